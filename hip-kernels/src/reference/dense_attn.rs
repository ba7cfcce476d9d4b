use candle_core::Tensor;

use super::{attend_one, output, to_f64};
use crate::error::Result;
use crate::layout::AttnDims;

/// Reference exact causal attention: for each query, the softmax over all keys up to its position,
/// in f64. Same contract as [`crate::dense_attn`], output in f32.
///
/// # Errors
/// Inconsistent shapes or dtypes.
pub fn dense_attn(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    let (qd, kd, vd) = (to_f64(q)?, to_f64(k)?, to_f64(v)?);
    let mut out = Vec::with_capacity(dims.batch * dims.t_q * dims.heads_q * dims.head_dim);
    for b in 0..dims.batch {
        for i in 0..dims.t_q {
            for h in 0..dims.heads_q {
                out.extend(attend_one(&qd, &kd, &vd, &dims, scale as f64, (b, i, h), |_| true));
            }
        }
    }
    output(&dims, out)
}
