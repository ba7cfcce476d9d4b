//! HiP vs dense attention on the CPU, 8 query heads / 2 KV heads, head dim 128, f32.
//!
//! * prefill (all queries) at T = 4k, 16k, 64k: our dense, HiP (mask + block-sparse), and
//!   candle's `cpu_flash` where it finishes in reasonable time (4k);
//! * decode (one query against T keys) at T = 16k, 128k, 1M: our dense, HiP with the mask cached
//!   and refreshed every 8 steps (amortised), HiP re-estimating the mask every step, and candle's
//!   `cpu_flash` up to 128k.
//!
//! `HIP_BENCH_MAX_T` (tokens) skips larger sizes, e.g. `HIP_BENCH_MAX_T=16384 cargo bench -p hip-kernels`.

use std::time::Duration;

use candle_core::{Device, Tensor};
use candle_nn::attention::{cpu_flash::flash_attn, AttnMask};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use hip_kernels::{dense_attn, hip_attn, hip_attn_decode, HipConfig, MaskCache};

const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 128;

fn max_t() -> usize {
    std::env::var("HIP_BENCH_MAX_T").ok().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX)
}

fn qkv(t_q: usize, t_k: usize) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    (
        Tensor::randn(0f32, 1., (1, t_q, HQ, D), &dev).unwrap(),
        Tensor::randn(0f32, 1., (1, t_k, HKV, D), &dev).unwrap(),
        Tensor::randn(0f32, 1., (1, t_k, HKV, D), &dev).unwrap(),
    )
}

fn prefill(c: &mut Criterion) {
    let scale = 1.0 / (D as f32).sqrt();
    let cfg = HipConfig::paper();
    let mut g = c.benchmark_group("prefill");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    for t in [4096usize, 16384, 65536].into_iter().filter(|&t| t <= max_t()) {
        let (q, k, v) = qkv(t, t);
        g.measurement_time(Duration::from_secs(if t >= 65536 { 60 } else { 10 }));
        g.bench_with_input(BenchmarkId::new("hip", t), &t, |b, _| {
            b.iter(|| hip_attn(&q, &k, &v, &cfg, scale).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("dense", t), &t, |b, _| {
            b.iter(|| dense_attn(&q, &k, &v, scale).unwrap())
        });
        if t <= 4096 {
            g.bench_with_input(BenchmarkId::new("candle_cpu_flash", t), &t, |b, _| {
                b.iter(|| flash_attn::<f32>(&q, &k, &v, scale, AttnMask::causal(), None, None).unwrap())
            });
        }
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let scale = 1.0 / (D as f32).sqrt();
    let cfg = HipConfig::paper();
    let always = HipConfig::paper().with_refresh_interval(1);
    let mut g = c.benchmark_group("decode");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    for t in [16384usize, 131072, 1 << 20].into_iter().filter(|&t| t <= max_t()) {
        let (q_all, k, v) = qkv(1, t);
        let q = q_all.narrow(1, 0, 1).unwrap();
        g.bench_with_input(BenchmarkId::new("hip_refresh8", t), &t, |b, _| {
            let mut cache = MaskCache::new();
            b.iter(|| hip_attn_decode(&q, &k, &v, &cfg, scale, &mut cache).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("hip_refresh1", t), &t, |b, _| {
            let mut cache = MaskCache::new();
            b.iter(|| hip_attn_decode(&q, &k, &v, &always, scale, &mut cache).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("dense", t), &t, |b, _| {
            b.iter(|| dense_attn(&q, &k, &v, scale).unwrap())
        });
        if t <= 131072 {
            g.bench_with_input(BenchmarkId::new("candle_cpu_flash", t), &t, |b, _| {
                b.iter(|| flash_attn::<f32>(&q, &k, &v, scale, AttnMask::causal(), None, None).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
