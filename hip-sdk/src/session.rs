//! [`SessionBuilder`] → [`Session`]: a persistent context on a [`Model`].

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use hip_core::kv::SeqId;
use hip_core::loader::chat_template::Message;
use hip_core::persist::{self, Expected, KvGeometry, SessionFile, SessionFileProblem};
use hip_core::sampling::SamplingParams;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::chat::ChatState;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::options::GenerateOptions;
use crate::stream::{Append, TokenStream};
use crate::worker::{
    AppendItem, Command, GenItem, GenerateCmd, SeqGuard, SessionShared, PROGRESS_CAPACITY, TOKEN_CAPACITY,
};

/// Settings of a [`Session`]; [`build`](Self::build) creates it.
///
/// ```no_run
/// # async fn demo(model: hip_sdk::Model) -> hip_sdk::Result<()> {
/// use hip_sdk::SamplingParams;
///
/// let session = model
///     .session()
///     .with_system_prompt("You answer in one sentence.")
///     .with_sampling(SamplingParams::default().with_temperature(0.7).with_top_p(0.9))
///     .build()
///     .await?;
/// # let _ = session; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until built"]
pub struct SessionBuilder {
    model: Model,
    system: Option<String>,
    chat: Option<bool>,
    sampling: SamplingParams,
}

impl SessionBuilder {
    pub(crate) fn new(model: Model) -> Self {
        SessionBuilder { model, system: None, chat: None, sampling: SamplingParams::default() }
    }

    /// A system prompt, put in the context when the session is built (so that it is prefilled
    /// once and shared by forks). With the chat template it is rendered as the system message;
    /// without, it is appended as raw text.
    pub fn with_system_prompt(mut self, text: impl Into<String>) -> Self {
        self.system = Some(text.into());
        self
    }

    /// Whether [`Session::generate`] renders prompts as chat turns with the model's chat template
    /// (default: when the model has one) or appends them as raw text.
    pub fn with_chat_template(mut self, on: bool) -> Self {
        self.chat = Some(on);
        self
    }

    /// Default sampling of the session's generations (default: hip-core's
    /// [`SamplingParams::default`], temperature 1 with no filters).
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Creates the session and prefills its system prompt.
    ///
    /// # Errors
    ///
    /// [`InvalidRequest`](crate::ErrorKind::InvalidRequest) for invalid sampling defaults or a
    /// chat template asked of a model without one;
    /// [`ContextOverflow`](crate::ErrorKind::ContextOverflow) for a system prompt past the
    /// context limit; [`Engine`](crate::ErrorKind::Engine) if the engine thread is gone.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the half-built session (its context is freed).
    pub async fn build(self) -> Result<Session> {
        self.sampling.validate().map_err(Error::from_core)?;
        let chat = match self.chat {
            Some(true) if self.model.inner.chat.is_none() => {
                return Err(Error::invalid("the model has no chat template"));
            }
            Some(on) => on,
            None => self.model.inner.chat.is_some(),
        };
        let shared = Arc::new(SessionShared::default());
        let (reply, rx) = oneshot::channel();
        self.model.inner.send(Command::Create { session: Arc::clone(&shared), reply }).await?;
        let guard = rx.await.map_err(|_| self.model.inner.shared.engine_error())??;
        let session = Session {
            inner: Arc::new(SessionInner {
                model: self.model,
                guard,
                shared,
                ops: Arc::new(Semaphore::new(1)),
                chat,
                sampling: self.sampling,
            }),
        };
        if let Some(system) = self.system {
            session.prefill_system(system).await?;
        }
        Ok(session)
    }
}

/// A session's state on the client side. Dropping the last reference (the [`Session`] and any
/// running stream hold one) removes the sequence from the engine.
pub(crate) struct SessionInner {
    pub(crate) model: Model,
    guard: SeqGuard,
    shared: Arc<SessionShared>,
    /// One permit: the operation running on the session holds it until the engine ends it.
    ops: Arc<Semaphore>,
    chat: bool,
    sampling: SamplingParams,
}

impl SessionInner {
    fn seq(&self) -> SeqId {
        self.guard.seq
    }

