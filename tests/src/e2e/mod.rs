//! End-to-end speed of a whole model (`hip-bench e2e`): a Qwen2 model folder with seeded random
//! weights ([`model_dir`]), prefill and batched decode through hip-core ([`run`]), and the
//! result rows, in the JSON-lines schema that `scripts/hf_e2e_bench.py` (transformers + SDPA on
//! the same folder) also writes.

pub mod model_dir;
pub mod run;

pub use model_dir::{write_model_dir, QwenShape, SplitMix64};
pub use run::{PrefixMode, RunSpec};

use hip_core::HipConfig;

/// One result row: one engine and method at one context and decode batch.
#[derive(Debug, Clone)]
pub struct Row {
    /// `hip-core` (or `transformers` from the Python side).
    pub engine: String,
    /// `dense` or `hip` (or `sdpa`).
    pub method: String,
    /// Prompt tokens.
    pub context: usize,
    /// Decode batch.
    pub batch: usize,
    /// Prefill tokens per second of one sequence (batch 1; the same value in every batch row of
    /// a context and method).
    pub prefill_tok_s: f64,
    /// Seconds of that prefill.
    pub prefill_s: f64,
    /// Prefill chunk (tokens per forward).
    pub prefill_chunk: usize,
    /// Decode tokens per second over the whole batch.
    pub decode_tok_s: f64,
    /// Milliseconds per decode step (all sequences of the batch advance by one token).
    pub decode_ms_per_step: f64,
    /// Timed decode steps.
    pub decode_steps: usize,
    /// KV bytes of the batch's sequences (shared blocks counted per sequence).
    pub kv_bytes: usize,
    /// KV bytes held on the device (each block once, the template included).
    pub kv_bytes_in_use: usize,
    /// `copy` or `fork` (how the batch got the prompt's KV).
    pub prefix: String,
    /// The model's shape (`qwen2.5-1.5b`, `llama3.1-8b`, `tiny`).
    pub model: String,
    /// `forward` (a real prefill) or `fill` (the prompt's KV written from random values; the
    /// prefill numbers are then the fill's).
    pub prefill: String,
    /// The linear layers' products: `bf16` (weights and inputs), or `f32` / `tf32` (f32 weights,
    /// TF32 tensor cores allowed or not).
    pub matmul: String,
    /// Rounds of a paired decode (two methods alternating), 0 when decoded alone.
    pub paired_rounds: usize,
}

impl Row {
    /// The row as one line of JSON.
    pub fn json(&self) -> String {
        format!(
            "{{\"bench\":\"e2e\",\"engine\":\"{}\",\"method\":\"{}\",\"context\":{},\"batch\":{},\
             \"prefill_tok_s\":{:.3},\"prefill_s\":{:.4},\"prefill_batch\":1,\"prefill_chunk\":{},\
             \"decode_tok_s\":{:.3},\"decode_ms_per_step\":{:.4},\"decode_steps\":{},\"kv_bytes\":{},\
             \"kv_bytes_in_use\":{},\"prefix\":\"{}\",\"model\":\"{}\",\"prefill\":\"{}\",\"matmul\":\"{}\",\
             \"paired_rounds\":{},\"weights_dtype\":\"f32\",\"kv_dtype\":\"bf16\"}}",
            self.engine,
            self.method,
            self.context,
            self.batch,
            self.prefill_tok_s,
            self.prefill_s,
            self.prefill_chunk,
            self.decode_tok_s,
            self.decode_ms_per_step,
            self.decode_steps,
            self.kv_bytes,
            self.kv_bytes_in_use,
            self.prefix,
            self.model,
            self.prefill,
            self.matmul,
            self.paired_rounds
        )
    }

    /// The header of [`markdown`](Self::markdown) rows.
    pub fn markdown_header() -> &'static str {
        "| engine | method | T | batch | prefill tok/s | decode tok/s | ms/step | KV GB |\n\
         |---|---|---|---|---|---|---|---|"
    }

    /// The row as a markdown table row.
    pub fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} |",
            self.engine,
            self.method,
            self.context,
            self.batch,
            self.prefill_tok_s,
            self.decode_tok_s,
            self.decode_ms_per_step,
            self.kv_bytes as f64 / 1e9
        )
    }
}

/// [`HipConfig::paper`] changed by a comma-separated list of `key=value`: `k=N`, `bq=SIZE[/STRIDE]`,
/// `bk=SIZE[/STRIDE]`, `sink=N`, `window=N`, `refresh=N`, `dense=L:L:...` (or `dense=none`).
/// The result is validated.
///
/// # Errors
/// An unknown key, a value that is not a number, or a config that fails validation.
pub fn parse_hip_config(s: &str) -> Result<HipConfig, String> {
    let mut cfg = HipConfig::paper();
    let num = |k: &str, v: &str| {
        v.trim().parse::<usize>().map_err(|_| format!("--hip-config {k}: {v:?} is not a number"))
    };
    let pair = |k: &str, v: &str, stride: usize| -> Result<(usize, usize), String> {
        match v.split_once('/') {
            Some((a, b)) => Ok((num(k, a)?, num(k, b)?)),
            None => Ok((num(k, v)?, stride)),
        }
    };
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) =
            item.split_once('=').ok_or_else(|| format!("--hip-config: {item:?} is not key=value"))?;
        match k.trim() {
            "k" => cfg.k = num(k, v)?,
            "bq" => (cfg.block_size_q, cfg.block_stride_q) = pair(k, v, cfg.block_stride_q)?,
            "bk" => (cfg.block_size_k, cfg.block_stride_k) = pair(k, v, cfg.block_stride_k)?,
            "sink" => cfg.sink_tokens = num(k, v)?,
            "window" => cfg.window_tokens = num(k, v)?,
            "refresh" => cfg.refresh_interval = num(k, v)?,
            "dense" => {
                cfg.dense_layers = if v.trim() == "none" {
                    Vec::new()
                } else {
                    v.split(':').map(|x| num(k, x)).collect::<Result<_, _>>()?
                }
            }
            other => {
                return Err(format!(
                    "--hip-config: unknown key {other:?} (known: k, bq, bk, sink, window, refresh, dense)"
                ))
            }
        }
    }
    cfg.validate().map_err(|e| format!("--hip-config {s:?}: {e}"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests;
