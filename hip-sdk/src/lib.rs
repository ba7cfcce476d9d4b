//! # hip-sdk
//!
//! The async API of hip: load a model once, open persistent long-context [`Session`]s on it,
//! append documents to them and stream generations out of them.
//!
//! ```no_run
//! use futures::StreamExt;
//! use hip_sdk::{GenerateOptions, Model};
//!
//! # async fn demo() -> hip_sdk::Result<()> {
//! let model = Model::builder("smollm2-135m-instruct-q4_1.gguf").build().await?;
//! let session = model.session().with_system_prompt("You are concise.").build().await?;
//!
//! // Stream a reply token by token …
//! let mut stream = session.generate_with("What is a paged KV cache?", GenerateOptions::greedy());
//! while let Some(token) = stream.next().await {
//!     print!("{}", token?.text);
//! }
//!
//! // … or await the whole completion. The session remembers the conversation.
//! let reply = session.generate("Say it in five words.").await?;
//! println!("\n{}", reply.text);
//!
//! // Forks share the context (and its KV cache) and diverge independently.
//! let other = session.fork().await?;
//! let alt = other.generate("Now in French.").await?;
//! # let _ = alt; Ok(()) }
//! ```
//!
//! # Model, sessions, streams
//!
//! * [`Model`] (built by [`ModelBuilder`]) is a cheap, cloneable handle to a loaded model. Each
//!   model runs **one engine thread** (a plain OS thread, running its steps in an optional rayon
//!   pool) that owns the weights and the paged KV cache and batches the work of every session:
//!   chunked prefill of long appends interleaves with the decoding of other sessions. The async
//!   world talks to it over a bounded command channel; nothing here blocks an async runtime.
//! * [`Session`] is one persistent context (one engine sequence). [`Session::append`] adds raw
//!   text (with [`Progress`] reports), [`Session::generate`] adds a prompt (rendered with the
//!   model's chat template by default) and generates, [`Session::fork`] copies the context
//!   cheaply. Operations on one session run one at a time, in order.
//! * [`TokenStream`] is `'static + Send + Sync`, a [`futures::Stream`] of [`Token`]s and an
//!   [`IntoFuture`](std::future::IntoFuture) of the whole [`Completion`]. Dropping it cancels the
//!   generation before the engine's next step.
//!
//! # Backpressure
//!
//! The engine never waits for a consumer: tokens that do not fit in a stream's bounded channel
//! are queued for that stream (at most `max_tokens` of them) while the other sessions go on.
//!
//! # Errors
//!
//! Every failure is an [`Error`]; ask it what it is with [`Error::kind`] or
//! [`Error::is_load`], [`Error::is_invalid_request`], [`Error::is_context_overflow`],
//! [`Error::is_kv_cache_full`], [`Error::is_cancelled`], [`Error::is_engine`]. A panic on the
//! engine thread fails the running requests and makes every later call on that model fail with
//! an engine error; it never leaves a request hanging.
//!
//! A Tokio runtime must be running: loading and long tokenizations run on its blocking pool.
#![warn(missing_docs, unreachable_pub)]

mod chat;
mod error;
mod model;
mod options;
mod session;
mod stream;
mod worker;

pub use error::{Error, ErrorKind, Result};
pub use hip_core;
pub use hip_core::engine::FinishReason;
pub use hip_core::loader::chat_template::Message;
pub use hip_core::sampling::SamplingParams;
pub use hip_core::{HipConfig, Offload, RopeExtend};
pub use model::{Attention, Device, KvUsage, Model, ModelBuilder};
pub use options::{GenerateOptions, DEFAULT_MAX_TOKENS};
pub use session::{Session, SessionBuilder, Usage};
pub use stream::{
    AbortHandle, Append, AppendFuture, Completion, CompletionFuture, CompletionUsage, Progress, Token,
    TokenStream,
};
