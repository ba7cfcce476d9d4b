//! Model hyper-parameters.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The supported transformer families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Arch {
    /// Llama (SmolLM2, Llama 2/3): interleaved RoPE on llama.cpp-permuted q/k weights, no biases.
    Llama,
    /// Qwen2 / Qwen2.5: half-split ("neox") RoPE, q/k/v biases.
    Qwen2,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub ffn: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Whether the output projection reuses the token embeddings.
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Checks the sizes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero sizes or heads that do not divide.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
        ] {
            if v == 0 {
                return Err(Error::arg(name, v, "must be at least 1"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return Err(Error::arg("kv_heads", self.kv_heads, format!("must divide heads = {}", self.heads)));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::arg("head_dim", self.head_dim, "must be even for RoPE"));
        }
        Ok(())
    }
}
