//! The crate's error type: an opaque [`Error`] with a [`ErrorKind`] and `is_*` predicates.

use std::error::Error as StdError;
use std::fmt;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is. `#[non_exhaustive]`: keep a catch-all arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The model (or tokenizer) could not be loaded: a missing, unreadable or corrupt file, an
    /// unsupported architecture, a device that is not available.
    Load,
    /// The request is invalid: out-of-range sampling values or builder settings, an empty
    /// context to generate from, a chat template the prompt cannot be rendered with.
    InvalidRequest,
    /// The context would grow past the model's context limit. The session is left as it was.
    ContextOverflow {
        /// Tokens the context would have held.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// The KV cache has no free memory left for the request (see
    /// [`ModelBuilder::with_kv_budget_bytes`](crate::ModelBuilder::with_kv_budget_bytes)).
    KvCacheFull,
    /// The operation was cancelled through an [`AbortHandle`](crate::AbortHandle).
    Cancelled,
    /// A session file could not be written or read, or was refused: not a session file, of a
    /// future format version, of another model, truncated or corrupt
    /// ([`Error::session_file_problem`] says which). Nothing was changed: a failed save leaves
    /// any earlier file at the path intact, a failed load creates no session.
    SessionFile,
    /// The engine thread failed (a panic or an internal error) or is gone; every later call on
    /// the same [`Model`](crate::Model) fails the same way.
    Engine,
}

/// The error of every fallible hip-sdk operation.
///
/// Opaque on purpose: ask it what it is with [`Error::kind`] or the `is_*` predicates, and find
/// the underlying [`hip_core::Error`] (when there is one) through [`std::error::Error::source`].
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn load(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Load, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidRequest, message)
    }

    pub(crate) fn engine(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Engine, message)
    }

    pub(crate) fn cancelled() -> Self {
        Error::new(ErrorKind::Cancelled, "the operation was cancelled")
    }

    /// A hip-core error from loading files: file, format and tokenizer errors are
    /// [`ErrorKind::Load`], the rest are classified as by [`Error::from_core`].
    pub(crate) fn from_core_load(e: hip_core::Error) -> Self {
        use hip_core::Error as E;
        match e {
            E::Io { .. }
            | E::Format { .. }
            | E::UnsupportedArchitecture(_)
            | E::Tokenizer(_)
            | E::ChatTemplate(_)
            | E::Candle(_) => Error::load(format!("cannot load the model: {e}")).with_source(e),
            E::NoCudaDevice { .. } => Error::load(e.to_string()).with_source(e),
            e => Error::from_core(e),
        }
    }

    /// A hip-core error from saving or loading a session file: I/O and format errors are
    /// [`ErrorKind::SessionFile`], the rest are classified as by [`Error::from_core`].
    pub(crate) fn from_core_session(e: hip_core::Error) -> Self {
        use hip_core::Error as E;
        match e {
            E::Io { .. } | E::SessionFile { .. } => {
                Error::new(ErrorKind::SessionFile, e.to_string()).with_source(e)
            }
            e => Error::from_core(e),
        }
    }

    /// A hip-core error from a request.
    pub(crate) fn from_core(e: hip_core::Error) -> Self {
        use hip_core::Error as E;
        let kind = match &e {
            E::ContextOverflow { tokens, limit } => {
                ErrorKind::ContextOverflow { tokens: *tokens, limit: *limit }
            }
            E::KvCacheFull { .. } => ErrorKind::KvCacheFull,
            E::SessionFile { .. } => ErrorKind::SessionFile,
            E::InvalidSampling { .. }
            | E::InvalidArgument { .. }
            | E::Kernel(_)
            | E::Tokenizer(_)
            | E::ChatTemplate(_) => ErrorKind::InvalidRequest,
            E::Io { .. } | E::Format { .. } | E::UnsupportedArchitecture(_) | E::NoCudaDevice { .. } => {
                ErrorKind::Load
            }
            _ => ErrorKind::Engine,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }

    /// The failure of an engine step, which hip-core reports as text only.
    pub(crate) fn from_step_failure(message: String) -> Self {
        let kind = if message.starts_with("KV cache full") {
            ErrorKind::KvCacheFull
        } else if message.starts_with("context overflow") {
            ErrorKind::ContextOverflow { tokens: 0, limit: 0 }
        } else {
            ErrorKind::Engine
        };
        Error::new(kind, format!("the engine step failed: {message}"))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The model or tokenizer could not be loaded (missing or corrupt file, …).
    pub fn is_load(&self) -> bool {
        self.kind == ErrorKind::Load
    }

    /// The request was invalid (bad sampling values or settings, empty context, …).
    pub fn is_invalid_request(&self) -> bool {
        self.kind == ErrorKind::InvalidRequest
    }

    /// The context would have passed the context limit; nothing was changed.
    pub fn is_context_overflow(&self) -> bool {
        matches!(self.kind, ErrorKind::ContextOverflow { .. })
    }

    /// The KV cache ran out of memory.
    pub fn is_kv_cache_full(&self) -> bool {
        self.kind == ErrorKind::KvCacheFull
    }

    /// The operation was cancelled through an [`AbortHandle`](crate::AbortHandle).
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }

    /// The engine thread failed or is gone.
    pub fn is_engine(&self) -> bool {
        self.kind == ErrorKind::Engine
    }

    /// A session file could not be saved or loaded (see [`ErrorKind::SessionFile`]).
    pub fn is_session_file(&self) -> bool {
        self.kind == ErrorKind::SessionFile
    }

    /// Why a session file was refused, when it was (`None` for I/O errors and other kinds).
    ///
    /// ```no_run
    /// # async fn demo(model: hip_sdk::Model) {
    /// use hip_sdk::hip_core::persist::SessionFileProblem;
    ///
    /// match hip_sdk::Session::load(&model, "book.hips").await {
    ///     Ok(session) => { /* … */ }
    ///     Err(e) if matches!(e.session_file_problem(), Some(SessionFileProblem::OtherModel { .. })) => {
    ///         eprintln!("saved with another model: prefilling again");
    ///     }
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub fn session_file_problem(&self) -> Option<&hip_core::persist::SessionFileProblem> {
        match self.source.as_deref()?.downcast_ref::<hip_core::Error>()? {
            hip_core::Error::SessionFile { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_are_classified() {
        let e = Error::from_core(hip_core::Error::ContextOverflow { tokens: 10, limit: 8 });
        assert!(e.is_context_overflow());
        assert_eq!(e.kind(), ErrorKind::ContextOverflow { tokens: 10, limit: 8 });
        assert!(e.source().is_some());
        let e = Error::from_core(hip_core::Error::arg("x", 1, "bad"));
        assert!(e.is_invalid_request());
        let e = Error::from_core_load(hip_core::Error::format("f.gguf", "truncated"));
        assert!(e.is_load() && e.to_string().contains("truncated"));
        assert!(
            Error::from_step_failure("KV cache full: 3 more blocks needed, 0 free".into()).is_kv_cache_full()
        );
        assert!(Error::from_step_failure("boom".into()).is_engine());
        assert!(Error::cancelled().is_cancelled());
        let e = Error::from_core_session(
            hip_core::persist::SessionFileProblem::NotASessionFile.at_path("x.hips"),
        );
        assert!(e.is_session_file() && e.to_string().contains("x.hips"));
        assert_eq!(e.session_file_problem(), Some(&hip_core::persist::SessionFileProblem::NotASessionFile));
    }
}
