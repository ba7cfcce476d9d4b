//! `hip-bench e2e`: end-to-end prefill and decode speed of a Qwen2.5-1.5B-shaped (or
//! Llama-3.1-8B-shaped) model with seeded random weights (speed does not depend on the values),
//! HiP vs dense, through
//! `hip_core::model::Model` with the KV cache on the GPU (bf16 blocks; the linear layers in bf16,
//! as `Model::from_hf_dir` loads them on a GPU, or in f32 with `--weights f32`).
//!
//! ```text
//! hip-bench e2e [--contexts 4096,32768,131072] [--batch 1,16] [--decode 64] [--decode-warmup 8]
//!               [--chunk 4096] [--json FILE] [--dir DIR] [--hip-config k=512,window=256,...]
//!               [--methods dense,hip,hip-offload] [--offload sa=8192,mask=65536,stage=BYTES,resident=LAYERS,miss-stage=16384]
//!               [--prefix copy|fork] [--seed 0] [--shape qwen1.5b|llama8b|tiny] [--tiny]
//!               [--weights bf16|f32] [--tf32] [--fill] [--paired ROUNDS] [--write-only]
//! ```
//!
//! 1. Writes the model folder (`--dir`, default `/tmp/hip-e2e-qwen2.5-1.5b`: `config.json`,
//!    `model.safetensors` in bf16) or reuses it when it holds the same shapes and seed; the
//!    transformers peer (`scripts/hf_e2e_bench.py`) loads the same folder.
//! 2. Warm-up per method (a 2k-token prefill and two decode steps, untimed): the first CUDA forward
//!    JIT-compiles candle's PTX (~15 s on a fresh machine).
//! 3. For each context T and method: prefill of one sequence (T tokens in `--chunk` chunks), then
//!    for each batch size B, B sequences holding the prompt's KV (device-side copies of the
//!    prefilled sequence's blocks, or forks sharing them with `--prefix fork`) decode
//!    `--decode-warmup` untimed and `--decode` timed greedy steps together, one forward per step.
//!    See `hip_e2e::e2e::run` for exactly what each number covers.
//!
//! Prints a markdown row per (T, method, batch) as it finishes, writes JSON lines (`--json`), and
//! ends with a summary of HiP over dense. `hip-offload` is HiP with the HiP layers' KV offloaded
//! to pinned host memory (default `Offload` caches; the prompt's KV is forked into the decoding
//! sequences); `hip-offload-inplace` the same with prefill chunks attending over the bus instead
//! of staging each layer's rows on the GPU first (`prefill_stage_bytes` 0). `--tiny` swaps in a
//! 2-layer model for a quick check of the whole pipeline (`--shape tiny`); `--shape llama8b` a
//! model with Llama-3.1-8B's dimensions (32 layers, 32/8 heads of 128: 128 KiB of bf16 KV per
//! token, 30 GB of f32 weights on the GPU).
//!
//! `--weights f32` keeps the linear layers' weights and inputs in f32 (`Model::from_hf_dir_with`);
//! `--tf32` then lets candle's f32 matrix products use TF32 tensor cores (both methods alike).
//! `--fill` writes the prompt's KV from seeded random values through the cache's write path
//! instead of running the prefill (decode speed does not depend on the values; an 8B-shaped
//! prefill of 512k tokens would take minutes): the prefill columns then time the fill.
//! `--paired ROUNDS` (exactly two methods) keeps both methods' caches allocated and decodes them
//! in alternating rounds of `--decode / ROUNDS` steps (A B, B A, ...): the batch-1 decode rate of
//! the lent machine drifts by ±20% between runs seconds apart, which a ratio of separate runs
//! cannot tell from a real difference. Prints each round's B/A rate ratio.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use hip_core::attention::AttentionBackend;
use hip_core::model::Model;
use hip_core::HipConfig;
use hip_e2e::e2e::{self, run, PrefixMode, QwenShape, Row, RunSpec};

