//! Fused kernels of the transformer step around attention (`kernels/fused.cu`): each replaces
//! several one-operation launches of a decode step, whose count (not bytes) bounds a step of a
//! small model on a large GPU.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::{cuda_err, dev_ptr, func};
use crate::error::{Error, Result};

const FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
const FUSED_MODULE: &str = "hip_fused";

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
    let Device::Cuda(dev) = x.device() else {
        return Err(Error::UnsupportedDevice {
            op: "add_rms_norm",
            device: format!("{:?}", x.device().location()),
        });
    };
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
    for (name, t) in [("w", Some(w)), ("delta", delta)] {
        if let Some(t) = t {
            if !t.device().same_device(x.device()) {
                return Err(Error::UnsupportedDevice {
                    op: name,
                    device: format!("{:?}", t.device().location()),
                });
            }
        }
    }
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

fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
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
    // SAFETY: plain floats; the kernel writes every element of both (one CTA per row, every
    // column of it).
    let (xo, xn) = unsafe { (dev.alloc::<f32>(rows * h)?, dev.alloc::<T>(rows * h)?) };
    {
        let (xop, _g1) = xo.device_ptr(&stream);
        let (xnp, _g2) = xn.device_ptr(&stream);
        let f = func(dev, FUSED, FUSED_MODULE, name)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let h32 = h as i32;
        let mut b = stream.launch_builder(&f);
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
