//! Evaluation helpers: perplexity of a model over a token window (all of it, or only its last
//! tokens after a long context) and greedy completions of a prompt, each on a fresh KV cache with
//! a chosen [`AttentionBackend`]. A model on a CUDA device gets its cache on the device (bf16),
//! as in the engine.

use crate::attention::{AttentionBackend, AttentionState};
use crate::error::{Error, Result};
use crate::kv::{KvCacheConfig, PagedKvCache, SeqId};
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
    let scored = tokens.len().saturating_sub(1);
    perplexity_of_last(model, backend, tokens, chunk, scored.max(1))
}

/// Perplexity of the last `score_last` tokens of `tokens` given everything before them: the
/// first `tokens.len() - score_last` tokens are prefilled as context (in chunks of `chunk`, no
/// logits), then the scored part runs in chunks of `chunk` with logits at every position.
/// Returns the perplexity and the number of scored tokens (`score_last`).
///
/// This is the long-context perplexity: with a window of T tokens, every scored token sees at
/// least `T - score_last` tokens of context.
///
/// # Errors
/// Fewer than 2 tokens, `score_last` zero or not below `tokens.len()`, a zero chunk, model errors.
pub fn perplexity_of_last(
    model: &Model,
    backend: AttentionBackend,
    tokens: &[u32],
    chunk: usize,
    score_last: usize,
) -> Result<(f64, usize)> {
    if tokens.len() < 2 {
        return Err(Error::arg("tokens", tokens.len(), "need at least 2 tokens"));
    }
    if score_last == 0 || score_last >= tokens.len() {
        return Err(Error::arg(
            "score_last",
            score_last,
            format!("must be in 1..{} (the window has {} tokens)", tokens.len(), tokens.len()),
        ));
    }
    check_chunk(chunk)?;
    let mut run = Run::new(model, backend, tokens.len())?;
    // Token i predicts token i + 1: the inputs whose predictions are scored are the
    // `score_last` positions before the last one.
    let first_scored_input = tokens.len() - 1 - score_last;
    run.prefill(&tokens[..first_scored_input], chunk)?;
    let mut nll = 0f64;
    let mut scored = 0usize;
    for start in (first_scored_input..tokens.len() - 1).step_by(chunk) {
        let end = (start + chunk).min(tokens.len() - 1);
        let logits = run.forward(&tokens[start..end], LogitsWanted::All)?;
        for (i, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
            nll += token_nll(row, tokens[start + i + 1]);
            scored += 1;
        }
    }
    Ok(((nll / scored as f64).exp(), scored))
}

/// Greedy continuation of `prompt`: prefills it in chunks of `chunk` tokens, then decodes one
/// token at a time (the decode path of the backend: HiP reuses its cached masks) until
/// `max_new` tokens or a token in `stop`. Returns the new tokens (a stop token included).
///
/// # Errors
/// An empty prompt, a zero chunk, model errors.
pub fn greedy_completion(
    model: &Model,
    backend: AttentionBackend,
    prompt: &[u32],
    max_new: usize,
    chunk: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::arg("prompt", 0, "need at least 1 token"));
    }
    check_chunk(chunk)?;
    let mut run = Run::new(model, backend, prompt.len() + max_new)?;
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(out);
    }
    let (head, last) = prompt.split_at(prompt.len() - 1);
    run.prefill(head, chunk)?;
    let mut next = last.to_vec();
    while out.len() < max_new {
        let logits = run.forward(&next, LogitsWanted::Last)?;
        let row = logits.flatten_all()?.to_vec1::<f32>()?;
        let tok = argmax(&row);
        out.push(tok);
        if stop.contains(&tok) {
            break;
        }
        next = vec![tok];
    }
    Ok(out)
}

/// `-log softmax(logits)[target]`, in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    lse - logits[target as usize] as f64
}

/// Index of the largest logit (the first on ties).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn check_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::arg("chunk", 0, "must be at least 1"));
    }
    Ok(())
}

/// One sequence on a fresh KV cache sized for `capacity` tokens.
struct Run<'m> {
    model: &'m Model,
    kv: PagedKvCache,
    attn: AttentionState,
    seq: SeqId,
}

impl<'m> Run<'m> {
    fn new(model: &'m Model, backend: AttentionBackend, capacity: usize) -> Result<Self> {
        let c = model.config();
        let block = 16;
        let kv_cfg = KvCacheConfig {
            num_layers: c.layers,
            num_kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            block_size: block,
            num_blocks: capacity.div_ceil(block) + 1,
        };
        // Like the engine: a model on a GPU keeps its cache there (bf16).
        let mut kv = if model.device().is_cuda() {
            PagedKvCache::new_on_device(kv_cfg, model.device(), candle_core::DType::BF16)?
        } else {
            PagedKvCache::new(kv_cfg)?
        };
        let attn = AttentionState::new(backend)?;
        let seq = kv.add_sequence();
        Ok(Run { model, kv, attn, seq })
    }

    fn forward(&mut self, tokens: &[u32], logits: LogitsWanted) -> Result<candle_core::Tensor> {
        let chunk = SeqChunk { seq: self.seq, tokens, logits };
        let mut out = self.model.forward(&[chunk], &mut self.kv, &mut self.attn)?;
        Ok(out.remove(0))
    }

    fn prefill(&mut self, tokens: &[u32], chunk: usize) -> Result<()> {
        for part in tokens.chunks(chunk) {
            self.forward(part, LogitsWanted::None)?;
        }
        Ok(())
    }
}
