//! [`HipConfig`]: every knob of HiP attention, its published defaults and validation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Configuration of HiP (hierarchically pruned) attention.
///
/// Each query block of `block_size_q` queries attends to
/// * the first `sink_tokens` keys (attention sinks),
/// * its last `window_tokens` keys (a sliding window, per query),
/// * `k` further tokens: `k / block_size_k` key blocks chosen by the hierarchical top-k tree search
///   of the HiP paper (arXiv 2406.09827 §3).
///
/// The last `tail_queries` queries of a prefill chunk form query blocks of their own
/// (`tail_block_size_q` queries, every one scoring), so the question at the end of a prompt does
/// not share the document's mask ([`HipConfig::default`] has a tail of 64, [`HipConfig::paper`]
/// none).
///
/// Scores of a branch in the tree search are the max of `q·k` over every `block_stride_q`-th query
/// of the block (counted back from its last, newest query) and every `block_stride_k`-th key of the branch's center block.
///
/// ```
/// use hip_kernels::HipConfig;
/// let cfg = HipConfig::paper();
/// assert_eq!(cfg.k, 512);
/// cfg.validate().unwrap();
/// let bad = HipConfig::paper().with_k(511);
/// assert!(bad.validate().is_err()); // k must be a multiple of block_size_k
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HipConfig {
    /// Tokens kept by the tree search per query block (`mask_k`); a multiple of `block_size_k`.
    pub k: usize,
    /// Queries per query block (`b_q`).
    pub block_size_q: usize,
    /// Stride over the block's queries when scoring a branch (`b_sq`); divides `block_size_q`.
    pub block_stride_q: usize,
    /// Keys per key block (`b_k`).
    pub block_size_k: usize,
    /// Stride over a representative block's keys when scoring (`b_sk`); divides `block_size_k`.
    pub block_stride_k: usize,
    /// Attention-sink tokens at the start of the context, always attended.
    pub sink_tokens: usize,
    /// Sliding-window tokens before (and including) each query, always attended.
    pub window_tokens: usize,
    /// Layers that run dense attention instead of HiP (the paper keeps the first layers dense).
    pub dense_layers: Vec<usize>,
    /// During decode, the mask is re-estimated every `refresh_interval` steps and reused in between.
    pub refresh_interval: usize,
    /// The last `tail_queries` queries of a prefill chunk get masks of their own: they are
    /// searched in query blocks of `tail_block_size_q` queries, every query scoring, instead of
    /// sharing the mask of a `block_size_q` block with the queries before them. At the end of a
    /// prompt these are the question's tokens; in a shared 64-query block their needs are
    /// outvoted by the document tokens before them (docs/quality.md). 0 turns it off (the
    /// published code's behaviour, [`HipConfig::paper`]); [`HipConfig::default`] uses 64.
    #[serde(default)]
    pub tail_queries: usize,
    /// Query block size of the tail (see `tail_queries`); 1 gives every tail query its own mask,
    /// as in decoding.
    #[serde(default = "one")]
    pub tail_block_size_q: usize,
    /// Dynamic RoPE for contexts past the model's trained length ([`crate::extend`]): the cache
    /// holds un-rotated keys and attention positions them itself. `None` (the default): the
    /// model rotates queries and keys as usual.
    #[serde(default)]
    pub rope_extend: Option<crate::extend::RopeExtend>,
}

fn one() -> usize {
    1
}

/// [`HipConfig::paper`] plus a prefill tail of 64 queries with masks of their own
/// (`tail_queries = 64`, `tail_block_size_q = 1`): the published defaults lose passkeys that dense
/// attention finds when the question shares a query block with the document before it
/// (docs/quality.md); the tail costs 64 single-query searches per prefill chunk.
///
/// ```
/// use hip_kernels::HipConfig;
/// let cfg = HipConfig::default();
/// assert_eq!((cfg.k, cfg.block_size_q, cfg.tail_queries, cfg.tail_block_size_q), (512, 64, 64, 1));
/// assert_eq!(HipConfig::paper().tail_queries, 0);
/// ```
impl Default for HipConfig {
    fn default() -> Self {
        Self::paper().with_prefill_tail(64, 1)
    }
}

