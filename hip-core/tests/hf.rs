//! A Hugging Face folder (config.json + model.safetensors) made from the SmolLM2 GGUF — weights
//! dequantized, renamed, and llama.cpp's q/k row permutation undone — runs like the GGUF.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{smollm2, tiny_hf_model, TinyDims};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::model::{LogitsWanted, Model, SeqChunk, WeightPolicy};
use hip_core::Error;

/// llama.cpp stores q/k rows of each head as interleaved pairs; HF stores two halves.
fn unpermute(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let hd = rows / heads;
    t.reshape((heads, hd / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn last_logits(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let c = model.config();
    let mut kv =
        PagedKvCache::new(KvCacheConfig::for_bytes(c.layers, c.kv_heads, c.head_dim, 16, 64 << 20).unwrap())
            .unwrap();
    let mut attn = AttentionState::new(AttentionBackend::Dense).unwrap();
    let seq = kv.add_sequence();
    model
        .forward(&[SeqChunk { seq, tokens: prompt, logits: LogitsWanted::Last }], &mut kv, &mut attn)
        .unwrap()[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn hf_folder_made_from_the_gguf_gives_the_same_logits() {
    // SAFETY (edition 2021 `set_var`): no other test in this binary reads this variable. With it
    // the GGUF model runs f32 weights too, so both sides compute the same float math.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    std::thread::spawn(|| {
        let path = smollm2();
        let mut f = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let gguf = Model::from_gguf_with(&path, &Device::Cpu, WeightPolicy::AsStored).unwrap();
        let c = gguf.config().clone();
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        for name in names {
            let t = content.tensor(&mut f, &name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let hf = if name == "token_embd.weight" {
                "model.embed_tokens.weight".to_string()
            } else if name == "output_norm.weight" {
                "model.norm.weight".to_string()
            } else if name == "output.weight" {
                "lm_head.weight".to_string()
            } else {
                let rest = name.strip_prefix("blk.").unwrap();
                let (l, what) = rest.split_once('.').unwrap();
                let hf_what = match what {
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    "attn_norm.weight" => "input_layernorm.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("model.layers.{l}.{hf_what}")
            };
            let t = if name.ends_with("attn_q.weight") {
                unpermute(&t, c.heads)
            } else if name.ends_with("attn_k.weight") {
                unpermute(&t, c.kv_heads)
            } else {
                t
            };
            out.insert(hf, t);
        }
        let dir = std::env::temp_dir().join(format!("hip-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
        let config = format!(
            r#"{{"model_type": "llama", "vocab_size": {}, "hidden_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {}, "intermediate_size": {}, "rope_theta": {}, "rms_norm_eps": {}, "max_position_embeddings": {}, "tie_word_embeddings": true}}"#,
            c.vocab_size, c.hidden, c.layers, c.heads, c.kv_heads, c.ffn, c.rope_theta, c.rms_eps, c.context_length
        );
        std::fs::write(dir.join("config.json"), config).unwrap();
        let hf = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
        assert_eq!(hf.config(), gguf.config());
        let prompt: Vec<u32> = (0..120u32).map(|i| 200 + (i * 7919) % 40000).collect();
        let (a, b) = (last_logits(&gguf, &prompt), last_logits(&hf, &prompt));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-3, "max abs logit difference {diff}");

        // Linear layers in a dtype that is not a float: refused before anything is read.
        let err = Model::from_hf_dir_with(&dir, &Device::Cpu, candle_core::DType::U32).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");

        // Bad folders: no config, unknown architecture, missing tensor.
        assert!(matches!(Model::from_hf_dir(dir.join("nope"), &Device::Cpu), Err(Error::Io { .. })));
        let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        std::fs::write(dir.join("config.json"), cfg_text.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
        assert!(matches!(Model::from_hf_dir(&dir, &Device::Cpu), Err(Error::UnsupportedArchitecture(_))));
        std::fs::write(dir.join("config.json"), cfg_text.replace("\"num_hidden_layers\": 30", "\"num_hidden_layers\": 31"))
            .unwrap();
        let err = Model::from_hf_dir(&dir, &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Format { ref what, .. } if what.contains("model.layers.30")), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .join()
    .unwrap();
}

/// A Qwen2 folder (q/k/v biases, which `Model::from_hf_dir` stacks into one product with the q/k/v
/// weights) against candle-transformers' own Qwen2 on the same random weights: last-token logits
/// of a prompt, and of a decode step over the cached prompt.
#[test]
fn hf_qwen2_with_biases_matches_candle_transformers() {
    use candle_transformers::models::qwen2;
    let (hid, heads, kv_heads, ffn, layers, vocab) = (128usize, 4usize, 2usize, 256usize, 2usize, 300usize);
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let dims = TinyDims {
        hidden: hid,
        heads,
        kv_heads,
        ffn,
        layers,
        vocab,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_positions: 512,
    };
    let t = tiny_hf_model(dir.path(), "qwen2", dims);

    let ours = Model::from_hf_dir(dir.path(), &dev).unwrap();
    let cfg = qwen2::Config {
        vocab_size: vocab,
        hidden_size: hid,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 512,
        sliding_window: 512,
        max_window_layers: layers,
        tie_word_embeddings: false,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = candle_nn::VarBuilder::from_tensors(t, candle_core::DType::F32, &dev);
    let mut theirs = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();

    let prompt: Vec<u32> = (0..97u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let c = ours.config();
    let mut kv =
        PagedKvCache::new(KvCacheConfig::for_bytes(c.layers, c.kv_heads, c.head_dim, 16, 16 << 20).unwrap())
            .unwrap();
    let mut attn = AttentionState::new(AttentionBackend::Dense).unwrap();
    let seq = kv.add_sequence();
    let mut step = |tokens: &[u32]| -> Vec<f32> {
        let chunk = SeqChunk { seq, tokens, logits: LogitsWanted::Last };
        ours.forward(&[chunk], &mut kv, &mut attn).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mut theirs_step = |tokens: &[u32], offset: usize| -> Vec<f32> {
        let ids = Tensor::new(tokens, &dev).unwrap().unsqueeze(0).unwrap();
        theirs.forward(&ids, offset).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let next = 17u32;
    for (what, a, b) in [
        ("prompt", step(&prompt), theirs_step(&prompt, 0)),
        ("decode step", step(&[next]), theirs_step(&[next], prompt.len())),
    ] {
        assert_eq!(a.len(), vocab, "{what}");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(scale > 0.1, "{what}: logits too small to compare ({scale})");
        assert!(
            diff <= 1e-3 * scale.max(1.0),
            "{what}: max abs logit difference {diff} (max |logit| {scale})"
        );
    }
}
