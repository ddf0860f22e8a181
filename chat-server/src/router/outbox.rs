//! One logged-in connection's outbox: the bounded queue of what the router routes to it,
//! and the kick that closes it, behind one small lock.
//!
//! The router holds the [`Outbox`] (it pushes and kicks); the connection holds the
//! [`Inbox`] (it takes). Nothing is allocated until something is queued: an idle
//! connection costs one ~150 B allocation here, where a tokio `mpsc` channel (a block of
//! 32 slots and cache-padded halves) and a `watch` for the kick came to about 1.2 KB. The
//! connection takes everything queued in one lock (the queue is swapped with its own
//! empty one), so a burst routed to it costs one lock, not one per message. What it has
//! taken and not yet returned still counts against the bound, in messages and in bytes.
//!
//! Order: a kick is seen before anything still queued; messages come out in the order
//! they were pushed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chat_protocol::ErrorCode;
use tokio::sync::Notify;

use super::Routed;

/// How much a connection's outbox may hold before its connection counts as not reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxBound {
    /// Messages.
    pub messages: usize,
    /// Their [`Routed::weight`]s together; a message over it is still queued alone.
    pub bytes: usize,
}

#[cfg(test)]
impl OutboxBound {
    /// A bound of `messages` and none in bytes.
    pub(crate) fn messages(messages: usize) -> Self {
        Self {
            messages,
            bytes: usize::MAX,
        }
    }
}

/// Why [`Outbox::push`] did not queue a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds its bound already: the connection is not keeping up.
    Full(Routed),
    /// The connection has ended.
    Closed,
}

/// What [`Inbox::next`] returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Routed(Routed),
    /// The session must close with this code (`session_replaced` if the router dropped
    /// it without one).
    Kicked(ErrorCode),
}

/// Creates the two ends of a connection's outbox holding at most `bound`.
pub(crate) fn outbox(bound: OutboxBound) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            bytes: 0,
            bound,
            kicked: None,
            detached: false,
            closed: false,
        }),
        kicked: AtomicBool::new(false),
        taken: AtomicUsize::new(0),
        taken_bytes: AtomicUsize::new(0),
        routed: Notify::new(),
        kick: Notify::new(),
    });
    let inbox = Inbox {
        shared: shared.clone(),
        taken: VecDeque::new(),
        handed: 0,
    };
    (Outbox { shared }, inbox)
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Set (after `State::kicked` or `State::detached`) so the connection can check for a
    /// kick between queued messages without taking the lock.
    kicked: AtomicBool,
    /// Messages the connection has taken from the queue and not yet returned: set under
    /// the lock when it takes a batch, counted down without it as it returns them.
    taken: AtomicUsize,
    /// The weight of those messages (as `taken`).
    taken_bytes: AtomicUsize,
    /// Wakes the connection waiting in [`Inbox::next`]: something queued, a kick, or the
    /// router gone. A permit is kept if it is not waiting, so no wake-up is lost.
    routed: Notify,
    /// Wakes every [`KickWatch`] waiting.
    kick: Notify,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Routed>,
    /// The weight of what `queue` holds.
    bytes: usize,
    bound: OutboxBound,
    kicked: Option<ErrorCode>,
    /// The router dropped its end: the session was replaced or has left.
    detached: bool,
    /// The connection dropped its end.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The code to close with, if kicked or detached.
    fn kicked(state: &State) -> Option<ErrorCode> {
        match (state.kicked, state.detached) {
            (Some(code), _) => Some(code),
            (None, true) => Some(ErrorCode::SessionReplaced),
            (None, false) => None,
        }
    }

    fn wake_on_kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.routed.notify_one();
        self.kick.notify_waiters();
    }
}

