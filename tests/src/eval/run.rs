//! Running the evaluations on a loaded model: retrieval (passkey, needle) and long-context
//! perplexity, for each attention method.

use std::path::Path;
use std::time::Instant;

use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::Model;
use hip_core::HipConfig;
use serde::{Deserialize, Serialize};

use super::error::{EvalError, Result};
use super::method::Method;
use super::prompt::{first_number, text_tokens, Prompt};

/// One retrieval prompt: its cell (length, depth, trial) and the prompt itself.
#[derive(Debug, Clone)]
pub struct RetrievalCase {
    /// Prompt length in tokens.
    pub length: usize,
    /// Where the key / needle sits, in [0, 1].
    pub depth: f64,
    /// Trial number within the cell.
    pub trial: usize,
    /// The prompt.
    pub prompt: Prompt,
}

/// The outcome of one retrieval prompt under one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalResult {
    /// The attention method.
    pub method: Method,
    /// Prompt length in tokens.
    pub length: usize,
    /// Key / needle depth.
    pub depth: f64,
    /// Trial number.
    pub trial: usize,
    /// The expected answer.
    pub expected: String,
    /// The model's greedy answer (decoded).
    pub answer: String,
    /// Whether the answer is judged correct.
    pub correct: bool,
    /// Wall-clock seconds of prefill + decode.
    pub seconds: f64,
}

/// How answers are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// The first number in the answer equals the expected key.
    Passkey,
    /// The answer's first line contains the expected word (case-insensitive).
    Needle,
}

impl Judge {
    /// Whether `answer` is correct for `expected`.
    pub fn correct(self, answer: &str, expected: &str) -> bool {
        match self {
            Judge::Passkey => first_number(answer) == Some(expected),
            Judge::Needle => {
                let line = answer.trim_start().lines().next().unwrap_or("");
                line.to_lowercase().contains(&expected.to_lowercase())
            }
        }
    }
}

/// Settings shared by every run: the HiP config (the streaming baseline derives from it), the
/// prefill chunk, and the methods.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The HiP configuration.
    pub hip: HipConfig,
    /// Prefill chunk in tokens.
    pub chunk: usize,
    /// Methods to run, in order.
    pub methods: Vec<Method>,
}

/// Runs every case under every method: greedy decoding of up to `max_new` tokens, judged by
/// `judge`. `progress` sees each result as it comes.
///
/// # Errors
/// Model and tokenizer errors.
pub fn run_retrieval(
    model: &Model,
    tok: &Tokenizer,
    settings: &RunSettings,
    cases: &[RetrievalCase],
    max_new: usize,
    judge: Judge,
    mut progress: impl FnMut(&RetrievalResult),
) -> Result<Vec<RetrievalResult>> {
    let stop: Vec<u32> = tok.eos_token_ids().to_vec();
    let mut out = Vec::with_capacity(cases.len() * settings.methods.len());
    for case in cases {
        for &method in &settings.methods {
            let t = Instant::now();
            let backend = method.backend(&settings.hip);
            let ids = hip_core::eval::greedy_completion(
                model,
                backend,
                &case.prompt.tokens,
                max_new,
                settings.chunk,
                &stop,
            )?;
            let answer = tok.decode(&ids, true)?;
            let r = RetrievalResult {
                method,
                length: case.length,
                depth: case.depth,
                trial: case.trial,
                correct: judge.correct(&answer, &case.prompt.expected),
                expected: case.prompt.expected.clone(),
                answer,
                seconds: t.elapsed().as_secs_f64(),
            };
            progress(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// One perplexity window.
#[derive(Debug, Clone)]
pub struct PplCase {
    /// Window length in tokens.
    pub length: usize,
    /// Window number.
    pub window: usize,
    /// The window's tokens.
    pub tokens: Vec<u32>,
}

/// The perplexity of one window's last tokens under one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PplResult {
    /// The attention method.
    pub method: Method,
    /// Window length (context of the scored tokens included).
    pub length: usize,
    /// Window number.
    pub window: usize,
    /// Perplexity of the scored tokens.
    pub ppl: f64,
    /// Scored tokens (the window's last ones).
    pub scored: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The windows of a perplexity run: `windows` stretches of `max(lengths)` tokens from the start
/// of the text; for each stretch and length T, the window is its last T tokens, so every length
/// scores the same tokens and only the context before them grows.
///
/// # Errors
/// Empty or zero lengths, `score_last` not below the shortest length, zero windows,
/// [`EvalError::TextTooShort`].
pub fn ppl_cases(
    tok: &Tokenizer,
    text: &Path,
    lengths: &[usize],
    windows: usize,
    score_last: usize,
) -> Result<Vec<PplCase>> {
    let max = lengths.iter().copied().max().ok_or_else(|| EvalError::arg("--lengths", "no length given"))?;
    let min = lengths.iter().copied().min().unwrap_or(0);
    if windows == 0 {
        return Err(EvalError::arg("--windows", "must be at least 1"));
    }
    if score_last == 0 || score_last >= min {
        return Err(EvalError::arg(
            "--score-last",
            format!("{score_last} must be at least 1 and below the shortest length {min}"),
        ));
    }
    let why = format!("{windows} window(s) of {max} tokens");
    let all = text_tokens(tok, text, windows * max, &why)?;
    let mut cases = Vec::new();
    for w in 0..windows {
        let end = (w + 1) * max;
        for &length in lengths {
            cases.push(PplCase { length, window: w, tokens: all[end - length..end].to_vec() });
        }
    }
    Ok(cases)
}

/// Runs every window under every method, scoring its last `score_last` tokens.
///
/// # Errors
/// Model errors.
pub fn run_ppl(
    model: &Model,
    settings: &RunSettings,
    cases: &[PplCase],
    score_last: usize,
    mut progress: impl FnMut(&PplResult),
) -> Result<Vec<PplResult>> {
    let mut out = Vec::new();
    for case in cases {
        for &method in &settings.methods {
            let t = Instant::now();
            let backend = method.backend(&settings.hip);
            let (ppl, scored) =
                hip_core::eval::perplexity_of_last(model, backend, &case.tokens, settings.chunk, score_last)?;
            let r = PplResult {
                method,
                length: case.length,
                window: case.window,
                ppl,
                scored,
                seconds: t.elapsed().as_secs_f64(),
            };
            progress(&r);
            out.push(r);
        }
    }
    Ok(out)
}
