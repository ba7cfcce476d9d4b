//! A Hugging Face Qwen2 model folder with seeded random bf16 weights: `config.json` and one
//! `model.safetensors`, loadable by [`hip_core::model::Model::from_hf_dir`] and by
//! `transformers.AutoModelForCausalLM`.
//!
//! The weights are uniform random numbers from a fixed seed (SplitMix64, four bf16 values per
//! 64-bit draw), written straight to the file in bounded chunks: the 3.1 GB of Qwen2.5-1.5B take a
//! few seconds and little memory. Their scale follows the usual initialisation (standard deviation
//! 0.02 for matrices, embeddings and biases, RMSNorm weights 1), which keeps every activation
//! finite in bf16 and f32; the values say nothing about language, and speed does not depend on them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The shapes of a Qwen2 model (`model_type` "qwen2": q/k/v biases, half-split RoPE, SwiGLU).
#[derive(Debug, Clone, PartialEq)]
pub struct QwenShape {
    /// Hidden size.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// `max_position_embeddings` written to the config (the longest context the runs may reach).
    pub max_positions: usize,
}

impl QwenShape {
    /// Qwen2.5-1.5B: hidden 1536, 28 layers, 12 query / 2 KV heads of 128, FFN 8960, vocab
    /// 151,936, RoPE base 1e6, tied embeddings (1.54 B parameters, 3.1 GB in bf16).
    pub fn qwen25_1_5b() -> Self {
        QwenShape {
            hidden: 1536,
            layers: 28,
            heads: 12,
            kv_heads: 2,
            head_dim: 128,
            ffn: 8960,
            vocab: 151_936,
            rope_theta: 1e6,
            max_positions: 262_144,
        }
    }

    /// Llama-3.1-8B's dimensions in a Qwen2 folder: hidden 4096, 32 layers, 32 query / 8 KV heads
    /// of 128, FFN 14,336, vocab 128,256, RoPE base 5e5, room for 1M positions. It differs from
    /// Llama-3.1-8B in what does not change the speed of attention or the KV cache: q/k/v biases
    /// (Qwen2's, 6k parameters a layer), half-split RoPE, and tied embeddings (7.5 B parameters,
    /// 15 GB in bf16, instead of 8.0 B).
    pub fn llama31_8b() -> Self {
        QwenShape {
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            ffn: 14_336,
            vocab: 128_256,
            rope_theta: 5e5,
            max_positions: 1 << 21,
        }
    }

    /// A tiny Qwen2 (2 layers, hidden 128) for smoke runs and tests.
    pub fn tiny() -> Self {
        QwenShape {
            hidden: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            ffn: 256,
            vocab: 512,
            rope_theta: 1e6,
            max_positions: 262_144,
        }
    }

