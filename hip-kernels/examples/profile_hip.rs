//! Runs HiP prefill (mask + block-sparse attention) twice at a given T (default 64k), printing
//! the time of each part; meant to run under a profiler (`perf record`).
use std::time::Instant;

use candle_core::{Device, Tensor};
use hip_kernels::{block_sparse_attn, hip_mask, HipConfig};

fn main() -> hip_kernels::Result<()> {
    let t: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(65536);
    let dev = Device::Cpu;
    let (hq, hkv, d) = (8, 2, 128);
    let q = Tensor::randn(0f32, 1., (1, t, hq, d), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, t, hkv, d), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, t, hkv, d), &dev)?;
    let cfg = HipConfig::paper();
    let scale = 1.0 / (d as f32).sqrt();
    for _ in 0..2 {
        let s = Instant::now();
        let mask = hip_mask(&q, &k, &cfg, scale)?;
        let m = s.elapsed().as_secs_f64();
        let s = Instant::now();
        block_sparse_attn(&q, &k, &v, &mask, scale, 0)?;
        println!("T={t}: mask {m:.3}s, block-sparse {:.3}s", s.elapsed().as_secs_f64());
    }
    Ok(())
}
