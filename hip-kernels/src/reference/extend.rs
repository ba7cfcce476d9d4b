use candle_core::Tensor;

use super::{dot, output, to_f64, weighted_values};
use crate::error::Result;
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;
use crate::rope::Rope;

/// Reference block-sparse attention with Dynamic RoPE's StreamingLLM positions
/// ([`crate::extend`]), over **un-rotated** `q` and `k` (contiguous, shapes as
/// [`crate::dense_attn`]).
///
/// For query block `m` of head `h` (queries `i0..i1`, the last at position `p_last`), with
/// `w = window_tokens + extra_window_tokens` and `R = max(w, 1) + (i1 - i0) - 1`, the block's key
/// list `U` is, in order, every `j <= p_last` that is a sink token, lies in one of the mask's
/// blocks, or is one of the last `R` tokens up to `p_last`. Key `j` gets position `index of j in
/// U`, query `i` (at `p`) the position of `p` in `U`. Query `i` admits the keys
/// [`crate::reference::block_sparse_attn`] admits (`j <= p`: sink, window `j + w > p`, or a
/// selected block); scores `scale * rot(q, pos_q) · rot(k_j, pos_j)`, f64 softmax.
///
/// # Errors
/// Inconsistent shapes, dtypes or mask.
pub fn block_sparse_attn_extend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &HipMask,
    scale: f32,
    extra_window_tokens: usize,
    rope: &Rope,
) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    mask.check_fits(&dims)?;
    let (qd, kd, vd) = (to_f64(q)?, to_f64(k)?, to_f64(v)?);
    let (d, w) = (dims.head_dim, mask.window_tokens + extra_window_tokens);
    let mut out = Vec::new();
    for b in 0..dims.batch {
        for i in 0..dims.t_q {
            for h in 0..dims.heads_q {
                let m = i / mask.block_size_q;
                let (i0, i1) = (m * mask.block_size_q, ((m + 1) * mask.block_size_q).min(dims.t_q));
                let p_last = dims.query_pos(i1 - 1);
                let p = dims.query_pos(i);
                let region = w.max(1) + (i1 - i0) - 1;
                let blocks = mask.blocks(b, h, m);
                let in_block =
                    |j: usize| blocks.iter().any(|&s| j >= s as usize && j < s as usize + mask.block_size_k);
                let list: Vec<usize> = (0..=p_last)
                    .filter(|&j| j < mask.sink_tokens || in_block(j) || j + region > p_last)
                    .collect();
                let pos_of = |j: usize| list.binary_search(&j).expect("in the list");
                let g = h / dims.group();
                let mut qrow = qd[dims.q_off(b, i, h)..dims.q_off(b, i, h) + d].to_vec();
                rope.rotate_row_f64(&mut qrow, pos_of(p));
                let mut scores = Vec::new();
                let mut values = Vec::new();
                for &j in &list {
                    if j <= p && (j < mask.sink_tokens || j + w > p || in_block(j)) {
                        let o = dims.kv_off(b, j, g);
                        let mut krow = kd[o..o + d].to_vec();
                        rope.rotate_row_f64(&mut krow, pos_of(j));
                        scores.push(scale as f64 * dot(&qrow, &krow));
                        values.push(&vd[o..o + d]);
                    }
                }
                out.extend(weighted_values(&scores, &values, d));
            }
        }
    }
    output(&dims, out)
}