    /// Bytes of one token's K and V over all layers, at `elem_bytes` per element.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * elem_bytes
    }

    /// The `config.json` text. `seed` is recorded as `hip_bench_seed` so that a folder written
    /// with another seed is not reused.
    pub fn config_json(&self, seed: u64) -> String {
        let mut s = String::from("{\n");
        let mut kv = |k: &str, v: String| s.push_str(&format!("  \"{k}\": {v},\n"));
        kv("architectures", "[\"Qwen2ForCausalLM\"]".into());
        kv("model_type", "\"qwen2\"".into());
        kv("hidden_size", self.hidden.to_string());
        kv("intermediate_size", self.ffn.to_string());
        kv("num_hidden_layers", self.layers.to_string());
        kv("num_attention_heads", self.heads.to_string());
        kv("num_key_value_heads", self.kv_heads.to_string());
        kv("head_dim", self.head_dim.to_string());
        kv("vocab_size", self.vocab.to_string());
        kv("max_position_embeddings", self.max_positions.to_string());
        kv("max_window_layers", self.layers.to_string());
        kv("hidden_act", "\"silu\"".into());
        kv("rms_norm_eps", "1e-06".into());
        // Both spellings: transformers 4.x reads `rope_theta`, 5.x `rope_parameters`.
        kv("rope_theta", format!("{:.1}", self.rope_theta));
        kv(
            "rope_parameters",
            format!("{{\"rope_type\": \"default\", \"rope_theta\": {:.1}}}", self.rope_theta),
        );
        kv("tie_word_embeddings", "true".into());
        kv("use_sliding_window", "false".into());
        kv("sliding_window", "null".into());
        kv("attention_dropout", "0.0".into());
        kv("initializer_range", "0.02".into());
        kv("use_cache", "true".into());
        kv("bos_token_id", "0".into());
        kv("eos_token_id", "1".into());
        kv("torch_dtype", "\"bfloat16\"".into());
        kv("hip_bench_seed", seed.to_string());
        s.push_str("  \"hip_bench_note\": \"seeded random weights for speed runs (hip-bench e2e)\"\n}\n");
        s
    }

    /// Every tensor of the checkpoint (HF names, row-major shapes) with its initialiser.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, hd) = (self.hidden, self.head_dim);
        let mut v = vec![
            TensorSpec::random("model.embed_tokens.weight", vec![self.vocab, h]),
            TensorSpec::ones("model.norm.weight", vec![h]),
        ];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push(TensorSpec::ones(&format!("{p}.input_layernorm.weight"), vec![h]));
            v.push(TensorSpec::ones(&format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, rows) in
                [("q_proj", self.heads * hd), ("k_proj", self.kv_heads * hd), ("v_proj", self.kv_heads * hd)]
            {
                v.push(TensorSpec::random(&format!("{p}.self_attn.{name}.weight"), vec![rows, h]));
                v.push(TensorSpec::random(&format!("{p}.self_attn.{name}.bias"), vec![rows]));
            }
            v.push(TensorSpec::random(&format!("{p}.self_attn.o_proj.weight"), vec![h, self.heads * hd]));
            v.push(TensorSpec::random(&format!("{p}.mlp.gate_proj.weight"), vec![self.ffn, h]));
            v.push(TensorSpec::random(&format!("{p}.mlp.up_proj.weight"), vec![self.ffn, h]));
            v.push(TensorSpec::random(&format!("{p}.mlp.down_proj.weight"), vec![h, self.ffn]));
        }
        v
    }

    /// Parameters of the checkpoint (the tied output projection counted once).
    pub fn parameters(&self) -> usize {
        self.tensors().iter().map(TensorSpec::numel).sum()
    }
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// HF name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// `None`: all ones (norm weights); `Some(std)`: uniform random with that standard deviation.
    pub std: Option<f32>,
}

/// Standard deviation of the random tensors (HF's `initializer_range` for Qwen2).
const STD: f32 = 0.02;

impl TensorSpec {
    fn random(name: &str, shape: Vec<usize>) -> Self {
        TensorSpec { name: name.to_string(), shape, std: Some(STD) }
    }
    fn ones(name: &str, shape: Vec<usize>) -> Self {
        TensorSpec { name: name.to_string(), shape, std: None }
    }
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// SplitMix64: a tiny, fast, well-mixed 64-bit generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// f32 to bf16 bits, rounding to nearest even (finite inputs).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Fills `out` (little-endian bf16) with the values of `spec`: uniform on `[-a, a)` with
/// `a = std * sqrt(3)`, from `rng`.
fn fill_bf16(spec: &TensorSpec, rng: &mut SplitMix64, out: &mut [u8]) {
    match spec.std {
        None => {
            let one = bf16_bits(1.0).to_le_bytes();
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&one);
            }
        }
        Some(std) => {
            let a = std * 3f32.sqrt();
            // 16 random bits per value: u in [0, 65536) maps to [-a, a).
            let step = 2.0 * a / 65536.0;
            for c in out.chunks_mut(8) {
                let r = rng.next_u64();
                for (i, v) in c.chunks_exact_mut(2).enumerate() {
                    let u = ((r >> (16 * i)) & 0xFFFF) as f32;
                    v.copy_from_slice(&bf16_bits(u * step - a).to_le_bytes());
                }
            }
        }
    }
}

