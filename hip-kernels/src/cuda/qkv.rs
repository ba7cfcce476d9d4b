//! A step's attention input in one launch (`qkv_rope_write_*` in `kernels/fused.cu`): the q, k
//! and v bias, RoPE on q and k, q out and k / v into the paged cache pools. Replaces three bias
//! adds, two rotations and two scatters a layer.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

use super::fused::{FUSED, FUSED_MODULE};
use super::{alloc_out, check_same_device, cuda_device, cuda_err, dev_ptr, func, Launch};
use crate::error::{Error, Result};

/// The inputs of [`qkv_rope_write_cuda`].
#[derive(Debug, Clone, Copy)]
pub struct QkvRopeWrite<'a> {
    /// `[n, heads * head_dim]` rows of q before bias and RoPE: contiguous rows with a row stride
    /// of their own (a column range of one fused q/k/v product is fine).
    pub q: &'a Tensor,
    /// `[n, kv_heads * head_dim]` rows of k, like `q`.
    pub k: &'a Tensor,
    /// `[n, kv_heads * head_dim]` rows of v, like `q`.
    pub v: &'a Tensor,
    /// f32 `[(heads + 2 kv_heads) * head_dim]`: the q, k and v bias one after the other (or none).
    pub bias: Option<&'a Tensor>,
    /// f32 `[n, head_dim / 2]` RoPE tables of the tokens' positions ([`crate::Rope::tables`]).
    pub cos: &'a Tensor,
    /// f32 `[n, head_dim / 2]`.
    pub sin: &'a Tensor,
    /// Pairs `(2i, 2i + 1)` rather than halves `(i, i + head_dim / 2)` ([`crate::Rope::interleaved`]).
    pub interleaved: bool,
    /// u32 `[n]`: the pool row each token's k and v go to (rows past the pools are skipped).
    pub rows: &'a Tensor,
    /// `[pool_rows, kv_heads, head_dim]`, written in place (in q's dtype).
    pub k_pool: &'a Tensor,
    /// `[pool_rows, kv_heads, head_dim]`, written in place.
    pub v_pool: &'a Tensor,
    /// Query heads.
    pub heads: usize,
}

/// Adds the bias to q, k and v, rotates q and k, writes k and v into the pools at `rows` and
/// returns q `[n, heads, head_dim]`: the same as `x + bias`, [`crate::Rope::rotate_tokens`] and
/// a scatter of k and v rows, in one launch (computed in f32, each value rounded once to the
/// dtype: f32, bf16 or f16, the same for q, k, v and the pools).
///
/// # Errors
/// Shapes, dtypes, strides or devices that do not fit (typed, naming the argument).
pub fn qkv_rope_write_cuda(a: &QkvRopeWrite<'_>) -> Result<Tensor> {
    let dev = &cuda_device(a.q.device(), "qkv_rope_write")?;
    let dt = a.q.dtype();
    if !matches!(dt, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::DType { name: "q", expected: "f32, bf16 or f16".into(), got: dt });
    }
    let (pool_rows, kvh, d) = a
        .k_pool
        .dims3()
        .map_err(|_| Error::shape("k_pool", "[rows, kv_heads, head_dim]", a.k_pool.dims()))?;
    if a.v_pool.dims() != a.k_pool.dims() {
        return Err(Error::shape("v_pool", format!("{:?} like k_pool", a.k_pool.dims()), a.v_pool.dims()));
    }
    if d == 0 || d % 2 != 0 || a.heads == 0 || kvh == 0 {
        return Err(Error::arg("head_dim", d, "needs an even head dim and at least one head of each kind"));
    }
    let n = a.rows.dims1().map_err(|_| Error::shape("rows", "[n]", a.rows.dims()))?;
    if a.rows.dtype() != DType::U32 {
        return Err(Error::DType { name: "rows", expected: "u32".into(), got: a.rows.dtype() });
    }
    let mut strides = [0i64; 3];
    for (i, (name, t, width)) in
        [("q", a.q, a.heads * d), ("k", a.k, kvh * d), ("v", a.v, kvh * d)].into_iter().enumerate()
    {
        if t.dims() != [n, width] {
            return Err(Error::shape(name, format!("[{n}, {width}]"), t.dims()));
        }
        if t.dtype() != dt {
            return Err(Error::DType { name, expected: format!("{dt:?} like q"), got: t.dtype() });
        }
        let st = t.layout().stride();
        if st[1] != 1 {
            return Err(Error::arg(name, format!("strides {st:?}"), "needs contiguous rows"));
        }
        strides[i] = st[0] as i64;
    }
    for (name, t) in [("k_pool", a.k_pool), ("v_pool", a.v_pool)] {
        if t.dtype() != dt {
            return Err(Error::DType { name, expected: format!("{dt:?} like q"), got: t.dtype() });
        }
        if !t.is_contiguous() {
            return Err(Error::arg(name, "strided", "the pools must be contiguous"));
        }
    }
    for (name, t) in [("cos", a.cos), ("sin", a.sin)] {
        if t.dims() != [n, d / 2] || t.dtype() != DType::F32 {
            return Err(Error::shape(name, format!("f32 [{n}, {}]", d / 2), t.dims()));
        }
    }
    if let Some(b) = a.bias {
        let w = (a.heads + 2 * kvh) * d;
        if b.dims() != [w] || b.dtype() != DType::F32 {
            return Err(Error::shape("bias", format!("f32 [{w}]"), b.dims()));
        }
    }
    let all = [a.k, a.v, a.cos, a.sin, a.rows, a.k_pool, a.v_pool];
    check_same_device(a.q, all.into_iter().chain(a.bias), "qkv_rope_write")?;
    if n == 0 {
        return Ok(Tensor::zeros((0, a.heads, d), dt, a.q.device())?);
    }
    let (cos, sin, rows) = (a.cos.contiguous()?, a.sin.contiguous()?, a.rows.contiguous()?);
    let bias = a.bias.map(Tensor::contiguous).transpose()?;
    let l =
        Prepared { a, cos: &cos, sin: &sin, rows: &rows, bias: bias.as_ref(), n, pool_rows, kvh, d, strides };
    match dt {
        DType::BF16 => l.run::<bf16>(dev, "qkv_rope_write_bf16"),
        DType::F16 => l.run::<f16>(dev, "qkv_rope_write_f16"),
        _ => l.run::<f32>(dev, "qkv_rope_write_f32"),
    }
}

