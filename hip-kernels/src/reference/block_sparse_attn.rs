use candle_core::Tensor;

use super::{attend_one, output, to_f64};
use crate::error::Result;
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;

/// Reference block-sparse attention: query `i` (head `h`, block `m`) at position `p` admits key
/// `j <= p` when it is a sink token, lies in its window of `window_tokens + extra_window_tokens`
/// keys, or lies inside one of the mask's blocks for `(b, h, m)`. f64 softmax over the admitted
/// keys. Same contract as [`crate::block_sparse_attn`], output in f32.
///
/// # Errors
/// Inconsistent shapes, dtypes or mask.
pub fn block_sparse_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &HipMask,
    scale: f32,
    extra_window_tokens: usize,
) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    mask.check_fits(&dims)?;
    let (qd, kd, vd) = (to_f64(q)?, to_f64(k)?, to_f64(v)?);
    let window = mask.window_tokens + extra_window_tokens;
    let mut out = Vec::new();
    for b in 0..dims.batch {
        for i in 0..dims.t_q {
            for h in 0..dims.heads_q {
                let p = dims.query_pos(i);
                let blocks = mask.blocks(b, h, i / mask.block_size_q);
                let in_block =
                    |j: usize| blocks.iter().any(|&s| j >= s as usize && j < s as usize + mask.block_size_k);
                let admit = |j: usize| j < mask.sink_tokens || j + window > p || in_block(j);
                out.extend(attend_one(&qd, &kd, &vd, &dims, scale as f64, (b, i, h), admit));
            }
        }
    }
    output(&dims, out)
}
