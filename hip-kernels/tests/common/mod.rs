//! Helpers shared by the integration tests: seeded random tensors and error measures.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Standard normal samples (Box–Muller), seeded.
pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-12);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// A `[b, t, h, d]` tensor of standard normal values in `dtype`.
pub fn randn(seed: u64, shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(normal(&mut rng, n), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// Random q, k, v for `t_q` queries over `t_k` keys.
pub fn qkv(
    seed: u64,
    b: usize,
    t_q: usize,
    t_k: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
) -> (Tensor, Tensor, Tensor) {
    (
        randn(seed, (b, t_q, hq, d), dtype),
        randn(seed + 1, (b, t_k, hkv, d), dtype),
        randn(seed + 2, (b, t_k, hkv, d), dtype),
    )
}

/// Max absolute difference of two tensors, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Relative L2 error `|a - b| / |b|`.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    (num / den).sqrt()
}

/// Scatters contiguous `[1, t, hkv, d]` K and V into shuffled blocks of `bs` tokens (plus spare
/// blocks full of garbage) and returns the pool and the block table.
pub fn paginate(k: &Tensor, v: &Tensor, bs: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let (_, t, hkv, d) = k.dims4().unwrap();
    let kd = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let vd = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n_blocks = t.div_ceil(bs) + 3;
    let mut order: Vec<u32> = (0..n_blocks as u32).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let table = order[..t.div_ceil(bs)].to_vec();
    let row = hkv * d;
    let mut kp = vec![f32::NAN; n_blocks * bs * row];
    let mut vp = vec![f32::NAN; n_blocks * bs * row];
    for j in 0..t {
        let dst = (table[j / bs] as usize * bs + j % bs) * row;
        kp[dst..dst + row].copy_from_slice(&kd[j * row..(j + 1) * row]);
        vp[dst..dst + row].copy_from_slice(&vd[j * row..(j + 1) * row]);
    }
    (kp, vp, table)
}
