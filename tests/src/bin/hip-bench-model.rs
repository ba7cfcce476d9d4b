//! `hip-bench-model`: end-to-end prefill and decode speed of a GGUF model on the CPU, dense vs
//! HiP, with candle-transformers' `quantized_llama` / `quantized_qwen2` measured in the same run.
//!
//! ```text
//! hip-bench-model [--model PATH] [--contexts 1024,4096,8192] [--decode 32] [--chunk 512] [--json PATH]
//!                 [--slow-max 1024] [--kv-dir DIR]
//! ```
//! For each context T: prefill the first T tokens of Moby-Dick (chunks of `--chunk`), then decode
//! `--decode` greedy tokens; prints tokens/s. candle-transformers runs the whole prompt in one
//! forward (its own way) and then decodes token by token; its llama model is limited to 4,096
//! positions, so it is skipped above that. The slow rows (weights as stored, and candle, whose
//! Q4_1 kernel has no SIMD path) run only up to `--slow-max` tokens. With `--kv-dir`, dense and HiP
//! also run with the KV cache in a memory-mapped temporary file in DIR
//! (`PagedKvCache::new_file_backed`), next to the in-memory rows.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{Device, Tensor};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::model::{LogitsWanted, Model, SeqChunk, WeightPolicy};
use hip_core::HipConfig;
use hip_e2e::argmax;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hip-bench-model: {e}");
            ExitCode::from(2)
        }
    }
}

