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
//! Writes are applied in the order they were submitted (the router submits envelopes in
//! id order), so what is committed is always a prefix of what was submitted.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chat_protocol::Username;
use tokio::sync::{mpsc, oneshot};

use crate::store::{self, Bind, Enqueued, QueueLimits, Store, StoreError};

/// Writes per group commit; bounds the latency one batch adds to its last member.
const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<Done, StoreError>>;

/// Held envelopes not yet claimed by the writer, by envelope id; the condvar wakes the
/// writer when one is acknowledged.
#[derive(Debug, Default)]
struct HeldMap {
    map: Mutex<HashMap<u64, HeldEnvelope>>,
    acked: Condvar,
}

type Held = Arc<HeldMap>;

#[derive(Debug)]
struct HeldEnvelope {
    recipient: Username,
    reply: Reply,
}

/// The sending side of the writer thread.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Write>,
    held: Held,
}

/// A submitted write. It is committed whether or not anyone waits for the ticket;
/// waiting tells the outcome once it is durable.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<Done, StoreError>>);

impl Ticket {
    /// The outcome of an enqueue. Polls by reference, so it is safe in `select!`.
    pub async fn enqueued(&mut self) -> Result<Enqueued, StoreError> {
        match self.done().await? {
            Done::Enqueued(e) => Ok(e),
            _ => unreachable!("an enqueue answers Enqueued"),
        }
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
    /// Starts the writer thread. `grace` is how long a held envelope waits for its Ack.
    pub fn start(store: Store, grace: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Write>();
        let held = Held::default();
        let thread_held = held.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(&store, rx, &thread_held, grace))
            .expect("spawn the store writer thread");
        Self { tx, held }
    }

    /// Submits envelope `id` to be committed with whatever else is waiting. Submitting is
    /// immediate, so one connection can have many sends in one group commit.
    pub fn enqueue(&self, id: u64, envelope: Envelope) -> Ticket {
        self.submit(Op::Enqueue { id, envelope })
    }

    /// Like [`Writer::enqueue`] for an envelope already delivered to its online recipient:
    /// written only if its Ack has not come within the grace period. The ticket answers
    /// `Stored(id)` either way.
    pub fn enqueue_held(&self, id: u64, envelope: Envelope) -> Ticket {
        let (reply, rx) = oneshot::channel();
        let recipient = envelope.recipient.clone();
        lock(&self.held.map).insert(id, HeldEnvelope { recipient, reply });
        let write = Write {
            op: Op::Enqueue { id, envelope },
            reply: None,
            held_since: Some(Instant::now()),
        };
        if self.tx.send(write).is_err() {
            // No writer: dropping the reply answers WriterGone.
            lock(&self.held.map).remove(&id);
        }
        Ticket(rx)
    }

    /// `recipient` has stored these envelopes. Held ones are answered and never written;
    /// the rest are deleted in the next commit. Nobody waits: a failure is logged.
    pub fn ack(&self, recipient: Username, mut ids: Vec<u64>) {
        {
            let mut held = lock(&self.held.map);
            ids.retain(|id| {
                if held.get(id).is_none_or(|h| h.recipient != recipient) {
                    return true;
                }
                if let Some(h) = held.remove(id) {
                    let _ = h.reply.send(Ok(Done::Enqueued(Enqueued::Stored(*id))));
                }
                false
            });
        }
        self.held.acked.notify_all();
        if !ids.is_empty() {
            self.submit(Op::Ack { recipient, ids });
        }
    }

    /// Submits [`Store::bind`], so a storm of new accounts shares commits too.
    pub fn bind(&self, user: Username, public_key: Vec<u8>) -> Ticket {
        self.submit(Op::Bind { user, public_key })
    }

    /// A ticket that resolves once everything submitted before it is durable (or, for held
    /// envelopes, acknowledged).
    pub fn barrier(&self) -> Ticket {
        self.submit(Op::Barrier)
    }

