//! The engine thread: one OS thread per [`Model`](crate::Model) that owns the
//! [`hip_core::engine::Engine`], takes [`Command`]s from a bounded channel and routes the events of
//! every step to per-operation channels.
//!
//! # Loop
//!
//! Idle (no work in the engine), the thread blocks on the command channel. Busy, it drains the
//! channel without blocking, cancels operations whose receiver is gone (a dropped
//! [`TokenStream`](crate::TokenStream) or [`Append`](crate::Append)) or that were aborted, runs
//! one [`Engine::step`] inside the model's rayon pool, and routes the events.
//!
//! # Backpressure
//!
//! Each operation has a bounded channel to its consumer. The engine never blocks on it: items go
//! through [`Outbox`], which sends with `try_send` and keeps what does not fit in a per-operation
//! queue (bounded by the request's `max_tokens`; progress reports are coalesced), flushed before
//! every step and, when the engine is otherwise idle, as soon as the consumer makes room. A slow
//! consumer therefore never stalls other requests; its own request keeps generating (hip-core
//! cannot pause a request), buffering its tokens.
//!
//! # Failures
//!
//! A failed step ([`Event::Failed`]) fails the affected operations and restores their sessions'
//! contexts. A panic or an internal error ends the thread: its message is kept in
//! [`ModelShared::dead`], every channel to it closes, and every pending and later call fails with
//! an [`ErrorKind::Engine`](crate::ErrorKind::Engine) error.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use futures::future::{select, select_all, Either};
use hip_core::engine::{Engine, Event, FinishReason, GenerateParams, RequestId};
use hip_core::kv::SeqId;
use hip_core::loader::chat_template::Message;
use hip_core::persist::SeqSnapshot;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::chat::{ChatState, OpenTurn};
use crate::error::{Error, Result};
use crate::stream::{Progress, Token};

mod outbox;

use outbox::{Draining, Outbox};

/// Capacity of the command channel.
pub(crate) const COMMAND_CAPACITY: usize = 64;
/// Capacity of a token stream's channel (tiny in unit tests, to exercise the overflow queue).
pub(crate) const TOKEN_CAPACITY: usize = if cfg!(test) { 2 } else { 64 };
/// Capacity of an append's progress channel.
pub(crate) const PROGRESS_CAPACITY: usize = 8;

/// State shared between a model's handles and its engine thread.
#[derive(Debug, Default)]
pub(crate) struct ModelShared {
    /// Sequences of dropped sessions whose removal could not be sent (a full command channel).
    graveyard: Mutex<Vec<SeqId>>,
    /// Why the engine thread died, if it did.
    dead: OnceLock<String>,
    /// Set when the engine thread has exited.
    pub(crate) exited: AtomicBool,
    /// Bytes of KV-cache blocks in use.
    pub(crate) kv_in_use: AtomicUsize,
}

impl ModelShared {
    /// The error for a call that finds the engine thread gone.
    pub(crate) fn engine_error(&self) -> Error {
        match self.dead.get() {
            Some(why) => Error::engine(format!("the engine thread is dead: {why}")),
            None => Error::engine("the engine thread has stopped"),
        }
    }

    /// Fails when the engine thread has died.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.dead.get().is_some() || self.exited.load(Ordering::Acquire) {
            return Err(self.engine_error());
        }
        Ok(())
    }
}

/// State shared between a session's handles and the engine thread.
#[derive(Debug, Default)]
pub(crate) struct SessionShared {
    /// Tokens of the context (cached or queued), as of the last engine update.
    pub(crate) tokens: AtomicUsize,
    /// Bytes of the KV blocks of the session (shared blocks count for each session).
    pub(crate) kv_bytes: AtomicUsize,
    /// The conversation (chat sessions).
    pub(crate) chat: Mutex<ChatState>,
}

