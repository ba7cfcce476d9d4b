//! Summaries of the results, the markdown tables and the JSON report.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use hip_core::attention::StreamingConfig;
use hip_core::HipConfig;
use serde::Serialize;

use super::error::{EvalError, Result};
use super::method::Method;
use super::run::{PplResult, RetrievalResult};

/// Accuracy of one method over some retrieval results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accuracy {
    /// Correct answers.
    pub correct: usize,
    /// Prompts.
    pub total: usize,
}

impl Accuracy {
    /// Of the results that pass `keep`.
    pub fn of(results: &[RetrievalResult], keep: impl Fn(&RetrievalResult) -> bool) -> Self {
        let kept: Vec<_> = results.iter().filter(|r| keep(r)).collect();
        Accuracy { correct: kept.iter().filter(|r| r.correct).count(), total: kept.len() }
    }
    /// `correct / total` (0 when empty).
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Lengths in the results, ascending.
pub fn lengths_of<'a>(lengths: impl Iterator<Item = &'a usize>) -> Vec<usize> {
    lengths.copied().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Depths in the results, ascending.
pub fn depths_of(results: &[RetrievalResult]) -> Vec<f64> {
    let mut d: Vec<f64> = results.iter().map(|r| r.depth).collect();
    d.sort_by(f64::total_cmp);
    d.dedup();
    d
}

/// Methods in the results, in report order.
pub fn methods_of(methods: impl Iterator<Item = Method>) -> Vec<Method> {
    methods.collect::<BTreeSet<_>>().into_iter().collect()
}

/// The markdown table of a retrieval run: one row per (method, length), one column per depth
/// (correct / prompts), then the row's accuracy.
pub fn retrieval_markdown(results: &[RetrievalResult]) -> String {
    let depths = depths_of(results);
    let mut s = String::from("| method | length |");
    for d in &depths {
        let _ = write!(s, " depth {d} |");
    }
    s.push_str(" accuracy |\n|---|---:|");
    s.push_str(&"---:|".repeat(depths.len() + 1));
    s.push('\n');
    for m in methods_of(results.iter().map(|r| r.method)) {
        for l in lengths_of(results.iter().map(|r| &r.length)) {
            let _ = write!(s, "| {m} | {l} |");
            for &d in &depths {
                let a = Accuracy::of(results, |r| r.method == m && r.length == l && r.depth == d);
                let _ = write!(s, " {}/{} |", a.correct, a.total);
            }
            let a = Accuracy::of(results, |r| r.method == m && r.length == l);
            let _ = writeln!(s, " {:.0}% |", a.ratio() * 100.0);
        }
    }
    s
}

/// The perplexity of `method` at `length`, pooled over windows (`exp` of the token-weighted mean
/// log-perplexity), or `None` if it was not run.
pub fn pooled_ppl(results: &[PplResult], method: Method, length: usize) -> Option<f64> {
    let rs: Vec<_> = results.iter().filter(|r| r.method == method && r.length == length).collect();
    let n: usize = rs.iter().map(|r| r.scored).sum();
    if n == 0 {
        return None;
    }
    Some((rs.iter().map(|r| r.ppl.ln() * r.scored as f64).sum::<f64>() / n as f64).exp())
}

/// The markdown table of a perplexity run: one row per length, one column per method, with the
/// relative difference to dense where dense was run.
pub fn ppl_markdown(results: &[PplResult]) -> String {
    let methods = methods_of(results.iter().map(|r| r.method));
    let mut s = String::from("| length |");
    for m in &methods {
        let _ = write!(s, " {m} |");
    }
    s.push_str("\n|---:|");
    s.push_str(&"---:|".repeat(methods.len()));
    s.push('\n');
    for l in lengths_of(results.iter().map(|r| &r.length)) {
        let _ = write!(s, "| {l} |");
        let dense = pooled_ppl(results, Method::Dense, l);
        for &m in &methods {
            match (pooled_ppl(results, m, l), dense) {
                (Some(p), Some(d)) if m != Method::Dense => {
                    let _ = write!(s, " {p:.3} ({:+.2}%) |", (p / d - 1.0) * 100.0);
                }
                (Some(p), _) => {
                    let _ = write!(s, " {p:.3} |");
                }
                (None, _) => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Everything a run records besides its results.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `ppl`, `passkey` or `needle`.
    pub command: String,
    /// The command line.
    pub argv: Vec<String>,
    /// The model file.
    pub model: String,
    /// The text file (ppl, needle).
    pub text: Option<String>,
    /// The HiP configuration.
    pub hip: HipConfig,
    /// The streaming baseline's configuration (same budget as `hip`).
    pub streaming: StreamingConfig,
    /// Prefill chunk.
    pub chunk: usize,
    /// Device (`cpu`, `cuda`).
    pub device: String,
    /// Seconds since the Unix epoch at the start.
    pub unix_time: u64,
}

/// A JSON report: the run's info, its results and the markdown summary.
#[derive(Debug, Serialize)]
pub struct Report<'a, T: Serialize> {
    /// The run.
    pub info: &'a RunInfo,
    /// Every result.
    pub results: &'a [T],
    /// The markdown table.
    pub markdown: &'a str,
}

/// Writes `value` as pretty JSON to `path`.
///
/// # Errors
/// I/O errors.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value).map_err(|e| EvalError::arg("json", e.to_string()))?;
    write_file(path, s.as_bytes())
}

/// Writes `bytes` to `path`, creating its folder.
///
/// # Errors
/// I/O errors.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| EvalError::Io { path: path.into(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, bytes).map_err(io)
}
