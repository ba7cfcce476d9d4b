//! Block-sparse attention over sink + sliding window + the key blocks of a [`HipMask`]
//! (hip-algorithm.md §1C).

pub(crate) mod cpu;

use candle_core::{Device, Tensor};

use crate::elem::{dispatch_dtype, Elem};
use crate::error::Result;
use crate::layout::{check_scale, AttnDims};
use crate::ops::hip_mask::HipMask;
use crate::ops::tile::KvLayout;
use crate::ops::{require_cpu, with_cpu_data};

/// Attention of each query over its sink, its window and the selected blocks of `mask`.
///
/// Query `i` at position `p = t_k - t_q + i` in query block `m = i / mask.block_size_q` of head `h`
/// admits key `j <= p` when
/// * `j < mask.sink_tokens` (sink), or
/// * `j + w > p` with `w = mask.window_tokens + extra_window_tokens` (its window), or
/// * `j` lies in one of `mask.blocks(b, h, m)`.
///
/// Each admitted key counts once even when it is in several of these sets, and keys past `p` are
/// never admitted (exact causal masking inside blocks). `extra_window_tokens` widens the window;
/// decode uses it to cover the tokens appended since the mask was estimated.
///
/// Shapes and dtypes as [`crate::dense_attn`]; the mask must have been estimated for the same
/// batch, query heads and number of query blocks.
///
/// # Errors
/// Inconsistent shapes, dtypes or mask; a bad scale; non-CPU tensors.
pub fn block_sparse_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &HipMask,
    scale: f32,
    extra_window_tokens: usize,
) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    check_scale(scale)?;
    mask.check_fits(&dims)?;
    #[cfg(feature = "cuda")]
    if crate::cuda::is_cuda(q) {
        let m = crate::cuda::CudaMask::new(mask, q.device())?;
        let keys = crate::cuda::Keys::Mask(&m, extra_window_tokens);
        return crate::cuda::span_attn(q, k, v, &dims, keys, None, scale);
    }
    require_cpu("block_sparse_attn", &[q, k, v])?;
    dispatch_dtype!(q.dtype(), E => run::<E>(q, k, v, &dims, mask, scale, extra_window_tokens))
}

fn run<E: Elem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: &AttnDims,
    mask: &HipMask,
    scale: f32,
    extra: usize,
) -> Result<Tensor> {
    let out = with_cpu_data::<E, _>("q", q, |qd| {
        with_cpu_data::<E, _>("k", k, |kd| {
            with_cpu_data::<E, _>("v", v, |vd| {
                Ok(cpu::block_sparse_attn_cpu(qd, kd, vd, dims, KvLayout::Contiguous, mask, scale, extra))
            })
        })
    })?;
    let shape = (dims.batch, dims.t_q, dims.heads_q, dims.head_dim);
    Ok(Tensor::from_vec(E::store(out), shape, &Device::Cpu)?)
}
