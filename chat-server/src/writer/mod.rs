//! The one thread that writes envelopes, acks and new accounts to the database.
//!
//! - **Group commit.** Whatever is waiting is written in one transaction (one fsync), so
//!   under load one commit serves many senders; each still hears only once its write is
//!   durable.
//! - **Live delivery first.** An envelope already delivered to an online recipient is
//!   *held* for up to the grace period: if the recipient's `Ack` arrives first (it has
//!   stored the message), the envelope is never written at all and the sender is answered
//!   at once. Otherwise it is written like any other. Either way the sender's `Ok` means
//!   the envelope cannot be lost: it is on the server's disk or on the recipient's.
//!
//! Other writes are applied in the order they were submitted (the router submits
//! envelopes in id order) and never wait for held envelopes; a barrier waits for both.
//! An envelope written for a recipient with envelopes still held first has those written
//! (decided) before it: a held one refused when written (the recipient's queue full)
//! must not be overtaken by a later one already stored.
//! The thread is not woken for each held envelope, only by the deadline of the oldest,
//! so a stream of promptly acknowledged messages costs it almost no wake-ups.
//!
//! - **Bounded.** Every write but an ack needs [`Room`] first: bytes of a fixed budget,
//!   given back once the write is done. A connection that cannot get room is not read
//!   until it can (paced), or with `shed_when_full` its send is refused, so no client can
//!   make this queue, and the server's memory, grow. An ack only removes work, and its ids
//!   come out of the session's own bounded set of unacknowledged deliveries
//!   ([`Writer::ack`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chat_protocol::Username;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::store::{self, Bind, Enqueued, QueueLimits, Store, StoreError};

mod thread;

/// Writes per group commit; bounds the latency one batch adds to its last member.
const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<Done, StoreError>>;

#[derive(Debug)]
struct HeldEnvelope {
    recipient: Username,
    reply: Reply,
    /// Given back as soon as it is acknowledged (its payload lingers in the queue only
    /// until the writer passes it, within the grace period).
    room: Room,
}

/// What the connections and the writer thread share.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer: work that must not wait, or the last handle gone.
    work: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Writes other than held envelopes, in submission order.
    plain: VecDeque<Write>,
    /// Held envelopes in submission order (so in deadline order), with a sequence number.
    held_queue: VecDeque<(u64, Write)>,
    /// Held envelopes not yet claimed by the writer, by id. One acknowledged in time is
    /// removed here and skipped when the writer reaches it. Changed only through
    /// [`QueueState::hold`] and [`QueueState::take_held`], which keep `held_for`.
    held: HashMap<u64, HeldEnvelope>,
    /// How many of `held` are for each recipient (absent: none).
    held_for: HashMap<Username, usize>,
    /// Sequence number of the next held envelope.
    held_seq: u64,
    /// Barriers whose earlier plain writes are committed, waiting for the held envelopes
    /// submitted before them (sequence numbers below the first field) to be done.
    barriers: Vec<(u64, Reply)>,
    /// Every `Writer` handle is gone: write what is left and stop.
    stopping: bool,
    /// The writer thread has ended: submissions fail at once.
    stopped: bool,
}

/// The sending side of the writer thread.
#[derive(Clone, Debug)]
pub struct Writer {
    queue: Arc<Queue>,
    /// Bytes of the queue's budget not taken by a waiting write.
    budget: Arc<Semaphore>,
    /// The whole budget, in bytes.
    budget_bytes: usize,
    _stop: Arc<StopOnDrop>,
}

/// Room in the writer's queue for one write: part of its byte budget, given back when
/// the write is done (committed, refused, or acknowledged while held).
#[derive(Debug)]
pub struct Room {
    permit: OwnedSemaphorePermit,
}

impl Room {
    /// Splits off the room for one write of `cost` bytes, for a request that makes several
    /// writes (a `SendMany`). A room that was clamped to the whole budget is shared out as
    /// far as it goes: the last writes may get none.
    pub fn split(&mut self, cost: usize) -> Room {
        let n = cost.min(self.permit.num_permits());
        Room {
            permit: self.permit.split(n).expect("no more than this room holds"),
        }
    }
}

