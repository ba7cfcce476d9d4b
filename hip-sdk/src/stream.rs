//! [`TokenStream`] (a generation) and [`Append`] (a prefill with progress): each a
//! [`Stream`] of its progress and an [`IntoFuture`] of its result.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use futures::Stream;
use hip_core::engine::FinishReason;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::session::SessionInner;
use crate::worker::{AppendItem, Done, GenItem};

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Token {
    /// The token id.
    pub id: u32,
    /// The text this token completes. Empty while a multi-byte character or a possible stop
    /// string is incomplete (the text comes with a later token), and for an end-of-sequence token.
    pub text: String,
}

/// Prefill progress of an [`Append`]: `done` of `total` appended tokens are in the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Tokens prefilled so far.
    pub done: usize,
    /// Tokens appended.
    pub total: usize,
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CompletionUsage {
    /// Tokens the prompt added to the context (chat markup included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Tokens in the session's context afterwards.
    pub context_tokens: usize,
}

/// A finished generation: what awaiting a [`TokenStream`] gives.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Completion {
    /// The generated text (without a matched stop string or end-of-sequence token).
    pub text: String,
    /// Every generated token id, a final end-of-sequence token included; they are all in the
    /// session's context now.
    pub tokens: Vec<u32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: CompletionUsage,
}

/// Aborts a [`TokenStream`] from anywhere (see [`TokenStream::abort_handle`]).
#[derive(Debug, Clone)]
pub struct AbortHandle {
    flag: Arc<AtomicBool>,
}

impl AbortHandle {
    /// Asks the engine to stop the generation at its next step. The stream then ends with an
    /// [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled) error (after the tokens generated
    /// before); the tokens generated so far stay in the session's context.
    pub fn abort(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether [`abort`](Self::abort) was called.
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// How an operation stands: starting (waiting for its session, tokenizing, sending the command),
/// running (receiving from the engine), or over.
enum OpState<T> {
    Starting(BoxFuture<'static, Result<mpsc::Receiver<T>>>),
    Running(mpsc::Receiver<T>),
    Ended,
}

/// The client side of an engine operation. The state sits in a `Mutex` only to make the handle
/// `Sync`: it is always reached through `&mut self` (`Mutex::get_mut`), never locked.
struct Op<T> {
    session: Arc<SessionInner>,
    state: Mutex<OpState<T>>,
}

impl<T> Op<T> {
    fn new(session: Arc<SessionInner>, start: BoxFuture<'static, Result<mpsc::Receiver<T>>>) -> Self {
        Op { session, state: Mutex::new(OpState::Starting(start)) }
    }

    fn state(&mut self) -> &mut OpState<T> {
        self.state.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    fn end(&mut self) {
        *self.state() = OpState::Ended;
    }

    /// The next item from the engine; `None` once ended. A channel that closes without a final
    /// item means the engine thread died.
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        loop {
            let state = self.state();
            match state {
                OpState::Starting(fut) => match ready!(fut.as_mut().poll(cx)) {
                    Ok(rx) => *state = OpState::Running(rx),
                    Err(e) => {
                        *state = OpState::Ended;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                OpState::Running(rx) => {
                    return match ready!(rx.poll_recv(cx)) {
                        Some(item) => Poll::Ready(Some(Ok(item))),
                        None => {
                            *state = OpState::Ended;
                            Poll::Ready(Some(Err(self.session.model.inner.shared.engine_error())))
                        }
                    };
                }
                OpState::Ended => return Poll::Ready(None),
            }
        }
    }

    fn status(&self) -> &'static str {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            OpState::Starting(_) => "starting",
            OpState::Running(_) => "running",
            OpState::Ended => "ended",
        }
    }
}

/// A generation in progress: a [`Stream`] of [`Token`]s and an [`IntoFuture`] of the whole
/// [`Completion`].
///
/// Made by [`Session::generate`](crate::Session::generate). It is `'static`, `Send` and `Sync`:
/// move it into a task, poll it anywhere.
///
/// * The generation starts when the stream is first polled (or awaited), once the session has
///   no other operation running: operations on one session run one at a time, in the order they
///   are first polled.
/// * The stream yields every generated token, then ends (`None`); a failure is yielded as one
///   `Err` item, after which the stream ends. [`finish_reason`](Self::finish_reason) and
///   [`usage`](Self::usage) tell how it ended.
/// * **Dropping it cancels the generation** before the engine's next step; the tokens generated
///   until then stay in the session's context. [`abort_handle`](Self::abort_handle) cancels from
///   elsewhere.
/// * The engine never waits for a slow consumer: tokens it produces faster than they are read
///   are queued for this stream (at most `max_tokens` of them).
pub struct TokenStream {
    op: Op<GenItem>,
    abort: Arc<AtomicBool>,
    done: Option<Done>,
}

impl fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStream")
            .field("state", &self.op.status())
            .field("aborted", &self.abort.load(Ordering::Relaxed))
            .field("finish_reason", &self.finish_reason())
            .finish()
    }
}

impl TokenStream {
    pub(crate) fn new(
        session: Arc<SessionInner>,
        abort: Arc<AtomicBool>,
        start: BoxFuture<'static, Result<mpsc::Receiver<GenItem>>>,
    ) -> Self {
        TokenStream { op: Op::new(session, start), abort, done: None }
    }

