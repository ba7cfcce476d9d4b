//! Shape conventions and checks shared by every op.
//!
//! All ops take **token-major** tensors, the layout a model produces after its q/k/v projections
//! and the one a KV cache appends to:
//!
//! * `q: [batch, t_q, heads_q, head_dim]`
//! * `k, v: [batch, t_k, heads_kv, head_dim]`, with `heads_q` a multiple of `heads_kv` (GQA) and
//!   `t_q <= t_k`: the queries are the **last** `t_q` of the `t_k` positions, so query `i` sits at
//!   position `t_k - t_q + i` and sees keys `0..=t_k - t_q + i` (causal with a query offset).
//! * outputs: `[batch, t_q, heads_q, head_dim]` in the dtype of `q`.

use candle_core::Tensor;

use crate::elem::check_dtype;
use crate::error::{Error, Result};

/// The largest head dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Sizes of one attention call, checked by [`AttnDims::from_qkv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch size.
    pub batch: usize,
    /// Query tokens.
    pub t_q: usize,
    /// Key/value tokens.
    pub t_k: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl AttnDims {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }
    /// Position of query `i` (`t_k - t_q + i`).
    pub fn query_pos(&self, i: usize) -> usize {
        self.t_k - self.t_q + i
    }
    /// Offset of query row `(b, i, h)` in a contiguous q/out buffer.
    #[inline]
    pub(crate) fn q_off(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.t_q + i) * self.heads_q + h) * self.head_dim
    }
    /// Offset of key row `(b, j, g)` in a contiguous k/v buffer.
    #[inline]
    pub(crate) fn kv_off(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.t_k + j) * self.heads_kv + g) * self.head_dim
    }

    /// Checks q, k, v (and only q and k when `v` is `None`) and returns their sizes.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong rank, mismatched batch / head dim / kv heads, heads_q not a
    /// multiple of heads_kv, zero sizes, `t_q > t_k` or a head dim over [`MAX_HEAD_DIM`];
    /// [`Error::DType`] for an unsupported or mismatched dtype.
    pub fn from_qkv(q: &Tensor, k: &Tensor, v: Option<&Tensor>) -> Result<Self> {
        let qd = q.dims();
        let kd = k.dims();
        let want = "4 dims [batch, tokens, heads, head_dim]";
        if qd.len() != 4 {
            return Err(Error::shape("q", want, qd));
        }
        if kd.len() != 4 {
            return Err(Error::shape("k", want, kd));
        }
        let (batch, t_q, heads_q, head_dim) = (qd[0], qd[1], qd[2], qd[3]);
        let (t_k, heads_kv) = (kd[1], kd[2]);
        if batch == 0 || t_q == 0 || heads_q == 0 || head_dim == 0 {
            return Err(Error::shape("q", "non-zero sizes", qd));
        }
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::shape("q", format!("head_dim <= {MAX_HEAD_DIM}"), qd));
        }
        if kd[0] != batch || kd[3] != head_dim || heads_kv == 0 {
            return Err(Error::shape(
                "k",
                format!("[{batch}, t_k, heads_kv > 0, {head_dim}] to match q"),
                kd,
            ));
        }
        if heads_q % heads_kv != 0 {
            return Err(Error::shape("q", format!("heads_q a multiple of heads_kv = {heads_kv}"), qd));
        }
        if t_q > t_k {
            return Err(Error::shape(
                "k",
                format!("at least t_q = {t_q} tokens (queries are the last t_q positions)"),
                kd,
            ));
        }
        let dq = check_dtype("q", q)?;
        let dk = check_dtype("k", k)?;
        if dk != dq {
            return Err(Error::DType { name: "k", expected: format!("{dq:?} like q"), got: dk });
        }
        if let Some(v) = v {
            if v.dims() != kd {
                return Err(Error::shape("v", format!("{kd:?} like k"), v.dims()));
            }
            let dv = check_dtype("v", v)?;
            if dv != dq {
                return Err(Error::DType { name: "v", expected: format!("{dq:?} like q"), got: dv });
            }
        }
        Ok(AttnDims { batch, t_q, t_k, heads_q, heads_kv, head_dim })
    }
}

/// Checks a softmax scale.
pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() && scale > 0.0 {
        Ok(())
    } else {
        Err(Error::arg("scale", scale, "must be finite and positive"))
    }
}
