//! `hip-bench attn`: attention-only GPU benchmark at Llama-3.1-8B shapes (32 query heads, 8 KV
//! heads, head dim 128, bf16): prefill of a chunk of queries at the end of a context of T tokens,
//! and decode (batch 1 and 16), HiP vs our dense kernel. Times are CUDA-event medians; each row
//! also gets its floor (bytes over the measured copy bandwidth, FLOPs over the measured bf16
//! matrix rate, whichever is larger). Writes JSON lines (`--json FILE`) and a markdown table.
//!
//! ```text
//! hip-bench attn [--t 32768,131072,524288,1048576] [--chunk 32768] [--batch 1,16] [--json out.jsonl] [--sync-each]
//! ```
//! PyTorch SDPA (FlashAttention and cuDNN) on the same shapes: `scripts/sdpa_bench.py`.

use std::io::Write;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{DType, Device, Tensor};
use hip_kernels::cuda::{block_sparse_attn_cuda, hip_mask_cuda};
use hip_kernels::{dense_attn, HipConfig};

use crate::R;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

struct Args {
    ts: Vec<usize>,
    chunk: usize,
    batches: Vec<usize>,
    json: Option<String>,
    reps: usize,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        ts: vec![32_768, 131_072, 524_288, 1_048_576],
        chunk: 32_768,
        batches: vec![1, 16],
        json: None,
        reps: 7,
    };
    let list = |s: String| -> Result<Vec<usize>, String> {
        s.split(',').map(|x| x.trim().parse::<usize>().map_err(|e| format!("{x:?}: {e}"))).collect()
    };
    while let Some(flag) = it.next() {
        if flag == "--sync-each" {
            SYNC_EACH.store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--t" => a.ts = list(val)?,
            "--chunk" => a.chunk = val.parse().map_err(|e| format!("--chunk: {e}"))?,
            "--batch" => a.batches = list(val)?,
            "--json" => a.json = Some(val),
            "--reps" => a.reps = val.parse().map_err(|e| format!("--reps: {e}"))?,
            _ => return Err(format!("unknown flag {flag} (usage: {USAGE})")),
        }
    }
    if a.reps == 0 || a.chunk == 0 || a.ts.contains(&0) || a.batches.contains(&0) {
        return Err("--reps, --chunk, --t and --batch values must be at least 1".into());
    }
    Ok(a)
}

/// Usage of the subcommand.
pub const USAGE: &str =
    "hip-bench attn [--t LIST] [--chunk N] [--batch LIST] [--json FILE] [--reps N] [--sync-each]";

/// Median milliseconds of `reps` runs of `f` (after one warm-up), timed as
/// `triton.testing.do_bench` times the SDPA baseline (`scripts/sdpa_bench.py`): before each run a
/// 256 MiB buffer is zeroed, so that the run starts with a cold L2 and finds the GPU busy (the
/// host's launch cost overlaps the clearing, as it does between the steps of a real decode); CUDA
/// events around each run, one synchronisation at the end. With `--sync-each` (the method of the
/// 2026-11-28 tables) the GPU drains before every run instead and the L2 keeps what the last run
/// left: small kernels then also carry the host's launch cost.
pub(crate) fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    let Device::Cuda(cd) = dev else { return Err("not a CUDA device".into()) };
    let stream = cd.cuda_stream();
    f()?;
    stream.synchronize()?;
    let sync_each = SYNC_EACH.load(std::sync::atomic::Ordering::Relaxed);
    let mut flush = if sync_each { None } else { Some(stream.alloc_zeros::<u8>(256 << 20)?) };
    let mut events = Vec::with_capacity(reps);
    for _ in 0..reps {
        if let Some(buf) = flush.as_mut() {
            stream.memset_zeros(buf)?;
        }
        let a = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        if sync_each {
            b.synchronize()?;
        }
        events.push((a, b));
    }
    stream.synchronize()?;
    let mut ms = events.iter().map(|(a, b)| Ok(a.elapsed_ms(b)? as f64)).collect::<R<Vec<_>>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[reps / 2])
}