use crate::R;

/// Usage of the subcommand.
pub const USAGE: &str = "hip-bench e2e [--contexts 4096,32768,131072] [--batch 1,16] [--decode 64] \
[--decode-warmup 8] [--chunk 4096] [--json FILE] [--dir DIR] [--hip-config k=512,window=256,...] \
[--methods dense,hip,hip-offload] [--offload sa=8192,mask=65536,stage=BYTES,resident=LAYERS,miss-stage=16384] [--prefix copy|fork] \
[--seed 0] [--shape qwen1.5b|llama8b|tiny] [--tiny] [--weights bf16|f32] [--tf32] [--fill] [--paired ROUNDS] [--write-only]";

struct Args {
    contexts: Vec<usize>,
    batches: Vec<usize>,
    decode: usize,
    decode_warmup: usize,
    chunk: usize,
    json: Option<PathBuf>,
    dir: Option<PathBuf>,
    hip: HipConfig,
    methods: Vec<String>,
    prefix: PrefixMode,
    seed: u64,
    shape: String,
    /// The linear layers' weights: bf16 (the GPU default) or f32.
    weights: candle_core::DType,
    tf32: bool,
    fill: bool,
    paired: usize,
    /// Only write (or check) the model folder.
    write_only: bool,
    /// The offload caches of the `hip-offload*` methods.
    offload: hip_core::Offload,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        contexts: vec![4096, 32_768, 131_072],
        batches: vec![1, 16],
        decode: 64,
        decode_warmup: 8,
        chunk: 4096,
        json: None,
        dir: None,
        hip: HipConfig::paper(),
        methods: vec!["dense".into(), "hip".into()],
        prefix: PrefixMode::Copy,
        seed: 0,
        shape: "qwen1.5b".into(),
        weights: candle_core::DType::BF16,
        tf32: false,
        fill: false,
        paired: 0,
        write_only: false,
        offload: hip_core::Offload::default(),
    };
    let list = |flag: &str, s: &str| -> Result<Vec<usize>, String> {
        s.split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|_| format!("{flag}: {x:?} is not a number")))
            .collect()
    };
    let num =
        |flag: &str, s: &str| s.trim().parse::<usize>().map_err(|_| format!("{flag}: {s:?} is not a number"));
    while let Some(flag) = it.next() {
        // Flags without a value.
        match flag.as_str() {
            "--tiny" => {
                a.shape = "tiny".into();
                continue;
            }
            "--write-only" => {
                a.write_only = true;
                continue;
            }
            "--tf32" => {
                a.tf32 = true;
                continue;
            }
            "--fill" => {
                a.fill = true;
                continue;
            }
            _ => (),
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value (usage: {USAGE})"))?;
        match flag.as_str() {
            "--contexts" => a.contexts = list(&flag, &val)?,
            "--weights" => {
                a.weights = match val.as_str() {
                    "bf16" => candle_core::DType::BF16,
                    "f32" => candle_core::DType::F32,
                    other => return Err(format!("--weights takes bf16 or f32, not {other:?}")),
                }
            }
            "--batch" => a.batches = list(&flag, &val)?,
            "--decode" => a.decode = num(&flag, &val)?,
            "--decode-warmup" => a.decode_warmup = num(&flag, &val)?,
            "--chunk" => a.chunk = num(&flag, &val)?,
            "--json" => a.json = Some(val.into()),
            "--dir" => a.dir = Some(val.into()),
            "--hip-config" => a.hip = e2e::parse_hip_config(&val)?,
            "--offload" => {
                for kv in val.split(',') {
                    let (k, v) =
                        kv.split_once('=').ok_or_else(|| format!("--offload: {kv:?} is not key=value"))?;
                    let n = num("--offload", v)?;
                    a.offload = match k.trim() {
                        "sa" => a.offload.with_gpu_cache_tokens(n),
                        "mask" => a.offload.with_mask_cache_tokens(n),
                        "stage" => a.offload.with_prefill_stage_bytes(n as u64),
                        "resident" => a.offload.with_resident_layers(n),
                        "miss-stage" => a.offload.with_miss_stage_tokens(n),
                        other => {
                            return Err(format!(
                                "--offload: unknown key {other:?} (sa, mask, stage, resident, miss-stage)"
                            ))
                        }
                    };
                }
                a.offload.validate().map_err(|e| format!("--offload: {e}"))?;
            }
            "--shape" => {
                shape_of(&val)?;
                a.shape = val
            }
            "--paired" => a.paired = num(&flag, &val)?,
            "--seed" => {
                a.seed = val.trim().parse().map_err(|_| format!("--seed: {val:?} is not a number"))?
            }
            "--methods" => {
                a.methods = val.split(',').map(|m| m.trim().to_string()).collect();
                if let Some(bad) = a
                    .methods
                    .iter()
                    .find(|m| !["dense", "hip", "hip-offload", "hip-offload-inplace"].contains(&m.as_str()))
                {
                    return Err(format!(
                        "--methods: {bad:?} (known: dense, hip, hip-offload, hip-offload-inplace)"
                    ));
                }
            }
            "--prefix" => {
                a.prefix = match val.as_str() {
                    "copy" => PrefixMode::Copy,
                    "fork" => PrefixMode::Fork,
                    other => return Err(format!("--prefix takes copy or fork, not {other:?}")),
                }
            }
            _ => return Err(format!("unknown flag {flag} (usage: {USAGE})")),
        }
    }
    if a.contexts.contains(&0) || a.batches.is_empty() || a.batches.contains(&0) {
        return Err("--contexts and --batch need values of at least 1".into());
    }
    if a.decode == 0 || a.chunk == 0 {
        return Err("--decode and --chunk must be at least 1".into());
    }
    if a.methods.is_empty() {
        return Err("--methods is empty".into());
    }
    if a.paired > 0 && (a.methods.len() != 2 || !a.decode.is_multiple_of(a.paired)) {
        return Err(format!(
            "--paired {} needs exactly two methods (got {}) and --decode a multiple of it (got {})",
            a.paired,
            a.methods.len(),
            a.decode
        ));
    }
    Ok(a)
}

