//! The long-context quality evaluation behind `hip-eval` and the quality tests: perplexity at
//! several context lengths, passkey retrieval and needle-in-a-haystack, each for dense attention,
//! HiP and the sink-and-window baseline with HiP's token budget (docs/quality.md).
//!
//! | module | role |
//! |---|---|
//! | [`cli`] | the `hip-eval` command line, checked before any model work |
//! | [`method`] | the methods and the sparse default HiP config |
//! | [`prompt`] | passkey and needle prompts (exact token lengths), input checks |
//! | [`run`] | running cases under each method |
//! | [`report`] | summaries, markdown tables, JSON |
//! | [`heatmap`] | the needle depth × length heat map (PNG) |
//! | [`error`] | [`EvalError`] |

pub mod cli;
pub mod error;
pub mod heatmap;
pub mod method;
pub mod prompt;
pub mod report;
pub mod run;

pub use error::{EvalError, Result};
pub use method::Method;