/// What a write of each kind is charged, in bytes of the budget: its data plus the
/// bookkeeping around it.
pub mod cost {
    /// An envelope of `payload_len` bytes.
    pub fn envelope(payload_len: usize) -> usize {
        payload_len + 256
    }
    /// An account bind with a key of `key_len` bytes.
    pub fn bind(key_len: usize) -> usize {
        key_len + 256
    }
}

/// Tells the writer thread to finish once the last [`Writer`] handle is dropped.
#[derive(Debug)]
struct StopOnDrop(Arc<Queue>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        lock(&self.0.state).stopping = true;
        self.0.work.notify_one();
    }
}

/// Marks the writer stopped however its thread ends (a panic included).
struct Stopped<'a>(&'a Queue);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.stopped = true;
        // Dropping the replies answers WriterGone.
        state.plain.clear();
        state.held_queue.clear();
        state.held.clear();
        state.held_for.clear();
        state.barriers.clear();
    }
}

/// A submitted write. It is committed whether or not anyone waits for the ticket;
/// waiting tells the outcome once it is durable.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<Done, StoreError>>);

impl Ticket {
    /// A ticket answered through the returned sender, for writes done elsewhere than the
    /// writer thread (the cluster backend's publishes).
    pub(crate) fn pending() -> (oneshot::Sender<Result<Done, StoreError>>, Self) {
        let (reply, rx) = oneshot::channel();
        (reply, Self(rx))
    }

    /// The outcome of an enqueue. Polls by reference, so it is safe in `select!`.
    pub async fn enqueued(&mut self) -> Result<Enqueued, StoreError> {
        self.done().await.map(Done::into_enqueued)
    }

    /// The outcome of an enqueue if it is known already.
    pub fn try_enqueued(&mut self) -> Option<Result<Enqueued, StoreError>> {
        let done = match self.0.try_recv() {
            Ok(done) => done,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => Err(StoreError::WriterGone),
        };
        Some(done.map(Done::into_enqueued))
    }

    /// The outcome of a bind.
    pub async fn bound(&mut self) -> Result<Bind, StoreError> {
        match self.done().await? {
            Done::Bound(b) => Ok(b),
            _ => unreachable!("a bind answers Bound"),
        }
    }

    /// Resolves once everything submitted before the barrier is committed.
    pub async fn passed(&mut self) -> Result<(), StoreError> {
        self.done().await.map(drop)
    }

    async fn done(&mut self) -> Result<Done, StoreError> {
        (&mut self.0).await.map_err(|_| StoreError::WriterGone)?
    }
}

