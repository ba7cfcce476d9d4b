//! `hip-cuda-check [ORDINAL]`: the smoke test of a CUDA build (`make cuda`; needs `--features cuda`).
//!
//! Opens CUDA device ORDINAL (default 0) through hip-core (candle), prints what the driver says
//! about it, runs f32 and bf16 matmuls on it and checks them against the CPU, then checks that
//! hip-sdk's `Model::builder(..).with_device(Device::Cuda(..))` opens it too. Exit 0 when all
//! passed.
//!
//! Without a usable device it prints one line, `hip-cuda-check: no CUDA device: <reason>`, to
//! stderr and exits 2 (after checking that hip-sdk reports the same as a `Load` error). CI runs it
//! like that against the link-time stubs of `scripts/cuda-env.sh`. (On a machine without the NVIDIA
//! driver library, the dynamic loader refuses to start any CUDA build before `main`: see
//! `hip_core::device::cuda`.) Exit 1: a wrong result or an unexpected error; exit 3: hip-core and
//! hip-sdk disagree.

use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};

fn main() -> ExitCode {
    let ordinal = match std::env::args().nth(1).map(|a| a.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("hip-cuda-check: usage: hip-cuda-check [ORDINAL]");
            return ExitCode::from(1);
        }
    };
    let device = match hip_core::device::cuda(ordinal) {
        Ok(d) => d,
        Err(e) => {
            // hip-sdk must say the same, as a Load error.
            return match sdk_open(ordinal) {
                Err(s) if s.is_load() && s.to_string().contains("no CUDA device") => {
                    eprintln!("hip-cuda-check: {e}");
                    ExitCode::from(2)
                }
                other => {
                    eprintln!("hip-cuda-check: {e}");
                    eprintln!("hip-cuda-check: but hip-sdk's builder gave {other:?}");
                    ExitCode::from(3)
                }
            };
        }
    };
    match check(ordinal, &device) {
        Ok(()) => {
            println!("hip-cuda-check: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hip-cuda-check: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(ordinal: usize, device: &Device) -> Result<(), String> {
    let Device::Cuda(cuda) = device else { return Err(format!("device {ordinal} is not a CUDA device")) };
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    let name = ctx.name().map_err(|e| format!("device name: {e:?}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("compute capability: {e:?}"))?;
    let (free, total) = ctx.mem_get_info().map_err(|e| format!("memory info: {e:?}"))?;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "hip-cuda-check: device {ordinal}: {name}, compute capability {major}.{minor}, \
         {:.1} GiB total, {:.1} GiB free",
        gib(total),
        gib(free)
    );

    // A 257×384 by 384×129 matmul (odd sizes: no lucky tiling), deterministic inputs.
    let err = |e: candle_core::Error| e.to_string();
    let (m, k, n) = (257usize, 384usize, 129usize);
    let a = Tensor::arange(0u32, (m * k) as u32, &Device::Cpu).map_err(err)?;
    let a = (a.to_dtype(DType::F32).map_err(err)? * 0.37).map_err(err)?.sin().map_err(err)?;
    let a = a.reshape((m, k)).map_err(err)?;
    let b = Tensor::arange(0u32, (k * n) as u32, &Device::Cpu).map_err(err)?;
    let b = (b.to_dtype(DType::F32).map_err(err)? * 0.11).map_err(err)?.cos().map_err(err)?;
    let b = b.reshape((k, n)).map_err(err)?;
    // The reference is an f32 CPU matmul of the inputs rounded to `dtype`, so only the GPU's
    // accumulation order and the rounding of its output count (the sums cancel heavily: comparing a
    // bf16 product with the unrounded f32 one would measure the input rounding instead).
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
        let (ra, rb) = (a.to_dtype(dtype).map_err(err)?, b.to_dtype(dtype).map_err(err)?);
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
        let want = f32_of(&ra).map_err(err)?.matmul(&f32_of(&rb).map_err(err)?).map_err(err)?;
        let scale = max_abs(&want)?;
        let (ga, gb) = (ra.to_device(device).map_err(err)?, rb.to_device(device).map_err(err)?);
        let got = ga.matmul(&gb).map_err(err)?.to_dtype(DType::F32).map_err(err)?;
        let got = got.to_device(&Device::Cpu).map_err(err)?;
        let diff = max_abs(&(got - &want).map_err(err)?)? / scale;
        println!("hip-cuda-check: {dtype:?} matmul {m}x{k}x{n} on the GPU: max |gpu - cpu| / max |cpu| = {diff:.2e}");
        if diff.is_nan() || diff > tol {
            return Err(format!("{dtype:?} matmul differs from the CPU by {diff:.3e} (tolerance {tol:.0e})"));
        }
    }

    // hip-sdk opens the same device; the (missing) model file is what fails then.
    match sdk_open(ordinal) {
        Err(e) if e.is_load() && !e.to_string().contains("no CUDA device") => {
            println!("hip-cuda-check: hip-sdk opened the device (then, as expected: {e})");
            Ok(())
        }
        other => Err(format!("hip-sdk's builder on CUDA device {ordinal} gave {other:?}")),
    }
}

fn max_abs(t: &Tensor) -> Result<f64, String> {
    let v = t.abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0)).and_then(|t| t.to_scalar::<f32>());
    v.map(f64::from).map_err(|e| e.to_string())
}

/// `Model::builder(<a missing file>).with_device(Device::Cuda(ordinal)).build()`: the device is
/// opened before the model file, so this fails with "no CUDA device" exactly when there is none.
fn sdk_open(ordinal: usize) -> hip_sdk::Result<hip_sdk::Model> {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
    rt.block_on(
        hip_sdk::Model::builder("/nonexistent/hip-cuda-check.gguf")
            .with_device(hip_sdk::Device::Cuda(ordinal))
            .build(),
    )
}