impl SessionShared {
    pub(crate) fn chat(&self) -> std::sync::MutexGuard<'_, ChatState> {
        self.chat.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns a sequence of the engine: dropping it removes the sequence (and aborts its request).
#[derive(Debug)]
pub(crate) struct SeqGuard {
    pub(crate) seq: SeqId,
    tx: mpsc::WeakSender<Command>,
    shared: Arc<ModelShared>,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        let Some(tx) = self.tx.upgrade() else { return };
        match tx.try_send(Command::Remove { seq: self.seq }) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            // The engine is busy with a full channel: it drains the graveyard after the channel.
            Err(TrySendError::Full(_)) => {
                self.shared.graveyard.lock().unwrap_or_else(PoisonError::into_inner).push(self.seq)
            }
        }
    }
}

/// What a generation stream receives.
#[derive(Debug)]
pub(crate) enum GenItem {
    Token(Token),
    Done(Done),
    Failed(Error),
}

/// The end of a generation.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub(crate) reason: FinishReason,
    /// Text the engine held back until the end.
    pub(crate) tail: String,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) context_tokens: usize,
}

/// What an append's progress stream receives.
#[derive(Debug)]
pub(crate) enum AppendItem {
    Progress(Progress),
    Done,
    Failed(Error),
}

/// A generation to start.
#[derive(Debug)]
pub(crate) struct GenerateCmd {
    pub(crate) seq: SeqId,
    /// Prompt tokens to append first.
    pub(crate) tokens: Vec<u32>,
    pub(crate) params: GenerateParams,
    pub(crate) out: mpsc::Sender<GenItem>,
    pub(crate) abort: Arc<AtomicBool>,
    /// For chat sessions: the conversation once the user turn is in.
    pub(crate) turn: Option<Vec<Message>>,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// Requests to the engine thread.
#[derive(Debug)]
pub(crate) enum Command {
    /// Creates an empty sequence for a new session.
    Create { session: Arc<SessionShared>, reply: oneshot::Sender<Result<SeqGuard>> },
    /// Removes a sequence (its session was dropped).
    Remove { seq: SeqId },
    /// Appends tokens to a sequence and prefills them; `chat` becomes the session's conversation
    /// state once they are in.
    Append {
        seq: SeqId,
        tokens: Vec<u32>,
        chat: Option<ChatState>,
        out: mpsc::Sender<AppendItem>,
        permit: OwnedSemaphorePermit,
    },
    /// Starts a generation.
    Generate(Box<GenerateCmd>),
    /// Forks a sequence.
    Fork { seq: SeqId, child: Arc<SessionShared>, reply: oneshot::Sender<Result<SeqGuard>> },
    /// Copies a sequence's context out (for a session file).
    Snapshot { seq: SeqId, reply: oneshot::Sender<Result<SeqSnapshot>> },
    /// Creates a sequence from a saved context (a memory-mapped session file).
    Restore {
        file: Box<hip_core::persist::MappedSession>,
        session: Arc<SessionShared>,
        reply: oneshot::Sender<Result<SeqGuard>>,
    },
    /// What KV-cache offloading did so far.
    OffloadReport { reply: oneshot::Sender<Result<Option<hip_core::engine::OffloadReport>>> },
    /// Panics on the engine thread.
    #[cfg(test)]
    Panic,
}

#[derive(Debug)]
struct AppendOp {
    out: Outbox<AppendItem>,
    /// Context length before the append (restored on cancel or failure).
    base: usize,
    /// Context length after it.
    target: usize,
    /// Tokens appended.
    n: usize,
    /// The conversation state once the tokens are in.
    chat: Option<ChatState>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct GenOp {
    request: RequestId,
    out: Outbox<GenItem>,
    abort: Arc<AtomicBool>,
    /// Context length before the prompt (restored on failure).
    base: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    last_token: Option<u32>,
    text: String,
    turn: Option<Vec<Message>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Op {
    Append(AppendOp),
    Generate(GenOp),
}

#[derive(Debug)]
struct Entry {
    session: Arc<SessionShared>,
    op: Option<Op>,
}

/// What an idle wait ended with.
enum Wake {
    Command(Command),
    Room,
    Closed,
}

/// The engine thread's state.
#[derive(Debug)]
pub(crate) struct Worker {
    engine: Engine,
    pool: Option<rayon::ThreadPool>,
    shared: Arc<ModelShared>,
    tx: mpsc::WeakSender<Command>,
    seqs: HashMap<SeqId, Entry>,
    requests: HashMap<RequestId, SeqId>,
    draining: Vec<Draining>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

impl Worker {
    pub(crate) fn new(
        engine: Engine,
        pool: Option<rayon::ThreadPool>,
        shared: Arc<ModelShared>,
        tx: mpsc::WeakSender<Command>,
    ) -> Self {
        Worker {
            engine,
            pool,
            shared,
            tx,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            draining: Vec::new(),
        }
    }

    /// Runs until every handle of the model is gone or the engine fails.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let shared = Arc::clone(&self.shared);
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.iteration(&mut rx))) {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => break,
                Ok(Err(why)) => {
                    tracing::error!("hip engine thread failed: {why}");
                    let _ = shared.dead.set(why);
                    break;
                }
                Err(p) => {
                    let why = format!("panic: {}", panic_message(&*p));
                    tracing::error!("hip engine thread failed: {why}");
                    let _ = shared.dead.set(why);
                    break;
                }
            }
        }
        // Close the channel before dropping the operations, so that every waiter wakes to an error.
        rx.close();
        drop(rx);
        drop(self);
        shared.exited.store(true, Ordering::Release);
        tracing::debug!("hip engine thread exited");
    }

