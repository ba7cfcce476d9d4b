//! [`GenerateOptions`]: per-call settings of a generation.

use hip_core::engine::GenerateParams;
use hip_core::sampling::SamplingParams;

use crate::error::{Error, Result};

/// Most tokens a generation produces unless [`GenerateOptions::with_max_tokens`] says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Settings of one generation. Unset sampling values come from the session's defaults
/// ([`SessionBuilder::with_sampling`](crate::SessionBuilder::with_sampling)); values are checked
/// when the generation starts (out-of-range ones fail it with an
/// [`InvalidRequest`](crate::ErrorKind::InvalidRequest) error).
///
/// ```
/// use hip_sdk::GenerateOptions;
///
/// let opts = GenerateOptions::new().with_max_tokens(64).with_temperature(0.7).with_top_p(0.9).with_seed(7);
/// let greedy = GenerateOptions::greedy().with_stop(["\n\n"]);
/// # let _ = (opts, greedy);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    max_tokens: Option<usize>,
    sampling: Option<SamplingParams>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Vec<String>,
    ignore_eos: bool,
}

impl GenerateOptions {
    /// No overrides: the session's sampling defaults and at most [`DEFAULT_MAX_TOKENS`] tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Greedy decoding (temperature 0), whatever the session's defaults.
    pub fn greedy() -> Self {
        Self::new().with_sampling(SamplingParams::greedy())
    }

    /// Generates at most `n` tokens (default [`DEFAULT_MAX_TOKENS`]).
    #[must_use]
    pub fn with_max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Replaces the session's sampling defaults; the single-value setters still apply on top.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = Some(sampling);
        self
    }

    /// Softmax temperature, finite and `>= 0`; `0` is greedy.
    #[must_use]
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Nucleus sampling threshold in `(0, 1]`; `1` is off.
    #[must_use]
    pub fn with_top_p(mut self, p: f32) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Keeps the `k` most likely tokens; `0` is off.
    #[must_use]
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Drops tokens less likely than `p` times the most likely one, in `[0, 1)`; `0` is off.
    #[must_use]
    pub fn with_min_p(mut self, p: f32) -> Self {
        self.min_p = Some(p);
        self
    }

    /// Repetition penalty, finite and `> 0`; `1` is off.
    #[must_use]
    pub fn with_repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = Some(penalty);
        self
    }

    /// Seed of the sampler's random number generator.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Stops when the text contains one of these strings (which is left out of the output).
    #[must_use]
    pub fn with_stop(mut self, stop: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.stop = stop.into_iter().map(Into::into).collect();
        self
    }

    /// Keeps generating past end-of-sequence tokens (until `max_tokens`, a stop string or the
    /// context limit).
    #[must_use]
    pub fn with_ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// The engine parameters, over the session's sampling defaults; checks the values.
    pub(crate) fn resolve(&self, defaults: &SamplingParams) -> Result<GenerateParams> {
        let mut s = self.sampling.clone().unwrap_or_else(|| defaults.clone());
        if let Some(t) = self.temperature {
            s = s.with_temperature(t);
        }
        if let Some(p) = self.top_p {
            s = s.with_top_p(p);
        }
        if let Some(k) = self.top_k {
            s = s.with_top_k(k);
        }
        if let Some(p) = self.min_p {
            s = s.with_min_p(p);
        }
        if let Some(r) = self.repetition_penalty {
            s = s.with_repetition_penalty(r);
        }
        if let Some(seed) = self.seed {
            s = s.with_seed(seed);
        }
        s.validate().map_err(Error::from_core)?;
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(Error::invalid("max_tokens must be at least 1"));
        }
        Ok(GenerateParams::default()
            .with_max_tokens(max_tokens)
            .with_stop_strings(self.stop.iter().cloned())
            .with_ignore_eos(self.ignore_eos)
            .with_sampling(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_over_defaults() {
        let defaults = SamplingParams::default().with_top_k(40).with_seed(3);
        let p = GenerateOptions::new().with_temperature(0.5).with_max_tokens(9).resolve(&defaults).unwrap();
        assert_eq!(p.max_tokens, 9);
        assert_eq!(p.sampling.temperature, 0.5);
        assert_eq!(p.sampling.top_k, 40);
        assert_eq!(p.sampling.seed, 3);
        let p = GenerateOptions::greedy().with_stop(["x"]).resolve(&defaults).unwrap();
        assert!(p.sampling.is_greedy());
        assert_eq!(p.sampling.top_k, 0);
        assert_eq!(p.stop_strings, ["x"]);
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_values_are_invalid_requests() {
        let d = SamplingParams::default();
        assert!(GenerateOptions::new().with_temperature(-1.0).resolve(&d).unwrap_err().is_invalid_request());
        assert!(GenerateOptions::new().with_top_p(0.0).resolve(&d).unwrap_err().is_invalid_request());
        assert!(GenerateOptions::new().with_max_tokens(0).resolve(&d).unwrap_err().is_invalid_request());
    }
}