    /// A handle that cancels this generation (the stream then ends with a
    /// [`Cancelled`](crate::ErrorKind::Cancelled) error).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { flag: Arc::clone(&self.abort) }
    }

    /// Why the generation stopped, once the stream has ended normally.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.done.as_ref().map(|d| d.reason)
    }

    /// Token counts, once the stream has ended normally.
    pub fn usage(&self) -> Option<CompletionUsage> {
        self.done.as_ref().map(|d| CompletionUsage {
            prompt_tokens: d.prompt_tokens,
            completion_tokens: d.completion_tokens,
            context_tokens: d.context_tokens,
        })
    }
}

impl Stream for TokenStream {
    type Item = Result<Token>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match ready!(this.op.poll_item(cx)) {
            None => Poll::Ready(None),
            Some(Ok(GenItem::Token(t))) => Poll::Ready(Some(Ok(t))),
            Some(Ok(GenItem::Done(d))) => {
                this.op.end();
                this.done = Some(d);
                Poll::Ready(None)
            }
            Some(Ok(GenItem::Failed(e))) | Some(Err(e)) => {
                this.op.end();
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// The future of a whole generation: [`TokenStream`]'s [`IntoFuture`].
///
/// # Cancel safety
///
/// Dropping it cancels the generation, as dropping the stream does.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct CompletionFuture {
    stream: TokenStream,
    text: String,
    tokens: Vec<u32>,
}

impl Future for CompletionFuture {
    type Output = Result<Completion>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(t)) => {
                    this.tokens.push(t.id);
                    this.text.push_str(&t.text);
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    let Some(done) = &this.stream.done else {
                        return Poll::Ready(Err(Error::engine("the generation ended without a result")));
                    };
                    let mut text = std::mem::take(&mut this.text);
                    text.push_str(&done.tail);
                    return Poll::Ready(Ok(Completion {
                        text,
                        tokens: std::mem::take(&mut this.tokens),
                        finish_reason: done.reason,
                        usage: this.stream.usage().unwrap_or_default(),
                    }));
                }
            }
        }
    }
}

impl IntoFuture for TokenStream {
    type Output = Result<Completion>;
    type IntoFuture = CompletionFuture;

    fn into_future(self) -> CompletionFuture {
        CompletionFuture { stream: self, text: String::new(), tokens: Vec::new() }
    }
}

/// Text being appended to a session's context: a [`Stream`] of prefill [`Progress`] and an
/// [`IntoFuture`] that resolves when all of it is in the KV cache.
///
/// Made by [`Session::append`](crate::Session::append). `'static`, `Send` and `Sync`. Like a
/// [`TokenStream`], it starts when first polled and runs after the session's earlier
/// operations. The progress stream yields reports as prefill chunks complete (reports a slow
/// reader missed are merged into the latest), the last one with `done == total`, then ends; a
/// failure is yielded as one `Err` item.
///
/// # Cancel safety
///
/// Dropping it before it completes cancels the append: the context is restored to what it was
/// before, as if the text had never been appended. Once it has resolved, the text stays.
pub struct Append {
    op: Op<AppendItem>,
    finished: bool,
}

impl fmt::Debug for Append {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Append").field("state", &self.op.status()).finish()
    }
}

impl Append {
    pub(crate) fn new(
        session: Arc<SessionInner>,
        start: BoxFuture<'static, Result<mpsc::Receiver<AppendItem>>>,
    ) -> Self {
        Append { op: Op::new(session, start), finished: false }
    }
}

impl Stream for Append {
    type Item = Result<Progress>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match ready!(this.op.poll_item(cx)) {
            None => Poll::Ready(None),
            Some(Ok(AppendItem::Progress(p))) => Poll::Ready(Some(Ok(p))),
            Some(Ok(AppendItem::Done)) => {
                this.op.end();
                this.finished = true;
                Poll::Ready(None)
            }
            Some(Ok(AppendItem::Failed(e))) | Some(Err(e)) => {
                this.op.end();
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// The future of an [`Append`]: resolves once the text is in the KV cache.
///
/// # Cancel safety
///
/// Dropping it before it resolves cancels the append and restores the context.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct AppendFuture {
    append: Append,
}

impl Future for AppendFuture {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        loop {
            match ready!(Pin::new(&mut this.append).poll_next(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None if this.append.finished => return Poll::Ready(Ok(())),
                None => return Poll::Ready(Err(Error::engine("the append ended without a result"))),
            }
        }
    }
}

impl IntoFuture for Append {
    type Output = Result<()>;
    type IntoFuture = AppendFuture;

    fn into_future(self) -> AppendFuture {
        AppendFuture { append: self }
    }
}