    /// One turn of the loop: `Ok(false)` when the model's handles are all gone, `Err` when the
    /// engine failed.
    fn iteration(&mut self, rx: &mut mpsc::Receiver<Command>) -> std::result::Result<bool, String> {
        if !self.engine.has_work() {
            let wake = if self.draining.iter().any(Draining::pending) {
                self.wait(rx)
            } else {
                rx.blocking_recv().map_or(Wake::Closed, Wake::Command)
            };
            match wake {
                Wake::Command(c) => self.handle(c),
                Wake::Room => {}
                Wake::Closed => return Ok(false),
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => self.handle(c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(false),
            }
        }
        self.bury();
        self.reap();
        self.flush();
        if self.engine.has_work() {
            let engine = &mut self.engine;
            let events = match &self.pool {
                Some(pool) => pool.install(|| engine.step()),
                None => engine.step(),
            }
            .map_err(|e| format!("engine step failed: {e}"))?;
            for ev in events {
                self.route(ev);
            }
            self.publish_all();
        }
        Ok(true)
    }

    /// Blocks until a command arrives or a draining consumer makes room.
    fn wait(&self, rx: &mut mpsc::Receiver<Command>) -> Wake {
        let ready: Vec<_> = self.draining.iter().filter(|d| d.pending()).map(Draining::ready).collect();
        futures::executor::block_on(async {
            let recv = std::pin::pin!(rx.recv());
            match select(recv, select_all(ready)).await {
                Either::Left((Some(c), _)) => Wake::Command(c),
                Either::Left((None, _)) => Wake::Closed,
                Either::Right(_) => Wake::Room,
            }
        })
    }

    fn guard(&self, seq: SeqId) -> SeqGuard {
        SeqGuard { seq, tx: self.tx.clone(), shared: Arc::clone(&self.shared) }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Create { session, reply } => {
                let seq = self.engine.create_sequence();
                self.seqs.insert(seq, Entry { session, op: None });
                self.publish(seq);
                // A caller that went away drops the guard, which removes the sequence again.
                let _ = reply.send(Ok(self.guard(seq)));
            }
            Command::Remove { seq } => self.remove(seq),
            Command::Append { seq, tokens, chat, out, permit } => {
                self.start_append(seq, tokens, chat, out, permit)
            }
            Command::Generate(cmd) => self.start_generate(*cmd),
            Command::Fork { seq, child, reply } => {
                let res = self.fork(seq, child);
                let _ = reply.send(res);
            }
            Command::OffloadReport { reply } => {
                let _ = reply.send(self.engine.offload_report().map_err(Error::from_core));
            }
            Command::Snapshot { seq, reply } => {
                let res =
                    self.idle_entry(seq).and_then(|_| self.engine.snapshot(seq).map_err(Error::from_core));
                let _ = reply.send(res);
            }
            Command::Restore { file, session, reply } => {
                let res = match self.engine.restore_mapped(&file) {
                    Ok(seq) => {
                        self.seqs.insert(seq, Entry { session, op: None });
                        self.publish(seq);
                        Ok(self.guard(seq))
                    }
                    Err(e) => Err(Error::from_core_session(e)),
                };
                let _ = reply.send(res);
            }
            #[cfg(test)]
            Command::Panic => panic!("injected panic"),
        }
    }

