//! `hip-bench matmul`: a decode step's products alone, `x Wᵀ` for a few rows of bf16 at
//! Qwen2.5-1.5B's shapes (q/k/v 2048 × 1536, o 1536 × 1536, gate/up 17920 × 1536, down 1536 × 8960,
//! the LM head 151936 × 1536), cuBLAS through candle (`x.matmul(&w.t())`, what `Linear` runs by
//! default) against `hip_kernels::cuda::matmul_small_cuda` in each of its forms, side by side in
//! one process. Times are CUDA-event medians with a cold L2 before each run (as `hip-bench attn`
//! times: a decode step reads each layer's weights once, from memory); each row gets its floor
//! (the weight bytes over the measured copy bandwidth).
//!
//! ```text
//! hip-bench matmul [--rows 1,16] [--reps 51] [--json out.jsonl]
//! ```

use std::io::Write;

use candle_core::{DType, Device, Tensor};
use hip_kernels::cuda::{matmul_small_cuda_form, SmallMatmulForm};

use crate::attn::{floor_ms, measure_ceilings, time};
use crate::R;

/// Usage of the subcommand.
pub const USAGE: &str = "hip-bench matmul [--rows LIST] [--reps N] [--json FILE]";

/// (name, n, k) of Qwen2.5-1.5B's products.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 2048, 1536),
    ("o", 1536, 1536),
    ("gate_up", 17920, 1536),
    ("down", 1536, 8960),
    ("lm_head", 151_936, 1536),
];

/// Runs `hip-bench matmul` with the arguments after the subcommand.
pub fn run(mut it: impl Iterator<Item = String>) -> R<()> {
    let (mut rows, mut reps, mut json) = (vec![1usize, 16], 51usize, None::<String>);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or_else(|| format!("{flag} needs a value (usage: {USAGE})"))?;
        match flag.as_str() {
            "--rows" => {
                rows = val.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>()?;
            }
            "--reps" => reps = val.parse()?,
            "--json" => json = Some(val),
            _ => return Err(format!("unknown flag {flag} (usage: {USAGE})").into()),
        }
    }
    if reps == 0 || rows.iter().any(|&m| !(1..=16).contains(&m)) {
        return Err("--reps must be at least 1 and --rows within 1..=16".into());
    }
    let dev = Device::new_cuda(0)?;
    let ceil = measure_ceilings(&dev)?;
    let mut out = match &json {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    println!("| product | rows | form | µs | floor µs | vs cublas |");
    println!("|---|---|---|---|---|---|");
    for (name, n, k) in SHAPES {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let floor_us = floor_ms(&ceil, (n * k * 2) as f64, 0.0) * 1e3;
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
            let want = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
            let mut base = None;
            // cuBLAS, the picked form, then every form whose tiles divide n.
            let forms = SmallMatmulForm::ALL.into_iter().filter(|f| f.fits(n));
            let forms = [None, Some(None)].into_iter().chain(forms.map(|f| Some(Some(f))));
            for form in forms {
                let label = match form {
                    None => "cublas".to_string(),
                    Some(None) => format!("small {:?}", SmallMatmulForm::pick(n)),
                    Some(Some(f)) => format!("small w{} t{}", f.warps, f.tiles),
                };
                let us = match form {
                    None => time(&dev, reps, || {
                        x.matmul(&w.t()?)?;
                        Ok(())
                    })?,
                    Some(f) => {
                        // Each form's result is checked against cuBLAS's before it is timed.
                        let got = matmul_small_cuda_form(&x, &w, f)?.to_dtype(DType::F32)?;
                        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                        if err > 2e-2 * scale.max(1e-6) {
                            return Err(
                                format!("{name} rows {m} {label}: max error {err} (scale {scale})").into()
                            );
                        }
                        time(&dev, reps, || {
                            matmul_small_cuda_form(&x, &w, f)?;
                            Ok(())
                        })?
                    }
                } * 1e3;
                let b = *base.get_or_insert(us);
                println!("| {name} {n}x{k} | {m} | {label} | {us:.2} | {floor_us:.2} | {:.2}x |", b / us);
                if let Some(f) = out.as_mut() {
                    writeln!(
                        f,
                        "{{\"product\":\"{name}\",\"n\":{n},\"k\":{k},\"rows\":{m},\"form\":\"{label}\",\"us\":{us:.3},\"floor_us\":{floor_us:.3}}}"
                    )?;
                }
            }
        }
    }
    Ok(())
}