    fn submit(&self, op: Op) -> Ticket {
        let (reply, rx) = oneshot::channel();
        // If the writer is gone the write (and its reply) is dropped: WriterGone.
        let _ = self.tx.send(Write {
            op,
            reply: Some(reply),
            held_since: None,
        });
        Ticket(rx)
    }

    /// Envelopes held for an Ack right now (for tests and stats).
    pub fn held_count(&self) -> usize {
        lock(&self.held.map).len()
    }
}

/// What an enqueue stores.
#[derive(Debug)]
pub struct Envelope {
    pub recipient: Username,
    pub sender: Username,
    pub payload: Vec<u8>,
    pub now_secs: u64,
    pub limits: QueueLimits,
}

#[derive(Debug)]
struct Write {
    op: Op,
    /// `None` for a held envelope until the writer claims it.
    reply: Option<Reply>,
    held_since: Option<Instant>,
}

#[derive(Debug)]
enum Op {
    Enqueue { id: u64, envelope: Envelope },
    Ack { recipient: Username, ids: Vec<u64> },
    Bind { user: Username, public_key: Vec<u8> },
    Barrier,
}

#[derive(Debug)]
pub enum Done {
    Enqueued(Enqueued),
    Acked(usize),
    Bound(Bind),
    Passed,
}

