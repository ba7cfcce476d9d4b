//! Opening a compute device, with a typed error instead of a panic when there is none.

use candle_core::Device;

use crate::{Error, Result};

/// Opens CUDA device `ordinal` through candle.
///
/// # Errors
///
/// [`Error::NoCudaDevice`] (its message starts with "no CUDA device") when this build has no CUDA
/// support (the `cuda` feature), the driver reports no usable device, or `ordinal` is out of range.
///
/// A build with the `cuda` feature links `libcuda.so.1` (candle 0.11 links cudarc with its
/// `dynamic-linking` mode): on a machine without the NVIDIA driver the dynamic loader refuses to
/// start the program at all, before any of this runs. Where the driver library is present but
/// reports an error (no GPU, the link-time stubs of `scripts/cuda-env.sh`), candle returns an error,
/// which becomes [`Error::NoCudaDevice`]. cudarc's other mode, `dynamic-loading`, panics instead of
/// returning an error when a library is missing; the `catch_unwind` keeps that (and any other panic
/// while the context, cuBLAS and cuRAND handles are created) from unwinding through the caller.
pub fn cuda(ordinal: usize) -> Result<Device> {
    let no_device = |reason: String| Error::NoCudaDevice { ordinal, reason };
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(candle_core::Error::NotCompiledWithCudaSupport)) => {
            Err(no_device("this build has no CUDA support (build with --features cuda)".into()))
        }
        Ok(Err(e)) => Err(no_device(format!("device {ordinal}: {}", one_line(&e.to_string())))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(no_device(format!("device {ordinal}: {}", one_line(&msg))))
        }
    }
}

/// The first line of an error message, trimmed (candle appends backtraces on later lines).
fn one_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_without_a_device_is_a_typed_error() {
        // Without the `cuda` feature this always fails; with it, only on a machine without a GPU.
        if let Err(e) = cuda(0) {
            assert!(matches!(e, Error::NoCudaDevice { ordinal: 0, .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.starts_with("no CUDA device: ") && !msg.contains('\n'), "{msg}");
        }
    }
}
