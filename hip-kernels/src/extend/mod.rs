//! **Dynamic RoPE**: HiP attention past a model's trained context (hip-algorithm.md §2,
//! InfiniteHiP's "using_extend").
//!
//! With it the KV cache holds keys *before* rotary embedding, and attention rotates queries and
//! keys itself, so no score ever sees a distance the model was not trained on:
//!
//! * **pruning** (the tree search) uses *relative* positions: every query is rotated to position
//!   `window_tokens + 1` and every key sits at position 0, so a key is scored as if it stood just
//!   before the sliding window, wherever it is in the context;
//! * **block-sparse attention** uses *StreamingLLM* positions: the keys a query block attends
//!   (sink, selected blocks, window) are numbered consecutively in their original order and the
//!   newest key has the query's position, so positions stay below
//!   `sink + k + window + block_size_q` however long the context is.
//!
//! Layers the config keeps dense run the same way with `k =` [`RopeExtend::dense_layer_k`]
//! (InfiniteHiP keeps no layer truly dense under extension). The chunk-indexed pruning positions
//! the paper uses in layers 1–3 are not implemented: every layer prunes with relative positions.
//!
//! The attention gathers each query block's keys into a dense tile, rotates them and runs exact
//! attention over the tile ([`crate::reference::block_sparse_attn_extend`] is the slow
//! reference). It runs on any candle device; on CUDA the mask search is the HiP CUDA kernel.

mod slots;

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::HipConfig;
use crate::error::{Error, Result};
use crate::layout::{check_scale, AttnDims};
use crate::mask_cache::{with_prefill_tail, MaskCache};
use crate::ops::hip_mask::HipMask;
use crate::ops::tile::KvRows;
use crate::paged::{hip_mask_paged, PagedKv};
use crate::rope::Rope;

/// Dynamic RoPE settings (see the [module docs](self)); set with [`HipConfig::with_rope_extend`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RopeExtend {
    /// `k` of the layers in [`HipConfig::dense_layers`], which under extension run HiP too
    /// (InfiniteHiP: 4096).
    pub dense_layer_k: usize,
}

impl Default for RopeExtend {
    fn default() -> Self {
        RopeExtend { dense_layer_k: 4096 }
    }
}

impl HipConfig {
    /// The config layer `layer` runs with under Dynamic RoPE: this one, or for a layer listed
    /// in `dense_layers` this one with `k = dense_layer_k` (rounded up to whole key blocks).
    /// `None` when Dynamic RoPE is off.
    pub fn extend_layer_config(&self, layer: usize) -> Option<Cow<'_, HipConfig>> {
        let ext = self.rope_extend.as_ref()?;
        if !self.is_dense_layer(layer) {
            return Some(Cow::Borrowed(self));
        }
        let k = ext.dense_layer_k.div_ceil(self.block_size_k.max(1)) * self.block_size_k.max(1);
        Some(Cow::Owned(self.clone().with_k(k)))
    }
}

/// The keys and values a Dynamic RoPE attention reads: a paged sequence on the host
/// ([`PagedKv`]) or in device tensors.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Host(PagedKv<'a>),
    #[cfg(feature = "cuda")]
    Device {
        kv: crate::cuda::CudaPagedKv<'a>,
        table: &'a [u32],
    },
}