impl Writer {
    /// Starts the writer thread. `grace` is how long a held envelope waits for its Ack;
    /// `budget` is how many bytes of writes may wait at once (see [`Room`]).
    pub fn start(store: Store, grace: Duration, budget: usize) -> Self {
        let queue = Arc::new(Queue::default());
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let _stopped = Stopped(&thread_queue);
                thread::run(&store, &thread_queue, grace);
            })
            .expect("spawn the store writer thread");
        let budget_bytes = budget.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            _stop: Arc::new(StopOnDrop(queue.clone())),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            queue,
        }
    }

    /// Room for a write of `cost` bytes if there is some now.
    pub fn try_reserve(&self, cost: usize) -> Option<Room> {
        let n = self.clamp(cost);
        self.budget
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|permit| Room { permit })
    }

    /// Room for a write of `cost` bytes, waiting (first come, first served) until there
    /// is some. Cancel-safe: dropping the future gives up the place in line.
    pub async fn reserve(&self, cost: usize) -> Room {
        let n = self.clamp(cost);
        match self.budget.clone().acquire_many_owned(n).await {
            Ok(permit) => Room { permit },
            // The semaphore is never closed.
            Err(_) => unreachable!("the writer's budget is never closed"),
        }
    }

    /// A cost no larger than the whole budget (so it can always be met eventually).
    fn clamp(&self, cost: usize) -> u32 {
        cost.min(self.budget_bytes).min(u32::MAX as usize) as u32
    }

    /// Bytes of the budget free now (for stats).
    pub fn room_left(&self) -> usize {
        self.budget.available_permits()
    }

    /// Submits envelope `id` to be committed with whatever else is waiting. Submitting is
    /// immediate, so one connection can have many sends in one group commit.
    pub fn enqueue(&self, room: Room, id: u64, envelope: Envelope) -> Ticket {
        self.submit(Op::Enqueue { id, envelope }, Some(room))
    }

    /// Like [`Writer::enqueue`] for an envelope already delivered to its online recipient:
    /// written only if its Ack has not come within the grace period. The ticket answers
    /// `Stored(id)` either way.
    pub fn enqueue_held(&self, room: Room, id: u64, envelope: Envelope) -> Ticket {
        let (reply, rx) = oneshot::channel();
        let mut state = lock(&self.queue.state);
        if state.stopped {
            return Ticket(rx);
        }
        let recipient = envelope.recipient.clone();
        state.hold(
            id,
            HeldEnvelope {
                recipient,
                reply,
                room,
            },
        );
        let seq = state.held_seq;
        state.held_seq += 1;
        let write = Write {
            op: Op::Enqueue { id, envelope },
            reply: None,
            held_since: Some(Instant::now()),
            _room: None,
        };
        state.held_queue.push_back((seq, write));
        // Not woken for every one: the writer already waits for the deadline of the
        // oldest, which comes before this one's.
        if state.held_queue.len() == 1 {
            self.queue.work.notify_one();
        }
        Ticket(rx)
    }

    /// `recipient` has stored these envelopes. Held ones are answered and never written;
    /// the rest are deleted in the next commit. Nobody waits: a failure is logged.
    ///
    /// An ack takes no [`Room`] and never waits for it: it only ever removes work (a held
    /// envelope's write, or a stored envelope), and the ids it carries are ones the
    /// caller has just taken out of its own bounded set of unacknowledged deliveries, so
    /// its memory was already counted. Pacing it would keep the Acks that free room
    /// behind the writes that wait for it: under load, envelopes whose Acks were only
    /// late would be written and then deleted, the writer would fall further behind, and
    /// the relay would stay collapsed (measured: PERFORMANCE.md, "Overload").
    pub fn ack(&self, recipient: Username, mut ids: Vec<u64>) {
        {
            let mut state = lock(&self.queue.state);
            let before = ids.len();
            ids.retain(|id| {
                if state.held.get(id).is_none_or(|h| h.recipient != recipient) {
                    return true;
                }
                if let Some(h) = state.take_held(*id) {
                    let _ = h.reply.send(Ok(Done::Enqueued(Enqueued::Stored(*id))));
                }
                false
            });
            // A barrier may have been waiting for one of them.
            if ids.len() < before && !state.barriers.is_empty() {
                self.queue.work.notify_one();
            }
        }
        if !ids.is_empty() {
            self.submit(Op::Ack { recipient, ids }, None);
        }
    }

    /// Submits [`Store::bind`], so a storm of new accounts shares commits too.
    pub fn bind(&self, room: Room, user: Username, public_key: Vec<u8>) -> Ticket {
        self.submit(Op::Bind { user, public_key }, Some(room))
    }

    /// A ticket that resolves once everything submitted before it is durable (or, for held
    /// envelopes, acknowledged).
    pub fn barrier(&self) -> Ticket {
        self.submit(Op::Barrier { held_before: 0 }, None)
    }

    fn submit(&self, mut op: Op, room: Option<Room>) -> Ticket {
        let (reply, rx) = oneshot::channel();
        let mut state = lock(&self.queue.state);
        // If the writer is gone the reply is dropped: WriterGone.
        if !state.stopped {
            if let Op::Barrier { held_before } = &mut op {
                *held_before = state.held_seq;
            }
            state.plain.push_back(Write {
                op,
                reply: Some(reply),
                held_since: None,
                _room: room,
            });
            self.queue.work.notify_one();
        }
        Ticket(rx)
    }

    /// Envelopes held for an Ack right now (for tests and stats).
    pub fn held_count(&self) -> usize {
        lock(&self.queue.state).held.len()
    }
}

