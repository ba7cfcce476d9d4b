//! Slow, readable references for every op: plain loops, f64 arithmetic, no tiling, no
//! parallelism. Tests compare the fast ops against these at awkward sizes.

mod block_sparse_attn;
mod dense_attn;
mod extend;
mod hip_mask;

pub use block_sparse_attn::block_sparse_attn;
pub use dense_attn::dense_attn;
pub use extend::block_sparse_attn_extend;
pub use hip_mask::hip_mask;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::layout::AttnDims;

/// A tensor's data as f64, row-major.
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// `sum_i a[i] * b[i]` in f64.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax-weighted sum of value rows: `sum_j softmax(scores)_j * v_j`, where `keys[j]` indexes
/// `scores` and `values`. Returns zeros when `keys` is empty.
fn weighted_values(scores: &[f64], values: &[&[f64]], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; d];
    if scores.is_empty() {
        return out;
    }
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    for (w, v) in weights.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += w / total * x;
        }
    }
    out
}

/// Builds a `[batch, t_q, heads_q, head_dim]` f32 tensor from f64 rows.
fn output(dims: &AttnDims, data: Vec<f64>) -> Result<Tensor> {
    let data: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(data, (dims.batch, dims.t_q, dims.heads_q, dims.head_dim), &Device::Cpu)?)
}

/// The attention of query `(b, i, h)` over the keys `j` for which `admit(j)` holds.
fn attend_one(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: &AttnDims,
    scale: f64,
    (b, i, h): (usize, usize, usize),
    admit: impl Fn(usize) -> bool,
) -> Vec<f64> {
    let d = dims.head_dim;
    let g = h / dims.group();
    let qrow = &q[dims.q_off(b, i, h)..dims.q_off(b, i, h) + d];
    let mut scores = Vec::new();
    let mut values = Vec::new();
    for j in 0..=dims.query_pos(i) {
        if admit(j) {
            let o = dims.kv_off(b, j, g);
            scores.push(scale * dot(qrow, &k[o..o + d]));
            values.push(&v[o..o + d]);
        }
    }
    weighted_values(&scores, &values, d)
}
