//! `hip-offload-sim`: hit ratios of the KV-cache offload policy on real HiP decode masks (CPU).
//!
//! ```text
//! cargo run --release -p hip-e2e --bin hip-offload-sim -- [--context 8192] [--steps 128]
//!     [--chunk 512] [--k 512] [--refresh 8] [--sizes 1024,2048,4096,8192,full]
//!     [--text moby-dick.txt] [--out docs/offload-data]
//! ```
//! SmolLM2-135M-Instruct prefills the first `--context` tokens of a text with
//! `HipConfig::default()` (k, refresh interval overridable), then greedy-decodes `--steps`
//! tokens. After every step the decode mask of each HiP layer gives the (KV head, token) entries
//! block-sparse attention read (sink, widened window, selected blocks; query heads unioned per KV
//! head), and those lists run through one LRU `TokenCache` per layer for each sparse-attention
//! cache size. Prints a markdown table; `--out DIR` also writes `DIR/ctx<N>-k<K>-r<R>.json` and
//! `.md`. Mask-estimation key reads are not observable (see hip_e2e::offload_sim), so
//! only the sparse-attention cache is measured. Results: docs/offload.md.

use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::Device;
use hip_core::model::Model;
use hip_core::HipConfig;
use hip_e2e::offload_sim::{self, SizeResult, LLAMA8B_HIP};
use hip_kernels::offload::{GpuFootprint, KvShape, Offload};
use serde::Serialize;

struct Args {
    context: usize,
    steps: usize,
    chunk: usize,
    k: Option<usize>,
    refresh: Option<usize>,
    sizes: Vec<Option<usize>>,
    text: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        context: 8192,
        steps: 128,
        chunk: 512,
        k: None,
        refresh: None,
        sizes: vec![Some(1024), Some(2048), Some(4096), Some(8192), None],
        text: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, name: &str| -> Result<usize, String> {
        v.as_deref()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name} needs a positive number"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--context" => a.context = num(it.next(), "--context")?,
            "--steps" => a.steps = num(it.next(), "--steps")?,
            "--chunk" => a.chunk = num(it.next(), "--chunk")?,
            "--k" => a.k = Some(num(it.next(), "--k")?),
            "--refresh" => a.refresh = Some(num(it.next(), "--refresh")?),
            "--sizes" => {
                let v = it.next().ok_or("--sizes needs a list")?;
                a.sizes = v
                    .split(',')
                    .map(|s| match s {
                        "full" => Ok(None),
                        s => num(Some(s.to_string()), "--sizes").map(Some),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--text" => a.text = Some(it.next().ok_or("--text needs a path")?.into()),
            "--out" => a.out = Some(it.next().ok_or("--out needs a folder")?.into()),
            other => return Err(format!("unknown argument {other} (see the source header for usage)")),
        }
    }
    Ok(a)
}

/// GPU memory of the offload caches of Llama-3.1-8B (bf16) at one context length.
#[derive(Serialize)]
struct Footprint {
    gpu_cache_tokens: usize,
    mask_cache_tokens: usize,
    max_tokens: usize,
    bytes: GpuFootprint,
    total: u64,
    full_kv: u64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    date: String,
    threads: usize,
    model: String,
    heads_q: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    hip_layers: Vec<usize>,
    hip: HipConfig,
    context: usize,
    steps: usize,
    chunk: usize,
    prefill_s: f64,
    decode_s: f64,
    mean_accessed_per_layer_head: f64,
    mean_block_only_per_layer_head: f64,
    refresh_steps: Vec<usize>,
    generated: String,
    sizes: Vec<SizeResult>,
    llama8b_bf16_footprints: Vec<Footprint>,
    note: &'static str,
}

const NOTE: &str = "Sparse-attention cache only: the keys mask estimation scores during a refresh are not \
observable through the public API, so the mask-estimation cache is not simulated. Accesses are distinct \
(KV head, token) entries per step (query heads of a KV head unioned); the newest token is a miss at its \
first step (the policy does not insert on write).";

/// `YYYY-MM-DD` (UTC) of now.
fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn pct(r: f64) -> String {
    format!("{:.2}", 100.0 * r)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Context {} + {} decode steps ({})\n\n`{}`\n\n{}; {} threads; prefill {:.0} s, decode {:.0} s. \
         HiP config: k = {}, block_size_k = {}, sink {}, window {}, refresh every {} steps, dense layers {:?} \
         ({} HiP layers × {} KV heads, {} query heads, head dim {}). Per step and (HiP layer, KV head) \
         decode read {:.0} distinct entries on average, {:.0} of them in selected blocks outside the sink \
         and window. Mask refreshed at steps {:?}.\n",
        r.context,
        r.steps,
        r.date,
        r.command,
        r.model,
        r.threads,
        r.prefill_s,
        r.decode_s,
        r.hip.k,
        r.hip.block_size_k,
        r.hip.sink_tokens,
        r.hip.window_tokens,
        r.hip.refresh_interval,
        r.hip.dense_layers,
        r.hip_layers.len(),
        r.kv_heads,
        r.heads_q,
        r.head_dim,
        r.mean_accessed_per_layer_head,
        r.mean_block_only_per_layer_head,
        r.refresh_steps,
    );
    s.push_str(
        "| SA slots / KV head | resident | hit % all steps | layer min–max | hit % steps ≥ 1 | layer min–max \
         | hit % refresh steps ≥ 1 | first-touch share of misses (≥ 1) | entries moved / step / (layer, head) \
         | KiB / step, SmolLM2 bf16 | MiB / step, Llama-3.1-8B-like bf16 |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for z in &r.sizes {
        let first =
            if z.steady.misses == 0 { 1.0 } else { z.steady.first_touch as f64 / z.steady.misses as f64 };
        let _ = writeln!(
            s,
            "| {} | {:.1}% | {} | {}–{} | {} | {}–{} | {} | {:.0}% | {:.0} | {:.0} | {:.2} |",
            z.slots_per_head,
            100.0 * z.resident_fraction,
            pct(z.all.hit_ratio()),
            pct(z.all_layer_range.0),
            pct(z.all_layer_range.1),
            pct(z.steady.hit_ratio()),
            pct(z.steady_layer_range.0),
            pct(z.steady_layer_range.1),
            pct(z.steady_refresh.hit_ratio()),
            100.0 * first,
            z.steady_moved_per_layer_head,
            z.steady_bytes_per_step_model / 1024.0,
            z.steady_bytes_per_step_llama8b / (1u64 << 20) as f64,
        );
    }
    let _ = writeln!(
        s,
        "\nLlama-3.1-8B-like: the per-(layer, KV head) traffic × {} HiP layers × {} KV heads × {} B \
         (K and V, head dim {}, bf16), assuming the same access pattern per KV head.\n\n{NOTE}",
        LLAMA8B_HIP.0,
        LLAMA8B_HIP.1,
        2 * LLAMA8B_HIP.2 * 2,
        LLAMA8B_HIP.2
    );
    s
}

