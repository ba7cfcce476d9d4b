//! The `hip-eval` command line: parsing and checking every option, and preparing the prompts,
//! all before the model is loaded.

use std::path::{Path, PathBuf};

use hip_core::HipConfig;

use super::error::{EvalError, Result};
use super::method::{eval_hip_config, validate_configs, Method};
use super::prompt::{cell_seed, check_depths, NeedleBuilder, PasskeyBuilder};
use super::run::{ppl_cases, PplCase, RetrievalCase};

/// The usage text.
pub const USAGE: &str = "\
usage: hip-eval <ppl|passkey|needle> [options]
  --model PATH          GGUF model (default: SmolLM2-135M-Instruct from the assets)
  --text PATH           text for ppl and needle (default: moby-dick.txt from the assets)
  --methods LIST        of dense,hip,streaming,hip-extend (default: dense,hip,streaming;
                        hip-extend = HiP with Dynamic RoPE, for contexts past the trained length)
  --lengths LIST        context lengths in tokens (default: 1024,2048)
  --depths LIST         passkey / needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)
  --trials N            prompts per (length, depth) cell (default: 1)
  --seed N              seed of the keys and needles (default: 0)
  --score-last N        ppl: tokens scored at the end of each window (default: 256)
  --windows N           ppl: windows per length (default: 1)
  --chunk N             prefill chunk in tokens (default: 512)
  --k N --window N --sink N --block-q N --stride-q N --block-k N --stride-k N
  --dense-layers LIST --refresh N --tail N --tail-block-q N --extend-dense-k N
                        the HiP config (default: HipConfig::default(): k 512, window 256, sink 16,
                        query blocks 64/2, key blocks 2/1, dense layers 0,1,2, refresh 8, a prefill
                        tail of 64 queries in blocks of 1; --tail 0 gives HipConfig::paper()); streaming
                        gets the same sink and dense layers and a window of window + k;
                        hip-extend runs its dense layers with k = --extend-dense-k (default 4096)
  --device cpu|cuda     (default: cpu)
  --out DIR             where the JSON, markdown and PNG go (default: eval-out)";

/// The subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Perplexity of the last tokens of windows of several lengths.
    Ppl,
    /// The synthetic passkey prompt.
    Passkey,
    /// A fact in natural text, and a question about it.
    Needle,
}

impl Task {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Task::Ppl => "ppl",
            Task::Passkey => "passkey",
            Task::Needle => "needle",
        }
    }
}

/// A parsed command line.
#[derive(Debug, Clone)]
pub struct Args {
    /// The subcommand.
    pub task: Task,
    /// Model file (`None`: the SmolLM2 asset).
    pub model: Option<PathBuf>,
    /// Text file (`None`: the Moby-Dick asset).
    pub text: Option<PathBuf>,
    /// Methods.
    pub methods: Vec<Method>,
    /// Lengths in tokens.
    pub lengths: Vec<usize>,
    /// Depths in [0, 1].
    pub depths: Vec<f64>,
    /// Prompts per cell.
    pub trials: usize,
    /// Seed.
    pub seed: u64,
    /// ppl: scored tokens per window.
    pub score_last: usize,
    /// ppl: windows per length.
    pub windows: usize,
    /// Prefill chunk.
    pub chunk: usize,
    /// The HiP config.
    pub hip: HipConfig,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Output folder.
    pub out: PathBuf,
}

fn list<T: std::str::FromStr>(name: &str, v: &str) -> Result<Vec<T>> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| EvalError::arg(name, format!("{s:?} is not a valid value"))))
        .collect()
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.parse().map_err(|_| EvalError::arg(name, format!("{v:?} is not a valid number")))
}

