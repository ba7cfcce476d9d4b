//! `hip-bench offload`: HiP decode attention of one layer at Llama-3.1-8B shapes (32 query heads,
//! 8 KV heads, head dim 128, bf16; `--heads 12,2` for Qwen2.5-1.5B's) with the KV cache offloaded to pinned host memory (GPU caches
//! of `--sa-cache` / `--mask-cache` tokens per KV head) against the same decode over a
//! GPU-resident cache, in the same process. The sequence grows by one token a step; the mask is
//! refreshed every 8 steps (HipConfig::default()). Times are wall-clock per step over `--steps`
//! steps after `--warm` untimed ones (the host LRU updates are part of a step), so they include
//! launch overheads of a one-layer loop. Queries: `drift` = a fixed random query plus noise of
//! `--sigma` per step (masks overlap between refreshes, as a model's do), `random` = fresh each
//! step (the worst case for the caches).
//!
//! ```text
//! hip-bench offload [--t 131072,524288,1048576] [--steps 64] [--warm 24] [--query drift|random]
//!                   [--sigma 0.5] [--sa-cache 8192] [--mask-cache 65536] [--heads 32,8]
//!                   [--json out.jsonl]
//! ```

use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hip_kernels::cuda::{
    hip_attn_decode_offload_cuda, hip_attn_decode_paged_cuda, CudaPagedKv, HostKvStore, LayerCaches,
    OffloadedKv,
};
use hip_kernels::offload::{Offload, OffloadStats};
use hip_kernels::{HipConfig, MaskCache};

use crate::R;

const D: usize = 128;
const BLOCK: usize = 64;

struct Args {
    ts: Vec<usize>,
    steps: usize,
    warm: usize,
    random: bool,
    sigma: f64,
    sa: usize,
    mask: usize,
    /// Query and KV heads (`--heads 32,8`: Llama-3.1-8B; `12,2`: Qwen2.5-1.5B).
    heads: (usize, usize),
    json: Option<String>,
}

