//! Where the time of a GPU prefill goes (feature `cuda`; run on the GPU host): a SmolLM2-shaped
//! Llama with random weights, chunks of 512 tokens up to 8k through `Model::forward` with the KV
//! cache on the device, dense and HiP; then the pieces of one chunk timed alone (K/V writes,
//! attention of every layer, the whole forward).
//!
//! `cargo run --release --features cuda -p hip-core --example gpu_prefill_profile`
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::model::{LogitsWanted, Model, SeqChunk};
use hip_core::HipConfig;

fn sync(dev: &Device) {
    if let Device::Cuda(d) = dev {
        d.cuda_stream().synchronize().unwrap();
    }
}

fn main() {
    let (hid, heads, kv, hd, ffn, layers, vocab) = (576, 9, 3, 64, 1536, 30, 49152);
    let dir = std::env::temp_dir().join("hip-profile-model");
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hid, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": ffn,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize], std: f32, mean: f32| {
        t.insert(name, Tensor::randn(mean, std, shape, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
    };
    add("model.embed_tokens.weight".into(), &[vocab, hid], 0.5, 0.0);
    add("model.norm.weight".into(), &[hid], 0.05, 1.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, r, c) in [
            ("self_attn.q_proj", heads * hd, hid),
            ("self_attn.k_proj", kv * hd, hid),
            ("self_attn.v_proj", kv * hd, hid),
            ("self_attn.o_proj", hid, heads * hd),
            ("mlp.gate_proj", ffn, hid),
            ("mlp.up_proj", ffn, hid),
            ("mlp.down_proj", hid, ffn),
        ] {
            add(format!("{p}.{n}.weight"), &[r, c], 0.05, 0.0);
        }
        add(format!("{p}.input_layernorm.weight"), &[hid], 0.05, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[hid], 0.05, 1.0);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let dev = Device::new_cuda(0).unwrap();
    let model = Model::from_hf_dir(&dir, &dev).unwrap();
    let tokens: Vec<u32> = (0..8192u32).map(|i| (i * 7919 + 13) % vocab as u32).collect();
    let hip = HipConfig::paper();
    for (name, backend) in [("dense", AttentionBackend::Dense), ("hip", AttentionBackend::Hip(hip))] {
        let cfg = KvCacheConfig::for_bytes(layers, kv, hd, 16, 2 << 30).unwrap();
        let mut cache = PagedKvCache::new_on_device(cfg, &dev, DType::BF16).unwrap();
        let mut attn = AttentionState::new(backend).unwrap();
        let seq = cache.add_sequence();
        let mut line = format!("{name}: ms per 512-token chunk:");
        let total = Instant::now();
        for c in tokens.chunks(512) {
            let s = Instant::now();
            let chunk = SeqChunk { seq, tokens: c, logits: LogitsWanted::Last };
            let out = model.forward(&[chunk], &mut cache, &mut attn).unwrap();
            let _ = out[0].to_device(&Device::Cpu).unwrap();
            line += &format!(" {:.0}", s.elapsed().as_secs_f64() * 1e3);
        }
        println!("{line}\n{name}: 8192 tokens in {:.2} s", total.elapsed().as_secs_f64());
        // The pieces of one more chunk, alone: K/V writes of every layer, attention of every layer.
        let n = 512;
        let k = Tensor::randn(0f32, 1.0, (n, kv, hd), &dev).unwrap();
        cache.reserve(seq, n).unwrap();
        sync(&dev);
        let s = Instant::now();
        for l in 0..layers {
            cache.write_tensor(seq, l, &k, &k).unwrap();
        }
        sync(&dev);
        let w = s.elapsed().as_secs_f64() * 1e3;
        let len = cache.len(seq).unwrap() + n;
        let q = Tensor::randn(0f32, 1.0, (1, n, heads, hd), &dev).unwrap();
        let s = Instant::now();
        for l in 0..layers {
            let view = cache.device_layer(seq, l, len).unwrap();
            attn.attend_device(l, seq, &q, &view, 0.125).unwrap();
        }
        sync(&dev);
        let a = s.elapsed().as_secs_f64() * 1e3;
        println!("{name}: one chunk at {len} tokens: K/V writes {w:.1} ms, attention {a:.1} ms (all {layers} layers)");
    }
}
