//! Evaluation helpers: perplexity of a model over a token window.

use crate::attention::{AttentionBackend, AttentionState};
use crate::error::{Error, Result};
use crate::kv::{KvCacheConfig, PagedKvCache};
use crate::model::{LogitsWanted, Model, SeqChunk};

/// Perplexity of `tokens` under `model`: `exp(mean(-log p(t_i | t_<i)))` over positions 1.., with
/// the context prefilled in chunks of `chunk` tokens. Also returns the number of scored tokens.
///
/// # Errors
/// Fewer than 2 tokens, a zero chunk, model errors.
pub fn perplexity(
    model: &Model,
    backend: AttentionBackend,
    tokens: &[u32],
    chunk: usize,
) -> Result<(f64, usize)> {
    if tokens.len() < 2 {
        return Err(Error::arg("tokens", tokens.len(), "need at least 2 tokens"));
    }
    if chunk == 0 {
        return Err(Error::arg("chunk", 0, "must be at least 1"));
    }
    let c = model.config();
    let block = 16;
    let blocks = tokens.len().div_ceil(block) + 1;
    let kv_cfg = KvCacheConfig {
        num_layers: c.layers,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_size: block,
        num_blocks: blocks,
    };
    let mut kv = PagedKvCache::new(kv_cfg)?;
    let mut attn = AttentionState::new(backend)?;
    let seq = kv.add_sequence();
    let mut nll = 0f64;
    let mut scored = 0usize;
    for start in (0..tokens.len() - 1).step_by(chunk) {
        let end = (start + chunk).min(tokens.len() - 1);
        let input = &tokens[start..end];
        let logits = model.forward(
            &[SeqChunk { seq, tokens: input, logits: LogitsWanted::All }],
            &mut kv,
            &mut attn,
        )?;
        let rows = logits[0].to_vec2::<f32>()?;
        for (i, row) in rows.iter().enumerate() {
            nll += token_nll(row, tokens[start + i + 1]);
            scored += 1;
        }
    }
    Ok(((nll / scored as f64).exp(), scored))
}

/// `-log softmax(logits)[target]`, in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    lse - logits[target as usize] as f64
}
