//! [`Outbox`]: an operation's bounded channel to its consumer, plus what did not fit in it yet.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{AppendItem, GenItem};
use crate::stream::Progress;

/// An operation's channel to its consumer and what did not fit in it yet.
#[derive(Debug)]
pub(super) struct Outbox<T> {
    tx: mpsc::Sender<T>,
    buf: VecDeque<T>,
}

impl<T> Outbox<T> {
    pub(super) fn new(tx: mpsc::Sender<T>) -> Self {
        Outbox { tx, buf: VecDeque::new() }
    }

    pub(super) fn push(&mut self, item: T) {
        self.buf.push_back(item);
        self.flush();
    }

    /// Sends what fits; drops everything once the consumer is gone.
    pub(super) fn flush(&mut self) {
        while let Some(item) = self.buf.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => {
                    self.buf.push_front(item);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.buf.clear();
                    return;
                }
            }
        }
    }

    pub(super) fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether items wait for room in the channel.
    pub(super) fn pending(&self) -> bool {
        !self.buf.is_empty() && !self.tx.is_closed()
    }

    /// Resolves when the channel has room (or closed).
    pub(super) fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        Box::pin(async move {
            let _ = self.tx.reserve().await;
        })
    }
}

impl Outbox<AppendItem> {
    /// Queues a progress report, replacing a queued one that was not delivered yet.
    pub(super) fn progress(&mut self, p: Progress) {
        if let Some(AppendItem::Progress(last)) = self.buf.back_mut() {
            *last = p;
        } else {
            self.buf.push_back(AppendItem::Progress(p));
        }
        self.flush();
    }
}

/// The outbox of an operation that has ended, still delivering.
#[derive(Debug)]
pub(super) enum Draining {
    Gen(Outbox<GenItem>),
    Append(Outbox<AppendItem>),
}

impl Draining {
    pub(super) fn flush(&mut self) {
        match self {
            Draining::Gen(o) => o.flush(),
            Draining::Append(o) => o.flush(),
        }
    }
    pub(super) fn pending(&self) -> bool {
        match self {
            Draining::Gen(o) => o.pending(),
            Draining::Append(o) => o.pending(),
        }
    }
    pub(super) fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        match self {
            Draining::Gen(o) => o.ready(),
            Draining::Append(o) => o.ready(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Progress;

    #[test]
    fn outbox_queues_what_does_not_fit_and_coalesces_progress() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut out = Outbox::new(tx);
        for done in 0..5 {
            out.progress(Progress { done, total: 9 });
        }
        out.buf.push_back(AppendItem::Done);
        out.flush();
        // Two reports fit; of the three that did not, only the latest is kept.
        assert!(out.pending());
        assert_eq!(out.buf.len(), 2);
        let mut got = Vec::new();
        while let Ok(item) = rx.try_recv() {
            got.push(item);
        }
        out.flush();
        while let Ok(item) = rx.try_recv() {
            got.push(item);
        }
        let dones: Vec<_> = got
            .iter()
            .map(|i| match i {
                AppendItem::Progress(p) => Some(p.done),
                _ => None,
            })
            .collect();
        assert_eq!(dones, [Some(0), Some(1), Some(4), None]);
        assert!(!out.pending());
        // A closed channel drops what is queued.
        out.buf.push_back(AppendItem::Done);
        drop(rx);
        out.flush();
        assert!(out.buf.is_empty() && out.closed());
    }
}
