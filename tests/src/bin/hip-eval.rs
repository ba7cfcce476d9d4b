//! `hip-eval`: long-context quality of dense attention, HiP and the sink-and-window baseline.
//!
//! ```text
//! hip-eval ppl     [options]   perplexity of the last tokens of windows of several lengths
//! hip-eval passkey [options]   the synthetic passkey prompt at lengths × depths
//! hip-eval needle  [options]   a fact in natural text at lengths × depths, then a question
//! ```
//! Every option is checked, and the prompts are built, before the model is loaded. Results go to
//! `--out` (default `eval-out/`) as `<command>.json` and `<command>.md` (and `needle.png`, the
//! depth × length heat map); the markdown table is also printed. See `hip-eval --help` and
//! docs/quality.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use hip_core::attention::StreamingConfig;
use hip_core::model::Model;
use hip_e2e::eval::cli::{self, Args, Task, Work};
use hip_e2e::eval::report::{self, Report, RunInfo};
use hip_e2e::eval::run::{self, Judge, RunSettings};
use hip_e2e::eval::{heatmap, EvalError, Result};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", cli::USAGE);
        return ExitCode::SUCCESS;
    }
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hip-eval: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(argv: &[String]) -> Result<()> {
    let args = cli::parse(argv)?;
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf").map_err(EvalError::Asset)?,
    };
    let text_path = match &args.text {
        Some(p) => p.clone(),
        None => hip_e2e::asset("moby-dick.txt").map_err(EvalError::Asset)?,
    };
    if !model_path.is_file() {
        return Err(EvalError::arg("--model", format!("{} is not a file", model_path.display())));
    }
    let tok = hip_e2e::gguf_tokenizer(&model_path).map_err(EvalError::Asset)?;
    let work = cli::prepare(&args, &tok, &text_path)?;

    // Only now the model work.
    let device = match args.device.as_str() {
        "cuda" => hip_core::device::cuda(0)?,
        _ => Device::Cpu,
    };
    let model = Model::from_gguf(&model_path, &device)?;
    let trained = model.config().context_length;
    if let Some(&l) = args.lengths.iter().find(|&&l| l > trained) {
        eprintln!("hip-eval: note: length {l} exceeds the model's trained context of {trained} tokens");
    }
    let info = RunInfo {
        command: args.task.name().into(),
        argv: argv.to_vec(),
        model: model_path.display().to_string(),
        text: (args.task != Task::Passkey).then(|| text_path.display().to_string()),
        hip: args.hip.clone(),
        streaming: StreamingConfig::same_budget(&args.hip),
        chunk: args.chunk,
        device: args.device.clone(),
        unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    let settings = RunSettings { hip: args.hip.clone(), chunk: args.chunk, methods: args.methods.clone() };
    let out = |ext: &str| -> PathBuf { args.out.join(format!("{}.{ext}", args.task.name())) };
    match work {
        Work::Ppl(cases) => {
            let results = run::run_ppl(&model, &settings, &cases, args.score_last, |r| {
                eprintln!(
                    "{:>9} length {:>6} window {} ppl {:.4} ({} scored) {:.1} s",
                    r.method.name(),
                    r.length,
                    r.window,
                    r.ppl,
                    r.scored,
                    r.seconds
                );
            })?;
            let md = report::ppl_markdown(&results);
            finish(&args, &info, &results, &md, out)?;
        }
        Work::Retrieval(cases) => {
            let (judge, max_new) = match args.task {
                Task::Passkey => (Judge::Passkey, 8),
                _ => (Judge::Needle, 8),
            };
            let results = run::run_retrieval(&model, &tok, &settings, &cases, max_new, judge, |r| {
                eprintln!(
                    "{:>9} length {:>6} depth {:.2} trial {} expected {:>8} {} answer {:?} {:.1} s",
                    r.method.name(),
                    r.length,
                    r.depth,
                    r.trial,
                    r.expected,
                    if r.correct { "ok  " } else { "MISS" },
                    r.answer,
                    r.seconds
                );
            })?;
            let md = report::retrieval_markdown(&results);
            finish(&args, &info, &results, &md, out)?;
            if args.task == Task::Needle {
                let png = out("png");
                heatmap::draw(&png, &results, "needle accuracy")?;
                println!("heat map: {}", png.display());
            }
        }
    }
    Ok(())
}

fn finish<T: serde::Serialize>(
    args: &Args,
    info: &RunInfo,
    results: &[T],
    md: &str,
    out: impl Fn(&str) -> PathBuf,
) -> Result<()> {
    let h = &args.hip;
    let head = format!(
        "{} — model {}, HiP k={} window={} sink={} block_q={}/{} block_k={}/{} dense_layers={:?} refresh={} \
         tail={}/{} extend_dense_k={}; streaming sink={} window={}\n\n",
        args.task.name(),
        info.model,
        h.k,
        h.window_tokens,
        h.sink_tokens,
        h.block_size_q,
        h.block_stride_q,
        h.block_size_k,
        h.block_stride_k,
        h.dense_layers,
        h.refresh_interval,
        h.tail_queries,
        h.tail_block_size_q,
        h.rope_extend.clone().unwrap_or_default().dense_layer_k,
        info.streaming.sink_tokens,
        info.streaming.window_tokens
    );
    println!("{head}{md}");
    report::write_json(&out("json"), &Report { info, results, markdown: md })?;
    report::write_file(&out("md"), format!("{head}{md}").as_bytes())?;
    println!("wrote {} and {}", out("json").display(), out("md").display());
    Ok(())
}