    /// Waits until no other operation runs on the session.
    async fn turn(&self) -> Result<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.ops)
            .acquire_owned()
            .await
            .map_err(|_| Error::engine("the session's operation queue is closed"))?;
        self.model.inner.shared.check_alive()?;
        Ok(permit)
    }

    /// Whether the context is empty (so that a beginning-of-sequence token may be added).
    fn is_empty(&self) -> bool {
        self.shared.tokens.load(Ordering::Acquire) == 0
    }

    /// Appends `text` (raw, or rendered from `message` with the chat template) and prefills it.
    async fn start_append(
        self: Arc<Self>,
        text: String,
        message: Option<Message>,
    ) -> Result<mpsc::Receiver<AppendItem>> {
        let permit = self.turn().await?;
        let inner = &self.model.inner;
        let (text, chat, add_special) = match (&inner.chat, self.chat, message) {
            (Some(chat), true, Some(message)) => {
                let mut state = self.shared.chat().clone();
                let tok = &inner.tokenizer;
                let turn = chat.message(&state, message, |id| tok.decode(&[id], false).ok())?;
                let add = self.is_empty() && (chat.bos.is_empty() || !turn.text.starts_with(&chat.bos));
                state.history = turn.history;
                state.rendered = true;
                state.open = None;
                (turn.text, Some(state), add)
            }
            (_, _, Some(message)) => (message.content, None, self.is_empty()),
            (_, _, None) => (text, None, self.is_empty()),
        };
        let tokens = inner.encode(text, add_special).await?;
        let (tx, rx) = mpsc::channel(PROGRESS_CAPACITY);
        inner.send(Command::Append { seq: self.seq(), tokens, chat, out: tx, permit }).await?;
        Ok(rx)
    }

    async fn start_generate(
        self: Arc<Self>,
        prompt: String,
        opts: GenerateOptions,
        abort: Arc<AtomicBool>,
    ) -> Result<mpsc::Receiver<GenItem>> {
        let params = opts.resolve(&self.sampling)?;
        let permit = self.turn().await?;
        if abort.load(Ordering::Acquire) {
            return Err(Error::cancelled());
        }
        let inner = &self.model.inner;
        let (text, turn, add_special) = match (&inner.chat, self.chat) {
            (Some(chat), true) => {
                let state = self.shared.chat().clone();
                let tok = &inner.tokenizer;
                let turn = chat.turn(&state, &prompt, |id| tok.decode(&[id], false).ok())?;
                let add = self.is_empty() && (chat.bos.is_empty() || !turn.text.starts_with(&chat.bos));
                (turn.text, Some(turn.history), add)
            }
            _ => (prompt, None, self.is_empty()),
        };
        let tokens = inner.encode(text, add_special).await?;
        let (tx, rx) = mpsc::channel(TOKEN_CAPACITY);
        let cmd = GenerateCmd { seq: self.seq(), tokens, params, out: tx, abort, turn, permit };
        inner.send(Command::Generate(Box::new(cmd))).await?;
        Ok(rx)
    }
}

impl fmt::Debug for SessionInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("seq", &self.seq())
            .field("tokens", &self.shared.tokens.load(Ordering::Relaxed))
            .field("chat", &self.chat)
            .finish()
    }
}

/// Size of a session's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the context (prefilled or queued).
    pub tokens: usize,
    /// Bytes of the KV-cache blocks the session references; blocks shared with forks count for
    /// each of them (see [`Model::kv_usage`] for the model's total).
    pub kv_bytes: usize,
}

