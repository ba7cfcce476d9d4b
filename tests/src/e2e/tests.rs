//! The e2e bench on the CPU with the tiny Qwen2: the folder loads, the runner measures, copies
//! and forks of the prompt give the sequences the same next token as the template would get.

use candle_core::Device;
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::model::{LogitsWanted, Model, SeqChunk};

use super::run::{self, PrefixMode, RunSpec};
use super::*;

fn tmp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hip-e2e-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn sparse() -> HipConfig {
    parse_hip_config("k=64,sink=16,window=32,dense=0,refresh=3").unwrap()
}

#[test]
fn the_folder_is_written_once_and_loads() {
    let dir = tmp_dir("write");
    let shape = QwenShape::tiny();
    assert!(!write_model_dir(&dir, &shape, 1).unwrap());
    assert!(write_model_dir(&dir, &shape, 1).unwrap(), "same seed and shape: reused");
    assert!(!write_model_dir(&dir, &shape, 2).unwrap(), "another seed: rewritten");
    let bytes = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    assert_eq!(bytes, model_dir::safetensors_bytes(&shape));
    let m = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
    let c = m.config();
    assert_eq!((c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim), (128, 2, 4, 2, 32));
    assert!(c.tied_embeddings);
    assert_eq!(c.rope_theta, 1e6);
    // The logits are finite and not all equal.
    let mut kv = run::new_cache(&m, 64, 16).unwrap();
    let mut attn = AttentionState::new(AttentionBackend::Dense).unwrap();
    let seq = kv.add_sequence();
    let toks = run::prompt(20, c.vocab_size, 3);
    let out = m
        .forward(&[SeqChunk { seq, tokens: &toks, logits: LogitsWanted::Last }], &mut kv, &mut attn)
        .unwrap();
    let v = out[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    assert!(v.iter().any(|x| (x - v[0]).abs() > 1e-6));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runner_measures_dense_and_hip_with_copies_and_forks() {
    let dir = tmp_dir("run");
    write_model_dir(&dir, &QwenShape::tiny(), 5).unwrap();
    let m = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
    for prefix in [PrefixMode::Copy, PrefixMode::Fork] {
        // 300 tokens: not a multiple of the block size, so forks copy a partial block.
        let spec = RunSpec {
            context: 300,
            batches: vec![1, 3],
            decode: 4,
            decode_warmup: 3,
            chunk: 128,
            prefix,
            block_size: 16,
            seed: 9,
            offload: None,
            fill: false,
        };
        for backend in [AttentionBackend::Dense, AttentionBackend::Hip(sparse())] {
            let (pre, decs) = run::run(&m, backend, &spec).unwrap();
            assert!(pre.tok_s > 0.0 && pre.seconds > 0.0);
            assert_eq!(decs.len(), 2);
            for d in &decs {
                assert!(d.tok_s > 0.0);
                assert_eq!(d.steps, 4);
                // Host cache: a block is 2 (K, V) x 2 layers x 16 tokens x 64 floats x 4 bytes.
                let block = 2 * 2 * 16 * 64 * 4;
                // 300 + 3 + 4 = 307 tokens: 20 blocks a sequence; the template holds 19.
                assert_eq!(d.kv_bytes, d.batch * 20 * block);
                let own = match prefix {
                    PrefixMode::Copy => 20,
                    // 18 full blocks shared; the partial 19th copied on write, the 20th new.
                    PrefixMode::Fork => 2,
                };
                assert_eq!(d.kv_bytes_in_use, (19 + d.batch * own) * block, "{prefix:?}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn filled_prompts_decode_and_paired_runs_alternate() {
    let dir = tmp_dir("fill");
    write_model_dir(&dir, &QwenShape::tiny(), 5).unwrap();
    let m = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
    // The fill writes the whole context into a sequence of its own, without the model.
    let mut kv = run::new_cache(&m, 512, 16).unwrap();
    let (seq, f) = run::fill(&m, &mut kv, 300, 128, 4).unwrap();
    assert_eq!(kv.len(seq).unwrap(), 300);
    assert!(f.seconds > 0.0);
    let (k, v) = kv.gather_layer(seq, 1, 300).unwrap();
    assert!(k.iter().chain(&v).all(|x| x.is_finite()));
    let mean_sq = k.iter().map(|x| x * x).sum::<f32>() / k.len() as f32;
    assert!((0.8..1.2).contains(&mean_sq), "standard normal values: {mean_sq}");
    assert!(run::fill(&m, &mut kv, 0, 128, 4).is_err());
    // Paired: dense and HiP over filled prompts, 3 rounds of 2 steps, each side summing them.
    let spec = RunSpec {
        context: 300,
        batches: vec![1, 2],
        decode: 6,
        decode_warmup: 1,
        chunk: 128,
        prefix: PrefixMode::Fork,
        block_size: 16,
        seed: 9,
        offload: None,
        fill: true,
    };
    let p = run::paired(&m, (AttentionBackend::Dense, &spec), (AttentionBackend::Hip(sparse()), &spec), 3)
        .unwrap();
    for (side, (pre, decs)) in [&p.a, &p.b].into_iter().enumerate() {
        assert!(pre.tok_s > 0.0, "side {side}");
        assert_eq!(decs.iter().map(|d| (d.batch, d.steps)).collect::<Vec<_>>(), [(1, 6), (2, 6)]);
        assert!(decs.iter().all(|d| d.tok_s > 0.0 && d.seconds > 0.0));
    }
    assert_eq!(p.round_ratios.len(), 2);
    assert!(p.round_ratios.iter().all(|r| r.len() == 3 && r.iter().all(|x| x.is_finite() && *x > 0.0)));
    assert!(run::paired(&m, (AttentionBackend::Dense, &spec), (AttentionBackend::Dense, &spec), 4).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn copies_and_forks_continue_like_the_template() {
    // The first decode step of a copied or forked sequence gives the same logits as the template.
    let dir = tmp_dir("copy");
    write_model_dir(&dir, &QwenShape::tiny(), 5).unwrap();
    let m = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
    let toks = run::prompt(100, m.config().vocab_size, 1);
    let mut kv = run::new_cache(&m, 1024, 16).unwrap();
    let mut attn = AttentionState::new(AttentionBackend::Dense).unwrap();
    let (template, first, _) = run::prefill(&m, &mut kv, &mut attn, &toks, 64).unwrap();
    let next = |kv: &mut hip_core::kv::PagedKvCache, attn: &mut AttentionState, seq| {
        let c = SeqChunk { seq, tokens: std::slice::from_ref(&first), logits: LogitsWanted::Last };
        m.forward(&[c], kv, attn).unwrap()[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let forked = kv.fork(template).unwrap();
    let a = next(&mut kv, &mut attn, forked);
    let b = next(&mut kv, &mut attn, template);
    assert_eq!(a, b);
    kv.truncate(template, 100).unwrap();
    let copied = run::copy_sequence(&mut kv, template).unwrap();
    assert_eq!(kv.len(copied).unwrap(), 100);
    assert_eq!(next(&mut kv, &mut attn, copied), b);
    kv.remove_sequence(copied).unwrap();
    let d = run::decode(&m, &mut kv, &mut attn, template, first, 2, 0, 1, PrefixMode::Copy).unwrap();
    assert_eq!(d.batch, 2);
    assert_eq!(kv.len(template).unwrap(), 100);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hip_config_parsing() {
    let c = parse_hip_config("k=256, bq=32/4, bk=4, window=128, sink=8, refresh=4, dense=0:1").unwrap();
    assert_eq!((c.k, c.block_size_q, c.block_stride_q, c.block_size_k), (256, 32, 4, 4));
    assert_eq!((c.window_tokens, c.sink_tokens, c.refresh_interval), (128, 8, 4));
    assert_eq!(c.dense_layers, vec![0, 1]);
    assert_eq!(parse_hip_config("").unwrap(), HipConfig::paper());
    assert!(parse_hip_config("dense=none").unwrap().dense_layers.is_empty());
    assert!(parse_hip_config("k=abc").unwrap_err().contains("not a number"));
    assert!(parse_hip_config("q=1").unwrap_err().contains("unknown key"));
    assert!(parse_hip_config("k").unwrap_err().contains("key=value"));
    assert!(parse_hip_config("k=511").is_err(), "validated");
}

#[test]
fn rows_serialise() {
    let r = Row {
        engine: "hip-core".into(),
        method: "hip".into(),
        context: 4096,
        batch: 16,
        prefill_tok_s: 1234.5,
        prefill_s: 3.3,
        prefill_chunk: 4096,
        decode_tok_s: 99.0,
        decode_ms_per_step: 161.6,
        decode_steps: 64,
        kv_bytes: 2_000_000_000,
        kv_bytes_in_use: 2_100_000_000,
        prefix: "copy".into(),
        model: "qwen2.5-1.5b".into(),
        prefill: "forward".into(),
        matmul: "f32".into(),
        paired_rounds: 0,
    };
    let j = r.json();
    assert!(
        j.contains(
            "\"model\":\"qwen2.5-1.5b\",\"prefill\":\"forward\",\"matmul\":\"f32\",\"paired_rounds\":0,"
        ),
        "{j}"
    );
    assert!(j.starts_with(
        "{\"bench\":\"e2e\",\"engine\":\"hip-core\",\"method\":\"hip\",\"context\":4096,\"batch\":16,"
    ));
    assert!(j.ends_with("\"kv_dtype\":\"bf16\"}"));
    assert_eq!(r.markdown(), "| hip-core | hip | 4096 | 16 | 1234 | 99.0 | 161.60 | 2.00 |");
}
