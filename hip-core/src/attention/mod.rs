//! The attention backend: dense everywhere, HiP with the configured layers kept dense, or the
//! sink-and-window baseline ([`StreamingConfig`]). Holds the decode-time mask caches of every
//! (sequence, layer).

mod streaming;

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::Tensor;
pub use hip_kernels::HipMask;
use hip_kernels::{
    block_sparse_attn_paged, dense_attn_paged, hip_attn_decode_paged, hip_attn_extend_decode_paged,
    hip_attn_extend_paged, hip_attn_paged, HipConfig, MaskCache, PagedKv, Rope,
};

use crate::error::Result;
use crate::kv::{DeviceLayerView, SeqId};
pub use streaming::StreamingConfig;

/// Which attention the model runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AttentionBackend {
    /// Exact attention in every layer.
    Dense,
    /// HiP attention, except in `cfg.dense_layers`. With `cfg.rope_extend` set (Dynamic RoPE,
    /// [`hip_kernels::extend`]) every layer runs HiP over un-rotated keys, which the model then
    /// stores in the cache ([`AttentionState::rotates_keys`]).
    Hip(HipConfig),
    /// Sink and sliding window only (the StreamingLLM-style baseline), except in
    /// `cfg.dense_layers`.
    Streaming(StreamingConfig),
}