/// A persistent context on a [`Model`]: text appended to it and generated in it stays, and
/// later generations see all of it.
///
/// `Send + Sync`; every method takes `&self`. Operations on one session (appends,
/// generations, forks) run one at a time, in the order they are first polled: a second
/// [`generate`](Self::generate) waits until the first one's stream ends or is dropped. Different
/// sessions of a model run concurrently, batched by the engine.
///
/// Dropping the session frees its context once its last stream is done.
pub struct Session {
    inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Session {
    /// The model the session runs on.
    pub fn model(&self) -> &Model {
        &self.inner.model
    }

    /// Whether prompts are rendered with the chat template.
    pub fn uses_chat_template(&self) -> bool {
        self.inner.chat
    }

    /// The context's size, as of the engine's last step.
    pub fn usage(&self) -> Usage {
        Usage {
            tokens: self.inner.shared.tokens.load(Ordering::Acquire),
            kv_bytes: self.inner.shared.kv_bytes.load(Ordering::Acquire),
        }
    }

    async fn prefill_system(&self, system: String) -> Result<()> {
        let inner = &self.inner.model.inner;
        match (&inner.chat, self.inner.chat) {
            (Some(chat), true) => match chat.system_prefix(&system)? {
                Some(_) => self.append_message(Message::system(system)).await,
                // The template renders the system message only with the first turn.
                None => {
                    self.inner.shared.chat().history = vec![Message::system(system)];
                    Ok(())
                }
            },
            _ => self.append(system).await,
        }
    }

    /// Appends raw `text` to the context (no chat template) and prefills it.
    ///
    /// The returned [`Append`] starts when first polled. Await it to wait for the prefill, or
    /// read it as a stream of [`Progress`](crate::Progress) reports for long inputs (other
    /// sessions keep generating between the prefill chunks):
    ///
    /// ```no_run
    /// # async fn demo(session: hip_sdk::Session, book: String) -> hip_sdk::Result<()> {
    /// use futures::StreamExt;
    ///
    /// let mut append = session.append(book);
    /// while let Some(p) = append.next().await {
    ///     let p = p?;
    ///     eprintln!("{}/{} tokens", p.done, p.total);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// The first text of an empty context gets the tokenizer's beginning-of-sequence token if the
    /// model wants one. In a chat session the text lands between turns exactly as given (after an
    /// assistant turn the template's closing markup comes only with the next user turn).
    ///
    /// # Errors
    ///
    /// [`ContextOverflow`](crate::ErrorKind::ContextOverflow) when the context would pass the
    /// limit (nothing is appended), [`KvCacheFull`](crate::ErrorKind::KvCacheFull) when the cache
    /// runs out (the context is restored).
    ///
    /// # Cancel safety
    ///
    /// Dropping the [`Append`] before it completes cancels it and restores the context.
    pub fn append(&self, text: impl Into<String>) -> Append {
        let start = Arc::clone(&self.inner).start_append(text.into(), None).boxed();
        Append::new(Arc::clone(&self.inner), start)
    }

    /// Appends one chat message (a document handed over as a user message, say) and prefills it,
    /// without generating: the context gets the chat template's rendering of `message` (after
    /// closing the previous assistant turn, if one is open). In a session without the chat
    /// template, `message.content` is appended raw, as by [`append`](Self::append).
    ///
    /// ```no_run
    /// # async fn demo(session: hip_sdk::Session, report: String) -> hip_sdk::Result<()> {
    /// use futures::StreamExt;
    /// use hip_sdk::Message;
    ///
    /// let mut append = session.append_message(Message::user(format!("Read this report:\n{report}")));
    /// while let Some(p) = append.next().await {
    ///     let p = p?;
    ///     eprint!("\r{}/{} tokens", p.done, p.total);
    /// }
    /// let answer = session.generate("What is its main finding?").await?;
    /// # let _ = answer; Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append); [`InvalidRequest`](crate::ErrorKind::InvalidRequest) when the
    /// template cannot render the message.
    ///
    /// # Cancel safety
    ///
    /// Dropping the [`Append`] before it completes cancels it and restores the context and the
    /// conversation.
    pub fn append_message(&self, message: Message) -> Append {
        let start = Arc::clone(&self.inner).start_append(String::new(), Some(message)).boxed();
        Append::new(Arc::clone(&self.inner), start)
    }

    /// Generates a reply to `prompt` with the session's default options; see
    /// [`generate_with`](Self::generate_with).
    ///
    /// # Cancel safety
    ///
    /// Dropping the stream (or the future) cancels the generation before the engine's next
    /// step; the prompt and the tokens generated so far stay in the context.
    pub fn generate(&self, prompt: impl Into<String>) -> TokenStream {
        self.generate_with(prompt, GenerateOptions::new())
    }

    /// Generates after `prompt`: a [`TokenStream`] of the tokens, which can also be awaited for
    /// the whole [`Completion`](crate::Completion).
    ///
    /// With the chat template on, `prompt` is the next user message: the context gets the
    /// template's rendering of that turn (after the system prompt, on the first turn, and after
    /// closing the previous assistant turn) followed by the generation prompt. With it off,
    /// `prompt` is appended raw (an empty prompt continues the context). The prompt and the
    /// generated tokens stay in the context.
    ///
    /// ```no_run
    /// # async fn demo(session: hip_sdk::Session) -> hip_sdk::Result<()> {
    /// use futures::StreamExt;
    /// use hip_sdk::GenerateOptions;
    ///
    /// // Stream the tokens …
    /// let mut stream = session.generate_with("Tell me a joke.", GenerateOptions::new().with_max_tokens(64));
    /// while let Some(token) = stream.next().await {
    ///     print!("{}", token?.text);
    /// }
    /// // … or wait for the whole completion.
    /// let reply = session.generate("Another one, please.").await?;
    /// println!("{} ({:?})", reply.text, reply.finish_reason);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Yielded by the stream: [`InvalidRequest`](crate::ErrorKind::InvalidRequest) for invalid
    /// options or an empty context, [`ContextOverflow`](crate::ErrorKind::ContextOverflow) when
    /// the prompt does not fit (the context is unchanged; a generation that reaches the limit
    /// just finishes with [`FinishReason::ContextFull`](crate::FinishReason::ContextFull)),
    /// [`KvCacheFull`](crate::ErrorKind::KvCacheFull), [`Cancelled`](crate::ErrorKind::Cancelled)
    /// after [`AbortHandle::abort`](crate::AbortHandle::abort). A failed generation leaves the
    /// context as it was before the call.
    ///
    /// # Cancel safety
    ///
    /// Dropping the stream (or the future) cancels the generation before the engine's next
    /// step; the prompt and the tokens generated so far stay in the context.
    pub fn generate_with(&self, prompt: impl Into<String>, options: GenerateOptions) -> TokenStream {
        let abort = Arc::new(AtomicBool::new(false));
        let start =
            Arc::clone(&self.inner).start_generate(prompt.into(), options, Arc::clone(&abort)).boxed();
        TokenStream::new(Arc::clone(&self.inner), abort, start)
    }

    /// A new session that starts with this session's context (sharing its KV-cache blocks,
    /// copy-on-write) and its settings, and goes on independently. Waits for the operations
    /// running on this session first.
    ///
    /// # Errors
    ///
    /// [`Engine`](crate::ErrorKind::Engine) if the engine thread is gone.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it resolves leaves this session unchanged and frees the fork.
    pub async fn fork(&self) -> Result<Session> {
        let inner = &self.inner;
        let _permit = inner.turn().await?;
        let child = Arc::new(SessionShared::default());
        *child.chat() = ChatState::clone(&inner.shared.chat());
        let usage = self.usage();
        child.tokens.store(usage.tokens, Ordering::Release);
        child.kv_bytes.store(usage.kv_bytes, Ordering::Release);
        let (reply, rx) = oneshot::channel();
        let model = &inner.model.inner;
        model.send(Command::Fork { seq: inner.seq(), child: Arc::clone(&child), reply }).await?;
        let guard = rx.await.map_err(|_| model.shared.engine_error())??;
        Ok(Session {
            inner: Arc::new(SessionInner {
                model: inner.model.clone(),
                guard,
                shared: child,
                ops: Arc::new(Semaphore::new(1)),
                chat: inner.chat,
                sampling: inner.sampling.clone(),
            }),
        })
    }

    /// Saves the session to a file: its context (tokens and KV cache, so that loading needs no
    /// prefill), its conversation state and its settings, tied to the model's fingerprint. Waits
    /// for the operations running on the session first; the session stays usable.
    ///
    /// The file is written atomically (a temporary file in the same folder, flushed to disk and
    /// renamed): after a crash or a failure the path holds the previous file, if any, or nothing.
    /// The format is documented in `docs/format/session.md`; a session of `n` cached tokens takes
    /// about `n × layers × 2 × kv_heads × head_dim × 4` bytes.
    ///
    /// ```no_run
    /// # async fn demo(model: hip_sdk::Model, book: String) -> hip_sdk::Result<()> {
    /// use hip_sdk::Session;
    ///
    /// let session = model.session().build().await?;
    /// session.append(book).await?;
    /// session.save("book.hips").await?;
    ///
    /// // Later, in another process: no prefill.
    /// let session = Session::load(&model, "book.hips").await?;
    /// let answer = session.generate("Who is the narrator?").await?;
    /// # let _ = answer; Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SessionFile`](crate::ErrorKind::SessionFile) when the file cannot be written (the
    /// folder is missing or read-only, the disk is full); [`Engine`](crate::ErrorKind::Engine)
    /// if the engine thread is gone.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the context was copied lets the write finish in the
    /// background (atomically); before, nothing is written.
    pub async fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let inner = &self.inner;
        let path = path.as_ref().to_owned();
        let permit = inner.turn().await?;
        let (reply, rx) = oneshot::channel();
        let model = &inner.model.inner;
        model.send(Command::Snapshot { seq: inner.seq(), reply }).await?;
        let snapshot = rx.await.map_err(|_| model.shared.engine_error())??;
        let state = SavedState {
            format: SAVED_STATE_FORMAT.to_owned(),
            chat: inner.chat,
            sampling: inner.sampling.clone(),
            conversation: inner.shared.chat().clone(),
        };
        drop(permit);
        let app = serde_json::to_value(&state)
            .map_err(|e| Error::invalid(format!("cannot serialize the session state: {e}")))?;
        let file = SessionFile::new(inner.model.fingerprint(), snapshot).with_app(app);
        tokio::task::spawn_blocking(move || persist::save(&path, &file))
            .await
            .map_err(|e| Error::engine(format!("the session writer failed: {e}")))?
            .map_err(Error::from_core_session)?;
        Ok(())
    }