fn footprints() -> Vec<Footprint> {
    let shape = KvShape::new(32, 8, 128, 2);
    let mut out = Vec::new();
    for max_tokens in [128 << 10, 1 << 20] {
        for sa in [1024, 2048, 4096, 8192] {
            let cfg = Offload::default().with_gpu_cache_tokens(sa);
            let bytes = cfg.gpu_footprint(&shape, max_tokens);
            out.push(Footprint {
                gpu_cache_tokens: sa,
                mask_cache_tokens: cfg.mask_cache_tokens,
                max_tokens,
                bytes,
                total: bytes.total(),
                full_kv: shape.token_bytes() * max_tokens as u64,
            });
        }
    }
    out
}

fn footprint_table(f: &[Footprint]) -> String {
    let mut s = String::from(
        "| context | SA cache tokens | mask cache tokens | SA banks GiB | mask banks GiB | page tables GiB | miss staging GiB | total GiB | full KV GiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for x in f {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            x.max_tokens,
            x.gpu_cache_tokens,
            x.mask_cache_tokens,
            gib(x.bytes.sa_cache),
            gib(x.bytes.mask_cache),
            gib(x.bytes.page_tables),
            gib(x.bytes.miss_staging),
            gib(x.total),
            gib(x.full_kv)
        );
    }
    s
}

fn main() -> Result<(), String> {
    let a = parse()?;
    let path = hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf")?;
    let text = match &a.text {
        Some(p) => p.clone(),
        None => hip_e2e::asset("moby-dick.txt")?,
    };
    let tok = hip_e2e::gguf_tokenizer(&path)?;
    let prompt = hip_e2e::text_window(&tok, &text, a.context)?;
    let model = Model::from_gguf(&path, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut cfg = HipConfig::default();
    if let Some(k) = a.k {
        cfg = cfg.with_k(k);
    }
    if let Some(r) = a.refresh {
        cfg = cfg.with_refresh_interval(r);
    }
    eprintln!("prefilling {} tokens, then {} decode steps...", a.context, a.steps);
    let rec = offload_sim::record(&model, &prompt, a.steps, &cfg, a.chunk)?;
    let max = rec.max_tokens();
    let sizes: Vec<usize> = a.sizes.iter().map(|s| s.unwrap_or(max)).collect();
    let results = offload_sim::simulate_sizes(&rec, &sizes)?;
    let (acc, blk) = offload_sim::mean_accesses(&rec);
    let refresh_steps =
        (0..rec.steps.len()).filter(|&s| rec.steps[s].first().is_some_and(|l| l.refreshed)).collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let report = Report {
        command: format!("cargo run --release -p hip-e2e --bin hip-offload-sim -- {}", args.join(" "))
            .trim_end()
            .to_string(),
        date: today(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        model: "SmolLM2-135M-Instruct Q4_1 (CPU), Moby-Dick".into(),
        heads_q: rec.heads_q,
        kv_heads: rec.kv_heads,
        head_dim: rec.head_dim,
        layers: rec.num_layers,
        hip_layers: rec.hip_layers.clone(),
        hip: cfg,
        context: rec.context,
        steps: rec.steps.len(),
        chunk: a.chunk,
        prefill_s: rec.prefill_s,
        decode_s: rec.decode_s,
        mean_accessed_per_layer_head: acc,
        mean_block_only_per_layer_head: blk,
        refresh_steps,
        generated: tok.decode(&rec.generated, true).map_err(|e| e.to_string())?,
        sizes: results,
        llama8b_bf16_footprints: footprints(),
        note: NOTE,
    };
    let md = markdown(&report);
    let fp = footprint_table(&report.llama8b_bf16_footprints);
    println!("{md}\nGPU memory of the offload caches, Llama-3.1-8B bf16 (Offload::gpu_footprint):\n\n{fp}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        let stem = dir.join(format!("ctx{}-k{}-r{}", a.context, report.hip.k, report.hip.refresh_interval));
        for (ext, body) in [("json", json), ("md", format!("{md}\n{fp}"))] {
            let p = stem.with_extension(ext);
            std::fs::write(&p, body + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