/// See [`AttentionState::route`].
enum Route<'a> {
    Dense,
    Prefill(&'a HipConfig),
    Decode(&'a HipConfig, &'a mut MaskCache),
    Streaming(&'a StreamingConfig),
    /// Dynamic RoPE: the layer's config, the decode mask cache for a single token, the rope.
    Extend(Cow<'a, HipConfig>, Option<&'a mut MaskCache>, &'a Rope),
}

/// The backend plus its per-(sequence, layer) decode state.
#[derive(Debug)]
pub struct AttentionState {
    backend: AttentionBackend,
    caches: HashMap<(SeqId, usize), MaskCache>,
    rope: Option<Rope>,
    /// KV-cache offloading: the GPU caches of every (sequence, offloaded layer).
    #[cfg(feature = "cuda")]
    offload: Option<OffloadState>,
    /// Decode batches of HiP layers: each sequence's mask slot and every layer's slot store.
    #[cfg(feature = "cuda")]
    batch: BatchSlots,
}

/// The mask slots of batched HiP decode ([`AttentionState::hip_decode_batch`]): a sequence keeps
/// its slot (the same in every layer) until it is forgotten.
#[cfg(feature = "cuda")]
#[derive(Debug, Default)]
struct BatchSlots {
    of: HashMap<SeqId, usize>,
    free: Vec<usize>,
    next: usize,
    stores: HashMap<usize, hip_kernels::cuda::CudaMaskSlots>,
}

/// The GPU caches of offloaded layers ([`AttentionState::set_offload`]).
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct OffloadState {
    cfg: hip_kernels::offload::Offload,
    max_tokens: usize,
    caches: HashMap<(SeqId, usize), hip_kernels::cuda::LayerCaches>,
}

/// What the offload caches of every sequence and layer did ([`AttentionState::offload_stats`]).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadTotals {
    /// The mask-estimation caches' counters.
    pub mask: hip_kernels::offload::OffloadStats,
    /// The sparse-attention caches' counters.
    pub sparse: hip_kernels::offload::OffloadStats,
    /// GPU bytes of the caches.
    pub gpu_bytes: u64,
    /// Bytes prefill chunks staged from the host store to the GPU.
    pub staged_bytes: u64,
}

impl AttentionState {
    /// A state for `backend`.
    ///
    /// # Errors
    /// An invalid [`HipConfig`].
    pub fn new(backend: AttentionBackend) -> Result<Self> {
        match &backend {
            AttentionBackend::Hip(cfg) => cfg.validate()?,
            AttentionBackend::Streaming(cfg) => cfg.validate()?,
            AttentionBackend::Dense => {}
        }
        Ok(AttentionState {
            backend,
            caches: HashMap::new(),
            rope: None,
            #[cfg(feature = "cuda")]
            offload: None,
            #[cfg(feature = "cuda")]
            batch: BatchSlots::default(),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &AttentionBackend {
        &self.backend
    }

    /// Whether attention rotates queries and keys itself (HiP with Dynamic RoPE): the model
    /// then passes un-rotated queries and stores un-rotated keys in the cache.
    pub fn rotates_keys(&self) -> bool {
        matches!(&self.backend, AttentionBackend::Hip(cfg) if cfg.rope_extend.is_some())
    }

    /// Sets the model's rotary embedding, which attention needs when it
    /// [rotates keys](Self::rotates_keys) itself ([`crate::model::Model::forward`] does this).
    pub fn set_rope(&mut self, rope: &Rope) {
        if self.rope.as_ref() != Some(rope) {
            self.rope = Some(rope.clone());
        }
    }

    /// The decode mask HiP layer `layer` of `seq` uses now (read-only): the one the last decode
    /// step of that layer estimated or reused, as the host-side [`MaskCache::mask`] holds it.
    ///
    /// `None` when there is none: a dense layer or a non-HiP backend, no decode step since the
    /// last prefill chunk or [`forget`](Self::forget), or a mask kept on a CUDA device
    /// ([`attend_device`](Self::attend_device)). The mask was estimated over its `t_k` keys; a
    /// step over `len` keys attends its blocks plus a window widened by `len - t_k` tokens (see
    /// [`hip_kernels::block_sparse_attn`]). Useful to record what decode reads, e.g. to size
    /// offload caches ([`hip_kernels::offload`]).
    pub fn decode_mask(&self, seq: SeqId, layer: usize) -> Option<&HipMask> {
        self.caches.get(&(seq, layer)).and_then(MaskCache::mask)
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
        Ok(match self.route(layer, seq, q.dim(1)?)? {
            Route::Dense => dense_attn_paged(q, kv, scale)?,
            Route::Prefill(cfg) => hip_attn_paged(q, kv, cfg, scale)?,
            Route::Decode(cfg, cache) => hip_attn_decode_paged(q, kv, cfg, scale, cache)?,
            Route::Streaming(cfg) => {
                let mask = cfg.empty_mask(q.dim(2)?, q.dim(1)?, kv.len);
                block_sparse_attn_paged(q, kv, &mask, scale, 0)?
            }
            Route::Extend(cfg, None, rope) => hip_attn_extend_paged(q, kv, &cfg, rope, scale)?,
            Route::Extend(cfg, Some(cache), rope) => {
                hip_attn_extend_decode_paged(q, kv, &cfg, rope, scale, cache)?
            }
        })
    }

    /// Whether `layer` runs exact dense attention for every sequence (the dense backend, a dense
    /// layer of HiP without Dynamic RoPE, or of the streaming baseline): then the sequences of a
    /// decode batch can share one launch ([`dense_decode_batch`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn dense_for_all(&self, layer: usize) -> bool {
        match &self.backend {
            AttentionBackend::Dense => true,
            AttentionBackend::Hip(cfg) => cfg.rope_extend.is_none() && cfg.is_dense_layer(layer),
            AttentionBackend::Streaming(cfg) => cfg.is_dense_layer(layer),
        }
    }

    /// Whether `layer`'s decode batches run HiP for every sequence in one launch
    /// ([`hip_decode_batch`](Self::hip_decode_batch)): a sparse layer of HiP without Dynamic RoPE.
    #[cfg(feature = "cuda")]
    pub(crate) fn hip_for_all(&self, layer: usize) -> bool {
        matches!(&self.backend, AttentionBackend::Hip(cfg) if cfg.rope_extend.is_none() && !cfg.is_dense_layer(layer))
    }

    /// The mask slots of `seqs` for batched HiP decode (given on first use, kept until
    /// [`forget`](Self::forget)).
    #[cfg(feature = "cuda")]
    pub(crate) fn batch_slots(&mut self, seqs: &[SeqId]) -> Vec<usize> {
        let b = &mut self.batch;
        seqs.iter()
            .map(|&s| {
                *b.of.entry(s).or_insert_with(|| {
                    b.free.pop().unwrap_or_else(|| {
                        b.next += 1;
                        b.next - 1
                    })
                })
            })
            .collect()
    }

    /// HiP decode of one new token per sequence over one device layer, every sequence of the
    /// decode batch in one launch (and the due mask refreshes in one more): `q: [batch, heads_q,
    /// head_dim]` in the pool's dtype, `seqs[b]` in slot `slots[b]` ([`batch_slots`](Self::batch_slots);
    /// `slots_device` the same on the device). Returns `[batch, heads_q, head_dim]` in the
    /// pool's dtype; row `b` is what [`attend_device`](Self::attend_device) gives `seqs[b]`, on
    /// the same mask schedule (the two paths share the sequences' mask caches).
    ///
    /// # Errors
    /// Not a HiP backend; kernel errors.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hip_decode_batch(
        &mut self,
        layer: usize,
        seqs: &[SeqId],
        q: &Tensor,
        kv: &hip_kernels::cuda::CudaPagedBatch<'_>,
        slots: &[usize],
        slots_device: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let AttentionState { backend, caches, batch, .. } = self;
        let AttentionBackend::Hip(cfg) = &*backend else {
            return Err(crate::Error::arg("backend", "not HiP", "batched HiP decode needs the HiP backend"));
        };
        let mut taken: Vec<MaskCache> =
            seqs.iter().map(|&s| caches.remove(&(s, layer)).unwrap_or_default()).collect();
        let (b, heads_q, d) = q.dims3()?;
        let store = batch.stores.entry(layer).or_default();
        let out = {
            let mut refs: Vec<&mut MaskCache> = taken.iter_mut().collect();
            let q = q.reshape((b, 1, heads_q, d))?;
            hip_kernels::cuda::hip_decode_paged_batch_cuda(
                &q,
                kv,
                cfg,
                scale,
                store,
                slots,
                slots_device,
                &mut refs,
            )
        };
        for (&s, c) in seqs.iter().zip(taken) {
            caches.insert((s, layer), c);
        }
        Ok(out?.reshape((b, heads_q, d))?)
    }

    /// Which attention `n` new tokens of `seq` get in `layer`: dense, a fresh HiP mask for a
    /// chunk (forgetting the decode mask), or the cached-mask decode path for one token.
    fn route(&mut self, layer: usize, seq: SeqId, n: usize) -> Result<Route<'_>> {
        let AttentionState { backend, caches, rope, .. } = self;
        let backend = &*backend;
        if let AttentionBackend::Hip(cfg) = backend {
            if let Some(layer_cfg) = cfg.extend_layer_config(layer) {
                let rope = rope.as_ref().ok_or_else(|| {
                    crate::Error::arg(
                        "rope",
                        "none",
                        "Dynamic RoPE needs the model's rope (AttentionState::set_rope)",
                    )
                })?;
                return Ok(Route::Extend(layer_cfg, decode_cache(caches, seq, layer, n), rope));
            }
        }
        Ok(match backend {
            AttentionBackend::Hip(cfg) if !cfg.is_dense_layer(layer) => {
                match decode_cache(caches, seq, layer, n) {
                    Some(cache) => Route::Decode(cfg, cache),
                    None => Route::Prefill(cfg),
                }
            }
            AttentionBackend::Streaming(cfg) if !cfg.is_dense_layer(layer) => Route::Streaming(cfg),
            _ => Route::Dense,
        })
    }

    /// [`attend`](Self::attend) over a KV cache on a CUDA device: `q: [1, n, heads_q, head_dim]`
    /// (any float dtype; computed in the cache's dtype, bf16 or f16), returns f32
    /// `[1, n, heads_q, head_dim]`.
    ///
    /// # Errors
    /// Kernel errors; without the `cuda` feature, an error saying so.
    pub fn attend_device(
        &mut self,
        layer: usize,
        seq: SeqId,
        q: &Tensor,
        kv: &DeviceLayerView<'_>,
        scale: f32,
    ) -> Result<Tensor> {
        Ok(self.attend_device_native(layer, seq, q, kv, scale)?.to_dtype(candle_core::DType::F32)?)
    }

    /// [`attend_device`](Self::attend_device), returning the cache's dtype (the model converts
    /// the outputs of all sequences at once).
    pub(crate) fn attend_device_native(
        &mut self,
        layer: usize,
        seq: SeqId,
        q: &Tensor,
        kv: &DeviceLayerView<'_>,
        scale: f32,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            use hip_kernels::cuda::{
                dense_attn_paged_cuda, hip_attn_decode_paged_cuda, hip_attn_paged_cuda, CudaPagedKv,
            };
            let table = match kv.device_table {
                Some(t) => t.clone(),
                None => Tensor::from_slice(kv.block_table, kv.block_table.len(), kv.k.device())?,
            };
            if let Some(store) = kv.host {
                return self.attend_offloaded(layer, seq, q, kv, store, &table, scale);
            }
            let view =
                CudaPagedKv { k: kv.k, v: kv.v, block_table: &table, block_size: kv.block_size, len: kv.len };
            let q = q.to_dtype(kv.k.dtype())?;
            let out = match self.route(layer, seq, q.dim(1)?)? {
                Route::Dense => dense_attn_paged_cuda(&q, &view, scale)?,
                Route::Prefill(cfg) => hip_attn_paged_cuda(&q, &view, cfg, scale)?,
                Route::Decode(cfg, cache) => hip_attn_decode_paged_cuda(&q, &view, cfg, scale, cache)?,
                Route::Streaming(cfg) => {
                    let mask = cfg.empty_mask(q.dim(2)?, q.dim(1)?, kv.len);
                    let mask = hip_kernels::cuda::CudaMask::new(&mask, q.device())?;
                    hip_kernels::cuda::block_sparse_attn_paged_cuda(&q, &view, &mask, scale, 0)?
                }
                Route::Extend(cfg, None, rope) => {
                    hip_kernels::hip_attn_extend_paged_cuda(&q, &view, kv.block_table, &cfg, rope, scale)?
                }
                Route::Extend(cfg, Some(cache), rope) => {
                    let table = kv.block_table;
                    hip_kernels::hip_attn_extend_decode_paged_cuda(
                        &q, &view, table, &cfg, rope, scale, cache,
                    )?
                }
            };
            // The extension computes in f32; the others already return the cache's dtype.
            Ok(out.to_dtype(kv.k.dtype())?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (layer, seq, q, kv, scale);
            Err(crate::Error::arg("device", "cuda", "attention on a device cache needs the `cuda` feature"))
        }
    }

    /// Attention over an offloaded layer (its rows in `store`, read through the layer's GPU
    /// caches).
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn attend_offloaded(
        &mut self,
        layer: usize,
        seq: SeqId,
        q: &Tensor,
        kv: &DeviceLayerView<'_>,
        store: &hip_kernels::cuda::HostKvStore,
        table: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        use hip_kernels::cuda::{
            dense_attn_offload_cuda, hip_attn_decode_offload_cuda, hip_attn_offload_cuda, LayerCaches,
            OffloadedKv,
        };
        let okv = OffloadedKv { store, block_table: table, block_size: kv.block_size, len: kv.len };
        let q = q.to_dtype(store.dtype())?;
        let Some(off) = self.offload.as_mut() else {
            return Err(crate::Error::arg(
                "offload",
                "none",
                "an offloaded KV cache needs AttentionState::set_offload",
            ));
        };
        // Out of the map while the route borrows the state; back in after.
        let mut lc = match off.caches.remove(&(seq, layer)) {
            Some(lc) => lc,
            None => LayerCaches::new(
                q.device(),
                &off.cfg,
                store.heads_kv(),
                store.head_dim(),
                store.dtype(),
                off.max_tokens,
            )?,
        };
        let out = match self.route(layer, seq, q.dim(1)?)? {
            Route::Dense => dense_attn_offload_cuda(&q, &okv, scale),
            Route::Prefill(cfg) => hip_attn_offload_cuda(&q, &okv, &mut lc, cfg, scale),
            Route::Decode(cfg, cache) => hip_attn_decode_offload_cuda(&q, &okv, &mut lc, cfg, scale, cache),
            Route::Streaming(_) | Route::Extend(..) => {
                return Err(crate::Error::arg(
                    "attention",
                    "streaming or Dynamic RoPE",
                    "offloaded layers run dense or HiP attention only",
                ))
            }
        };
        if let Some(off) = self.offload.as_mut() {
            off.caches.insert((seq, layer), lc);
        }
        Ok(out?)
    }

    /// Forgets every cached mask of `seq` (after it was removed or truncated), and its offload
    /// caches.
    pub fn forget(&mut self, seq: SeqId) {
        self.caches.retain(|(s, _), _| *s != seq);
        #[cfg(feature = "cuda")]
        {
            if let Some(o) = self.offload.as_mut() {
                o.caches.retain(|(s, _), _| *s != seq);
            }
            if let Some(slot) = self.batch.of.remove(&seq) {
                self.batch.free.push(slot);
            }
        }
    }

    /// KV-cache offloading: layers whose device view carries a host store
    /// ([`PagedKvCache::new_on_device_offloaded`](crate::kv::PagedKvCache::new_on_device_offloaded))
    /// are attended through two GPU caches per (sequence, layer) sized by `cfg`, covering
    /// sequences of up to `max_tokens` tokens (see [`hip_kernels::cuda::LayerCaches`]).
    /// Offloaded layers support dense and HiP attention (without Dynamic RoPE).
    ///
    /// # Errors
    /// An invalid `cfg`.
    #[cfg(feature = "cuda")]
    pub fn set_offload(&mut self, cfg: hip_kernels::offload::Offload, max_tokens: usize) -> Result<()> {
        cfg.validate()?;
        self.offload = Some(OffloadState { cfg, max_tokens, caches: HashMap::new() });
        Ok(())
    }

    /// Counters and GPU bytes of the offload caches of every sequence and layer, by cache kind;
    /// `None` without offloading. Waits for the device.
    ///
    /// # Errors
    /// Driver errors.
    #[cfg(feature = "cuda")]
    pub fn offload_stats(&self) -> Result<Option<OffloadTotals>> {
        let Some(o) = self.offload.as_ref() else { return Ok(None) };
        let mut t = OffloadTotals::default();
        for c in o.caches.values() {
            hip_kernels::offload::OffloadStats::merge(&mut t.mask, &c.mask.stats()?);
            hip_kernels::offload::OffloadStats::merge(&mut t.sparse, &c.sparse.stats()?);
            t.gpu_bytes += c.gpu_bytes();
            t.staged_bytes += c.staged_bytes();
        }
        Ok(Some(t))
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

/// Dense attention of one new token per sequence over one device layer, every sequence of the
/// decode batch in one launch: `q: [batch, heads_q, head_dim]` in the pools' dtype, the
/// tables and lengths from [`crate::kv::PagedKvCache::device_batch_tables`]; returns `[batch,
/// heads_q, head_dim]` in the pools' dtype (row `b` what [`AttentionState::attend_device`]
/// gives sequence `b` in a dense layer).
#[cfg(feature = "cuda")]
pub(crate) fn dense_decode_batch(
    q: &Tensor,
    kv: &hip_kernels::cuda::CudaPagedBatch<'_>,
    scale: f32,
) -> Result<Tensor> {
    let (batch, heads_q, d) = q.dims3()?;
    let q = q.reshape((batch, 1, heads_q, d))?;
    Ok(hip_kernels::cuda::dense_decode_paged_batch_cuda(&q, kv, scale)?.reshape((batch, heads_q, d))?)
}

/// The decode mask cache of `(seq, layer)` for a single new token; for a chunk, `None` and the
/// cached mask is forgotten (the chunk estimates a fresh one).
fn decode_cache(
    caches: &mut HashMap<(SeqId, usize), MaskCache>,
    seq: SeqId,
    layer: usize,
    n: usize,
) -> Option<&mut MaskCache> {
    if n == 1 {
        Some(caches.entry((seq, layer)).or_default())
    } else {
        caches.remove(&(seq, layer));
        None
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The decode mask appears after a decode step of a HiP layer, is reused (same `t_k`) until
    /// the refresh, and is gone after a prefill chunk or `forget`; dense layers have none.
    #[test]
    fn decode_mask_follows_the_cache() {
        let dev = Device::Cpu;
        let (t, hq, hkv, d) = (300usize, 4usize, 2usize, 8usize);
        let k = Tensor::randn(0f32, 1., (t, hkv, d), &dev).unwrap().flatten_all().unwrap();
        let v = Tensor::randn(0f32, 1., (t, hkv, d), &dev).unwrap().flatten_all().unwrap();
        let (kd, vd) = (k.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
        let table = [0u32];
        let view = |len| PagedKv {
            k: &kd,
            v: &vd,
            block_table: &table,
            block_size: t,
            heads_kv: hkv,
            head_dim: d,
            len,
        };
        let cfg = HipConfig::paper().with_k(32).with_sink_window(4, 16).with_dense_layers(vec![0]);
        let mut state = AttentionState::new(AttentionBackend::Hip(cfg.clone())).unwrap();
        let (seq, q1) = (SeqId(0), Tensor::randn(0f32, 1., (1, 1, hq, d), &dev).unwrap());
        assert!(state.decode_mask(seq, 1).is_none());
        for len in 200..200 + cfg.refresh_interval + 1 {
            state.attend(0, seq, &q1, &view(len), 0.3).unwrap();
            state.attend(1, seq, &q1, &view(len), 0.3).unwrap();
            let m = state.decode_mask(seq, 1).expect("a HiP layer after a decode step");
            // Estimated at the first step, reused, re-estimated after refresh_interval steps.
            let fresh = if len - 200 < cfg.refresh_interval { 200 } else { len };
            assert_eq!((m.t_k, m.heads, m.n_qblocks), (fresh, hq, 1));
            assert!((0..hq).all(|h| !m.blocks(0, h, 0).is_empty()));
            assert!(state.decode_mask(seq, 0).is_none(), "layer 0 is dense");
        }
        assert!(state.decode_mask(SeqId(1), 1).is_none());
        let q2 = Tensor::randn(0f32, 1., (1, 2, hq, d), &dev).unwrap();
        state.attend(1, seq, &q2, &view(t), 0.3).unwrap();
        assert!(state.decode_mask(seq, 1).is_none(), "a prefill chunk drops the decode mask");
        state.attend(1, seq, &q1, &view(t), 0.3).unwrap();
        assert_eq!(state.decode_mask(seq, 1).map(|m| m.t_k), Some(t));
        state.forget(seq);
        assert!(state.decode_mask(seq, 1).is_none());
    }
}