/// The safetensors header (JSON, space-padded to a multiple of 8 bytes) and the data size.
fn header(tensors: &[TensorSpec]) -> (Vec<u8>, usize) {
    let mut s = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0usize;
    for t in tensors {
        let bytes = t.numel() * 2;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(
            ",\"{}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            t.name,
            shape.join(","),
            off,
            off + bytes
        ));
        off += bytes;
    }
    s.push('}');
    while s.len() % 8 != 0 {
        s.push(' ');
    }
    (s.into_bytes(), off)
}

/// Bytes of the `model.safetensors` that [`write_model_dir`] writes for `shape`.
pub fn safetensors_bytes(shape: &QwenShape) -> u64 {
    let (h, data) = header(&shape.tensors());
    (8 + h.len() + data) as u64
}

/// Writes `config.json` and `model.safetensors` of `shape` into `dir` (created if needed), or
/// keeps them when `dir` already holds this exact config (same shapes and seed) and a
/// `model.safetensors` of the expected size. Returns whether the folder was reused.
///
/// The weights file is written under a temporary name and renamed, and `config.json` last, so an
/// interrupted write is never mistaken for a complete folder.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_model_dir(dir: &Path, shape: &QwenShape, seed: u64) -> Result<bool, String> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| format!("{p}: {e}")
    };
    let config = shape.config_json(seed);
    let (cfg_path, st_path) = (dir.join("config.json"), dir.join("model.safetensors"));
    let same_config = std::fs::read_to_string(&cfg_path).is_ok_and(|c| c == config);
    let same_size = std::fs::metadata(&st_path).is_ok_and(|m| m.len() == safetensors_bytes(shape));
    if same_config && same_size {
        return Ok(true);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // A config of another shape must not outlive its weights.
    if cfg_path.exists() {
        std::fs::remove_file(&cfg_path).map_err(io(&cfg_path))?;
    }
    let tmp = dir.join("model.safetensors.partial");
    let tensors = shape.tensors();
    let (head, _) = header(&tensors);
    let mut w = BufWriter::with_capacity(1 << 22, File::create(&tmp).map_err(io(&tmp))?);
    w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io(&tmp))?;
    w.write_all(&head).map_err(io(&tmp))?;
    let mut buf = vec![0u8; 1 << 24];
    for (i, t) in tensors.iter().enumerate() {
        // One stream per tensor: the values of a tensor do not depend on the others.
        let mut rng = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let mut left = t.numel() * 2;
        while left > 0 {
            let n = left.min(buf.len());
            fill_bf16(t, &mut rng, &mut buf[..n]);
            w.write_all(&buf[..n]).map_err(io(&tmp))?;
            left -= n;
        }
    }
    w.into_inner().map_err(|e| format!("{}: {}", tmp.display(), e.error()))?.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &st_path).map_err(io(&st_path))?;
    std::fs::write(&cfg_path, config).map_err(io(&cfg_path))?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen25_parameter_count() {
        // Qwen2.5-1.5B: 1.54 B parameters with tied embeddings.
        let p = QwenShape::qwen25_1_5b().parameters();
        assert!((1_540_000_000..1_550_000_000).contains(&p), "{p}");
        // Llama-3.1-8B without its separate output projection (525 M): 7.50 B.
        let p = QwenShape::llama31_8b().parameters();
        assert!((7_500_000_000..7_510_000_000).contains(&p), "{p}");
        assert_eq!(QwenShape::llama31_8b().kv_bytes_per_token(2), 128 << 10);
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        assert_eq!(bf16_bits(0.0), 0);
    }

    #[test]
    fn random_values_have_the_scale() {
        let spec = TensorSpec::random("x", vec![4096]);
        let mut buf = vec![0u8; 8192];
        fill_bf16(&spec, &mut SplitMix64::new(7), &mut buf);
        let vals: Vec<f32> = buf
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32).sqrt();
        assert!(mean.abs() < 2e-3, "{mean}");
        assert!((std - STD).abs() < 2e-3, "{std}");
        assert!(vals.iter().all(|v| v.abs() <= STD * 3f32.sqrt() * 1.01));
    }
}
