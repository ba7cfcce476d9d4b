//! Sampling: choosing the next token from a row of logits.
//!
//! A [`Sampler`] holds [`SamplingParams`], a seeded random number generator and scratch buffers;
//! [`Sampler::sample`] takes the logits of one position (one `f32` per vocabulary entry) and the
//! tokens generated or read so far, and returns a token id. It is pure, synchronous Rust over
//! slices, with no tensor library involved.
//!
//! # Order of operations
//!
//! The same order as Hugging Face `transformers` and llama.cpp's usual chain:
//!
//! 1. **Sanitise**: NaN logits become `-inf` (never chosen); `+inf` logits become `f32::MAX`, so
//!    that several `+inf` tokens share the mass equally. If no logit is left above `-inf` (or the
//!    slice is empty) the call fails with [`Error::InvalidSampling`] for the field `"logits"`.
//! 2. **Repetition penalty** ([`repetition_penalty`](SamplingParams::repetition_penalty), CTRL
//!    rule): each *distinct* token among the last
//!    [`repetition_window`](SamplingParams::repetition_window) previous tokens has its logit
//!    divided by the penalty if it is positive, multiplied by it otherwise. Token ids outside the
//!    vocabulary are ignored.
//! 3. **Greedy** when [`temperature`](SamplingParams::temperature) is `0`: the argmax, lowest id
//!    among ties. The filters below and the random generator are not used.
//! 4. **Temperature and softmax**: `p_i ∝ exp((l_i - max) / temperature)` (sums in f64).
//! 5. **Top-k** ([`top_k`](SamplingParams::top_k)): keep the `k` most probable tokens.
//! 6. **Top-p** ([`top_p`](SamplingParams::top_p)): keep the smallest set of most probable
//!    tokens whose probability (renormalised over what top-k kept) adds up to at least `top_p`;
//!    at least one token always stays.
//! 7. **Min-p** ([`min_p`](SamplingParams::min_p)): drop tokens whose probability is below
//!    `min_p` times the largest one.
//! 8. **Draw**: renormalise what is left and draw one token with the generator.
//!
//! Ties in probability are ranked by token id (lowest first) in every filter.
//!
//! # Determinism
//!
//! The generator is a [`rand::rngs::StdRng`] seeded from [`seed`](SamplingParams::seed); a
//! non-greedy call draws exactly one `f64` from it, a greedy call none. The same parameters, seed
//! and sequence of inputs therefore give the same sequence of tokens, run after run (with the
//! same version of `rand`).
//!
//! # Cost
//!
//! Each call is O(vocab) time apart from top-p, which sorts only as much of the candidate list as
//! it needs (the best 64 tokens first, then 8 times more, …, and the whole list once past a
//! quarter of it). Top-k uses a selection, never a full sort. The scratch buffers live in the
//! [`Sampler`] and are reused, so after the first call a `sample` does not allocate unless the
//! vocabulary or the history grows.

mod params;
mod processors;
#[cfg(test)]
mod tests;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use params::SamplingParams;
use processors::Candidate;

use crate::{Error, Result};

/// Chooses tokens from logits according to [`SamplingParams`]; see the [module docs](self) for
/// the order of operations.
///
/// It owns its random number generator, seeded from [`SamplingParams::seed`]: use one `Sampler`
/// per generated sequence to get reproducible output.
///
/// ```
/// use hip_core::sampling::{Sampler, SamplingParams};
///
/// # fn main() -> hip_core::Result<()> {
/// let logits = [0.1_f32, 2.5, -1.0, 0.7];
///
/// // Greedy: always the argmax.
/// let mut greedy = Sampler::new(SamplingParams::greedy())?;
/// assert_eq!(greedy.sample(&logits, &[])?, 1);
///
/// // Seeded sampling with filters: reproducible.
/// let params =
///     SamplingParams::default().with_temperature(0.8).with_top_k(3).with_top_p(0.95).with_seed(7);
/// let mut a = Sampler::new(params.clone())?;
/// let mut b = Sampler::new(params)?;
/// let mut history = Vec::new();
/// for _ in 0..10 {
///     let token = a.sample(&logits, &history)?;
///     assert_eq!(token, b.sample(&logits, &history)?);
///     assert!(token != 2, "top_k = 3 never picks the least likely token");
///     history.push(token);
/// }
///
/// // Bad parameters are rejected up front.
/// assert!(Sampler::new(SamplingParams::default().with_top_p(0.0)).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Copy of the logits, penalised and sanitised.
    logits: Vec<f32>,
    /// Distinct ids of the repetition window.
    distinct: Vec<u32>,
    /// Surviving tokens and their unnormalised probabilities.
    candidates: Vec<Candidate>,
}

impl Sampler {
    /// A sampler for `params`, its generator seeded from `params.seed`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSampling`] when [`SamplingParams::validate`] rejects `params`.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, logits: Vec::new(), distinct: Vec::new(), candidates: Vec::new() })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one per vocabulary entry), given the tokens that
    /// precede it (`previous_tokens`, oldest first; only used by the repetition penalty).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSampling`] with field `"logits"` when `logits` is empty, has more entries
    /// than `u32` ids can address, or has no entry above `-inf` once NaN is counted as `-inf`.
    /// Never panics on such input.
    pub fn sample(&mut self, logits: &[f32], previous_tokens: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(bad_logits("[]", "empty logits"));
        }
        if u32::try_from(logits.len() - 1).is_err() {
            return Err(bad_logits(
                format!("[{} entries]", logits.len()),
                "more entries than u32 token ids can address",
            ));
        }
        let p = &self.params;

        self.logits.clear();
        self.logits.extend_from_slice(logits);
        processors::apply_repetition_penalty(
            &mut self.logits,
            previous_tokens,
            p.repetition_window,
            p.repetition_penalty,
            &mut self.distinct,
        );
        processors::sanitize(&mut self.logits);

        if p.is_greedy() {
            return processors::argmax(&self.logits).ok_or_else(|| no_finite_logit(logits.len()));
        }

        let max = processors::finite_candidates(&self.logits, &mut self.candidates)
            .ok_or_else(|| no_finite_logit(logits.len()))?;
        // Top-k ranks by logit, which is the same as ranking by probability: selecting before
        // exponentiating only saves the work on the tokens it drops.
        processors::top_k(&mut self.candidates, p.top_k);
        processors::softmax(&mut self.candidates, max, p.temperature);
        // Top-p is relative to the mass that top-k kept. Min-p is applied before it here, with
        // that same mass: both filters keep a prefix of the same most-probable-first order, so
        // the result equals top-p then min-p, while top-p gets fewer candidates to sort.
        let mass: f64 = self.candidates.iter().map(|c| c.p).sum();
        processors::min_p(&mut self.candidates, p.min_p);
        processors::top_p(&mut self.candidates, p.top_p, mass);

        let u: f64 = self.rng.random();
        processors::draw(&self.candidates, u).ok_or_else(|| no_finite_logit(logits.len()))
    }
}

fn bad_logits(value: impl Into<String>, reason: &str) -> Error {
    Error::InvalidSampling { field: "logits", value: value.into(), reason: reason.to_owned() }
}

fn no_finite_logit(len: usize) -> Error {
    bad_logits(format!("[{len} entries]"), "no logit above -inf (NaN counts as -inf)")
}
