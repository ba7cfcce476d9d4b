//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in hip-core. `#[non_exhaustive]`: keep a catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An attention kernel rejected its input.
    #[error(transparent)]
    Kernel(#[from] hip_kernels::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A model, tokenizer or session file is malformed, truncated or inconsistent.
    #[error("{path}: {what}")]
    Format {
        /// The file (or a description of the source).
        path: String,
        /// What is wrong, and where.
        what: String,
    },
    /// A session file cannot be used: not a session file, a future version, another model's,
    /// truncated or corrupt (see [`crate::persist`]).
    #[error("session file {}: {problem}", path.display())]
    SessionFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: crate::persist::SessionFileProblem,
    },
    /// The model's architecture is not supported.
    #[error("unsupported model architecture {0:?} (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    /// A CUDA device could not be opened (see [`crate::device::cuda`]): no CUDA support in this
    /// build, no driver or GPU, or no such device.
    #[error("no CUDA device: {reason}")]
    NoCudaDevice {
        /// The device asked for.
        ordinal: usize,
        /// Why it could not be opened (one line).
        reason: String,
    },
    /// Tokenizer construction, encoding or decoding failed, or it does not fit the model.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter {field} = {value}: {reason}")]
    InvalidSampling {
        /// The parameter.
        field: &'static str,
        /// Its value, rendered.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The KV cache has no free blocks left for the request.
    #[error("KV cache full: {needed} more blocks needed, {free} free")]
    KvCacheFull {
        /// Blocks needed.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// No sequence with this id exists in the KV cache.
    #[error("unknown KV cache sequence {0}")]
    UnknownSequence(u64),
    /// No request with this id exists in the engine.
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    /// The context would exceed the configured limit.
    #[error("context overflow: {tokens} tokens exceed the limit of {limit}")]
    ContextOverflow {
        /// Tokens the context would hold.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// Any other out-of-range argument.
    #[error("invalid argument {name} = {value}: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Its value, rendered.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Format { path: path.into(), what: what.into() }
    }
    /// An [`Error::InvalidArgument`].
    pub fn arg(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { name, value: value.to_string(), reason: reason.into() }
    }
}