impl HipConfig {
    /// The published defaults of the HiP reference serving code (hip-algorithm.md §1A, the vLLM
    /// backend row): `k = 512`, query blocks of 64 scored with stride 2, key blocks of 2 scored with
    /// stride 1, 16 sink tokens, a 256-token window, layers 0–2 dense, mask refresh every 8 decode steps.
    pub fn paper() -> Self {
        HipConfig {
            k: 512,
            block_size_q: 64,
            block_stride_q: 2,
            block_size_k: 2,
            block_stride_k: 1,
            sink_tokens: 16,
            window_tokens: 256,
            dense_layers: vec![0, 1, 2],
            refresh_interval: 8,
            tail_queries: 0,
            tail_block_size_q: 1,
            rope_extend: None,
        }
    }

    /// Sets `k` (tokens selected per query block).
    pub fn with_k(mut self, k: usize) -> Self {
        self.k = k;
        self
    }
    /// Sets the query block size and stride.
    pub fn with_query_block(mut self, size: usize, stride: usize) -> Self {
        self.block_size_q = size;
        self.block_stride_q = stride;
        self
    }
    /// Sets the key block size and stride.
    pub fn with_key_block(mut self, size: usize, stride: usize) -> Self {
        self.block_size_k = size;
        self.block_stride_k = stride;
        self
    }
    /// Sets the sink and sliding-window token counts.
    pub fn with_sink_window(mut self, sink_tokens: usize, window_tokens: usize) -> Self {
        self.sink_tokens = sink_tokens;
        self.window_tokens = window_tokens;
        self
    }
    /// Sets the dense layers.
    pub fn with_dense_layers(mut self, layers: impl Into<Vec<usize>>) -> Self {
        self.dense_layers = layers.into();
        self
    }
    /// Sets the decode mask refresh interval.
    pub fn with_refresh_interval(mut self, steps: usize) -> Self {
        self.refresh_interval = steps;
        self
    }

    /// Sets the prefill tail: the last `queries` queries of a chunk are searched in query blocks
    /// of `block_size_q` (stride 1). `queries = 0` turns it off.
    pub fn with_prefill_tail(mut self, queries: usize, block_size_q: usize) -> Self {
        self.tail_queries = queries;
        self.tail_block_size_q = block_size_q;
        self
    }

    /// Turns Dynamic RoPE on (`Some`) or off ([`crate::extend`]).
    pub fn with_rope_extend(mut self, extend: impl Into<Option<crate::extend::RopeExtend>>) -> Self {
        self.rope_extend = extend.into();
        self
    }

    /// How a prefill chunk of `t_q` queries splits: `None` when it is one part; else the number of
    /// head queries (searched with `self`, possibly 0) and the config of the tail.
    pub(crate) fn tail_split(&self, t_q: usize) -> Option<(usize, HipConfig)> {
        if self.tail_queries == 0 || t_q <= 1 {
            return None;
        }
        let tail = self.tail_queries.min(t_q);
        let cfg = self.clone().with_query_block(self.tail_block_size_q, 1);
        Some((t_q - tail, cfg))
    }

    /// Number of key blocks the tree search keeps per query block (`k / block_size_k`).
    pub fn selected_blocks(&self) -> usize {
        self.k / self.block_size_k.max(1)
    }

