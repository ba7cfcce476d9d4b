//! Quick one-shot timings of the CPU ops (a sanity check; `cargo bench` is the real measurement).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hip_kernels::{dense_attn, hip_attn, hip_attn_decode, HipConfig, MaskCache};

fn main() -> hip_kernels::Result<()> {
    let dev = Device::Cpu;
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("token count")).collect();
    let (hq, hkv, d) = (8, 2, 128);
    let scale = 1.0 / (d as f32).sqrt();
    let cfg = HipConfig::paper();
    for &t in &args {
        let q = Tensor::randn(0f32, 1., (1, t, hq, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, t, hkv, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, t, hkv, d), &dev)?;
        let s = Instant::now();
        hip_attn(&q, &k, &v, &cfg, scale)?;
        let hip = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let mask = hip_kernels::hip_mask(&q, &k, &cfg, scale)?;
        let m_t = s.elapsed().as_secs_f64();
        let s = Instant::now();
        hip_kernels::block_sparse_attn(&q, &k, &v, &mask, scale, 0)?;
        let b_t = s.elapsed().as_secs_f64();
        let s = Instant::now();
        dense_attn(&q, &k, &v, scale)?;
        let dense = s.elapsed().as_secs_f64();
        let s = Instant::now();
        if t <= 16384 {
            candle_nn::attention::cpu_flash::flash_attn::<f32>(
                &q,
                &k,
                &v,
                scale,
                candle_nn::attention::AttnMask::causal(),
                None,
                None,
            )?;
        }
        let cf = s.elapsed().as_secs_f64();
        let q1 = q.narrow(1, t - 1, 1)?;
        let s = Instant::now();
        for _ in 0..8 {
            dense_attn(&q1, &k, &v, scale)?;
        }
        let dd = s.elapsed().as_secs_f64() / 8.0;
        let mut cache = MaskCache::new();
        let s = Instant::now();
        for _ in 0..8 {
            hip_attn_decode(&q1, &k, &v, &cfg, scale, &mut cache)?;
        }
        let hd = s.elapsed().as_secs_f64() / 8.0;
        println!("T={t}: prefill hip {hip:.3}s (mask {m_t:.3} bsa {b_t:.3}) dense {dense:.3}s candle {cf:.3}s | decode dense {:.3}ms hip {:.3}ms", dd*1e3, hd*1e3);
        let _ = DType::F32;
    }
    Ok(())
}
