//! Requests, their parameters and the events a step reports.

use serde::{Deserialize, Serialize};

use crate::kv::SeqId;
use crate::sampling::SamplingParams;

/// Identifies a generation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parameters of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these (the stop string is not returned).
    pub stop_strings: Vec<String>,
    /// Extra token ids that stop generation (the model's end-of-sequence tokens always do unless
    /// `ignore_eos`).
    pub stop_tokens: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// How to pick tokens.
    pub sampling: SamplingParams,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            stop_strings: Vec::new(),
            stop_tokens: Vec::new(),
            ignore_eos: false,
            sampling: SamplingParams::default(),
        }
    }
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        GenerateParams { max_tokens, sampling: SamplingParams::greedy(), ..Default::default() }
    }
    /// Sets the most tokens to generate.
    pub fn with_max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }
    /// Sets the stop strings.
    pub fn with_stop_strings(mut self, stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.stop_strings = stops.into_iter().map(Into::into).collect();
        self
    }
    /// Sets the sampling parameters.
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }
    /// Keeps generating past end-of-sequence tokens.
    pub fn with_ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context limit was reached.
    ContextFull,
    /// The request was aborted.
    Aborted,
}

/// What happened during an [`crate::engine::Engine::step`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Prefill progress of a sequence: `done` of `total` queued tokens are in the cache.
    Prefill {
        /// The sequence.
        seq: SeqId,
        /// Tokens processed so far.
        done: usize,
        /// Tokens queued in all.
        total: usize,
    },
    /// A generated token. `text` is the newly completed text (may be empty while a multi-byte
    /// character or a possible stop string is incomplete).
    Token {
        /// The request.
        request: RequestId,
        /// The token id.
        token: u32,
        /// Text released by this token.
        text: String,
    },
    /// A request finished; `text` is any text held back until now.
    Finished {
        /// The request.
        request: RequestId,
        /// Why.
        reason: FinishReason,
        /// Remaining text.
        text: String,
    },
    /// A request failed; the sequence is left as it was before the failing step.
    Failed {
        /// The request (or `None` for a failure of a plain prefill).
        request: Option<RequestId>,
        /// The sequence.
        seq: SeqId,
        /// What went wrong.
        error: String,
    },
}