impl QueueState {
    /// Holds envelope `id` for its Ack.
    fn hold(&mut self, id: u64, envelope: HeldEnvelope) {
        *self.held_for.entry(envelope.recipient.clone()).or_default() += 1;
        if let Some(replaced) = self.held.insert(id, envelope) {
            // Ids are never handed out twice; kept consistent all the same.
            self.forget_one(&replaced.recipient);
        }
    }

    /// Takes envelope `id` out of the held set: acknowledged, or claimed to be written.
    fn take_held(&mut self, id: u64) -> Option<HeldEnvelope> {
        let envelope = self.held.remove(&id)?;
        self.forget_one(&envelope.recipient);
        Some(envelope)
    }

    fn forget_one(&mut self, recipient: &Username) {
        if let Some(n) = self.held_for.get_mut(recipient) {
            *n -= 1;
            if *n == 0 {
                self.held_for.remove(recipient);
            }
        }
    }
}

/// What an enqueue stores.
#[derive(Debug)]
pub struct Envelope {
    pub recipient: Username,
    pub sender: Username,
    /// The sender's address group as a keyed hash (`limits::Sources`).
    pub source: i64,
    /// Shared with the `Deliver` routed to an online recipient (no copy).
    pub payload: tokio_util::bytes::Bytes,
    pub now_secs: u64,
    pub limits: QueueLimits,
    /// Its place among its connection's sends: refused `Fenced` if an earlier one to the
    /// same recipient was refused, and recorded if refused itself (`crate::fence`).
    pub fence: Option<crate::fence::FenceTag>,
}

#[derive(Debug)]
struct Write {
    op: Op,
    /// `None` for a held envelope until the writer claims it.
    reply: Option<Reply>,
    held_since: Option<Instant>,
    /// The budget this write takes, given back when it is dropped (done).
    _room: Option<Room>,
}

#[derive(Debug)]
enum Op {
    Enqueue {
        id: u64,
        envelope: Envelope,
    },
    Ack {
        recipient: Username,
        ids: Vec<u64>,
    },
    Bind {
        user: Username,
        public_key: Vec<u8>,
    },
    /// Passes once the plain writes before it are committed and the held envelopes
    /// submitted before it (sequence numbers below `held_before`) are done.
    Barrier {
        held_before: u64,
    },
}

#[derive(Debug)]
pub enum Done {
    Enqueued(Enqueued),
    Acked(usize),
    Bound(Bind),
    Passed,
}

impl Done {
    fn into_enqueued(self) -> Enqueued {
        match self {
            Done::Enqueued(e) => e,
            _ => unreachable!("an enqueue answers Enqueued"),
        }
    }
}

impl Write {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> Result<Done, StoreError> {
        match &self.op {
            Op::Enqueue { id, envelope: e } => {
                if e.fence.as_ref().is_some_and(|f| f.holds()) {
                    return Ok(Done::Enqueued(Enqueued::Fenced));
                }
                let done = store::enqueue_in(
                    tx,
                    Some(*id),
                    &e.recipient,
                    &e.sender,
                    e.source,
                    &e.payload,
                    e.now_secs,
                    &e.limits,
                );
                if let Some(fence) = &e.fence
                    && crate::fence::holds_back(&done)
                {
                    fence.refused();
                }
                done.map(Done::Enqueued)
            }
            Op::Ack { recipient, ids } => store::ack_in(tx, recipient, ids).map(Done::Acked),
            Op::Bind { user, public_key } => store::bind_in(tx, user, public_key).map(Done::Bound),
            Op::Barrier { .. } => Ok(Done::Passed),
        }
    }

    fn reply(self, result: Result<Done, StoreError>) {
        // The connection may have gone (or not be waiting, as for acks): the write stands
        // either way, but a failure nobody hears about must still be seen.
        let unheard = match self.reply {
            Some(reply) => reply.send(result).err(),
            None => Some(result),
        };
        if let Some(Err(e)) = unheard {
            tracing::error!("storage error (no one waiting): {e}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