/// The router's end: queues messages and kicks. Dropping it detaches the session (its
/// connection closes with `session_replaced` unless kicked with another code).
#[derive(Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues `msg`, unless the queue is full or the connection gone. Never waits.
    pub(crate) fn push(&self, msg: Routed) -> Result<(), PushError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        let held = state.queue.len() + self.shared.taken.load(Ordering::Relaxed);
        let weight = msg.weight();
        let held_bytes = state.bytes + self.shared.taken_bytes.load(Ordering::Relaxed);
        if held >= state.bound.messages || (held > 0 && held_bytes + weight > state.bound.bytes) {
            return Err(PushError::Full(msg));
        }
        let was_empty = state.queue.is_empty();
        state.queue.push_back(msg);
        state.bytes += weight;
        drop(state);
        // The connection checks the queue under the lock before it waits, so only the
        // first message after it found the queue empty needs to wake it.
        if was_empty {
            self.shared.routed.notify_one();
        }
        Ok(())
    }

    /// Tells the connection to close with `code` (a later kick replaces the code).
    pub(crate) fn kick(&self, code: ErrorCode) {
        self.shared.lock().kicked = Some(code);
        self.shared.wake_on_kick();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.shared.lock().detached = true;
        self.shared.wake_on_kick();
    }
}

/// The connection's end: what was routed to it, in order, and its kick.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Shared>,
    /// Taken from the queue in one lock, not yet returned.
    taken: VecDeque<Routed>,
    /// Room (entries) of the empty queue last handed to the router's half in exchange.
    handed: usize,
}

impl Inbox {
    /// The next routed message, or the kick, waiting for either. A kick comes before
    /// anything still queued. Cancel-safe: nothing is taken unless returned.
    pub async fn next(&mut self) -> Inbound {
        loop {
            if let Some(code) = self.kicked() {
                return Inbound::Kicked(code);
            }
            if let Some(msg) = self.try_next() {
                return Inbound::Routed(msg);
            }
            // Nothing queued (checked under the lock): a push from here on stores a
            // permit or wakes this wait.
            self.shared.routed.notified().await;
        }
    }

    /// The next routed message if one is queued; never waits, and does not look at the
    /// kick.
    pub fn try_next(&mut self) -> Option<Routed> {
        if let Some(msg) = self.taken.pop_front() {
            self.shared.taken.fetch_sub(1, Ordering::Relaxed);
            self.shared
                .taken_bytes
                .fetch_sub(msg.weight(), Ordering::Relaxed);
            return Some(msg);
        }
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            return None;
        }
        std::mem::swap(&mut state.queue, &mut self.taken);
        self.handed = state.queue.capacity();
        let first = self.taken.pop_front();
        // The first is returned now; the rest count until they are.
        let bytes = std::mem::take(&mut state.bytes);
        let first_weight = first.as_ref().map_or(0, Routed::weight);
        self.shared.taken.store(self.taken.len(), Ordering::Relaxed);
        self.shared
            .taken_bytes
            .store(bytes - first_weight, Ordering::Relaxed);
        drop(state);
        first
    }

    /// The kick's code, if kicked (or detached: `session_replaced`).
    pub fn kicked(&self) -> Option<ErrorCode> {
        if !self.shared.kicked.load(Ordering::Acquire) {
            return None;
        }
        Shared::kicked(&self.shared.lock())
    }

    /// A handle that waits for the kick alone, apart from this inbox.
    pub fn kick_watch(&self) -> KickWatch {
        KickWatch {
            shared: self.shared.clone(),
        }
    }

    /// Whether either half holds room that [`Inbox::trim`] would give back (no lock).
    /// Room is kept while the connection is busy: given back after every batch, it would
    /// be grown again by the router's pushes, under the router's lock.
    pub fn holds_room(&self) -> bool {
        self.taken.capacity() > 0 || self.handed > 0
    }

    /// Gives back the room of each half that is empty (the quiet trim): an idle
    /// connection's outbox is then its one small allocation.
    pub fn trim(&mut self) {
        if self.taken.is_empty() {
            self.taken = VecDeque::new();
        }
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
        self.handed = state.queue.capacity();
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        // Dropped here rather than with the router's session.
        let queued = std::mem::take(&mut state.queue);
        drop(state);
        drop(queued);
    }
}

/// Waits for a connection's kick without taking from its queue (while a request is
/// handled).
#[derive(Debug, Clone)]
pub struct KickWatch {
    shared: Arc<Shared>,
}

impl KickWatch {
    /// The code the session closes with, once kicked or detached.
    pub async fn kicked(self) -> ErrorCode {
        loop {
            let notified = self.shared.kick.notified();
            tokio::pin!(notified);
            // Registered before the check, so a kick after it wakes this wait.
            notified.as_mut().enable();
            if let Some(code) = Shared::kicked(&self.shared.lock()) {
                return code;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests;