    fn fork(&mut self, seq: SeqId, child: Arc<SessionShared>) -> Result<SeqGuard> {
        if !self.seqs.contains_key(&seq) {
            return Err(Error::engine(format!("unknown session {seq}")));
        }
        let id = self.engine.fork(seq).map_err(Error::from_core)?;
        self.seqs.insert(id, Entry { session: child, op: None });
        self.publish(id);
        Ok(self.guard(id))
    }

    fn remove(&mut self, seq: SeqId) {
        let Some(entry) = self.seqs.remove(&seq) else { return };
        if let Some(Op::Generate(g)) = &entry.op {
            self.requests.remove(&g.request);
        }
        if let Err(e) = self.engine.remove_sequence(seq) {
            tracing::warn!("removing sequence {seq}: {e}");
        }
        self.shared.kv_in_use.store(self.engine.kv().bytes_in_use(), Ordering::Relaxed);
    }

    /// Removes the sequences of sessions dropped while the command channel was full.
    fn bury(&mut self) {
        let dead = std::mem::take(&mut *self.shared.graveyard.lock().unwrap_or_else(PoisonError::into_inner));
        for seq in dead {
            self.remove(seq);
        }
    }

    fn start_append(
        &mut self,
        seq: SeqId,
        tokens: Vec<u32>,
        chat: Option<ChatState>,
        out: mpsc::Sender<AppendItem>,
        permit: OwnedSemaphorePermit,
    ) {
        let mut out = Outbox::new(out);
        if out.closed() {
            return;
        }
        let base = match self.idle_entry(seq) {
            Ok(_) => self.engine.tokens(seq).map_or(0, <[u32]>::len),
            Err(e) => return self.park_append(out, AppendItem::Failed(e)),
        };
        if let Err(e) = self.engine.append(seq, &tokens) {
            return self.park_append(out, AppendItem::Failed(Error::from_core(e)));
        }
        self.publish(seq);
        let n = tokens.len();
        if n == 0 {
            self.set_chat(seq, chat);
            out.push(AppendItem::Progress(Progress { done: 0, total: 0 }));
            return self.park_append(out, AppendItem::Done);
        }
        let op = AppendOp { out, base, target: base + n, n, chat, _permit: permit };
        if let Some(entry) = self.seqs.get_mut(&seq) {
            entry.op = Some(Op::Append(op));
        }
    }