/// Parses the arguments after the program name, and checks them (methods, depths, lengths, the
/// HiP config).
///
/// # Errors
/// [`EvalError::UnknownMethod`], [`EvalError::DepthOutOfRange`], [`EvalError::BadArgument`]
/// (unknown command or option, missing or bad values), [`EvalError::Core`] for a bad HiP config.
pub fn parse(argv: &[String]) -> Result<Args> {
    let task = match argv.first().map(String::as_str) {
        Some("ppl") => Task::Ppl,
        Some("passkey") => Task::Passkey,
        Some("needle") => Task::Needle,
        Some(other) => return Err(EvalError::arg("command", format!("unknown command {other:?}\n{USAGE}"))),
        None => return Err(EvalError::arg("command", format!("missing\n{USAGE}"))),
    };
    let mut a = Args {
        task,
        model: None,
        text: None,
        methods: Method::ALL.to_vec(),
        lengths: vec![1024, 2048],
        depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
        trials: 1,
        seed: 0,
        score_last: 256,
        windows: 1,
        chunk: 512,
        hip: eval_hip_config(),
        device: "cpu".into(),
        out: PathBuf::from("eval-out"),
    };
    let mut it = argv[1..].iter();
    while let Some(opt) = it.next() {
        let name = opt.as_str();
        let mut val = || it.next().map(String::as_str).ok_or_else(|| EvalError::arg(name, "needs a value"));
        let h = &mut a.hip;
        match name {
            "--model" => a.model = Some(val()?.into()),
            "--text" => a.text = Some(val()?.into()),
            "--methods" => a.methods = Method::parse_list(val()?)?,
            "--lengths" => a.lengths = list(name, val()?)?,
            "--depths" => a.depths = list(name, val()?)?,
            "--trials" => a.trials = num(name, val()?)?,
            "--seed" => a.seed = num(name, val()?)?,
            "--score-last" => a.score_last = num(name, val()?)?,
            "--windows" => a.windows = num(name, val()?)?,
            "--chunk" => a.chunk = num(name, val()?)?,
            "--k" => h.k = num(name, val()?)?,
            "--window" => h.window_tokens = num(name, val()?)?,
            "--sink" => h.sink_tokens = num(name, val()?)?,
            "--block-q" => h.block_size_q = num(name, val()?)?,
            "--stride-q" => h.block_stride_q = num(name, val()?)?,
            "--block-k" => h.block_size_k = num(name, val()?)?,
            "--stride-k" => h.block_stride_k = num(name, val()?)?,
            "--dense-layers" => h.dense_layers = list(name, val()?)?,
            "--refresh" => h.refresh_interval = num(name, val()?)?,
            "--tail" => h.tail_queries = num(name, val()?)?,
            "--tail-block-q" => h.tail_block_size_q = num(name, val()?)?,
            "--extend-dense-k" => {
                h.rope_extend = Some(hip_core::RopeExtend { dense_layer_k: num(name, val()?)? })
            }
            "--device" => match val()? {
                d @ ("cpu" | "cuda") => a.device = d.into(),
                other => return Err(EvalError::arg(name, format!("{other:?} (known: cpu, cuda)"))),
            },
            "--out" => a.out = val()?.into(),
            other => return Err(EvalError::arg(other, format!("unknown option\n{USAGE}"))),
        }
    }
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        return Err(EvalError::arg("--lengths", "give at least one length, each at least 1"));
    }
    check_depths(&a.depths)?;
    if a.depths.is_empty() && task != Task::Ppl {
        return Err(EvalError::arg("--depths", "give at least one depth"));
    }
    for (name, v) in [("--trials", a.trials), ("--chunk", a.chunk), ("--windows", a.windows)] {
        if v == 0 {
            return Err(EvalError::arg(name, "must be at least 1"));
        }
    }
    validate_configs(&a.hip)?;
    Ok(a)
}

/// The work of a run, prepared before any model is loaded.
#[derive(Debug)]
pub enum Work {
    /// Perplexity windows.
    Ppl(Vec<PplCase>),
    /// Passkey or needle prompts.
    Retrieval(Vec<RetrievalCase>),
}

/// Builds the prompts or windows of `args` with the model's tokenizer.
///
/// # Errors
/// [`EvalError::TextTooShort`], lengths too short for a prompt, I/O and tokenizer errors.
pub fn prepare(args: &Args, tok: &hip_core::loader::tokenizer::Tokenizer, text: &Path) -> Result<Work> {
    match args.task {
        Task::Ppl => Ok(Work::Ppl(ppl_cases(tok, text, &args.lengths, args.windows, args.score_last)?)),
        Task::Passkey => {
            let b = PasskeyBuilder::new(tok)?;
            retrieval_cases(args, |l, d, s| b.build(tok, l, d, s))
        }
        Task::Needle => {
            let max = args.lengths.iter().copied().max().unwrap_or(0);
            let b = NeedleBuilder::new(tok, text, max)?;
            retrieval_cases(args, |l, d, s| b.build(tok, l, d, s))
        }
    }
}

fn retrieval_cases(
    args: &Args,
    build: impl Fn(usize, f64, u64) -> Result<super::prompt::Prompt>,
) -> Result<Work> {
    let mut cases = Vec::new();
    for &length in &args.lengths {
        for &depth in &args.depths {
            for trial in 0..args.trials {
                let prompt = build(length, depth, cell_seed(args.seed, length, depth, trial))?;
                cases.push(RetrievalCase { length, depth, trial, prompt });
            }
        }
    }
    Ok(Work::Retrieval(cases))
}