struct Row {
    engine: String,
    context: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

fn ours(
    model: &Model,
    backend: AttentionBackend,
    prompt: &[u32],
    chunk: usize,
    n_dec: usize,
    kv_dir: Option<&std::path::Path>,
) -> Result<(f64, f64), String> {
    let e = |e: hip_core::Error| e.to_string();
    let c = model.config();
    let blocks = (prompt.len() + n_dec).div_ceil(16) + 1;
    let kv_cfg = KvCacheConfig {
        num_layers: c.layers,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_size: 16,
        num_blocks: blocks,
    };
    let mut kv = match kv_dir {
        Some(dir) => PagedKvCache::new_file_backed(kv_cfg, dir),
        None => PagedKvCache::new(kv_cfg),
    }
    .map_err(e)?;
    let mut attn = AttentionState::new(backend).map_err(e)?;
    let seq = kv.add_sequence();
    let t = Instant::now();
    let mut last = None;
    for (i, piece) in prompt.chunks(chunk).enumerate() {
        let want = if (i + 1) * chunk >= prompt.len() { LogitsWanted::Last } else { LogitsWanted::None };
        let out =
            model.forward(&[SeqChunk { seq, tokens: piece, logits: want }], &mut kv, &mut attn).map_err(e)?;
        last = out.into_iter().next();
    }
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let row = last
        .ok_or("empty prompt")?
        .flatten_all()
        .map_err(|x| x.to_string())?
        .to_vec1::<f32>()
        .map_err(|x| x.to_string())?;
    let mut tok = argmax(&row);
    let t = Instant::now();
    for _ in 0..n_dec {
        let out = model
            .forward(&[SeqChunk { seq, tokens: &[tok], logits: LogitsWanted::Last }], &mut kv, &mut attn)
            .map_err(e)?;
        tok = argmax(
            &out[0].flatten_all().map_err(|x| x.to_string())?.to_vec1::<f32>().map_err(|x| x.to_string())?,
        );
    }
    Ok((prefill, n_dec as f64 / t.elapsed().as_secs_f64()))
}

fn candle(path: &std::path::Path, prompt: &[u32], n_dec: usize) -> Result<(f64, f64), String> {
    let err = |e: candle_core::Error| e.to_string();
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(err)?;
    let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &dev)
        .map_err(err)?;
    let input = Tensor::new(prompt, &dev).map_err(err)?.unsqueeze(0).map_err(err)?;
    let t = Instant::now();
    let logits = m.forward(&input, 0).map_err(err)?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let mut tok = argmax(&logits.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?);
    let t = Instant::now();
    for i in 0..n_dec {
        let x = Tensor::new(&[tok], &dev).map_err(err)?.unsqueeze(0).map_err(err)?;
        let l = m.forward(&x, prompt.len() + i).map_err(err)?;
        tok = argmax(&l.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?);
    }
    Ok((prefill, n_dec as f64 / t.elapsed().as_secs_f64()))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut model_path = None;
    let mut contexts = vec![1024usize, 4096, 8192];
    let (mut n_dec, mut chunk) = (32usize, 512usize);
    let mut json = None;
    let mut slow_max = 1024usize;
    let mut kv_dir: Option<std::path::PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--model" => model_path = Some(std::path::PathBuf::from(v)),
            "--contexts" => {
                contexts = v
                    .split(',')
                    .map(|x| x.parse().map_err(|_| format!("bad context {x}")))
                    .collect::<Result<_, _>>()?
            }
            "--decode" => n_dec = v.parse().map_err(|_| "bad --decode")?,
            "--chunk" => chunk = v.parse().map_err(|_| "bad --chunk")?,
            "--json" => json = Some(v.clone()),
            "--slow-max" => slow_max = v.parse().map_err(|_| "bad --slow-max")?,
            "--kv-dir" => kv_dir = Some(v.into()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let path = match model_path {
        Some(p) => p,
        None => hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf")?,
    };
    let tok = hip_e2e::gguf_tokenizer(&path)?;
    let max_t = contexts.iter().copied().max().unwrap_or(0);
    let all = hip_e2e::text_window(&tok, &hip_e2e::asset("moby-dick.txt")?, max_t)?;
    let fast =
        Model::from_gguf_with(&path, &Device::Cpu, WeightPolicy::FastCpu).map_err(|e| e.to_string())?;
    let stored =
        Model::from_gguf_with(&path, &Device::Cpu, WeightPolicy::AsStored).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &t in &contexts {
        let prompt = &all[..t];
        let mut push = |engine: &str, r: (f64, f64)| {
            println!("T={t:>6} {engine:<34} prefill {:>9.1} tok/s  decode {:>7.2} tok/s", r.0, r.1);
            rows.push(Row { engine: engine.to_string(), context: t, prefill_tok_s: r.0, decode_tok_s: r.1 });
        };
        let hip = || AttentionBackend::Hip(HipConfig::paper());
        push("hip-core dense (FastCpu)", ours(&fast, AttentionBackend::Dense, prompt, chunk, n_dec, None)?);
        push("hip-core hip paper (FastCpu)", ours(&fast, hip(), prompt, chunk, n_dec, None)?);
        if let Some(dir) = kv_dir.as_deref() {
            let dense = ours(&fast, AttentionBackend::Dense, prompt, chunk, n_dec, Some(dir))?;
            push("hip-core dense (FastCpu, KV in file)", dense);
            push(
                "hip-core hip paper (FastCpu, KV in file)",
                ours(&fast, hip(), prompt, chunk, n_dec, Some(dir))?,
            );
        }
        if t <= slow_max {
            let r = ours(&stored, AttentionBackend::Dense, prompt, chunk, n_dec, None)?;
            push("hip-core dense (AsStored)", r);
        }
        if t + n_dec <= 4096 && t <= slow_max {
            push("candle-transformers quantized_llama", candle(&path, prompt, n_dec)?);
        }
    }
    if let Some(p) = json {
        let body: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"engine\":\"{}\",\"context\":{},\"prefill_tok_s\":{:.3},\"decode_tok_s\":{:.3}}}",
                    r.engine, r.context, r.prefill_tok_s, r.decode_tok_s
                )
            })
            .collect();
        std::fs::write(&p, format!("[{}]\n", body.join(",\n"))).map_err(|e| format!("{p}: {e}"))?;
    }
    Ok(())
}
