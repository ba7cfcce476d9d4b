//! With the `cuda` feature: compiles `kernels/*.cu` to fat binaries (SASS for sm_90 plus PTX,
//! loaded at run time into candle's CUDA context). nvcc comes from `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `PATH`;
//! `scripts/cuda-env.sh` installs the pinned CUDA 13.0 compiler and sets these.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["span_attn", "hip_mask", "offload", "fused"];
/// Kernels that use Hopper-only instructions (`wgmma`): built for sm_90a alone, and only when
/// the target is compute capability 9.0; otherwise an empty file stands in (the library then
/// uses the portable kernels).
const SM90A: &[&str] = &["prefill_sm90"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS.iter().chain(SM90A) {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=HIP_CUDA_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // SASS for the H200 (sm_90) plus PTX for compute_90 in one fat binary: Hopper loads the SASS
    // without JIT compilation; other GPUs of compute capability >= 9.0 JIT the PTX.
    let cc = std::env::var("HIP_CUDA_ARCH").unwrap_or_else(|_| "90".to_owned());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let builds = KERNELS
        .iter()
        .map(|k| {
            (
                *k,
                vec![
                    format!("-gencode=arch=compute_{cc},code=sm_{cc}"),
                    format!("-gencode=arch=compute_{cc},code=compute_{cc}"),
                ],
            )
        })
        .chain(SM90A.iter().map(|k| (*k, vec!["-gencode=arch=compute_90a,code=sm_90a".to_owned()])));
    for (k, arch) in builds {
        let bin = out.join(format!("{k}.fatbin"));
        if arch.len() == 1 && cc != "90" {
            std::fs::write(&bin, b"").expect("write an empty fatbin");
            continue;
        }
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17"])
            .args(&arch)
            .arg("-o")
            .arg(&bin)
            .arg(format!("kernels/{k}.cu"))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "hip-kernels: cannot run nvcc ({}): {e}. Source scripts/cuda-env.sh first \
                     (`. scripts/cuda-env.sh`), or set NVCC.",
                    nvcc.display()
                )
            });
        assert!(status.success(), "hip-kernels: nvcc failed on kernels/{k}.cu ({status})");
    }
}
