//! The sink-and-window baseline (StreamingLLM-style): every query attends to the first
//! `sink_tokens` keys and its last `window_tokens` keys, nothing else.

use hip_kernels::{HipConfig, HipMask, NO_BLOCK};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Configuration of the sink-and-window attention baseline.
///
/// Layers listed in `dense_layers` run exact attention (like HiP's dense layers), the others
/// attend to the sink and the sliding window only. [`StreamingConfig::same_budget`] builds the
/// baseline that attends to as many keys per query as a HiP configuration: the HiP window plus
/// its `k` selected tokens become one longer window.
///
/// ```
/// use hip_core::attention::StreamingConfig;
/// use hip_core::HipConfig;
/// let hip = HipConfig::paper().with_k(128).with_sink_window(16, 128);
/// let s = StreamingConfig::same_budget(&hip);
/// assert_eq!((s.sink_tokens, s.window_tokens), (16, 256));
/// assert_eq!(s.dense_layers, hip.dense_layers);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StreamingConfig {
    /// Tokens at the start of the context every query attends to.
    pub sink_tokens: usize,
    /// Keys before (and including) each query that it attends to; at least 1.
    pub window_tokens: usize,
    /// Layers that run exact attention.
    pub dense_layers: Vec<usize>,
}

impl StreamingConfig {
    /// Sink-and-window attention in every layer.
    pub fn new(sink_tokens: usize, window_tokens: usize) -> Self {
        StreamingConfig { sink_tokens, window_tokens, dense_layers: Vec::new() }
    }

    /// The baseline with the token budget of `hip`: the same sink and dense layers, and a window
    /// of `hip.window_tokens + hip.k` tokens.
    pub fn same_budget(hip: &HipConfig) -> Self {
        StreamingConfig {
            sink_tokens: hip.sink_tokens,
            window_tokens: hip.window_tokens + hip.k,
            dense_layers: hip.dense_layers.clone(),
        }
    }

    /// Sets the dense layers.
    pub fn with_dense_layers(mut self, layers: impl Into<Vec<usize>>) -> Self {
        self.dense_layers = layers.into();
        self
    }

    /// Whether `layer` runs exact attention.
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        self.dense_layers.contains(&layer)
    }

    /// Checks the sizes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`]: a zero window, sizes above 2^24, a dense layer listed twice.
    pub fn validate(&self) -> Result<()> {
        const MAX: usize = 1 << 24;
        if self.window_tokens == 0 {
            return Err(Error::arg("window_tokens", 0, "must be at least 1 (the query itself)"));
        }
        for (name, v) in [("sink_tokens", self.sink_tokens), ("window_tokens", self.window_tokens)] {
            if v > MAX {
                return Err(Error::arg(name, v, format!("must be at most {MAX}")));
            }
        }
        let mut layers = self.dense_layers.clone();
        layers.sort_unstable();
        if let Some(w) = layers.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::arg("dense_layers", w[0], "listed twice"));
        }
        Ok(())
    }

    /// A mask that selects no block, so block-sparse attention over it attends to the sink and
    /// the window only: for `t_q` queries of `heads_q` heads over `t_k` keys.
    pub(crate) fn empty_mask(&self, heads_q: usize, t_q: usize, t_k: usize) -> HipMask {
        // One query block holding every query; one unused slot (no zero-size buffers on devices).
        let block_size_q = t_q.max(1);
        HipMask {
            batch: 1,
            heads: heads_q,
            n_qblocks: 1,
            max_blocks: 1,
            block_size_q,
            block_size_k: 1,
            sink_tokens: self.sink_tokens,
            window_tokens: self.window_tokens,
            t_k,
            block_starts: vec![NO_BLOCK; heads_q],
            counts: vec![0; heads_q],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_named() {
        let cases = [
            (StreamingConfig::new(4, 0), "window_tokens"),
            (StreamingConfig::new(usize::MAX, 4), "sink_tokens"),
            (StreamingConfig::new(4, 4).with_dense_layers(vec![2, 2]), "dense_layers"),
        ];
        for (cfg, field) in cases {
            match cfg.validate() {
                Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, field, "{cfg:?}"),
                other => panic!("expected InvalidArgument({field}) for {cfg:?}, got {other:?}"),
            }
        }
        StreamingConfig::new(0, 1).validate().unwrap();
    }

    /// Streaming attention of every query equals exact attention over that query's sink and
    /// window only (computed by dense attention on the gathered keys), GQA 2:1, in a HiP layer;
    /// a dense layer of the same config is exact attention over everything.
    #[test]
    fn attends_to_exactly_the_sink_and_the_window() {
        use candle_core::{Device, Tensor};
        use hip_kernels::{dense_attn, PagedKv};

        use crate::attention::{AttentionBackend, AttentionState};
        use crate::kv::SeqId;

        let dev = Device::Cpu;
        let (t, t_q, hq, hkv, d) = (50usize, 7usize, 4usize, 2usize, 8usize);
        let k = Tensor::randn(0f32, 1., (t, hkv, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (t, hkv, d), &dev).unwrap();
        let q = Tensor::randn(0f32, 1., (1, t_q, hq, d), &dev).unwrap();
        let (kd, vd) = (
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let table = [0u32];
        let kv = PagedKv {
            k: &kd,
            v: &vd,
            block_table: &table,
            block_size: t,
            heads_kv: hkv,
            head_dim: d,
            len: t,
        };
        let cfg = StreamingConfig::new(3, 5).with_dense_layers(vec![1]);
        let mut state = AttentionState::new(AttentionBackend::Streaming(cfg)).unwrap();
        let scale = 0.3;
        let ours = state.attend(0, SeqId(0), &q, &kv, scale).unwrap();
        for i in 0..t_q {
            let p = t - t_q + i;
            let keep: Vec<u32> = (0..=p as u32).filter(|&j| j < 3 || j as usize + 5 > p).collect();
            let idx = Tensor::new(keep.as_slice(), &dev).unwrap();
            let ks = k.index_select(&idx, 0).unwrap().unsqueeze(0).unwrap();
            let vs = v.index_select(&idx, 0).unwrap().unsqueeze(0).unwrap();
            let qi = q.narrow(1, i, 1).unwrap();
            let want = dense_attn(&qi, &ks, &vs, scale).unwrap();
            let got = ours.narrow(1, i, 1).unwrap();
            let err = (want - got).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-5, "query {i}");
        }
        // Layer 1 is dense: all keys.
        let dense = state.attend(1, SeqId(0), &q, &kv, scale).unwrap();
        let want = dense_attn(&q, &k.unsqueeze(0).unwrap(), &v.unsqueeze(0).unwrap(), scale).unwrap();
        let err = (want - &dense).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        let diff = (ours - dense).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 1e-3, "the window must change the output");
    }

    #[test]
    fn same_budget_moves_k_into_the_window() {
        let hip = HipConfig::paper();
        let s = StreamingConfig::same_budget(&hip);
        assert_eq!(s.window_tokens, hip.window_tokens + hip.k);
        assert_eq!(s.sink_tokens, hip.sink_tokens);
        assert!(s.is_dense_layer(0) && !s.is_dense_layer(3));
    }
}