struct Prepared<'a> {
    a: &'a QkvRopeWrite<'a>,
    cos: &'a Tensor,
    sin: &'a Tensor,
    rows: &'a Tensor,
    bias: Option<&'a Tensor>,
    n: usize,
    pool_rows: usize,
    kvh: usize,
    d: usize,
    strides: [i64; 3],
}

impl Prepared<'_> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
    ) -> Result<Tensor> {
        let a = self.a;
        let (n, d, heads, kvh) = (self.n, self.d, a.heads, self.kvh);
        let stream = dev.cuda_stream();
        let (qp, kp, vp) = (dev_ptr::<T>(a.q, dev)?, dev_ptr::<T>(a.k, dev)?, dev_ptr::<T>(a.v, dev)?);
        let (kpool, vpool) = (dev_ptr::<T>(a.k_pool, dev)?, dev_ptr::<T>(a.v_pool, dev)?);
        let (cp, sp) = (dev_ptr::<f32>(self.cos, dev)?, dev_ptr::<f32>(self.sin, dev)?);
        let rp = dev_ptr::<u32>(self.rows, dev)?;
        let bp = match self.bias {
            Some(b) => dev_ptr::<f32>(b, dev)?,
            None => 0,
        };
        // The kernel writes every element (one thread per pair of every q head of every token).
        let out = alloc_out::<T>(dev, n * heads * d)?;
        {
            let (op, _g) = out.device_ptr(&stream);
            let f = func(dev, FUSED, FUSED_MODULE, name)?;
            let pairs = ((heads + 2 * kvh) * d / 2) as u32;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, pairs.div_ceil(256), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let [qs, ks, vs] = self.strides;
            let n_rows = self.pool_rows as i64;
            let (h, hk, d32, il) = (heads as i32, kvh as i32, d as i32, i32::from(a.interleaved));
            let mut b = Launch::new(&stream, &f);
            b.arg(&qp).arg(&kp).arg(&vp).arg(&qs).arg(&ks).arg(&vs).arg(&bp).arg(&cp).arg(&sp).arg(&rp);
            b.arg(&n_rows).arg(&op).arg(&kpool).arg(&vpool).arg(&h).arg(&hk).arg(&d32).arg(&il);
            // SAFETY: the argument list matches `qkv_rope_write_*`; every pointer holds the extents
            // checked above (rows past the pools are skipped on the device).
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        let s = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Tensor::from_storage(Storage::Cuda(s), (n, heads, d), BackpropOp::none(), false))
    }
}
