//! `hip-eval`: quality measurements.
//!
//! ```text
//! hip-eval ppl [--model PATH] [--text PATH] [--tokens N] [--chunk N] [--attention dense|hip]
//!              [--k N] [--window N] [--sink N] [--reference]
//! ```
//! Perplexity over the first N tokens of a text (default: SmolLM2-135M over 2,048 tokens of
//! Moby-Dick), prefilled in chunks; `--reference` also runs candle-transformers' model token by
//! token and prints both.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use hip_core::attention::AttentionBackend;
use hip_core::model::Model;
use hip_core::HipConfig;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hip-eval: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return Err("usage: hip-eval ppl [--model PATH] [--text PATH] [--tokens N] [--chunk N] [--attention dense|hip] [--k N] [--window N] [--sink N] [--reference]".into());
    };
    if cmd != "ppl" {
        return Err(format!("unknown command {cmd:?} (known: ppl)"));
    }
    let mut model = None;
    let mut text = None;
    let (mut n, mut chunk) = (2048usize, 512usize);
    let mut hip = false;
    let mut reference = false;
    let mut cfg = HipConfig::paper();
    let mut it = args[1..].iter();
    let num = |v: Option<&String>, name: &str| -> Result<usize, String> {
        v.ok_or(format!("{name} needs a value"))?.parse().map_err(|_| format!("{name} needs a number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => model = it.next().cloned(),
            "--text" => text = it.next().cloned(),
            "--tokens" => n = num(it.next(), "--tokens")?,
            "--chunk" => chunk = num(it.next(), "--chunk")?,
            "--k" => cfg = cfg.with_k(num(it.next(), "--k")?),
            "--window" => cfg = cfg.clone().with_sink_window(cfg.sink_tokens, num(it.next(), "--window")?),
            "--sink" => cfg = cfg.clone().with_sink_window(num(it.next(), "--sink")?, cfg.window_tokens),
            "--attention" => match it.next().map(String::as_str) {
                Some("dense") => hip = false,
                Some("hip") => hip = true,
                other => return Err(format!("--attention takes dense or hip, not {other:?}")),
            },
            "--reference" => reference = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let model_path = match model {
        Some(p) => p.into(),
        None => hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf")?,
    };
    let text_path = match text {
        Some(p) => p.into(),
        None => hip_e2e::asset("moby-dick.txt")?,
    };
    let tok = hip_e2e::gguf_tokenizer(&model_path)?;
    let tokens = hip_e2e::text_window(&tok, &text_path, n)?;
    let m = Model::from_gguf(&model_path, &Device::Cpu).map_err(|e| e.to_string())?;
    let backend = if hip { AttentionBackend::Hip(cfg.clone()) } else { AttentionBackend::Dense };
    let t = Instant::now();
    let (ppl, scored) = hip_core::eval::perplexity(&m, backend, &tokens, chunk).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    let attn = if hip {
        format!("hip(k={}, window={}, sink={})", cfg.k, cfg.window_tokens, cfg.sink_tokens)
    } else {
        "dense".into()
    };
    println!(
        "model={} text={} tokens={n} chunk={chunk} attention={attn} ppl={ppl:.4} scored={scored} seconds={secs:.1}",
        model_path.display(),
        text_path.display()
    );
    if reference {
        let t = Instant::now();
        let r = hip_e2e::candle_perplexity(&model_path, &tokens)?;
        println!(
            "reference=candle-transformers (token by token) ppl={r:.4} seconds={:.1} relative_difference={:.4}%",
            t.elapsed().as_secs_f64(),
            (ppl - r).abs() / r * 100.0
        );
    }
    Ok(())
}