/// `--sync-each`: time as the 2026-11-28 tables did (see `time`).
static SYNC_EACH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn randn(shape: (usize, usize, usize, usize), dev: &Device) -> R<Tensor> {
    // Generate one batch entry at a time: the f32 temporaries stay small.
    let parts = (0..shape.0)
        .map(|_| Tensor::randn(0f32, 1.0, (1, shape.1, shape.2, shape.3), dev)?.to_dtype(DType::BF16))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

pub(crate) struct Ceil {
    /// Bytes per second (device-to-device copy: read + write).
    bw: f64,
    /// bf16 matrix FLOP per second.
    flops: f64,
}

pub(crate) fn measure_ceilings(dev: &Device) -> R<Ceil> {
    let Device::Cuda(cd) = dev else { return Err("not a CUDA device".into()) };
    let n_bytes = 1usize << 31; // 2 GiB, far past the L2
    let src = cd.alloc_zeros::<u8>(n_bytes)?;
    let mut dst = cd.alloc_zeros::<u8>(n_bytes)?;
    let ms = time(dev, 9, || {
        cd.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    // Bytes read plus bytes written.
    let bw = 2.0 * n_bytes as f64 / (ms * 1e-3);
    let n = 8192;
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
    let ms = time(dev, 9, || {
        let _c = a.matmul(&b)?;
        Ok(())
    })?;
    let flops = 2.0 * (n as f64).powi(3) / (ms * 1e-3);
    Ok(Ceil { bw, flops })
}

pub(crate) fn floor_ms(c: &Ceil, bytes: f64, flops: f64) -> f64 {
    (bytes / c.bw).max(flops / c.flops) * 1e3
}

/// Runs `hip-bench attn` with the arguments after the subcommand.
pub fn run(args: impl Iterator<Item = String>) -> R<()> {
    let args = parse(args)?;
    let dev = Device::new_cuda(0).map_err(|e| format!("no CUDA device: {e}"))?;
    let ceil = measure_ceilings(&dev)?;
    println!("ceilings: copy {:.0} GB/s, bf16 matmul {:.0} TFLOP/s", ceil.bw / 1e9, ceil.flops / 1e12);
    let mut json = match &args.json {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    let cfg = HipConfig::paper();
    let scale = 1.0 / (D as f32).sqrt();
    let mut rows = Vec::new();
    let mut emit = |row: String, fields: String| -> R<()> {
        println!("{row}");
        if let Some(f) = json.as_mut() {
            writeln!(f, "{{{fields}}}")?;
        }
        rows.push(row);
        Ok(())
    };
    println!(
        "| op | T | batch | dense ms | HiP ms | HiP / dense | dense floor ms | HiP mask ms | HiP attn ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &t in &args.ts {
        let bmax = args.batches.iter().copied().max().unwrap_or(1);
        let k = randn((bmax, t, HKV, D), &dev)?;
        let v = randn((bmax, t, HKV, D), &dev)?;
        // Prefill: a chunk of queries at the end of T (batch 1).
        let chunk = args.chunk.min(t);
        let (k1, v1) = (k.narrow(0, 0, 1)?.contiguous()?, v.narrow(0, 0, 1)?.contiguous()?);
        let q = randn((1, chunk, HQ, D), &dev)?;
        let dense = time(&dev, args.reps.clamp(1, 3), || {
            dense_attn(&q, &k1, &v1, scale)?;
            Ok(())
        })?;
        let mask = time(&dev, args.reps, || {
            hip_mask_cuda(&q, &k1, &cfg, scale)?;
            Ok(())
        })?;
        let m = hip_mask_cuda(&q, &k1, &cfg, scale)?;
        let attn = time(&dev, args.reps, || {
            block_sparse_attn_cuda(&q, &k1, &v1, &m, scale, 0)?;
            Ok(())
        })?;
        let hip = mask + attn;
        // HipConfig::default(): the same plus a prefill tail (the last 64 queries searched one by one).
        let with_tail = HipConfig::default();
        let tail = time(&dev, args.reps, || {
            hip_kernels::hip_attn(&q, &k1, &v1, &with_tail, scale)?;
            Ok(())
        })?;
        println!("  prefill {chunk} at {t}: HiP with the prefill tail (HipConfig::default()) {tail:.2} ms");
        // Dense causal work: queries at the end of T see T - chunk + i + 1 keys.
        let pairs = chunk as f64 * (t - chunk) as f64 + (chunk as f64) * (chunk as f64 + 1.0) / 2.0;
        let flops = 4.0 * pairs * (HQ * D) as f64;
        let bytes = ((2 * t * HKV + 2 * chunk * HQ) * D * 2) as f64;
        let fl = floor_ms(&ceil, bytes, flops);
        emit(
            format!(
                "| prefill {chunk} | {t} | 1 | {dense:.2} | {hip:.2} | {:.1}x faster | {fl:.2} | {mask:.2} | {attn:.2} |",
                dense / hip
            ),
            format!(
                "\"op\":\"prefill\",\"chunk\":{chunk},\"t\":{t},\"batch\":1,\"dense_ms\":{dense},\"hip_ms\":{hip},\"hip_mask_ms\":{mask},\"hip_attn_ms\":{attn},\"hip_tail_ms\":{tail},\"dense_floor_ms\":{fl}"
            ),
        )?;
        drop((q, m));
        // Decode: one query per sequence.
        for &b in &args.batches {
            let (kb, vb) = (k.narrow(0, 0, b)?.contiguous()?, v.narrow(0, 0, b)?.contiguous()?);
            let q = randn((b, 1, HQ, D), &dev)?;
            let dense = time(&dev, args.reps * 3, || {
                dense_attn(&q, &kb, &vb, scale)?;
                Ok(())
            })?;
            let mask = time(&dev, args.reps * 3, || {
                hip_mask_cuda(&q, &kb, &cfg, scale)?;
                Ok(())
            })?;
            let m = hip_mask_cuda(&q, &kb, &cfg, scale)?;
            let attn = time(&dev, args.reps * 3, || {
                block_sparse_attn_cuda(&q, &kb, &vb, &m, scale, cfg.refresh_interval / 2)?;
                Ok(())
            })?;
            let amortized = attn + mask / cfg.refresh_interval as f64;
            let always = attn + mask;
            let bytes = (2 * b * t * HKV * D * 2) as f64;
            let fl = floor_ms(&ceil, bytes, 4.0 * (b * t * HQ * D) as f64);
            emit(
                format!(
                    "| decode (refresh every {}) | {t} | {b} | {dense:.3} | {amortized:.3} | {:.1}x faster | {fl:.3} | {mask:.3} | {attn:.3} |",
                    cfg.refresh_interval,
                    dense / amortized
                ),
                format!(
                    "\"op\":\"decode\",\"refresh\":{},\"t\":{t},\"batch\":{b},\"dense_ms\":{dense},\"hip_ms\":{amortized},\"hip_mask_ms\":{mask},\"hip_attn_ms\":{attn},\"dense_floor_ms\":{fl}",
                    cfg.refresh_interval
                ),
            )?;
            emit(
                format!(
                    "| decode (always refresh) | {t} | {b} | {dense:.3} | {always:.3} | {:.1}x faster | {fl:.3} | {mask:.3} | {attn:.3} |",
                    dense / always
                ),
                format!(
                    "\"op\":\"decode\",\"refresh\":1,\"t\":{t},\"batch\":{b},\"dense_ms\":{dense},\"hip_ms\":{always},\"hip_mask_ms\":{mask},\"hip_attn_ms\":{attn},\"dense_floor_ms\":{fl}"
                ),
            )?;
        }
    }
    println!("\nsummary:");
    for r in &rows {
        println!("{r}");
    }
    Ok(())
}
