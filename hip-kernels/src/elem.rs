//! Element types the CPU kernels read (f32, f16, bf16) and how they become f32.

use candle_core::{DType, Layout, Storage, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

/// A storage element the kernels accept. All arithmetic happens in f32.
pub(crate) trait Elem: WithDType + Copy + Send + Sync + 'static {
    /// Converts `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// Converts `src` into a new vector of `Self`.
    fn store(src: Vec<f32>) -> Vec<Self>;
}

impl Elem for f32 {
    #[inline]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn store(src: Vec<f32>) -> Vec<f32> {
        src
    }
}

impl Elem for half::f16 {
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn store(src: Vec<f32>) -> Vec<Self> {
        src.iter().map(|&x| half::f16::from_f32(x)).collect()
    }
}

impl Elem for half::bf16 {
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn store(src: Vec<f32>) -> Vec<Self> {
        src.iter().map(|&x| half::bf16::from_f32(x)).collect()
    }
}

/// Borrows the contiguous CPU data of `storage` seen through `layout`.
pub(crate) fn cpu_slice<'a, E: WithDType>(
    name: &'static str,
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a [E]> {
    match storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<E>()?;
            let start = layout.start_offset();
            let len = layout.shape().elem_count();
            all.get(start..start + len)
                .ok_or_else(|| Error::shape(name, "a contiguous tensor", layout.shape().dims()))
        }
        other => Err(Error::UnsupportedDevice {
            op: "hip-kernels CPU op",
            device: format!("{:?}", other.device().location()),
        }),
    }
}

/// Checks that `t` has one of the supported dtypes.
pub(crate) fn check_dtype(name: &'static str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        d @ (DType::F32 | DType::F16 | DType::BF16) => Ok(d),
        got => Err(Error::DType { name, expected: "f32, f16 or bf16".into(), got }),
    }
}

/// Runs `$body` with `$E` bound to the Rust type of `$dtype` (f32, f16 or bf16).
macro_rules! dispatch_dtype {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $E = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $E = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            got => Err($crate::Error::DType { name: "q", expected: "f32, f16 or bf16".into(), got }),
        }
    };
}
pub(crate) use dispatch_dtype;
