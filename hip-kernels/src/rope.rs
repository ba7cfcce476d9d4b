//! Rotary position embeddings (RoPE) with arbitrary per-token positions, for attention that
//! rotates queries and keys itself ([`crate::extend`]).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A model's rotary position embedding: the frequencies `theta^(-2i/head_dim)` and the pairing
/// of dimensions (`interleaved`: pairs `(2i, 2i+1)`, as GGUF Llama weights; otherwise halves
/// `(i, i + head_dim/2)`, as Hugging Face Qwen2 / Llama).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use hip_kernels::Rope;
/// let rope = Rope::new(8, 10_000.0, false)?;
/// let x = Tensor::randn(0f32, 1., (1, 3, 2, 8), &Device::Cpu)?; // [batch, tokens, heads, dim]
/// let y = rope.rotate(&x, &[0, 5, 9])?;
/// // Position 0 is the identity.
/// let d0 = (y.narrow(1, 0, 1)? - x.narrow(1, 0, 1)?)?.abs()?.flatten_all()?.max(0)?;
/// assert!(d0.to_scalar::<f32>()? < 1e-6);
/// # Ok::<(), hip_kernels::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
    interleaved: bool,
}

impl Rope {
    /// The embedding of a model with `head_dim` (even) and base `theta` (> 0).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an odd or zero head dim or a theta that is not positive.
    pub fn new(head_dim: usize, theta: f32, interleaved: bool) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::arg("head_dim", head_dim, "RoPE needs an even, non-zero head dim"));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::arg("rope theta", theta, "must be positive and finite"));
        }
        let inv_freq =
            (0..head_dim).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32)).collect();
        Ok(Rope { inv_freq, interleaved })
    }

    /// The head dim.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// The rotation frequencies, one per pair of dimensions.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Whether pairs are adjacent dimensions `(2i, 2i+1)` rather than halves.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// `cos` and `sin` tables `[positions, head_dim / 2]` (f32) for the given positions.
    ///
    /// # Errors
    /// Candle errors (allocation).
    pub fn tables(&self, positions: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let n = positions.len();
        Ok((Tensor::from_vec(cos, (n, half), dev)?, Tensor::from_vec(sin, (n, half), dev)?))
    }

    /// Rotates `x: [batch, heads, tokens, head_dim]` (head-major) with tables of its `tokens`
    /// positions (from [`tables`](Self::tables)); computed in `x`'s dtype (f32 / f16 / bf16).
    ///
    /// # Errors
    /// Shapes that do not fit, candle errors.
    pub fn rotate_heads(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        })
    }

    /// Rotates token-major `x: [batch, tokens, heads, head_dim]` with tables of its `tokens`
    /// positions; computed in `x`'s dtype. The halves pairing rotates the token-major layout
    /// directly (one kernel, no copies); the interleaved one goes through a head-major copy.
    ///
    /// # Errors
    /// Shapes that do not fit, candle errors.
    pub fn rotate_tokens(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.interleaved {
            let y = self.rotate_heads(&x.transpose(1, 2)?, cos, sin)?;
            return Ok(y.transpose(1, 2)?.contiguous()?);
        }
        let x = x.contiguous()?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        Ok(candle_nn::rotary_emb::rope_thd(&x, &cos, &sin)?)
    }

    /// Rotates token-major `x: [batch, tokens, heads, head_dim]`, token `i` at `positions[i]`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `x` is not 4-d with `positions.len()` tokens and this head dim.
    pub fn rotate(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        self.check_tokens(x, positions)?;
        let (cos, sin) = self.tables(positions, x.device())?;
        self.rotate_tokens(x, &cos, &sin)
    }

    /// The inverse of [`rotate`](Self::rotate): turns keys rotated to `positions` back into
    /// un-rotated ones.
    ///
    /// # Errors
    /// As [`rotate`](Self::rotate).
    pub fn unrotate(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        self.check_tokens(x, positions)?;
        let (cos, sin) = self.tables(positions, x.device())?;
        self.rotate_tokens(x, &cos, &sin.neg()?)
    }

    fn check_tokens(&self, x: &Tensor, positions: &[usize]) -> Result<()> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != positions.len() || dims[3] != self.head_dim() {
            return Err(Error::shape(
                "x",
                format!("[batch, {}, heads, {}]", positions.len(), self.head_dim()),
                dims,
            ));
        }
        Ok(())
    }

    /// Rotates one f64 row of `head_dim` values to `pos` (the references' slow path).
    pub(crate) fn rotate_row_f64(&self, x: &mut [f64], pos: usize) {
        let half = self.inv_freq.len();
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let a = pos as f64 * f as f64;
            let (s, c) = a.sin_cos();
            let (ia, ib) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (xa, xb) = (x[ia], x[ib]);
            x[ia] = xa * c - xb * s;
            x[ib] = xa * s + xb * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor rotation equals the f64 row rotation, both pairings, awkward positions.
    #[test]
    fn rotate_matches_rows() {
        for interleaved in [false, true] {
            let rope = Rope::new(6, 500.0, interleaved).unwrap();
            let pos = [0usize, 1, 7, 97, 4099];
            let x = Tensor::randn(0f32, 1., (1, pos.len(), 2, 6), &Device::Cpu).unwrap();
            let y = rope.rotate(&x, &pos).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (t, &p) in pos.iter().enumerate() {
                for h in 0..2 {
                    let o = (t * 2 + h) * 6;
                    let mut row: Vec<f64> = xs[o..o + 6].iter().map(|&v| v as f64).collect();
                    rope.rotate_row_f64(&mut row, p);
                    for (a, b) in row.iter().zip(&y[o..o + 6]) {
                        assert!((a - *b as f64).abs() < 1e-3, "{interleaved} pos {p}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The token-major rotation equals the head-major one (transposed around it), both pairings,
    /// f32 and bf16, at awkward token counts.
    #[test]
    fn token_major_equals_head_major() {
        for interleaved in [false, true] {
            let rope = Rope::new(64, 1e4, interleaved).unwrap();
            for t in [1usize, 7, 97] {
                let pos: Vec<usize> = (0..t).map(|i| i * 37 + 5).collect();
                let (cos, sin) = rope.tables(&pos, &Device::Cpu).unwrap();
                for dt in [candle_core::DType::F32, candle_core::DType::BF16] {
                    let x =
                        Tensor::randn(0f32, 1., (2, t, 3, 64), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
                    let a = rope.rotate_tokens(&x, &cos, &sin).unwrap();
                    let b = rope.rotate_heads(&x.transpose(1, 2).unwrap(), &cos, &sin).unwrap();
                    let b = b.transpose(1, 2).unwrap();
                    let d = (a.to_dtype(candle_core::DType::F32).unwrap()
                        - b.to_dtype(candle_core::DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                    assert!(d <= 1e-6, "{interleaved} t {t} {dt:?}: {d}");
                }
            }
        }
    }

    #[test]
    fn unrotate_inverts_rotate() {
        let rope = Rope::new(8, 1e6, false).unwrap();
        let pos: Vec<usize> = vec![0, 3, 4099, 131_071];
        let x = Tensor::randn(0f32, 1., (1, 4, 2, 8), &Device::Cpu).unwrap();
        let back = rope.unrotate(&rope.rotate(&x, &pos).unwrap(), &pos).unwrap();
        let err = (back - &x).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Rope::new(7, 1e4, false).is_err());
        assert!(Rope::new(0, 1e4, false).is_err());
        assert!(Rope::new(8, 0.0, false).is_err());
        assert!(Rope::new(8, f32::NAN, false).is_err());
    }
}
