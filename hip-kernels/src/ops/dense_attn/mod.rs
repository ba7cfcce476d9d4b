//! Exact causal attention (flash-style online softmax, O(T) memory), with GQA and a query offset.

pub(crate) mod cpu;

use candle_core::{Device, Tensor};

use crate::elem::{dispatch_dtype, Elem};
use crate::error::Result;
use crate::layout::{check_scale, AttnDims};
use crate::ops::tile::KvLayout;
use crate::ops::{require_cpu, with_cpu_data};

/// Exact causal attention.
///
/// * `q: [batch, t_q, heads_q, head_dim]`, `k, v: [batch, t_k, heads_kv, head_dim]`, all of one
///   dtype (f32, f16 or bf16); `heads_q` a multiple of `heads_kv`; `t_q <= t_k`; `head_dim <= 256`.
/// * Query `i` sits at position `t_k - t_q + i` and attends keys `0..=t_k - t_q + i`.
/// * `scale` multiplies `q·k` before the softmax (usually `1/sqrt(head_dim)`).
///
/// Returns `[batch, t_q, heads_q, head_dim]` in the dtype of `q`. Accumulation is f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (1, 5, 4, 64), &dev)?;
/// let k = Tensor::randn(0f32, 1., (1, 9, 2, 64), &dev)?;
/// let v = Tensor::randn(0f32, 1., (1, 9, 2, 64), &dev)?;
/// let out = hip_kernels::dense_attn(&q, &k, &v, 0.125)?;
/// assert_eq!(out.dims(), &[1, 5, 4, 64]);
/// # Ok::<(), hip_kernels::Error>(())
/// ```
///
/// # Errors
/// [`crate::Error::Shape`] / [`crate::Error::DType`] for inconsistent inputs,
/// [`crate::Error::InvalidArgument`] for a non-finite or non-positive scale,
/// [`crate::Error::UnsupportedDevice`] for tensors on a device this build does not support. With
/// the `cuda` feature, CUDA tensors run the CUDA kernel (bf16/f16, head dims 64 and 128).
pub fn dense_attn(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    check_scale(scale)?;
    #[cfg(feature = "cuda")]
    if crate::cuda::is_cuda(q) {
        return crate::cuda::span_attn(q, k, v, &dims, crate::cuda::Keys::Dense, None, scale);
    }
    require_cpu("dense_attn", &[q, k, v])?;
    dispatch_dtype!(q.dtype(), E => run::<E>(q, k, v, &dims, scale))
}

fn run<E: Elem>(q: &Tensor, k: &Tensor, v: &Tensor, dims: &AttnDims, scale: f32) -> Result<Tensor> {
    let out = with_cpu_data::<E, _>("q", q, |qd| {
        with_cpu_data::<E, _>("k", k, |kd| {
            with_cpu_data::<E, _>("v", v, |vd| {
                Ok(cpu::dense_attn_cpu(qd, kd, vd, dims, KvLayout::Contiguous, scale))
            })
        })
    })?;
    let shape = (dims.batch, dims.t_q, dims.heads_q, dims.head_dim);
    Ok(Tensor::from_vec(E::store(out), shape, &Device::Cpu)?)
}