/// The model of `--shape`, the name its rows record, and its default folder.
fn shape_of(name: &str) -> Result<(QwenShape, &'static str, &'static str), String> {
    match name {
        "qwen1.5b" => Ok((QwenShape::qwen25_1_5b(), "qwen2.5-1.5b", "/tmp/hip-e2e-qwen2.5-1.5b")),
        "llama8b" => Ok((QwenShape::llama31_8b(), "llama3.1-8b-shape", "/tmp/hip-e2e-llama3.1-8b-shape")),
        "tiny" => Ok((QwenShape::tiny(), "qwen2-tiny", "/tmp/hip-e2e-qwen2-tiny")),
        other => Err(format!("--shape: {other:?} (known: qwen1.5b, llama8b, tiny)")),
    }
}

/// Free and total device memory, in bytes.
fn mem_info(dev: &Device) -> R<(usize, usize)> {
    let Device::Cuda(cd) = dev else { return Err("not a CUDA device".into()) };
    Ok(cd.cuda_stream().context().mem_get_info()?)
}

/// Room kept free besides the KV cache: activations of a prefill chunk, the logits, the
/// temporaries of a prompt copy.
const HEADROOM: usize = 6 << 30;

/// Runs `hip-bench e2e` with the arguments after the subcommand.
pub fn run(args: impl Iterator<Item = String>) -> R<()> {
    let a = parse(args)?;
    let (shape, model_name, default_dir) = shape_of(&a.shape)?;
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(default_dir));
    let t = Instant::now();
    let reused = e2e::write_model_dir(&dir, &shape, a.seed)?;
    println!(
        "model folder {} ({} parameters, bf16, seed {}): {} in {:.1} s",
        dir.display(),
        shape.parameters(),
        a.seed,
        if reused { "reused" } else { "written" },
        t.elapsed().as_secs_f64()
    );
    if a.write_only {
        return Ok(());
    }
    let dev = Device::new_cuda(0).map_err(|e| format!("no CUDA device: {e}"))?;
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(a.tf32);
    let t = Instant::now();
    let model = Model::from_hf_dir_with(&dir, &dev, a.weights)
        .map_err(|e| format!("loading {}: {e}", dir.display()))?;
    let (free, total) = mem_info(&dev)?;
    let matmul = match (a.weights, a.tf32) {
        (candle_core::DType::F32, false) => "f32",
        (candle_core::DType::F32, true) => "tf32",
        _ => "bf16",
    };
    println!(
        "loaded in {:.1} s (linear layers in {matmul} on the device); device memory {:.1} GB free of {:.1} GB",
        t.elapsed().as_secs_f64(),
        free as f64 / 1e9,
        total as f64 / 1e9
    );
    let mut json = match &a.json {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let backend = |m: &str| {
        if m.starts_with("hip") {
            AttentionBackend::Hip(a.hip.clone())
        } else {
            AttentionBackend::Dense
        }
    };
    let spec = |m: &str, context: usize, batches: Vec<usize>, decode: usize, decode_warmup: usize| RunSpec {
        context,
        batches,
        decode,
        decode_warmup,
        chunk: a.chunk,
        prefix: a.prefix,
        block_size: 16,
        seed: a.seed ^ context as u64,
        fill: a.fill,
        offload: match m {
            "hip-offload" => Some(a.offload.clone()),
            "hip-offload-inplace" => Some(a.offload.clone().with_prefill_stage_bytes(0)),
            _ => None,
        },
    };
    for m in &a.methods {
        let t = Instant::now();
        run::run(&model, backend(m), &spec(m, 2048, vec![2], 2, 0))
            .map_err(|e| format!("warm-up {m}: {e}"))?;
        println!("warm-up {m}: {:.1} s", t.elapsed().as_secs_f64());
    }
    if let AttentionBackend::Hip(c) = backend("hip") {
        println!("HiP config: {c:?}");
    }
    println!(
        "prefill: one sequence, chunks of {}{}; decode: {} timed steps after {} untimed{}, prompt KV {} into each sequence; matmul {}\n",
        a.chunk,
        if a.fill { " (KV filled from random values, no forward)" } else { "" },
        a.decode,
        a.decode_warmup,
        if a.paired > 0 { format!(" in {} alternating rounds", a.paired) } else { String::new() },
        if a.prefix == PrefixMode::Copy { "copied" } else { "forked" },
        matmul
    );
    println!("{}", Row::markdown_header());
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let row = |m: &str, context: usize, pre: &run::Prefill, d: &run::Decode| Row {
        engine: "hip-core".into(),
        method: m.to_string(),
        context,
        batch: d.batch,
        prefill_tok_s: pre.tok_s,
        prefill_s: pre.seconds,
        prefill_chunk: a.chunk.min(context),
        decode_tok_s: d.tok_s,
        decode_ms_per_step: d.seconds * 1e3 / d.steps as f64,
        decode_steps: d.steps,
        kv_bytes: d.kv_bytes,
        kv_bytes_in_use: d.kv_bytes_in_use,
        prefix: if m.starts_with("hip-offload") { "fork".into() } else { a.prefix.name().into() },
        model: model_name.into(),
        prefill: if a.fill { "fill" } else { "forward" }.into(),
        matmul: matmul.into(),
        paired_rounds: a.paired,
    };
    let mut emit = |r: Row, rows: &mut Vec<Row>| -> R<()> {
        println!("{}", r.markdown());
        if let Some(f) = json.as_mut() {
            writeln!(f, "{}", r.json())?;
            f.flush()?;
        }
        rows.push(r);
        Ok(())
    };
    for &context in &a.contexts {
        if a.paired > 0 {
            let (ma, mb) = (&a.methods[0], &a.methods[1]);
            let (sa, sb) = (
                spec(ma, context, a.batches.clone(), a.decode, a.decode_warmup),
                spec(mb, context, a.batches.clone(), a.decode, a.decode_warmup),
            );
            let t = Instant::now();
            match run::paired(&model, (backend(ma), &sa), (backend(mb), &sb), a.paired) {
                Ok(p) => {
                    for (i, (da, db)) in p.a.1.iter().zip(&p.b.1).enumerate() {
                        emit(row(ma, context, &p.a.0, da), &mut rows)?;
                        emit(row(mb, context, &p.b.0, db), &mut rows)?;
                        let mut r = p.round_ratios[i].clone();
                        r.sort_by(f64::total_cmp);
                        println!(
                            "paired T={context} batch {}: {mb} / {ma} decode = {:.3} (rounds: median {:.3}, min {:.3}, max {:.3})",
                            da.batch,
                            db.tok_s / da.tok_s,
                            r[r.len() / 2],
                            r[0],
                            r[r.len() - 1]
                        );
                    }
                    eprintln!("(T={context} paired: {:.1} s in all)", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    let msg = format!("T={context} paired {ma},{mb}: {e}");
                    eprintln!("{msg}");
                    failures.push(msg);
                }
            }
            continue;
        }
        for m in &a.methods {
            let s = spec(m, context, a.batches.clone(), a.decode, a.decode_warmup);
            let need = run::cache_tokens(&s) * shape.kv_bytes_per_token(2);
            // Freed blocks of the previous run go back to the driver at a synchronisation.
            dev.synchronize()?;
            let (free, _) = mem_info(&dev)?;
            if need + HEADROOM > free && s.offload.is_none() {
                eprintln!(
                    "warning: T={context} {m}: the KV cache needs {:.1} GB (+{:.0} GB headroom), {:.1} GB free",
                    need as f64 / 1e9,
                    (HEADROOM >> 30) as f64,
                    free as f64 / 1e9
                );
            }
            let t = Instant::now();
            match run::run(&model, backend(m), &s) {
                Ok((pre, decs)) => {
                    for d in &decs {
                        emit(row(m, context, &pre, d), &mut rows)?;
                    }
                    eprintln!(
                        "(T={context} {m}: {:.1} s in all, KV cache of {:.1} GB)",
                        t.elapsed().as_secs_f64(),
                        need as f64 / 1e9
                    );
                }
                Err(e) => {
                    let msg = format!("T={context} {m}: {e}");
                    eprintln!("{msg}");
                    failures.push(msg);
                }
            }
        }
    }
    summary(&rows);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} run(s) failed:\n  {}", failures.len(), failures.join("\n  ")).into())
    }
}

/// HiP over dense for each context and batch measured with both.
fn summary(rows: &[Row]) {
    let find =
        |m: &str, t: usize, b: usize| rows.iter().find(|r| r.method == m && r.context == t && r.batch == b);
    let mut lines = Vec::new();
    for r in rows.iter().filter(|r| r.method == "hip") {
        if let Some(d) = find("dense", r.context, r.batch) {
            lines.push(format!(
                "| {} | {} | {:.2}x | {:.2}x |",
                r.context,
                r.batch,
                r.prefill_tok_s / d.prefill_tok_s,
                r.decode_tok_s / d.decode_tok_s
            ));
        }
    }
    if !lines.is_empty() {
        println!("\nHiP / dense (tokens/s):\n| T | batch | prefill | decode |\n|---|---|---|---|");
        for l in lines {
            println!("{l}");
        }
    }
    if let (Some(h), Some(d)) = (find("hip", 131_072, 16), find("dense", 131_072, 16)) {
        println!(
            "\ntarget: decode at 128k with 16 sequences >= 5x dense: {:.2}x",
            h.decode_tok_s / d.decode_tok_s
        );
    }
}