impl Write {
    fn apply(&self, tx: &rusqlite::Transaction<'_>) -> Result<Done, StoreError> {
        match &self.op {
            Op::Enqueue { id, envelope: e } => store::enqueue_in(
                tx,
                Some(*id),
                &e.recipient,
                &e.sender,
                &e.payload,
                e.now_secs,
                &e.limits,
            )
            .map(Done::Enqueued),
            Op::Ack { recipient, ids } => store::ack_in(tx, recipient, ids).map(Done::Acked),
            Op::Bind { user, public_key } => store::bind_in(tx, user, public_key).map(Done::Bound),
            Op::Barrier => Ok(Done::Passed),
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

    fn young(&self, grace: Duration) -> bool {
        self.held_since.is_some_and(|t| t.elapsed() < grace)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(store: &Store, mut rx: mpsc::UnboundedReceiver<Write>, held: &Held, grace: Duration) {
    let mut next: Option<Write> = None;
    let mut batch = Vec::new();
    // Highest envelope id seen, written or not: recorded so ids are not handed out twice.
    let mut last_id = 0;
    loop {
        let Some(first) = next.take().or_else(|| rx.blocking_recv()) else {
            return;
        };
        // Order is kept: a held envelope at the head makes the batch wait for its grace,
        // or until it is acknowledged.
        if let (Some(since), Op::Enqueue { id, .. }) = (first.held_since, &first.op) {
            let wait = (since + grace).saturating_duration_since(Instant::now());
            let map = lock(&held.map);
            let _ = held
                .acked
                .wait_timeout_while(map, wait, |m| m.contains_key(id));
        }
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) if w.young(grace) => {
                    next = Some(w);
                    break;
                }
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        for w in &batch {
            if let Op::Enqueue { id, .. } = w.op {
                last_id = last_id.max(id);
            }
        }
        // Claim the held envelopes; those acknowledged meanwhile are not written at all.
        {
            let mut held = lock(&held.map);
            batch.retain_mut(|w| match (&w.op, w.held_since) {
                (Op::Enqueue { id, .. }, Some(_)) => match held.remove(id) {
                    Some(h) => {
                        w.reply = Some(h.reply);
                        true
                    }
                    None => false,
                },
                _ => true,
            });
        }
        if !batch.is_empty() {
            write_batch(store, std::mem::take(&mut batch), last_id);
        }
    }
}

/// One transaction for the batch; if it fails, write by write, so one bad write cannot
/// fail the others.
fn write_batch(store: &Store, batch: Vec<Write>, last_id: u64) {
    let mut conn = store.conn();
    let together = (|| {
        let tx = conn.transaction()?;
        let results = batch
            .iter()
            .map(|w| w.apply(&tx))
            .collect::<Result<Vec<_>, _>>()?;
        store::record_last_id(&tx, last_id)?;
        tx.commit()?;
        Ok::<_, StoreError>(results)
    })();
    match together {
        Ok(results) => {
            for (w, r) in batch.into_iter().zip(results) {
                w.reply(Ok(r));
            }
        }
        Err(_) => {
            for w in batch {
                let one = (|| {
                    let tx = conn.transaction()?;
                    let r = w.apply(&tx)?;
                    tx.commit()?;
                    Ok(r)
                })();
                w.reply(one);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn envelope(to: &str, payload: &[u8]) -> Envelope {
        Envelope {
            recipient: name(to),
            sender: name("alice"),
            payload: payload.to_vec(),
            now_secs: 1000,
            limits: QueueLimits {
                max_envelopes: 100,
                max_bytes: 1 << 20,
            },
        }
    }

    fn setup(grace: Duration) -> (tempfile::TempDir, Store, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.bind(&name("bob"), b"k").unwrap();
        let writer = Writer::start(store.clone(), grace);
        (dir, store, writer)
    }

    #[tokio::test]
    async fn a_held_envelope_acknowledged_in_time_is_never_written() {
        // A grace far longer than the test: only the Ack can answer the ticket.
        let (_dir, store, writer) = setup(Duration::from_secs(3600));
        let mut ticket = writer.enqueue_held(7, envelope("bob", b"hi"));
        assert_eq!(writer.held_count(), 1);
        // Someone else's ack for that id changes nothing.
        writer.ack(name("carol"), vec![7]);
        assert_eq!(writer.held_count(), 1);
        writer.ack(name("bob"), vec![7]);
        assert_eq!(ticket.enqueued().await.unwrap(), Enqueued::Stored(7));
        assert_eq!(writer.held_count(), 0);
        assert_eq!(store.stats().unwrap().queued, 0);
        assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
        // The id is still used up, written or not: the next commit records it.
        writer
            .bind(name("carol"), b"k".to_vec())
            .bound()
            .await
            .unwrap();
        assert_eq!(store.next_envelope_id().unwrap(), 8);
    }

    #[tokio::test]
    async fn a_held_envelope_not_acknowledged_is_written_after_the_grace() {
        let (_dir, store, writer) = setup(Duration::from_millis(50));
        let started = Instant::now();
        let mut held = writer.enqueue_held(3, envelope("bob", b"held"));
        // Writes behind it keep their order: the barrier passes only after it.
        let mut barrier = writer.barrier();
        barrier.passed().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(held.enqueued().await.unwrap(), Enqueued::Stored(3));
        let queued = store.pending(&name("bob"), 0, 10).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!((queued[0].id, &queued[0].payload[..]), (3, &b"held"[..]));
        // A late ack now deletes it like any other.
        writer.ack(name("bob"), vec![3]);
        writer.barrier().passed().await.unwrap();
        assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn ordinary_writes_are_group_committed_in_order() {
        let (_dir, store, writer) = setup(Duration::ZERO);
        let mut tickets: Vec<Ticket> = (1..=50)
            .map(|i| writer.enqueue(i, envelope("bob", &[i as u8])))
            .collect();
        let mut unknown = writer.enqueue(51, envelope("nobody", b"?"));
        for (i, t) in tickets.iter_mut().enumerate() {
            assert_eq!(t.enqueued().await.unwrap(), Enqueued::Stored(i as u64 + 1));
        }
        assert_eq!(
            unknown.enqueued().await.unwrap(),
            Enqueued::UnknownRecipient
        );
        let ids: Vec<u64> = store
            .pending(&name("bob"), 0, 100)
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
        assert_eq!(
            writer
                .bind(name("bob"), b"other".to_vec())
                .bound()
                .await
                .unwrap(),
            Bind::Taken
        );
    }
}