/// Usage of the subcommand.
pub const USAGE: &str =
    "hip-bench offload [--t LIST] [--steps N] [--warm N] [--query drift|random] [--sigma X] \
                         [--sa-cache N] [--mask-cache N] [--heads 32,8] [--json FILE]";

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        ts: vec![131_072, 524_288, 1_048_576],
        steps: 64,
        warm: 24,
        random: false,
        sigma: 0.5,
        sa: Offload::default().gpu_cache_tokens,
        mask: Offload::default().mask_cache_tokens,
        heads: (32, 8),
        json: None,
    };
    let num = |f: &str, v: &str| v.parse::<usize>().map_err(|e| format!("{f}: {e}"));
    while let Some(flag) = it.next() {
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--t" => {
                a.ts = val
                    .split(',')
                    .map(|x| x.trim().parse::<usize>().map_err(|e| format!("{x:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--steps" => a.steps = num(&flag, &val)?,
            "--warm" => a.warm = num(&flag, &val)?,
            "--query" => {
                a.random = match val.as_str() {
                    "drift" => false,
                    "random" => true,
                    _ => return Err(format!("--query: drift or random, got {val:?}")),
                }
            }
            "--sigma" => a.sigma = val.parse().map_err(|e| format!("--sigma: {e}"))?,
            "--sa-cache" => a.sa = num(&flag, &val)?,
            "--mask-cache" => a.mask = num(&flag, &val)?,
            "--json" => a.json = Some(val),
            "--heads" => {
                let h = val.split_once(',').and_then(|(q, k)| Some((q.parse().ok()?, k.parse().ok()?)));
                match h {
                    Some((q, k)) if k > 0 && q % k == 0 => a.heads = (q, k),
                    _ => return Err(format!("--heads: QUERY,KV with KV dividing QUERY, got {val:?}")),
                }
            }
            _ => return Err(format!("unknown flag {flag} (usage: {USAGE})")),
        }
    }
    if a.steps == 0 || a.ts.iter().any(|&t| t <= a.steps + a.warm + 1024) {
        return Err("--steps must be at least 1 and every --t longer than steps + warm + 1024".into());
    }
    Ok(a)
}

fn diff(a: OffloadStats, b: OffloadStats) -> OffloadStats {
    OffloadStats {
        hits: a.hits - b.hits,
        misses: a.misses - b.misses,
        inserts: a.inserts - b.inserts,
        evictions: a.evictions - b.evictions,
        bytes_moved: a.bytes_moved - b.bytes_moved,
        staged: a.staged - b.staged,
    }
}

/// Runs `hip-bench offload` with the arguments after the subcommand.
pub fn run(args: impl Iterator<Item = String>) -> R<()> {
    let a = parse(args)?;
    let (hq, hkv) = a.heads;
    let dev = Device::new_cuda(0).map_err(|e| format!("no CUDA device: {e}"))?;
    let Device::Cuda(cd) = &dev else { unreachable!() };
    let stream = cd.cuda_stream();
    let mut json = match &a.json {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    let cfg = HipConfig::default();
    let scale = 1.0 / (D as f32).sqrt();
    let offload = Offload::default().with_gpu_cache_tokens(a.sa).with_mask_cache_tokens(a.mask);
    let query = if a.random { "random".to_string() } else { format!("drift sigma {}", a.sigma) };
    println!(
        "offload decode, one layer ({hq} q / {hkv} KV heads, d 128, bf16), k {}, refresh {}, queries {query}",
        cfg.k, cfg.refresh_interval
    );
    println!("| T | resident ms/step | offloaded ms/step | offloaded / resident throughput | SA hit % | mask hit % | GPU cache MiB | full KV MiB | GPU / full |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &t in &a.ts {
        let n_blocks = t.div_ceil(BLOCK);
        let rows = n_blocks * BLOCK;
        let gen = |seed: u64| -> R<Tensor> {
            // One 64k-row piece at a time: the f32 temporaries stay small.
            let parts = (0..rows.div_ceil(65_536))
                .map(|i| {
                    let n = 65_536.min(rows - i * 65_536);
                    Tensor::randn(seed as f32 * 1e-3, 1.0, (n, hkv, D), &dev)?.to_dtype(DType::BF16)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let (k, v) = (gen(1)?, gen(2)?);
        let order: Vec<u32> = (0..n_blocks as u32).collect();
        let table = Tensor::from_slice(&order, n_blocks, &dev)?;
        let t0 = Instant::now();
        let mut store = HostKvStore::new(&dev, rows, hkv, D, DType::BF16)?;
        let pin_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for i in 0..rows.div_ceil(65_536) {
            let (s, n) = (i * 65_536, 65_536.min(rows - i * 65_536));
            let idx: Vec<u32> = (s as u32..(s + n) as u32).collect();
            let idx = Tensor::from_slice(&idx, n, &dev)?;
            store.write_rows(&idx, &k.narrow(0, s, n)?, &v.narrow(0, s, n)?)?;
        }
        stream.synchronize()?;
        let write_s = t0.elapsed().as_secs_f64();
        let full_bytes = store.bytes();
        println!(
            "  T {t}: pinned {:.1} GiB in {pin_s:.1} s, written through in {write_s:.2} s ({:.1} GB/s)",
            full_bytes as f64 / (1u64 << 30) as f64,
            full_bytes as f64 / write_s / 1e9
        );
        let base = Tensor::randn(0f32, 1.0, (1, 1, hq, D), &dev)?;
        let total = a.warm + a.steps;
        let qs = (0..total)
            .map(|_| {
                let noise = Tensor::randn(0f32, 1.0, (1, 1, hq, D), &dev)?;
                let q = if a.random { noise } else { (&base + (noise * a.sigma)?)? };
                q.to_dtype(DType::BF16)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let start = t - total;
        let mut caches = LayerCaches::new(&dev, &offload, hkv, D, DType::BF16, t)?;
        // The resident run first, then the offloaded one (alternating steps would let the
        // offloaded side-stream updates overlap the resident steps).
        let (mut m_res, mut m_off) = (MaskCache::new(), MaskCache::new());
        let (mut ms_res, mut ms_off) = (0.0, 0.0);
        // Per phase (refresh step, the step after it, the others): summed ms of resident and
        // offloaded steps and the step count.
        let mut phase = [(0.0, 0.0, 0usize); 3];
        let phase_of = |s: usize| match s % cfg.refresh_interval {
            0 => 0,
            1 => 1,
            _ => 2,
        };
        for (s, q) in qs.iter().enumerate() {
            let len = start + s + 1;
            let kv = CudaPagedKv { k: &k, v: &v, block_table: &table, block_size: BLOCK, len };
            let t1 = Instant::now();
            hip_attn_decode_paged_cuda(q, &kv, &cfg, scale, &mut m_res)?;
            stream.synchronize()?;
            let r = t1.elapsed().as_secs_f64() * 1e3;
            if s >= a.warm {
                ms_res += r;
                phase[phase_of(s)].0 += r;
                phase[phase_of(s)].2 += 1;
            }
        }
        let (mut sa0, mut mk0) = (OffloadStats::default(), OffloadStats::default());
        for (s, q) in qs.iter().enumerate() {
            if s == a.warm {
                sa0 = caches.sparse.stats()?;
                mk0 = caches.mask.stats()?;
            }
            let len = start + s + 1;
            let kv = OffloadedKv { store: &store, block_table: &table, block_size: BLOCK, len };
            let t1 = Instant::now();
            hip_attn_decode_offload_cuda(q, &kv, &mut caches, &cfg, scale, &mut m_off)?;
            stream.synchronize()?;
            let o = t1.elapsed().as_secs_f64() * 1e3;
            if s >= a.warm {
                ms_off += o;
                phase[phase_of(s)].1 += o;
            }
        }
        let (ms_res, ms_off) = (ms_res / a.steps as f64, ms_off / a.steps as f64);
        let (sa, mk) = (diff(caches.sparse.stats()?, sa0), diff(caches.mask.stats()?, mk0));
        let gpu = caches.gpu_bytes();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let row = format!(
            "| {t} | {ms_res:.3} | {ms_off:.3} | {:.1}% | {:.1} | {:.1} | {:.0} | {:.0} | {:.2}% |",
            100.0 * ms_res / ms_off,
            100.0 * sa.hit_ratio(),
            100.0 * mk.hit_ratio(),
            mib(gpu),
            mib(full_bytes),
            100.0 * gpu as f64 / full_bytes as f64
        );
        println!("{row}");
        let ph = |i: usize| {
            let (r, o, n) = phase[i];
            format!("{:.3} / {:.3} ms ({n} steps)", r / n.max(1) as f64, o / n.max(1) as f64)
        };
        println!(
            "  resident / offloaded per step: refresh (+ LRU update) {}, next {}, other {}",
            ph(0),
            ph(1),
            ph(2)
        );
        if let (Some(x), Some(y)) = (caches.sparse.update_time(), caches.mask.update_time()) {
            let n = (total.div_ceil(cfg.refresh_interval)) as f64;
            println!(
                "  LRU updates (HIP_OFFLOAD_TIMING=1): SA {:.3} ms, mask {:.3} ms per update",
                x.as_secs_f64() * 1e3 / n,
                y.as_secs_f64() * 1e3 / n
            );
        }
        println!(
            "  SA {sa:?} dropped {}; mask {mk:?} dropped {}",
            caches.sparse.dropped()?,
            caches.mask.dropped()?
        );
        if let Some(f) = json.as_mut() {
            writeln!(
                f,
                "{{\"t\":{t},\"heads_q\":{hq},\"heads_kv\":{hkv},\"query\":\"{query}\",\"k\":{},\"sa_cache\":{},\"mask_cache\":{},\"resident_ms\":{ms_res},\"offload_ms\":{ms_off},\"sa_hit\":{},\"mask_hit\":{},\"sa_bytes_moved\":{},\"mask_bytes_moved\":{},\"gpu_cache_bytes\":{gpu},\"full_kv_bytes\":{full_bytes},\"pin_s\":{pin_s},\"write_s\":{write_s}}}",
                cfg.k,
                a.sa,
                a.mask,
                sa.hit_ratio(),
                mk.hit_ratio(),
                sa.bytes_moved,
                mk.bytes_moved
            )?;
        }
    }
    Ok(())
}