impl Source<'_> {
    fn dims(&self, q: &Tensor) -> Result<AttnDims> {
        match self {
            Source::Host(kv) => kv.dims(q),
            #[cfg(feature = "cuda")]
            Source::Device { kv, .. } => kv.dims(q),
        }
    }

    fn len(&self) -> usize {
        match self {
            Source::Host(kv) => kv.len,
            #[cfg(feature = "cuda")]
            Source::Device { kv, .. } => kv.len,
        }
    }

    /// The same sequence cut to its first `len` tokens.
    fn with_len(self, len: usize) -> Self {
        match self {
            Source::Host(kv) => Source::Host(PagedKv { len, ..kv }),
            #[cfg(feature = "cuda")]
            Source::Device { kv, table } => {
                Source::Device { kv: crate::cuda::CudaPagedKv { len, ..kv }, table }
            }
        }
    }

    /// The HiP mask of un-rotated `q`, searched with relative positions (on the host).
    fn mask(&self, q: &Tensor, cfg: &HipConfig, rope: &Rope, scale: f32) -> Result<HipMask> {
        let pq = pruning_queries(q, cfg, rope)?;
        match self {
            Source::Host(kv) => hip_mask_paged(&pq, kv, cfg, scale),
            #[cfg(feature = "cuda")]
            Source::Device { kv, .. } => {
                let pq = pq.to_dtype(kv.k.dtype())?;
                crate::cuda::hip_mask_paged_cuda(&pq, kv, cfg, scale)?.to_host()
            }
        }
    }

    /// Rows `idx` (`pool_row * heads_kv + kv_head`) of K and V as f32 `[idx.len(), head_dim]` on
    /// `dev`.
    fn gather(&self, idx: &[u32], d: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        match self {
            Source::Host(kv) => {
                let mut k = Vec::with_capacity(idx.len() * d);
                let mut v = Vec::with_capacity(idx.len() * d);
                for &i in idx {
                    let o = i as usize * d;
                    k.extend_from_slice(&kv.k[o..o + d]);
                    v.extend_from_slice(&kv.v[o..o + d]);
                }
                let n = idx.len();
                Ok((Tensor::from_vec(k, (n, d), dev)?, Tensor::from_vec(v, (n, d), dev)?))
            }
            #[cfg(feature = "cuda")]
            Source::Device { kv, .. } => {
                let ids = Tensor::from_slice(idx, idx.len(), dev)?;
                let rows = kv.k.elem_count() / d;
                let k = kv.k.reshape((rows, d))?.index_select(&ids, 0)?.to_dtype(DType::F32)?;
                let v = kv.v.reshape((rows, d))?.index_select(&ids, 0)?.to_dtype(DType::F32)?;
                Ok((k, v))
            }
        }
    }

    /// Where the rows of head `g` live, counted in `head_dim`-float rows of the pool viewed as
    /// `[pool rows * heads_kv, head_dim]` (the index [`gather`](Self::gather) takes).
    fn rows(&self, heads_kv: usize, g: usize) -> KvRows<'_> {
        let (table, block_size) = match self {
            Source::Host(kv) => (kv.block_table, kv.block_size),
            #[cfg(feature = "cuda")]
            Source::Device { kv, table } => (*table, kv.block_size),
        };
        KvRows::Paged { table, block_size, row: heads_kv, head_off: g }
    }
}

/// Queries rotated for the tree search: every one at position `window_tokens + 1` (keys sit at
/// position 0).
fn pruning_queries(q: &Tensor, cfg: &HipConfig, rope: &Rope) -> Result<Tensor> {
    let t_q = q.dim(1)?;
    rope.rotate(q, &vec![cfg.window_tokens + 1; t_q])
}

/// Scores of one gathered tile (query blocks × heads × queries × slots): 16M f32 (64 MB), so a
/// tile of 64-query blocks with k = 1024 holds about 16 blocks.
const TILE_SCORES: usize = 1 << 24;

/// Block-sparse attention of un-rotated `q: [1, t_q, heads_q, d]` over `src` with StreamingLLM
/// positions (see [`slots`]). Returns f32 `[1, t_q, heads_q, d]` on q's device.
fn attend(
    q: &Tensor,
    src: &Source<'_>,
    dims: &AttnDims,
    mask: &HipMask,
    extra: usize,
    rope: &Rope,
    scale: f32,
) -> Result<Tensor> {
    let (hq, dev) = (dims.heads_q, q.device().clone());
    let q = q.to_dtype(DType::F32)?;
    let mut outs = Vec::new();
    let n_qb = mask.n_qblocks;
    let full = dims.t_q / mask.block_size_q; // blocks with block_size_q queries
                                             // Blocks of one size per tile; as many as the score budget allows.
    let bound = mask.sink_tokens
        + mask.max_blocks * mask.block_size_k
        + slots::region_len(mask.window_tokens + extra, mask.block_size_q);
    let per_tile = (TILE_SCORES / (hq * bound * mask.block_size_q).max(1)).max(1);
    let mut m0 = 0;
    while m0 < n_qb {
        let m1 = if m0 < full { (m0 + per_tile).min(full) } else { m0 + 1 };
        let plan = slots::plan(dims, mask, extra, m0, m1);
        outs.push(attend_tile(&q, src, dims, &plan, rope, scale, &dev)?);
        m0 = m1;
    }
    let out = Tensor::cat(&outs, 0)?; // [t_q, hq, d]
    Ok(out.unsqueeze(0)?)
}