    /// Opens a session saved by [`save`](Self::save) on `model`: the context comes back without
    /// any prefill, with the conversation state and settings it was saved with, and continues
    /// exactly as the saved session would have.
    ///
    /// Everything is checked before the session is created: the magic, the format version, the
    /// model's fingerprint, the file's length and every checksum. The file is read through a
    /// memory map and its KV rows are copied into the cache chunk by chunk, each chunk verified
    /// as it is copied, so a long session needs no second copy of itself in memory (with
    /// [`ModelBuilder::with_kv_dir`](crate::ModelBuilder::with_kv_dir), not even the cache).
    ///
    /// # Errors
    ///
    /// [`SessionFile`](crate::ErrorKind::SessionFile) for a file that is missing, unreadable,
    /// not a session file, of a future format version, of another model, truncated or corrupt
    /// ([`Error::session_file_problem`] tells which);
    /// [`ContextOverflow`](crate::ErrorKind::ContextOverflow) when the saved context is longer
    /// than this model's context limit; [`KvCacheFull`](crate::ErrorKind::KvCacheFull) when the
    /// KV cache has no room for it; [`InvalidRequest`](crate::ErrorKind::InvalidRequest) for a
    /// chat session loaded on a model without a chat template.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future frees whatever was loaded.
    pub async fn load(model: &Model, path: impl AsRef<Path>) -> Result<Session> {
        let path = path.as_ref().to_owned();
        let cfg = model.config();
        let expected = Expected {
            fingerprint: model.fingerprint().to_owned(),
            geometry: KvGeometry {
                num_layers: cfg.layers,
                num_kv_heads: cfg.kv_heads,
                head_dim: cfg.head_dim,
            },
        };
        let shown = path.clone();
        // Mapped, not read: the KV rows go from the file's pages into the cache chunk by chunk,
        // each chunk's checksums verified as it is copied (Engine::restore_mapped).
        let file = tokio::task::spawn_blocking(move || persist::MappedSession::open(&path, &expected))
            .await
            .map_err(|e| Error::engine(format!("the session reader failed: {e}")))?
            .map_err(Error::from_core_session)?;
        let state: SavedState = serde_json::from_value(file.header().app.clone()).map_err(|e| {
            let problem = SessionFileProblem::Corrupt(format!("session state: {e}"));
            Error::from_core_session(problem.at_path(&shown))
        })?;
        if state.format != SAVED_STATE_FORMAT {
            let what = format!("session state {:?}, this build reads {SAVED_STATE_FORMAT:?}", state.format);
            return Err(Error::from_core_session(SessionFileProblem::Incompatible(what).at_path(shown)));
        }
        if state.chat && model.inner.chat.is_none() {
            return Err(Error::invalid("the session uses a chat template and the model has none"));
        }
        state.sampling.validate().map_err(Error::from_core)?;
        let shared = Arc::new(SessionShared::default());
        *shared.chat() = state.conversation;
        let (reply, rx) = oneshot::channel();
        let file = Box::new(file);
        model.inner.send(Command::Restore { file, session: Arc::clone(&shared), reply }).await?;
        let guard = rx.await.map_err(|_| model.inner.shared.engine_error())??;
        Ok(Session {
            inner: Arc::new(SessionInner {
                model: model.clone(),
                guard,
                shared,
                ops: Arc::new(Semaphore::new(1)),
                chat: state.chat,
                sampling: state.sampling,
            }),
        })
    }
}

/// Marks the application state hip-sdk keeps in a session file.
const SAVED_STATE_FORMAT: &str = "hip-sdk session state 1";

/// What hip-sdk keeps in a session file besides the context.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    format: String,
    chat: bool,
    sampling: SamplingParams,
    conversation: ChatState,
}
