//! Fused kernels of the transformer step around attention (`kernels/fused.cu`): each replaces
//! several one-operation launches of a decode step, whose count (not bytes) bounds a step of a
//! small model on a large GPU.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

use super::{alloc_out, check_same_device, cuda_device, cuda_err, dev_ptr, func, Launch};
use crate::error::{Error, Result};

pub(super) const FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
pub(super) const FUSED_MODULE: &str = "hip_fused";

/// The residual update and the next RMSNorm in one launch: returns `(x + delta, rms_norm(x +
/// delta) * w)`, the first in f32, the second in `out` (f32, bf16 or f16). `x: [rows, h]` f32,
/// `delta: [rows, h]` in `out` (or none: only the norm), `w: [h]` f32; all on one CUDA device.
/// Equals `x + delta.to_dtype(F32)` followed by `candle_nn::ops::rms_norm(.., w, eps)` and a
/// conversion to `out`, which are three or four launches.
///
/// # Errors
/// Shapes, dtypes or devices that do not fit (typed, naming the argument).
pub fn add_rms_norm_cuda(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    out: DType,
) -> Result<(Tensor, Tensor)> {
    let dev = &cuda_device(x.device(), "add_rms_norm")?;
    let (rows, h) = x.dims2().map_err(|_| Error::shape("x", "[rows, hidden]", x.dims()))?;
    if x.dtype() != DType::F32 {
        return Err(Error::DType { name: "x", expected: "f32".into(), got: x.dtype() });
    }
    if !matches!(out, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::DType { name: "out", expected: "f32, bf16 or f16".into(), got: out });
    }
    if w.dims() != [h] || w.dtype() != DType::F32 {
        return Err(Error::shape("w", format!("f32 [{h}]"), w.dims()));
    }
    if let Some(d) = delta {
        if d.dims() != [rows, h] {
            return Err(Error::shape("delta", format!("[{rows}, {h}]"), d.dims()));
        }
        if d.dtype() != out {
            return Err(Error::DType {
                name: "delta",
                expected: format!("{out:?} like the output"),
                got: d.dtype(),
            });
        }
    }
    check_same_device(x, std::iter::once(w).chain(delta), "add_rms_norm")?;
    if rows == 0 || h == 0 {
        return Ok((x.clone(), x.to_dtype(out)?));
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let delta = delta.map(Tensor::contiguous).transpose()?;
    match out {
        DType::BF16 => launch::<bf16>(&x, delta.as_ref(), &w, eps, dev, "add_rms_norm_bf16"),
        DType::F16 => launch::<f16>(&x, delta.as_ref(), &w, eps, dev, "add_rms_norm_f16"),
        _ => launch::<f32>(&x, delta.as_ref(), &w, eps, dev, "add_rms_norm_f32"),
    }
}

fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::WithDType>(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    dev: &candle_core::CudaDevice,
    name: &str,
) -> Result<(Tensor, Tensor)> {
    let (rows, h) = x.dims2()?;
    let stream = dev.cuda_stream();
    let (xp, wp) = (dev_ptr::<f32>(x, dev)?, dev_ptr::<f32>(w, dev)?);
    let dp = match delta {
        Some(d) => dev_ptr::<T>(d, dev)?,
        None => 0,
    };
    // The kernel writes every element of both (one CTA per row, every column of it).
    let (xo, xn) = (alloc_out::<f32>(dev, rows * h)?, alloc_out::<T>(dev, rows * h)?);
    {
        let (xop, _g1) = xo.device_ptr(&stream);
        let (xnp, _g2) = xn.device_ptr(&stream);
        let f = func(dev, FUSED, FUSED_MODULE, name)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let h32 = h as i32;
        let mut b = Launch::new(&stream, &f);
        b.arg(&xp).arg(&dp).arg(&wp).arg(&eps).arg(&h32).arg(&xop).arg(&xnp);
        // SAFETY: argument list matches `add_rms_norm_*` (256 threads); buffers hold rows * h.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    let wrap = |s: CudaStorage| Tensor::from_storage(Storage::Cuda(s), (rows, h), BackpropOp::none(), false);
    Ok((
        wrap(CudaStorage::wrap_cuda_slice(xo, dev.clone())),
        wrap(CudaStorage::wrap_cuda_slice(xn, dev.clone())),
    ))
}

/// SwiGLU's gate over one fused gate/up product: `y: [rows, 2 ffn]` (gate columns, then up)
/// gives `silu(y[.., ..ffn]) * y[.., ffn..]`, `[rows, ffn]` in `y`'s dtype (f32, bf16 or f16;
/// computed in f32). One launch instead of a silu and a product over two strided views.
///
/// # Errors
/// A `y` that is not a CUDA `[rows, even]` float tensor (typed).
pub fn silu_mul_cuda(y: &Tensor) -> Result<Tensor> {
    let dev = &cuda_device(y.device(), "silu_mul")?;
    let (rows, w) = y.dims2().map_err(|_| Error::shape("y", "[rows, 2 ffn]", y.dims()))?;
    if w % 2 != 0 {
        return Err(Error::shape("y", "[rows, 2 ffn] (an even width)", y.dims()));
    }
    let ffn = w / 2;
    if rows * ffn == 0 {
        return Ok(Tensor::zeros((rows, ffn), y.dtype(), y.device())?);
    }
    let y = y.contiguous()?;
    match y.dtype() {
        DType::BF16 => silu_mul_launch::<bf16>(&y, dev, "silu_mul_bf16"),
        DType::F16 => silu_mul_launch::<f16>(&y, dev, "silu_mul_f16"),
        DType::F32 => silu_mul_launch::<f32>(&y, dev, "silu_mul_f32"),
        other => Err(Error::DType { name: "y", expected: "f32, bf16 or f16".into(), got: other }),
    }
}

fn silu_mul_launch<
    T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::WithDType,
>(
    y: &Tensor,
    dev: &candle_core::CudaDevice,
    name: &str,
) -> Result<Tensor> {
    let (rows, w) = y.dims2()?;
    let ffn = w / 2;
    let stream = dev.cuda_stream();
    let yp = dev_ptr::<T>(y, dev)?;
    // The grid-stride loop writes every element.
    let out = alloc_out::<T>(dev, rows * ffn)?;
    {
        let (op, _g) = out.device_ptr(&stream);
        let f = func(dev, FUSED, FUSED_MODULE, name)?;
        let total = (rows * ffn) as u32;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(4096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, f32_ffn) = (rows as i64, ffn as i32);
        let mut b = Launch::new(&stream, &f);
        b.arg(&yp).arg(&op).arg(&n).arg(&f32_ffn);
        // SAFETY: argument list matches `silu_mul_*`; y holds rows * 2 ffn, out rows * ffn.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    let s = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(s), (rows, ffn), BackpropOp::none(), false))
}

/// The arg max of each row of `x: [rows, cols]` (f32, CUDA), the lowest column among equal
/// maxima, copied to the host: what `x.argmax(1)?.to_vec1::<u32>()` gives, in one launch over
/// many CTAs a row (candle's runs one CTA a row). NaN counts as larger than any number.
///
/// # Errors
/// A `x` that is not a CUDA `[rows, cols > 0]` f32 tensor (typed); CUDA errors.
pub fn argmax_rows_cuda(x: &Tensor) -> Result<Vec<u32>> {
    let dev = &cuda_device(x.device(), "argmax_rows")?;
    let (rows, cols) = x.dims2().map_err(|_| Error::shape("x", "[rows, cols]", x.dims()))?;
    if x.dtype() != DType::F32 {
        return Err(Error::DType { name: "x", expected: "f32".into(), got: x.dtype() });
    }
    if cols == 0 || cols > u32::MAX as usize {
        return Err(Error::shape("x", "[rows, 1..2^32 cols]", x.dims()));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let x = x.contiguous()?;
    let stream = dev.cuda_stream();
    let xp = dev_ptr::<f32>(&x, dev)?;
    let mut keys = stream.alloc_zeros::<u64>(rows).map_err(cuda_err)?;
    {
        let (kp, _g) = keys.device_ptr_mut(&stream);
        let f = func(dev, FUSED, FUSED_MODULE, "argmax_rows_f32")?;
        // ~16k columns a CTA: 10 CTAs a row of a 152k vocabulary.
        let chunks = cols.div_ceil(16 * 1024).clamp(1, 1024) as u32;
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, chunks, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let c = cols as i64;
        let mut b = Launch::new(&stream, &f);
        b.arg(&xp).arg(&c).arg(&kp);
        // SAFETY: argument list matches `argmax_rows_f32`; x holds rows * cols, keys rows.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    let host = stream.clone_dtoh(&keys).map_err(cuda_err)?;
    // The low 32 bits hold the column inverted (see argmax_key in fused.cu).
    Ok(host.into_iter().map(|k| !(k as u32)).collect())
}

/// `x` (bf16 or f16, CUDA, any shape) as f32, in one launch of 16-byte loads: what
/// `x.to_dtype(DType::F32)` gives (exactly: the conversion is exact), for the logits of a step
/// (candle's cast of 16 x 152k bf16 values took 25 us on the H200, this one about the copy
/// time). Other dtypes go through candle's cast.
///
/// # Errors
/// A `x` that is not on a CUDA device (typed); CUDA errors.
pub fn to_f32_cuda(x: &Tensor) -> Result<Tensor> {
    let dev = &cuda_device(x.device(), "to_f32")?;
    let name = match x.dtype() {
        DType::BF16 => "to_f32_bf16",
        DType::F16 => "to_f32_f16",
        _ => return Ok(x.to_dtype(DType::F32)?),
    };
    let x = x.contiguous()?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(x.to_dtype(DType::F32)?);
    }
    let xp = match x.dtype() {
        DType::BF16 => dev_ptr::<bf16>(&x, dev)?,
        _ => dev_ptr::<f16>(&x, dev)?,
    };
    let stream = dev.cuda_stream();
    let y = alloc_out::<f32>(dev, n)?;
    {
        let (yp, _g) = y.device_ptr(&stream);
        let f = func(dev, FUSED, FUSED_MODULE, name)?;
        let vec = i32::from(xp % 16 == 0);
        let per_cta = 256 * if vec == 1 { 8 } else { 1 };
        let ctas = n.div_ceil(per_cta).clamp(1, 4096) as u32;
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let n64 = n as i64;
        let mut b = Launch::new(&stream, &f);
        b.arg(&xp).arg(&yp).arg(&n64).arg(&vec);
        // SAFETY: argument list matches `to_f32_*`; x holds n values (16-byte aligned when vec
        // is 1), y n f32s, each written once.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    let s = CudaStorage::wrap_cuda_slice(y, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(s), x.shape().clone(), BackpropOp::none(), false))
}

/// `x Wᵀ` for a decode step's few rows: `x: [m, k]` with 1 ≤ m ≤ 16, `w: [n, k]` (a linear
/// layer's weights), both bf16 or both f16 on one CUDA device, `n % 8 == 0`, `k % 32 == 0`;
/// returns `[m, n]` in their dtype (f32 accumulation on tensor cores). One launch whose CTAs
/// stream the weights straight into the MMA operands; equals `x.matmul(&w.t())` up to the order
/// of the f32 sums. The kernel's form is picked from the shape ([`SmallMatmulForm::pick`]).
///
/// # Errors
/// Shapes, dtypes or devices that do not fit (typed, naming the argument).
pub fn matmul_small_cuda(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_small_cuda_form(x, w, None)
}

/// How [`matmul_small_cuda`]'s kernel splits the work: each CTA computes `8 * tiles` output
/// columns of every row, its `warps` warps splitting `k` (block `b` of 32 to warp `b % warps`).
/// More tiles a CTA re-read `x` (from L2) fewer times; more warps put more loads in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallMatmulForm {
    /// Warps a CTA: 4, 8 or 16.
    pub warps: u32,
    /// Column tiles of 8 a CTA: 1, 2 or 4 (`n` must be a multiple of `8 * tiles`).
    pub tiles: u32,
}

impl SmallMatmulForm {
    /// Every form the kernel is compiled in.
    pub const ALL: [SmallMatmulForm; 9] = [
        Self::new(4, 1),
        Self::new(4, 2),
        Self::new(4, 4),
        Self::new(8, 1),
        Self::new(8, 2),
        Self::new(8, 4),
        Self::new(16, 1),
        Self::new(16, 2),
        Self::new(16, 4),
    ];

    const fn new(warps: u32, tiles: u32) -> Self {
        SmallMatmulForm { warps, tiles }
    }

    /// Whether the form's column tiles divide `n` output columns (`8 * tiles` a CTA).
    pub fn fits(self, n: usize) -> bool {
        n % (8 * self.tiles as usize) == 0
    }

    /// The form for `n` output columns: the fastest of `hip-bench matmul` on the H200
    /// (2026-12-04, Qwen2.5-1.5B's products at 1 and 16 rows, docs/benchmarks.md): 16 warps over
    /// 16 columns for the narrow products (n ≤ 2048, k up to 8960: 8.1–9.3 µs against cuBLAS's
    /// 9.6–10.5, down 17.3–19.2 against 17.8), 4 warps over 8 columns for gate/up (n 17,920:
    /// 25.2–26.2 against 24.9–25.2) and over 16 for the LM head (124.4 against 124.3).
    pub fn pick(n: usize) -> Self {
        let (warps, tiles) = if n >= 65_536 && n % 16 == 0 {
            (4, 2)
        } else if n >= 8192 {
            (4, 1)
        } else if n % 16 == 0 {
            (16, 2)
        } else {
            (8, 1)
        };
        SmallMatmulForm { warps, tiles }
    }
}

/// [`matmul_small_cuda`] in a given form (`None`: [`SmallMatmulForm::pick`]) — for benchmarks
/// and tests of each form.
///
/// # Errors
/// As [`matmul_small_cuda`], and [`Error::InvalidArgument`] for a form not in
/// [`SmallMatmulForm::ALL`] or whose tiles do not divide `n / 8`.
pub fn matmul_small_cuda_form(x: &Tensor, w: &Tensor, form: Option<SmallMatmulForm>) -> Result<Tensor> {
    let (dev, n) = check_small(x, w)?;
    let form = form.unwrap_or_else(|| SmallMatmulForm::pick(n));
    if !SmallMatmulForm::ALL.contains(&form) {
        return Err(Error::arg("form", format!("{form:?}"), "warps 4, 8 or 16 and tiles 1, 2 or 4"));
    }
    if !form.fits(n) {
        return Err(Error::arg("form", format!("{form:?}"), format!("8 * tiles must divide n = {n}")));
    }
    let kernel = format!("w{}_t{}", form.warps, form.tiles);
    let ctas = n / (8 * form.tiles as usize);
    small_launch(x, w, &dev, SmallLaunch { kernel: &kernel, warps: form.warps, ctas, cols: n })
}

/// SwiGLU's gate fused into the few-row product: `x: [m, k]` and `w: [2 ffn, k]` (the gate
/// rows, then the up rows: a fused gate/up weight) give `silu(x gateᵀ) * (x upᵀ)`, `[m, ffn]`
/// in their dtype, in one launch: bit for bit what [`matmul_small_cuda_form`] in a form with
/// the same `warps` followed by [`silu_mul_cuda`] gives (two launches). Each CTA computes 8
/// gate columns and the same 8 up columns. `warps`: 4, 8 or 16 (`None`: 4, the fastest form
/// for Qwen2.5-1.5B's gate/up product alone on the H200).
///
/// # Errors
/// As [`matmul_small_cuda`], and `ffn % 8 != 0` or warps not 4, 8 or 16 (typed).
pub fn matmul_small_glu_cuda(x: &Tensor, w: &Tensor, warps: Option<u32>) -> Result<Tensor> {
    let (dev, n) = check_small(x, w)?;
    if n % 16 != 0 {
        return Err(Error::shape("w", "[2 ffn, k] with ffn a multiple of 8", w.dims()));
    }
    let warps = warps.unwrap_or(4);
    if ![4, 8, 16].contains(&warps) {
        return Err(Error::arg("warps", warps, "4, 8 or 16"));
    }
    let kernel = format!("glu_w{warps}");
    small_launch(x, w, &dev, SmallLaunch { kernel: &kernel, warps, ctas: n / 16, cols: n / 2 })
}

/// The checks of the few-row products: `x: [1..=16, k]`, `w: [n, k]`, one dtype, one device,
/// `k % 32 == 0`, `n % 8 == 0`. Returns the device and `n`.
fn check_small(x: &Tensor, w: &Tensor) -> Result<(candle_core::CudaDevice, usize)> {
    let dev = cuda_device(x.device(), "matmul_small")?;
    check_same_device(x, [w], "matmul_small")?;
    let (m, k) = x.dims2().map_err(|_| Error::shape("x", "[m, k]", x.dims()))?;
    let (n, kw) = w.dims2().map_err(|_| Error::shape("w", "[n, k]", w.dims()))?;
    if !(1..=MATMUL_SMALL_MAX_ROWS).contains(&m) {
        return Err(Error::shape("x", "[1..=16 rows, k]", x.dims()));
    }
    if kw != k || k % 32 != 0 || k == 0 {
        return Err(Error::shape("w", "[n, k] with x's k, a multiple of 32", w.dims()));
    }
    if n % 8 != 0 || n == 0 || n > (u32::MAX as usize) * 8 {
        return Err(Error::shape("w", "[n, k] with n a multiple of 8", w.dims()));
    }
    if w.dtype() != x.dtype() {
        return Err(Error::DType {
            name: "w",
            expected: format!("{:?} (x's dtype)", x.dtype()),
            got: w.dtype(),
        });
    }
    if !matches!(x.dtype(), DType::BF16 | DType::F16) {
        return Err(Error::DType { name: "x", expected: "bf16 or f16".into(), got: x.dtype() });
    }
    Ok((dev, n))
}

/// The most rows [`matmul_small_cuda`] takes (one MMA tile).
pub const MATMUL_SMALL_MAX_ROWS: usize = 16;

/// One few-row product launch: kernel `matmul_small_{dtype}_{kernel}`, `ctas` CTAs of
/// `32 * warps` threads, output `[m, cols]`.
struct SmallLaunch<'a> {
    kernel: &'a str,
    warps: u32,
    ctas: usize,
    cols: usize,
}

fn small_launch(x: &Tensor, w: &Tensor, dev: &candle_core::CudaDevice, l: SmallLaunch<'_>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match x.dtype() {
        DType::BF16 => small_launch_t::<bf16>(&x, &w, dev, l),
        _ => small_launch_t::<f16>(&x, &w, dev, l),
    }
}

fn small_launch_t<
    T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::WithDType,
>(
    x: &Tensor,
    w: &Tensor,
    dev: &candle_core::CudaDevice,
    l: SmallLaunch<'_>,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dims2()?.0;
    let stream = dev.cuda_stream();
    let (xp, wp) = (dev_ptr::<T>(x, dev)?, dev_ptr::<T>(w, dev)?);
    // Each CTA writes its columns of every one of the m rows.
    let out = alloc_out::<T>(dev, m * l.cols)?;
    {
        let (op, _g) = out.device_ptr(&stream);
        let tn = if T::DTYPE == DType::BF16 { "bf16" } else { "f16" };
        let f = func(dev, FUSED, FUSED_MODULE, &format!("matmul_small_{tn}_{}", l.kernel))?;
        let cfg = LaunchConfig {
            grid_dim: (l.ctas as u32, 1, 1),
            block_dim: (32 * l.warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m32, n32, k32) = (m as i32, n as i32, k as i32);
        let mut b = Launch::new(&stream, &f);
        b.arg(&xp).arg(&wp).arg(&op).arg(&m32).arg(&n32).arg(&k32);
        // SAFETY: argument list matches `matmul_small_*` (compiled for 32 * warps threads); x
        // holds m * k, w n * k and out m * cols elements; 1 <= m <= 16, the CTAs' tiles cover
        // n (or ffn = n / 2 gate columns), k % 32 == 0 (checked by the callers).
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    let s = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(Storage::Cuda(s), (m, l.cols), BackpropOp::none(), false))
}
