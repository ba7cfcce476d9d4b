//! The attention backend: dense everywhere, or HiP with the configured layers kept dense.
//! Holds the decode-time mask caches of every (sequence, layer).

use std::collections::HashMap;

use candle_core::Tensor;
use hip_kernels::{dense_attn_paged, hip_attn_decode_paged, hip_attn_paged, HipConfig, MaskCache, PagedKv};

use crate::error::Result;
use crate::kv::SeqId;

/// Which attention the model runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AttentionBackend {
    /// Exact attention in every layer.
    Dense,
    /// HiP attention, except in `cfg.dense_layers`.
    Hip(HipConfig),
}

/// The backend plus its per-(sequence, layer) decode state.
#[derive(Debug)]
pub struct AttentionState {
    backend: AttentionBackend,
    caches: HashMap<(SeqId, usize), MaskCache>,
}

impl AttentionState {
    /// A state for `backend`.
    ///
    /// # Errors
    /// An invalid [`HipConfig`].
    pub fn new(backend: AttentionBackend) -> Result<Self> {
        if let AttentionBackend::Hip(cfg) = &backend {
            cfg.validate()?;
        }
        Ok(AttentionState { backend, caches: HashMap::new() })
    }

    /// The backend.
    pub fn backend(&self) -> &AttentionBackend {
        &self.backend
    }

    /// Attention of `q: [1, n, heads_q, head_dim]` (the sequence's newest `n` tokens, already in
    /// `kv`) over the sequence. Returns f32 `[1, n, heads_q, head_dim]`.
    ///
    /// Dense layers and the dense backend run exact attention. HiP layers run a fresh mask for a
    /// chunk of several tokens (and forget the sequence's decode mask), and the cached-mask decode
    /// path for a single token.
    ///
    /// # Errors
    /// Kernel errors (shapes, a bad view).
    pub fn attend(
        &mut self,
        layer: usize,
        seq: SeqId,
        q: &Tensor,
        kv: &PagedKv<'_>,
        scale: f32,
    ) -> Result<Tensor> {
        let cfg = match &self.backend {
            AttentionBackend::Hip(cfg) if !cfg.is_dense_layer(layer) => cfg,
            _ => return Ok(dense_attn_paged(q, kv, scale)?),
        };
        let n = q.dim(1)?;
        if n == 1 {
            let cache = self.caches.entry((seq, layer)).or_default();
            Ok(hip_attn_decode_paged(q, kv, cfg, scale, cache)?)
        } else {
            self.caches.remove(&(seq, layer));
            Ok(hip_attn_paged(q, kv, cfg, scale)?)
        }
    }

    /// Forgets every cached mask of `seq` (after it was removed or truncated).
    pub fn forget(&mut self, seq: SeqId) {
        self.caches.retain(|(s, _), _| *s != seq);
    }

    /// Gives `child` copies of `parent`'s cached masks (after a fork).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let copies: Vec<_> = self
            .caches
            .iter()
            .filter(|((s, _), _)| *s == parent)
            .map(|((_, l), c)| ((child, *l), c.clone()))
            .collect();
        self.caches.extend(copies);
    }
}
