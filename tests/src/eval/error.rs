//! [`EvalError`]: everything `hip-eval` and the quality tests can reject or fail on.

use std::path::PathBuf;

/// An evaluation error. Bad input (the first variants) is found before any model work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A method name other than `dense`, `hip`, `streaming`, `hip-extend`.
    #[error("unknown method {0:?} (known: dense, hip, streaming, hip-extend)")]
    UnknownMethod(String),
    /// A needle / passkey depth outside [0, 1].
    #[error("depth {0} is outside [0, 1] (0 = start of the context, 1 = its end)")]
    DepthOutOfRange(f64),
    /// The text has fewer tokens than the evaluation needs.
    #[error("{}: {have} tokens, but {want} are needed ({why})", path.display())]
    TextTooShort {
        /// The text file.
        path: PathBuf,
        /// Tokens it has.
        have: usize,
        /// Tokens needed.
        want: usize,
        /// What needs them.
        why: String,
    },
    /// Any other bad argument or option.
    #[error("{name}: {reason}")]
    BadArgument {
        /// The option or argument.
        name: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A missing asset (model or text).
    #[error("{0}")]
    Asset(String),
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The model, tokenizer or attention failed.
    #[error(transparent)]
    Core(#[from] hip_core::Error),
    /// Drawing the heat map failed.
    #[error("heat map: {0}")]
    Plot(String),
}

impl EvalError {
    /// A [`EvalError::BadArgument`].
    pub fn arg(name: impl Into<String>, reason: impl Into<String>) -> Self {
        EvalError::BadArgument { name: name.into(), reason: reason.into() }
    }
}

/// `Result` with [`EvalError`].
pub type Result<T> = std::result::Result<T, EvalError>;