    fn start_generate(&mut self, cmd: GenerateCmd) {
        let GenerateCmd { seq, tokens, params, out, abort, turn, permit } = cmd;
        let out = Outbox::new(out);
        if out.closed() {
            return;
        }
        if abort.load(Ordering::Acquire) {
            return self.park_gen(out, GenItem::Failed(Error::cancelled()));
        }
        if let Err(e) = self.idle_entry(seq) {
            return self.park_gen(out, GenItem::Failed(e));
        }
        let base = self.engine.tokens(seq).map_or(0, <[u32]>::len);
        if let Err(e) = self.engine.append(seq, &tokens) {
            return self.park_gen(out, GenItem::Failed(Error::from_core(e)));
        }
        let request = match self.engine.generate(seq, params) {
            Ok(r) => r,
            Err(e) => {
                if let Err(e2) = self.engine.truncate(seq, base) {
                    tracing::warn!("restoring sequence {seq}: {e2}");
                }
                return self.park_gen(out, GenItem::Failed(Error::from_core(e)));
            }
        };
        self.requests.insert(request, seq);
        let op = GenOp {
            request,
            out,
            abort,
            base,
            prompt_tokens: tokens.len(),
            completion_tokens: 0,
            last_token: None,
            text: String::new(),
            turn,
            _permit: permit,
        };
        if let Some(entry) = self.seqs.get_mut(&seq) {
            entry.op = Some(Op::Generate(op));
        }
        self.publish(seq);
    }

    /// The entry of `seq`, which must exist and have no operation running.
    fn idle_entry(&self, seq: SeqId) -> Result<&Entry> {
        let entry = self.seqs.get(&seq).ok_or_else(|| Error::engine(format!("unknown session {seq}")))?;
        if entry.op.is_some() {
            return Err(Error::engine(format!("session {seq} is busy")));
        }
        Ok(entry)
    }

    fn park_gen(&mut self, mut out: Outbox<GenItem>, last: GenItem) {
        out.push(last);
        if out.pending() {
            self.draining.push(Draining::Gen(out));
        }
    }

    fn park_append(&mut self, mut out: Outbox<AppendItem>, last: AppendItem) {
        out.push(last);
        if out.pending() {
            self.draining.push(Draining::Append(out));
        }
    }