    /// Whether `layer` runs dense attention.
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        self.dense_layers.contains(&layer)
    }

    /// For each of `num_layers` layers, whether it runs HiP (not dense) attention: the layers
    /// KV-cache offloading moves to the host.
    ///
    /// ```
    /// let cfg = hip_kernels::HipConfig::paper(); // layers 0-2 dense
    /// assert_eq!(cfg.hip_layers(5), [false, false, false, true, true]);
    /// ```
    pub fn hip_layers(&self, num_layers: usize) -> Vec<bool> {
        (0..num_layers).map(|l| !self.is_dense_layer(l)).collect()
    }

    /// Checks every field and combination.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first offending field: a zero size, `k` not a multiple of
    /// `block_size_k`, a stride that does not divide its block size, sizes above 2^24, or
    /// duplicate dense layers.
    pub fn validate(&self) -> Result<()> {
        const MAX: usize = 1 << 24;
        let nonzero = [
            ("k", self.k),
            ("block_size_q", self.block_size_q),
            ("block_stride_q", self.block_stride_q),
            ("block_size_k", self.block_size_k),
            ("block_stride_k", self.block_stride_k),
            ("refresh_interval", self.refresh_interval),
            ("tail_block_size_q", self.tail_block_size_q),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(Error::config(name, v, "must be at least 1"));
            }
            if v > MAX {
                return Err(Error::config(name, v, format!("must be at most {MAX}")));
            }
        }
        for (name, v) in [
            ("sink_tokens", self.sink_tokens),
            ("window_tokens", self.window_tokens),
            ("tail_queries", self.tail_queries),
        ] {
            if v > MAX {
                return Err(Error::config(name, v, format!("must be at most {MAX}")));
            }
        }
        if self.k % self.block_size_k != 0 {
            return Err(Error::config(
                "k",
                self.k,
                format!("must be a multiple of block_size_k = {}", self.block_size_k),
            ));
        }
        if self.block_size_q % self.block_stride_q != 0 {
            return Err(Error::config(
                "block_stride_q",
                self.block_stride_q,
                format!("must divide block_size_q = {}", self.block_size_q),
            ));
        }
        if self.block_size_k % self.block_stride_k != 0 {
            return Err(Error::config(
                "block_stride_k",
                self.block_stride_k,
                format!("must divide block_size_k = {}", self.block_size_k),
            ));
        }
        if let Some(ext) = &self.rope_extend {
            if ext.dense_layer_k == 0 || ext.dense_layer_k > MAX {
                return Err(Error::config(
                    "rope_extend.dense_layer_k",
                    ext.dense_layer_k,
                    format!("must be in 1..={MAX}"),
                ));
            }
        }
        let mut layers = self.dense_layers.clone();
        layers.sort_unstable();
        if let Some(w) = layers.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::config("dense_layers", w[0], "listed twice"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_is_valid() {
        HipConfig::paper().validate().unwrap();
        assert_eq!(HipConfig::paper().selected_blocks(), 256);
        assert!(HipConfig::paper().is_dense_layer(2));
        assert!(!HipConfig::paper().is_dense_layer(3));
    }

    #[test]
    fn every_bad_field_is_named() {
        let p = HipConfig::paper;
        let cases: Vec<(HipConfig, &str)> = vec![
            (p().with_k(0), "k"),
            (p().with_k(513), "k"),
            (p().with_query_block(0, 1), "block_size_q"),
            (p().with_query_block(64, 0), "block_stride_q"),
            (p().with_query_block(64, 3), "block_stride_q"),
            (p().with_key_block(0, 1), "block_size_k"),
            (p().with_key_block(4, 3), "block_stride_k"),
            (p().with_refresh_interval(0), "refresh_interval"),
            (p().with_dense_layers(vec![1, 1]), "dense_layers"),
            (p().with_sink_window(usize::MAX, 0), "sink_tokens"),
            (p().with_prefill_tail(64, 0), "tail_block_size_q"),
            (p().with_prefill_tail(usize::MAX, 1), "tail_queries"),
            (
                p().with_rope_extend(crate::extend::RopeExtend { dense_layer_k: 0 }),
                "rope_extend.dense_layer_k",
            ),
        ];
        for (cfg, field) in cases {
            match cfg.validate() {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{cfg:?}"),
                other => panic!("expected InvalidConfig({field}) for {cfg:?}, got {other:?}"),
            }
        }
    }
}
