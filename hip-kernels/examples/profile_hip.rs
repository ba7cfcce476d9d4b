//! Runs HiP prefill (mask + block-sparse attention) once at a given T, for profilers.
use candle_core::{Device, Tensor};
use hip_kernels::{block_sparse_attn, hip_mask, HipConfig};
use std::time::Instant;

fn main() -> hip_kernels::Result<()> {
    let t: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(65536);
    let dev = Device::Cpu;
    let (hq, hkv, d) = (8, 2, 128);
    let q = Tensor::randn(0f32, 1., (1, t, hq, d), &dev)?;
    let huge = std::env::var("HUGE").is_ok();
    let mk = |seed: u64| -> hip_kernels::Result<Tensor> {
        let n = t * hkv * d;
        let mut data: Vec<f32> = Vec::with_capacity(n);
        if huge {
            let p = data.as_mut_ptr() as usize;
            let a = (p + 4095) & !4095;
            let r = unsafe { libc::madvise(a as *mut libc::c_void, n * 4 - (a - p), libc::MADV_HUGEPAGE) };
            eprintln!("madvise {r}");
        }
        let mut x = seed;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5);
        }
        Ok(Tensor::from_vec(data, (1, t, hkv, d), &dev)?)
    };
    let k = mk(1)?;
    let v = mk(2)?;
    eprintln!(
        "{}",
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("AnonHuge"))
            .collect::<String>()
    );
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
