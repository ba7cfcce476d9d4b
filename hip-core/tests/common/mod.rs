//! Helpers shared by the integration tests: the test assets fetched by `scripts/fetch-assets.sh`.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$HIP_ASSETS`, or `~/.cache/hip`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"))
}

/// A required asset: a missing one fails the test with instructions.
pub fn asset(name: &str) -> PathBuf {
    let p = assets_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

/// An opt-in asset: `None` when absent.
pub fn optional_asset(name: &str) -> Option<PathBuf> {
    let p = assets_dir().join(name);
    p.exists().then_some(p)
}

/// The SmolLM2-135M-Instruct GGUF (the default test model).
pub fn smollm2() -> PathBuf {
    asset("smollm2-135m-instruct-q4_1.gguf")
}

/// Index of the largest value (the first on ties of equal bits).
pub fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0 as u32).unwrap_or(0)
}

/// A HiP config that is sparse at a few hundred tokens: 64 selected tokens besides a 16-token
/// sink and a 32-token window, layer 0 dense, the decode mask refreshed every 3 steps.
pub fn sparse_hip() -> hip_core::HipConfig {
    hip_core::HipConfig::paper()
        .with_k(64)
        .with_query_block(32, 2)
        .with_sink_window(16, 32)
        .with_dense_layers(vec![0])
        .with_refresh_interval(3)
}

/// The shape of a small random Hugging Face model written by [`tiny_hf_model`].
#[derive(Debug, Clone, Copy)]
pub struct TinyDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub layers: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub max_positions: usize,
}

/// Writes a Hugging Face folder (config.json + model.safetensors) of `arch` ("llama", or "qwen2"
/// with q/k/v biases) with fresh random weights, and returns the weights by name. Large q/k
/// weights make attention peaked, so that a sparse selection matters.
pub fn tiny_hf_model(
    dir: &std::path::Path,
    arch: &str,
    d: TinyDims,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    use candle_core::{Device, Tensor};
    let hd = d.hidden / d.heads;
    let config = serde_json::json!({
        "model_type": arch, "hidden_size": d.hidden, "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads, "head_dim": hd, "intermediate_size": d.ffn,
        "num_hidden_layers": d.layers, "vocab_size": d.vocab, "max_position_embeddings": d.max_positions,
        "rms_norm_eps": d.rms_eps, "rope_theta": d.rope_theta, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t = std::collections::HashMap::new();
    let mut add = |name: String, shape: &[usize], std: f32, mean: f32| {
        t.insert(name, Tensor::randn(mean, std, shape, &Device::Cpu).unwrap());
    };
    add("model.embed_tokens.weight".into(), &[d.vocab, d.hidden], 1.0, 0.0);
    add("lm_head.weight".into(), &[d.vocab, d.hidden], 0.05, 0.0);
    add("model.norm.weight".into(), &[d.hidden], 0.05, 1.0);
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        for (name, rows, std) in [
            ("q_proj", d.heads * hd, 0.15),
            ("k_proj", d.kv_heads * hd, 0.15),
            ("v_proj", d.kv_heads * hd, 0.06),
        ] {
            add(format!("{p}.self_attn.{name}.weight"), &[rows, d.hidden], std, 0.0);
            if arch == "qwen2" {
                add(format!("{p}.self_attn.{name}.bias"), &[rows], 0.3, 0.0);
            }
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[d.hidden, d.heads * hd], 0.06, 0.0);
        add(format!("{p}.mlp.gate_proj.weight"), &[d.ffn, d.hidden], 0.06, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), &[d.ffn, d.hidden], 0.06, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), &[d.hidden, d.ffn], 0.06, 0.0);
        add(format!("{p}.input_layernorm.weight"), &[d.hidden], 0.05, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[d.hidden], 0.05, 1.0);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    t
}