/// One tile of [`attend`]: the query blocks of `plan`. Returns `[queries, heads_q, d]`.
fn attend_tile(
    q: &Tensor,
    src: &Source<'_>,
    dims: &AttnDims,
    plan: &slots::Plan,
    rope: &Rope,
    scale: f32,
    dev: &Device,
) -> Result<Tensor> {
    let (hq, hkv, d, w, bq) = (dims.heads_q, dims.heads_kv, dims.head_dim, plan.width, plan.bq);
    let g = plan.m1 - plan.m0;
    let rows = g * hq;
    let mut idx = Vec::with_capacity(rows * w);
    let mut valid = Vec::with_capacity(rows * w);
    // Padding reads token 0 (any real row: pool rows outside the sequence may hold garbage).
    let pad = src.rows(hkv, 0).offset(0);
    for (r, row) in plan.tokens.chunks(w).enumerate() {
        let head_rows = src.rows(hkv, (r % hq) / dims.group());
        for tok in row {
            match tok {
                Some(j) => {
                    idx.push(head_rows.offset(*j as usize) as u32);
                    valid.push(1f32);
                }
                None => {
                    idx.push(pad as u32);
                    valid.push(0f32);
                }
            }
        }
    }
    let always: Vec<f32> = plan.always.iter().map(|&a| f32::from(u8::from(a))).collect();
    let (causal, window) = plan.patterns();
    let (k, v) = src.gather(&idx, d, dev)?;
    let positions: Vec<usize> = (0..w).collect();
    let (cos, sin) = rope.tables(&positions, dev)?;
    let k = rope.rotate_heads(&k.reshape((1, rows, w, d))?, &cos, &sin)?.reshape((g, hq, w, d))?;
    let v = v.reshape((g, hq, w, d))?;
    // Queries of the tile: [g * bq, hq, d] -> [g, hq, bq, d], at positions w - bq .. w - 1.
    let qt = q.squeeze(0)?.narrow(0, plan.i0, g * bq)?.reshape((g, bq, hq, d))?.transpose(1, 2)?;
    let (qcos, qsin) = (cos.narrow(0, w - bq, bq)?, sin.narrow(0, w - bq, bq)?);
    let qt = rope.rotate_heads(&qt, &qcos, &qsin)?;
    let scores = (qt.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale as f64)?; // [g, hq, bq, w]
    let t = |data: Vec<f32>, shape: (usize, usize, usize, usize)| Tensor::from_vec(data, shape, dev);
    let valid = t(valid, (g, hq, 1, w))?;
    let always = t(always, (g, hq, 1, w))?;
    let causal = t(causal, (1, 1, bq, w))?;
    let window = t(window, (1, 1, bq, w))?;
    let admitted = always.broadcast_maximum(&window)?.broadcast_mul(&causal)?.broadcast_mul(&valid)?;
    // Not admitted: -1e30 (finite, so a row admitting nothing gives zeros, not NaN).
    let masked = (scores + ((&admitted - 1.0)? * 1e30)?)?;
    let p = (candle_nn::ops::softmax_last_dim(&masked)? * admitted)?;
    let out = p.matmul(&v.contiguous()?)?; // [g, hq, bq, d]
    Ok(out.transpose(1, 2)?.reshape((g * bq, hq, d))?)
}

/// The HiP mask of un-rotated `q` over a paged sequence of un-rotated keys, searched with
/// Dynamic RoPE's relative positions (see the [module docs](self)).
///
/// # Errors
/// As [`crate::hip_mask_paged`]; a rope whose head dim differs from the cache's.
pub fn hip_mask_extend_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
) -> Result<HipMask> {
    check_rope(rope, &kv.dims(q)?)?;
    Source::Host(*kv).mask(q, cfg, rope, scale)
}

/// Block-sparse attention of un-rotated `q` over a paged sequence of un-rotated keys with
/// StreamingLLM positions (see the [module docs](self)); `extra_window_tokens` widens the window
/// as in [`crate::block_sparse_attn`]. Returns f32 `[1, t_q, heads_q, d]`.
/// [`crate::reference::block_sparse_attn_extend`] is its slow reference.
///
/// # Errors
/// As [`crate::block_sparse_attn_paged`]; a rope whose head dim differs from the cache's.
pub fn block_sparse_attn_extend_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    mask: &HipMask,
    scale: f32,
    extra_window_tokens: usize,
    rope: &Rope,
) -> Result<Tensor> {
    check_scale(scale)?;
    let dims = kv.dims(q)?;
    check_rope(rope, &dims)?;
    mask.check_fits(&dims)?;
    if mask.block_size_q == 0 || mask.block_size_k == 0 {
        let sizes = format!("block_size_q {}, block_size_k {}", mask.block_size_q, mask.block_size_k);
        return Err(Error::arg("mask", sizes, "block sizes must be at least 1"));
    }
    attend(q, &Source::Host(*kv), &dims, mask, extra_window_tokens, rope, scale)
}

