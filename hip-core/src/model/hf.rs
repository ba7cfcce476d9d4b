//! Hugging Face model folders: `config.json` + `*.safetensors` (f32 / f16 / bf16 weights).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{Arch, ModelConfig};
use super::layers::{Linear, Mlp, Qkv, RmsNorm, Rope};
use super::weights::{Block, Model};
use crate::error::{Error, Result};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Reads the hyper-parameters of a `config.json`.
fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let where_ = path.display().to_string();
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(where_.clone(), format!("invalid JSON: {e}")))?;
    let arch = match v.get("model_type").and_then(|x| x.as_str()) {
        Some("llama") => Arch::Llama,
        Some("qwen2") => Arch::Qwen2,
        Some(other) => return Err(Error::UnsupportedArchitecture(other.to_string())),
        None => return Err(Error::format(where_, "missing model_type")),
    };
    let int = |key: &str| -> Result<usize> {
        v.get(key)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| Error::format(where_.clone(), format!("missing or non-integer {key}")))
    };
    let heads = int("num_attention_heads")?;
    let hidden = int("hidden_size")?;
    let cfg = ModelConfig {
        arch,
        vocab_size: int("vocab_size")?,
        hidden,
        layers: int("num_hidden_layers")?,
        heads,
        kv_heads: int("num_key_value_heads").unwrap_or(heads),
        head_dim: int("head_dim").unwrap_or(hidden / heads.max(1)),
        ffn: int("intermediate_size")?,
        rope_theta: v.get("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10_000.0) as f32,
        rms_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6) as f32,
        context_length: int("max_position_embeddings").unwrap_or(4096),
        tied_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
    };
    cfg.validate()?;
    Ok(cfg)
}

impl Model {
    /// Loads a Hugging Face model folder: `config.json` (`model_type` llama or qwen2) and every
    /// `*.safetensors` file in it (f32, f16 or bf16). HF checkpoints use half-split RoPE for both
    /// families.
    ///
    /// On a CUDA device the linear layers keep their weights in bf16 and take bf16 inputs (half
    /// the bytes a decode step reads, and tensor-core products), with the residual stream, the
    /// norms and the logits in f32; on the CPU everything is f32. [`Model::from_hf_dir_with`]
    /// picks the weights' dtype.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing folder or file, [`Error::Format`] for invalid JSON, unreadable
    /// safetensors, missing tensors or wrong shapes (naming the tensor),
    /// [`Error::UnsupportedArchitecture`].
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let weights = if device.is_cuda() { DType::BF16 } else { DType::F32 };
        Self::from_hf_dir_with(dir, device, weights)
    }

    /// [`Model::from_hf_dir`] with the linear layers' weights (and their inputs) in `weights`:
    /// f32, bf16 or f16.
    ///
    /// # Errors
    /// As [`Model::from_hf_dir`]; [`Error::InvalidArgument`] for another dtype.
    pub fn from_hf_dir_with(dir: impl AsRef<Path>, device: &Device, weights: DType) -> Result<Self> {
        if !matches!(weights, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::arg("weights", format!("{weights:?}"), "must be f32, bf16 or f16"));
        }
        let dir = dir.as_ref();
        let cfg = read_config(dir)?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::format(dir.display().to_string(), "no *.safetensors file"));
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut h = Sha256::new();
        h.update(std::fs::read(dir.join("config.json")).map_err(io(&dir.join("config.json")))?);
        for f in &files {
            let t = candle_core::safetensors::load(f, device).map_err(|e| {
                Error::format(f.display().to_string(), format!("unreadable safetensors: {e}"))
            })?;
            tensors.extend(t);
        }
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for n in names {
            h.update(n.as_bytes());
            h.update(format!("{:?}{:?}", tensors[n].dtype(), tensors[n].dims()).as_bytes());
            // Tie the fingerprint to the weight values cheaply: the first elements of each tensor.
            let flat = tensors[n].flatten_all()?;
            let head = flat.narrow(0, 0, flat.dim(0)?.min(64))?.to_dtype(candle_core::DType::F32)?;
            for x in head.to_vec1::<f32>()? {
                h.update(x.to_le_bytes());
            }
        }
        let fingerprint = format!("{:x}", h.finalize());
        let where_ = dir.display().to_string();
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| Error::format(where_.clone(), format!("missing tensor {name}")))?;
            if t.dims() != shape {
                return Err(Error::format(
                    where_.clone(),
                    format!("tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
                ));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let (hd, hid) = (cfg.head_dim, cfg.hidden);
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, hid])?;
        let output = if cfg.tied_embeddings {
            Linear::from_tensor(embed.to_dtype(weights)?, None)?
        } else {
            Linear::from_tensor(get("lm_head.weight", &[cfg.vocab_size, hid])?.to_dtype(weights)?, None)?
        };
        let norm = RmsNorm::from_tensor(get("model.norm.weight", &[hid])?, cfg.rms_eps);
        let bias = cfg.arch == Arch::Qwen2;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("model.layers.{l}");
            // Gate and up stacked into one product (Mlp::fused).
            let gate = get(&format!("{p}.mlp.gate_proj.weight"), &[cfg.ffn, hid])?.to_dtype(weights)?;
            let up = get(&format!("{p}.mlp.up_proj.weight"), &[cfg.ffn, hid])?.to_dtype(weights)?;
            // q, k and v stacked into one product (Qkv::fused).
            let (wq, wkv) = (cfg.heads * hd, cfg.kv_heads * hd);
            let mut qkv_w = Vec::with_capacity(3);
            let mut qkv_b = Vec::with_capacity(3);
            for (name, rows) in [("q_proj", wq), ("k_proj", wkv), ("v_proj", wkv)] {
                qkv_w.push(get(&format!("{p}.self_attn.{name}.weight"), &[rows, hid])?.to_dtype(weights)?);
                if bias {
                    qkv_b.push(get(&format!("{p}.self_attn.{name}.bias"), &[rows])?);
                }
            }
            let [qw, kw, vw]: [Tensor; 3] = qkv_w.try_into().expect("three weights");
            let b: Option<[Tensor; 3]> = qkv_b.try_into().ok();
            let mut lin = |name: &str, rows: usize, cols: usize, with_bias: bool| -> Result<Linear> {
                let w = get(&format!("{p}.{name}.weight"), &[rows, cols])?.to_dtype(weights)?;
                let b = if with_bias { Some(get(&format!("{p}.{name}.bias"), &[rows])?) } else { None };
                Linear::from_tensor(w, b)
            };
            let qkv = Qkv::fused(qw, kw, vw, b)?;
            let o = lin("self_attn.o_proj", hid, cfg.heads * hd, false)?;
            let down = lin("mlp.down_proj", hid, cfg.ffn, false)?;
            let mlp = Mlp::fused(gate, up, down)?;
            let attn_norm =
                RmsNorm::from_tensor(get(&format!("{p}.input_layernorm.weight"), &[hid])?, cfg.rms_eps);
            let ffn_norm = RmsNorm::from_tensor(
                get(&format!("{p}.post_attention_layernorm.weight"), &[hid])?,
                cfg.rms_eps,
            );
            blocks.push(Block { attn_norm, qkv, o, ffn_norm, mlp });
        }
        let rope = Rope::new(hd, cfg.rope_theta, false)?;
        Ok(Model { cfg, embed, blocks, norm, output, rope, device: device.clone(), fingerprint })
    }
}
