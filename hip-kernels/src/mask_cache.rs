//! HiP attention entry points: one-shot prefill ([`hip_attn`]) and decode with a mask that is
//! re-estimated only every `refresh_interval` steps ([`MaskCache`], [`hip_attn_decode`]).

use candle_core::Tensor;

use crate::config::HipConfig;
use crate::error::Result;
use crate::layout::AttnDims;
use crate::ops::block_sparse_attn::block_sparse_attn;
use crate::ops::hip_mask::{hip_mask, HipMask};

/// HiP attention in one call: [`hip_mask`] then [`block_sparse_attn`].
///
/// Shapes as [`crate::dense_attn`]. With `cfg.k` at least the context length every key is
/// selected and the result equals dense attention.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use hip_kernels::{hip_attn, HipConfig};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (1, 300, 4, 64), &dev)?;
/// let k = Tensor::randn(0f32, 1., (1, 300, 1, 64), &dev)?;
/// let v = Tensor::randn(0f32, 1., (1, 300, 1, 64), &dev)?;
/// let cfg = HipConfig::paper().with_k(64).with_sink_window(4, 32).with_query_block(32, 2);
/// let out = hip_attn(&q, &k, &v, &cfg, 0.125)?;
/// assert_eq!(out.dims(), &[1, 300, 4, 64]);
/// # Ok::<(), hip_kernels::Error>(())
/// ```
///
/// # Errors
/// As [`hip_mask`] and [`block_sparse_attn`].
pub fn hip_attn(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &HipConfig, scale: f32) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    with_prefill_tail(q, dims.t_q, cfg, |q, cut, cfg| {
        let (k, v) = (k.narrow(1, 0, dims.t_k - cut)?, v.narrow(1, 0, dims.t_k - cut)?);
        #[cfg(feature = "cuda")]
        if crate::cuda::is_cuda(q) {
            // The mask stays on the device.
            let mask = crate::cuda::hip_mask_cuda(q, &k, cfg, scale)?;
            return crate::cuda::block_sparse_attn_cuda(q, &k, &v, &mask, scale, 0);
        }
        let mask = hip_mask(q, &k, cfg, scale)?;
        block_sparse_attn(q, &k, &v, &mask, scale, 0)
    })
}

/// Runs a HiP prefill of the `t_q` queries `q: [batch, t_q, ..]` as `run(queries, cut, cfg)`, split
/// by [`HipConfig::tail_split`]: the head queries run with `cfg` over the context without its last
/// `cut` tokens (the tail's; the head queries are the newest tokens of that shorter context), the
/// tail queries with the tail's config over the whole context; the outputs are concatenated.
pub(crate) fn with_prefill_tail(
    q: &Tensor,
    t_q: usize,
    cfg: &HipConfig,
    mut run: impl FnMut(&Tensor, usize, &HipConfig) -> Result<Tensor>,
) -> Result<Tensor> {
    match cfg.tail_split(t_q) {
        None => run(q, 0, cfg),
        Some((0, tail_cfg)) => run(q, 0, &tail_cfg),
        Some((head, tail_cfg)) => {
            let tail = t_q - head;
            let a = run(&q.narrow(1, 0, head)?, tail, cfg)?;
            let b = run(&q.narrow(1, head, tail)?, 0, &tail_cfg)?;
            Ok(Tensor::cat(&[a, b], 1)?)
        }
    }
}

/// The decode-time mask of one layer of one sequence batch, reused for `refresh_interval` steps.
///
/// Between refreshes, the window of the cached mask is widened by the number of tokens appended
/// since the estimate, so tokens that leave the window are still attended until the next refresh.
///
/// On a CUDA device (`cuda::hip_attn_decode_paged_cuda`) the mask stays on the device
/// between steps ([`MaskCache::mask`] is then `None`): no copy to or from the host per step.
#[derive(Debug, Clone, Default)]
pub struct MaskCache {
    mask: Option<HipMask>,
    #[cfg(feature = "cuda")]
    device: Option<crate::cuda::CudaMask>,
    /// Which slot of which [`crate::cuda::CudaMaskSlots`] (its id) holds `device`'s rows too
    /// (the batched decode's mask store); `None` when no store does.
    #[cfg(feature = "cuda")]
    slot: Option<(u64, usize)>,
    steps: usize,
    refreshes: usize,
}

impl MaskCache {
    /// An empty cache: the next decode step estimates a fresh mask.
    pub fn new() -> Self {
        Self::default()
    }
    /// The mask in use, if any and if it is kept on the host.
    pub fn mask(&self) -> Option<&HipMask> {
        self.mask.as_ref()
    }
    /// How many times a mask was estimated.
    pub fn refreshes(&self) -> usize {
        self.refreshes
    }
    /// Forgets the cached mask (e.g. after the context was truncated).
    pub fn clear(&mut self) {
        self.mask = None;
        #[cfg(feature = "cuda")]
        {
            self.device = None;
            self.slot = None;
        }
        self.steps = 0;
    }
}