/// HiP attention with Dynamic RoPE over a paged sequence (prefill): `q: [1, t_q, heads_q, d]`
/// holds the **un-rotated** queries of the sequence's last `t_q` tokens, `kv` **un-rotated**
/// keys; `rope` is the model's embedding. A fresh mask per call (with the prefill tail of
/// `cfg`). Returns f32 `[1, t_q, heads_q, d]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use hip_kernels::{hip_attn_extend_paged, HipConfig, PagedKv, Rope, RopeExtend};
/// let (t, d) = (300usize, 16usize);
/// let k: Vec<f32> = (0..t * d).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
/// let v = k.clone();
/// let kv = PagedKv { k: &k, v: &v, block_table: &[0], block_size: t, heads_kv: 1, head_dim: d, len: t };
/// let q = Tensor::randn(0f32, 1., (1, 4, 2, d), &Device::Cpu)?;
/// let cfg = HipConfig::default().with_k(64).with_rope_extend(RopeExtend::default());
/// let rope = Rope::new(d, 10_000.0, false)?;
/// let out = hip_attn_extend_paged(&q, &kv, &cfg, &rope, 0.25)?;
/// assert_eq!(out.dims(), &[1, 4, 2, d]);
/// # Ok::<(), hip_kernels::Error>(())
/// ```
///
/// # Errors
/// As [`crate::hip_attn_paged`]; a rope whose head dim differs from the cache's.
pub fn hip_attn_extend_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
) -> Result<Tensor> {
    prefill(q, Source::Host(*kv), cfg, rope, scale)
}

/// One decode step of HiP attention with Dynamic RoPE over a paged sequence: as
/// [`hip_attn_extend_paged`], with the mask re-estimated every `cfg.refresh_interval` steps
/// ([`MaskCache`], kept on the host).
///
/// # Errors
/// As [`hip_attn_extend_paged`].
pub fn hip_attn_extend_decode_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    decode(q, Source::Host(*kv), cfg, rope, scale, cache)
}

/// [`hip_attn_extend_paged`] over a paged cache on CUDA: `kv` as for
/// [`crate::cuda::hip_attn_paged_cuda`], `table` the same block table on the host. Returns f32.
///
/// # Errors
/// As [`hip_attn_extend_paged`] and [`crate::cuda::hip_mask_paged_cuda`].
#[cfg(feature = "cuda")]
pub fn hip_attn_extend_paged_cuda(
    q: &Tensor,
    kv: &crate::cuda::CudaPagedKv<'_>,
    table: &[u32],
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
) -> Result<Tensor> {
    check_table(table, kv.len, kv.block_size)?;
    prefill(q, Source::Device { kv: *kv, table }, cfg, rope, scale)
}

/// [`hip_attn_extend_decode_paged`] over a paged cache on CUDA (see
/// [`hip_attn_extend_paged_cuda`]); the cached mask is kept on the host.
///
/// # Errors
/// As [`hip_attn_extend_paged_cuda`].
#[cfg(feature = "cuda")]
pub fn hip_attn_extend_decode_paged_cuda(
    q: &Tensor,
    kv: &crate::cuda::CudaPagedKv<'_>,
    table: &[u32],
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    check_table(table, kv.len, kv.block_size)?;
    decode(q, Source::Device { kv: *kv, table }, cfg, rope, scale, cache)
}

/// A prefill chunk over `src`: the prefill tail split, a fresh mask per part, then attention.
fn prefill(q: &Tensor, src: Source<'_>, cfg: &HipConfig, rope: &Rope, scale: f32) -> Result<Tensor> {
    cfg.validate()?;
    check_scale(scale)?;
    let dims = src.dims(q)?;
    check_rope(rope, &dims)?;
    with_prefill_tail(q, dims.t_q, cfg, |q, cut, cfg| {
        let src = src.with_len(src.len() - cut);
        let dims = src.dims(q)?;
        let mask = src.mask(q, cfg, rope, scale)?;
        attend(q, &src, &dims, &mask, 0, rope, scale)
    })
}

/// A decode step over `src` with the mask cache.
fn decode(
    q: &Tensor,
    src: Source<'_>,
    cfg: &HipConfig,
    rope: &Rope,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    check_scale(scale)?;
    let dims = src.dims(q)?;
    check_rope(rope, &dims)?;
    cache.step(
        &dims,
        cfg,
        || src.mask(q, cfg, rope, scale),
        |mask, extra| attend(q, &src, &dims, mask, extra, rope, scale),
    )
}

fn check_rope(rope: &Rope, dims: &AttnDims) -> Result<()> {
    if rope.head_dim() != dims.head_dim {
        return Err(Error::arg(
            "rope",
            format!("head dim {}", rope.head_dim()),
            format!("must match the cache's head dim {}", dims.head_dim),
        ));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn check_table(table: &[u32], len: usize, block_size: usize) -> Result<()> {
    let needed = len.div_ceil(block_size.max(1));
    if table.len() < needed {
        return Err(Error::arg(
            "block_table",
            format!("{} entries", table.len()),
            format!("{len} tokens need {needed} blocks"),
        ));
    }
    Ok(())
}
