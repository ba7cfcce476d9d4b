//! [`SamplingParams`]: the knobs of a [`Sampler`](super::Sampler), and their validation.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the next token is chosen from a row of logits.
///
/// Every filter has a neutral value that switches it off; [`Default`] switches them all off and
/// samples from the model's own distribution (temperature 1). See the [module docs](super) for
/// the order in which the fields are applied.
///
/// The struct is `#[non_exhaustive]`: build it from [`SamplingParams::default`] or
/// [`SamplingParams::greedy`] and the `with_*` setters. With serde, missing fields take their
/// default values.
///
/// ```
/// use hip_core::sampling::SamplingParams;
///
/// let params = SamplingParams::default().with_temperature(0.7).with_top_p(0.9).with_seed(42);
/// params.validate().unwrap();
/// assert!(SamplingParams::greedy().is_greedy());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SamplingParams {
    /// Softmax temperature; finite and `>= 0`. `0` means greedy decoding (argmax), which ignores
    /// `top_k`, `top_p`, `min_p` and the seed. Default `1.0`.
    pub temperature: f32,
    /// Keep only the `top_k` most probable tokens; `0` switches the filter off. Default `0`.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most probable tokens whose cumulative
    /// probability reaches `top_p` (at least one token is always kept). In `(0, 1]`; `1.0`
    /// switches the filter off. Default `1.0`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the probability of the most likely
    /// token. In `[0, 1)`; `0` switches the filter off. Default `0.0`.
    pub min_p: f32,
    /// Repetition penalty (CTRL / Hugging Face rule): each distinct token of the recent window
    /// has its logit divided by the penalty when positive, multiplied by it otherwise. Finite and
    /// `> 0`; values above 1 discourage repetition, `1.0` switches it off. Default `1.0`.
    pub repetition_penalty: f32,
    /// How many of the most recent previous tokens the repetition penalty looks at; `0` means
    /// all of them. Default `64`.
    pub repetition_window: usize,
    /// Seed of the sampler's random number generator. Default `0`.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0 (always the most likely token), every other knob at its
    /// default.
    #[must_use]
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    /// Sets [`temperature`](Self::temperature).
    #[must_use]
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets [`top_k`](Self::top_k).
    #[must_use]
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets [`top_p`](Self::top_p).
    #[must_use]
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// Sets [`min_p`](Self::min_p).
    #[must_use]
    pub fn with_min_p(mut self, min_p: f32) -> Self {
        self.min_p = min_p;
        self
    }

    /// Sets [`repetition_penalty`](Self::repetition_penalty).
    #[must_use]
    pub fn with_repetition_penalty(mut self, repetition_penalty: f32) -> Self {
        self.repetition_penalty = repetition_penalty;
        self
    }

    /// Sets [`repetition_window`](Self::repetition_window).
    #[must_use]
    pub fn with_repetition_window(mut self, repetition_window: usize) -> Self {
        self.repetition_window = repetition_window;
        self
    }

    /// Sets [`seed`](Self::seed).
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Whether these parameters decode greedily (temperature `0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSampling`] naming the first offending field: `temperature` that is NaN,
    /// infinite or negative; `top_p` outside `(0, 1]`; `min_p` outside `[0, 1)`;
    /// `repetition_penalty` that is not finite or `<= 0`.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid("temperature", t, "must be finite and >= 0 (0 = greedy)"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", p, "must be in (0, 1] (1 = off)"));
        }
        let m = self.min_p;
        if !(0.0..1.0).contains(&m) {
            return Err(invalid("min_p", m, "must be in [0, 1) (0 = off)"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(invalid("repetition_penalty", r, "must be finite and > 0 (1 = off)"));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, value: f32, reason: &str) -> Error {
    Error::InvalidSampling { field, value: value.to_string(), reason: reason.to_owned() }
}