/// Whether a decode step over `dims` must estimate a fresh mask, given the geometry of the cached
/// one (`None`: nothing cached) and the steps since it was estimated: none cached,
/// `refresh_interval` steps done, or shapes it does not fit (batch, heads, query blocks, a shorter
/// context, another config).
fn stale(meta: Option<&HipMask>, steps: usize, dims: &AttnDims, cfg: &HipConfig) -> bool {
    match meta {
        None => true,
        Some(m) => {
            steps >= cfg.refresh_interval
                || (m.batch, m.heads, m.n_qblocks)
                    != (dims.batch, dims.heads_q, dims.t_q.div_ceil(m.block_size_q.max(1)))
                || m.t_k > dims.t_k
                || m.block_size_q != cfg.block_size_q
                || m.max_blocks != cfg.selected_blocks()
        }
    }
}

/// One decode step of HiP attention: `q` holds the new queries (usually one token) and `k`/`v`
/// the whole cache including them.
///
/// The mask is re-estimated when the cache is empty, every `cfg.refresh_interval` steps, or when
/// the shapes no longer fit it (different batch, heads or query count, or a shorter context);
/// otherwise the cached blocks are reused with a widened window.
///
/// # Errors
/// As [`hip_mask`] and [`block_sparse_attn`].
pub fn hip_attn_decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &HipConfig,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    cache.step(
        &dims,
        cfg,
        || hip_mask(q, k, cfg, scale),
        |mask, extra| block_sparse_attn(q, k, v, mask, scale, extra),
    )
}

impl MaskCache {
    /// One decode step: refresh the mask with `estimate` when due, then attend with `attend(mask,
    /// extra_window_tokens)`.
    pub(crate) fn step(
        &mut self,
        dims: &AttnDims,
        cfg: &HipConfig,
        estimate: impl FnOnce() -> Result<HipMask>,
        attend: impl FnOnce(&HipMask, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        fn meta(m: &HipMask) -> &HipMask {
            m
        }
        step_cached(&mut self.mask, meta, &mut self.steps, &mut self.refreshes, dims, cfg, estimate, attend)
    }

    /// [`step`](Self::step) with the mask kept on the device.
    #[cfg(feature = "cuda")]
    pub(crate) fn step_device(
        &mut self,
        dims: &AttnDims,
        cfg: &HipConfig,
        estimate: impl FnOnce() -> Result<crate::cuda::CudaMask>,
        attend: impl FnOnce(&crate::cuda::CudaMask, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        fn meta(m: &crate::cuda::CudaMask) -> &HipMask {
            &m.meta
        }
        let refreshes = self.refreshes;
        let out = step_cached(
            &mut self.device,
            meta,
            &mut self.steps,
            &mut self.refreshes,
            dims,
            cfg,
            estimate,
            attend,
        );
        if self.refreshes != refreshes {
            self.slot = None; // a fresh mask of its own, in no slot store
        }
        out
    }

    /// The mask kept on the device, if any ([`crate::cuda::hip_attn_decode_paged_cuda`] and
    /// [`crate::cuda::hip_decode_paged_batch_cuda`] keep it there).
    #[cfg(feature = "cuda")]
    pub fn device_mask(&self) -> Option<&crate::cuda::CudaMask> {
        self.device.as_ref()
    }
}

/// The pieces of a batched decode step ([`crate::cuda::hip_decode_paged_batch_cuda`]): the same
/// schedule as [`MaskCache::step_device`], with the mask estimated for many sequences at once.
#[cfg(feature = "cuda")]
impl MaskCache {
    /// Whether a step over `dims` (one sequence) must estimate a fresh mask.
    pub(crate) fn due(&self, dims: &AttnDims, cfg: &HipConfig) -> bool {
        stale(self.device.as_ref().map(|m| &m.meta), self.steps, dims, cfg)
    }
    /// The slot store and slot holding the mask, if any.
    pub(crate) fn slot(&self) -> Option<(u64, usize)> {
        self.slot
    }
    /// Records that slot `slot` of store `store` now holds a copy of the mask.
    pub(crate) fn set_slot(&mut self, store: u64, slot: usize) {
        self.slot = Some((store, slot));
    }
    /// A fresh mask, kept in slot `slot` of store `store` (`mask` views that slot).
    pub(crate) fn refreshed(&mut self, mask: crate::cuda::CudaMask, store: u64, slot: usize) {
        self.device = Some(mask);
        self.slot = Some((store, slot));
        self.steps = 0;
        self.refreshes += 1;
    }
    /// One step done with the cached mask.
    pub(crate) fn stepped(&mut self) {
        self.steps += 1;
    }
}

/// The decode step of [`MaskCache`] over a cached mask of either kind (`meta` gives its geometry).
#[allow(clippy::too_many_arguments)]
fn step_cached<M>(
    slot: &mut Option<M>,
    meta: fn(&M) -> &HipMask,
    steps: &mut usize,
    refreshes: &mut usize,
    dims: &AttnDims,
    cfg: &HipConfig,
    estimate: impl FnOnce() -> Result<M>,
    attend: impl FnOnce(&M, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    cfg.validate()?;
    if stale(slot.as_ref().map(meta), *steps, dims, cfg) {
        *slot = Some(estimate()?);
        *steps = 0;
        *refreshes += 1;
    }
    let mask = slot.as_ref().expect("mask set above");
    let out = attend(mask, dims.t_k - meta(mask).t_k)?;
    *steps += 1;
    Ok(out)
}
