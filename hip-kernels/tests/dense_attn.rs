//! dense_attn against the f64 reference and against candle's CPU flash attention.

mod common;

use candle_core::DType;
use common::{max_abs_diff, qkv};
use hip_kernels::{dense_attn, reference};

fn check(
    seed: u64,
    b: usize,
    t_q: usize,
    t_k: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
    tol: f32,
) {
    let (q, k, v) = qkv(seed, b, t_q, t_k, hq, hkv, d, dtype);
    let scale = 1.0 / (d as f32).sqrt();
    let fast = dense_attn(&q, &k, &v, scale).unwrap();
    assert_eq!(fast.dims(), &[b, t_q, hq, d]);
    assert_eq!(fast.dtype(), dtype);
    let slow = reference::dense_attn(&q, &k, &v, scale).unwrap();
    let err = max_abs_diff(&fast, &slow);
    assert!(err <= tol, "T_q={t_q} T_k={t_k} hq={hq} hkv={hkv} d={d} {dtype:?}: max abs err {err}");
}

#[test]
fn awkward_sizes_f32() {
    let mut seed = 0;
    for &t in &[1usize, 7, 54, 97, 1000] {
        for &(hq, hkv) in &[(1usize, 1usize), (4, 2), (7, 1)] {
            for &d in &[64usize, 128] {
                seed += 10;
                check(seed, 1, t, t, hq, hkv, d, DType::F32, 1e-5);
            }
        }
    }
}

#[test]
fn long_context_4099() {
    check(7, 1, 4099, 4099, 2, 1, 128, DType::F32, 1e-5);
}

#[test]
fn query_offset_batch_and_odd_head_dims() {
    check(1, 2, 7, 97, 4, 2, 64, DType::F32, 1e-5);
    check(2, 1, 1, 4099, 7, 1, 128, DType::F32, 1e-5);
    check(3, 3, 54, 300, 2, 2, 80, DType::F32, 1e-5);
    check(4, 1, 65, 1000, 2, 1, 256, DType::F32, 1e-5);
    check(5, 1, 3, 5, 1, 1, 1, DType::F32, 1e-5);
}

#[test]
fn half_precision_inputs() {
    // Inputs are rounded to f16/bf16 for both sides; only the output rounding differs.
    check(11, 1, 97, 97, 4, 2, 64, DType::F16, 2e-3);
    check(12, 1, 97, 200, 7, 1, 128, DType::BF16, 1e-2);
}

#[test]
fn matches_candle_cpu_flash() {
    let (q, k, v) = qkv(21, 1, 300, 300, 8, 2, 128, DType::F32);
    let scale = 1.0 / (128f32).sqrt();
    let ours = dense_attn(&q, &k, &v, scale).unwrap();
    let theirs = candle_nn::attention::cpu_flash::flash_attn::<f32>(
        &q,
        &k,
        &v,
        scale,
        candle_nn::attention::AttnMask::causal(),
        None,
        None,
    )
    .unwrap()
    .transpose(1, 2)
    .unwrap()
    .contiguous()
    .unwrap();
    let err = max_abs_diff(&ours, &theirs);
    assert!(err < 1e-4, "max abs err vs candle cpu_flash {err}");
}