    /// Cancels operations whose consumer is gone or that were aborted.
    fn reap(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, e)| match &e.op {
                Some(Op::Generate(g)) => g.out.closed() || g.abort.load(Ordering::Acquire),
                Some(Op::Append(a)) => a.out.closed(),
                None => false,
            })
            .map(|(&s, _)| s)
            .collect();
        for seq in gone {
            let Some(op) = self.seqs.get_mut(&seq).and_then(|e| e.op.take()) else { continue };
            match op {
                Op::Generate(g) => {
                    self.requests.remove(&g.request);
                    if let Err(e) = self.engine.abort(g.request) {
                        tracing::warn!("aborting request {}: {e}", g.request);
                    }
                    tracing::debug!(%seq, "generation cancelled");
                    self.end_turn(seq, &g, None);
                    self.publish(seq);
                    let aborted = !g.out.closed();
                    let out = g.out;
                    if aborted {
                        self.park_gen(out, GenItem::Failed(Error::cancelled()));
                    }
                }
                Op::Append(a) => {
                    if let Err(e) = self.engine.truncate(seq, a.base) {
                        tracing::warn!("restoring sequence {seq}: {e}");
                    }
                    tracing::debug!(%seq, "append cancelled");
                    self.publish(seq);
                }
            }
        }
    }

    /// Delivers queued items.
    fn flush(&mut self) {
        for entry in self.seqs.values_mut() {
            match &mut entry.op {
                Some(Op::Generate(g)) => g.out.flush(),
                Some(Op::Append(a)) => a.out.flush(),
                None => {}
            }
        }
        for d in &mut self.draining {
            d.flush();
        }
        self.draining.retain(Draining::pending);
    }

    fn route(&mut self, ev: Event) {
        match ev {
            Event::Prefill { seq, .. } => self.on_prefill(seq),
            Event::Token { request, token, text } => {
                let Some(g) = self.gen_op(request) else { return };
                g.completion_tokens += 1;
                g.last_token = Some(token);
                g.text.push_str(&text);
                g.out.push(GenItem::Token(Token { id: token, text }));
            }
            Event::Finished { request, reason, text } => self.on_finished(request, reason, text),
            Event::Failed { request, seq, error } => self.on_failed(request, seq, error),
            other => tracing::debug!(?other, "unhandled engine event"),
        }
    }

    fn gen_op(&mut self, request: RequestId) -> Option<&mut GenOp> {
        let seq = self.requests.get(&request)?;
        match &mut self.seqs.get_mut(seq)?.op {
            Some(Op::Generate(g)) if g.request == request => Some(g),
            _ => None,
        }
    }

    fn on_prefill(&mut self, seq: SeqId) {
        let cached = self.engine.cached_len(seq).unwrap_or(0);
        let Some(entry) = self.seqs.get_mut(&seq) else { return };
        let Some(Op::Append(a)) = &mut entry.op else { return };
        let done = a.n - a.target.saturating_sub(cached).min(a.n);
        a.out.progress(Progress { done, total: a.n });
        if done == a.n {
            if let Some(Op::Append(a)) = entry.op.take() {
                self.set_chat(seq, a.chat);
                self.publish(seq);
                self.park_append(a.out, AppendItem::Done);
            }
        }
    }

    fn on_finished(&mut self, request: RequestId, reason: FinishReason, tail: String) {
        let Some(seq) = self.requests.remove(&request) else { return };
        let Some(entry) = self.seqs.get_mut(&seq) else { return };
        let Some(Op::Generate(mut g)) = entry.op.take() else { return };
        g.text.push_str(&tail);
        let eos = if reason == FinishReason::Eos { g.last_token } else { None };
        self.end_turn(seq, &g, eos);
        self.publish(seq);
        let done = Done {
            reason,
            tail,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.completion_tokens,
            context_tokens: self.engine.tokens(seq).map_or(0, <[u32]>::len),
        };
        self.park_gen(g.out, GenItem::Done(done));
    }

    fn on_failed(&mut self, request: Option<RequestId>, seq: SeqId, error: String) {
        if let Some(r) = request {
            self.requests.remove(&r);
        }
        let Some(op) = self.seqs.get_mut(&seq).and_then(|e| e.op.take()) else {
            tracing::warn!(%seq, "engine step failed for a sequence without an operation: {error}");
            return;
        };
        let err = Error::from_step_failure(error);
        let base = match &op {
            Op::Generate(g) => g.base,
            Op::Append(a) => a.base,
        };
        if let Err(e) = self.engine.truncate(seq, base) {
            tracing::warn!("restoring sequence {seq}: {e}");
        }
        self.publish(seq);
        match op {
            Op::Generate(g) => self.park_gen(g.out, GenItem::Failed(err)),
            Op::Append(a) => self.park_append(a.out, AppendItem::Failed(err)),
        }
    }

    /// Sets a chat session's conversation state after an append.
    fn set_chat(&self, seq: SeqId, chat: Option<ChatState>) {
        if let (Some(chat), Some(entry)) = (chat, self.seqs.get(&seq)) {
            *entry.session.chat() = chat;
        }
    }

    /// Records the end of a generated turn in a chat session's conversation.
    fn end_turn(&self, seq: SeqId, g: &GenOp, eos: Option<u32>) {
        let (Some(turn), Some(entry)) = (&g.turn, self.seqs.get(&seq)) else { return };
        let mut chat = entry.session.chat();
        chat.history = turn.clone();
        chat.rendered = true;
        chat.open = Some(OpenTurn { text: g.text.clone(), eos });
    }

    /// Updates the usage counters of `seq`'s session.
    fn publish(&self, seq: SeqId) {
        if let Some(entry) = self.seqs.get(&seq) {
            let tokens = self.engine.tokens(seq).map_or(0, <[u32]>::len);
            let bytes = self.engine.kv().seq_bytes(seq).unwrap_or(0);
            entry.session.tokens.store(tokens, Ordering::Release);
            entry.session.kv_bytes.store(bytes, Ordering::Release);
        }
        self.shared.kv_in_use.store(self.engine.kv().bytes_in_use(), Ordering::Relaxed);
    }

    fn publish_all(&self) {
        for &seq in self.seqs.keys() {
            self.publish(seq);
        }
    }
}
