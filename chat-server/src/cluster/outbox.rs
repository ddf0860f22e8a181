//! Group commit for the relay's publishes: envelopes from every connection go, in the
//! order they were submitted, into atomic batches (JetStream's atomic batch publish,
//! ADR-50, NATS 2.12+), one batch in flight at a time. JetStream stores a batch with one
//! commit, so with `sync_interval: always` many envelopes share one fsync, as the SQLite
//! backend's envelopes share a transaction.
//!
//! A batch is all or nothing: if JetStream refuses it (one recipient's mailbox is full,
//! the stream is full) nothing of it is stored, and its envelopes are published again
//! one by one, each with its own outcome. While JetStream does not answer (a stream
//! leader being elected) a batch is retried for up to [`RETRY_FOR`], and nothing behind
//! it is sent meanwhile: one batch is in flight at a time, so envelopes are stored in
//! the order they were submitted, whatever happens to a batch (a sender's envelopes to
//! one recipient are never reordered by a failure). Every envelope carries its
//! `Nats-Msg-Id`: a batch JetStream refuses because it knows one of its ids (an earlier
//! attempt whose answer was lost) is published again one by one, where each envelope an
//! earlier attempt stored is answered as a duplicate and not stored twice.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{FROM_HEADER, refusal};
use crate::fence::FenceTag;
use crate::store::{Enqueued, StoreError};
use crate::writer::Done;

/// Envelopes in one batch at most (JetStream accepts up to 1,000).
pub const MAX_BATCH: usize = 256;
/// Payload bytes in one batch at most.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Envelopes waiting for a batch; a full queue makes submitters wait.
const QUEUE: usize = 4 * MAX_BATCH;

/// One envelope to publish, and where its outcome goes.
pub(super) struct Pending {
    pub subject: String,
    pub from: String,
    pub payload: Bytes,
    pub msg_id: String,
    pub reply: oneshot::Sender<Result<Done, StoreError>>,
    /// Counts it in its recipient's tally until answered ([`super::tally`]).
    pub held: super::tally::Held,
    /// Its place among its connection's sends (`crate::fence`): refused `Fenced` rather
    /// than published if an earlier one to the same recipient was refused or failed.
    pub fence: FenceTag,
}

impl Pending {
    /// Answers it `Fenced` if an earlier send of its connection to its recipient was
    /// refused; otherwise gives it back.
    fn unless_fenced(self) -> Option<Self> {
        if self.fence.holds() {
            let _ = self.reply.send(Ok(Done::Enqueued(Enqueued::Fenced)));
            return None;
        }
        Some(self)
    }
}

/// The submitting end; the batches are sent by a task that ends with it.
#[derive(Debug, Clone)]
pub(super) struct Outbox(mpsc::Sender<Pending>);

impl Outbox {
    /// Starts the batching task. With `atomic` false (a server without atomic batches)
    /// every envelope is published on its own, still in order.
    pub(super) fn start(client: async_nats::Client, js: jetstream::Context, atomic: bool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, client, js, atomic));
        Self(tx)
    }

    /// Queues `pending` behind everything submitted before it.
    pub(super) async fn submit(&self, pending: Pending) {
        if let Err(mpsc::error::SendError(pending)) = self.0.send(pending).await {
            let _ = pending
                .reply
                .send(Err(StoreError::Cluster("the relay is stopping".into())));
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Pending>,
    client: async_nats::Client,
    js: jetstream::Context,
    atomic: bool,
) {
    while let Some(first) = rx.recv().await {
        let Some(first) = first.unless_fenced() else {
            continue;
        };
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        let limit = if atomic { MAX_BATCH } else { 1 };
        while batch.len() < limit && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    if let Some(next) = next.unless_fenced() {
                        bytes += next.payload.len();
                        batch.push(next);
                    }
                }
                Err(_) => break,
            }
        }
        if let Err(failed) = send(&client, &js, batch).await {
            // JetStream did not answer for RETRY_FOR: these envelopes and every one
            // queued behind them are failed, so none is stored ahead of an earlier one
            // (the senders' clients send them again, in order).
            fail(failed);
            while let Ok(next) = rx.try_recv() {
                fail(vec![next]);
            }
        }
    }
}

/// How long an envelope is retried while JetStream does not answer (a stream leader
/// being elected, a node restarting) before it is failed.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

fn fail(batch: Vec<Pending>) {
    for pending in batch {
        // A send of the same connection to the same recipient still in its checks must
        // not be stored ahead of this one when the cluster answers again.
        pending.fence.refused();
        let _ = pending.reply.send(Err(StoreError::Cluster(
            "the cluster did not store the message in time".into(),
        )));
    }
}

/// What JetStream said to a publish or a batch.
enum Outcome {
    /// Stored; the (last) sequence.
    Stored(u64),
    /// Refused for a limit: certainly not stored.
    Refused(Enqueued),
    /// A batch holding a message id JetStream already knows (an earlier attempt of the
    /// batch, stored or only staged): the batch itself was not stored.
    Duplicate,
    /// No answer, or an error that may pass: the outcome is unknown.
    Unknown(String),
}

/// What became of a publish of `len` envelopes (one, or an atomic batch).
fn outcome(result: Result<jetstream::publish::PublishAck, String>, len: usize) -> Outcome {
    match result {
        Ok(ack) => Outcome::Stored(ack.sequence),
        Err(e) => match refusal(&e) {
            Some(limit) => Outcome::Refused(limit),
            // A lone envelope's earlier attempt is still being stored ("duplicate message
            // id is in process"): unknown until that ends (a stored one is answered as a
            // duplicate with its sequence, not an error). Taken as a refused batch, it
            // was published again at once, for ever, one stack frame deeper each time,
            // until the relay overflowed its stack (seen when a cluster lost quorum).
            None if e.contains("duplicate message id") && len > 1 => Outcome::Duplicate,
            None => Outcome::Unknown(e),
        },
    }
}

/// Stores `batch` (one envelope, or an atomic batch), retrying while the outcome is
/// unknown, and answers every envelope. Returns the batch if it gave up.
async fn send(
    client: &async_nats::Client,
    js: &jetstream::Context,
    batch: Vec<Pending>,
) -> Result<(), Vec<Pending>> {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        let result = if batch.len() == 1 {
            publish_one(js, &batch[0]).await
        } else {
            commit_batch(client, js, &batch).await
        };
        match outcome(result, batch.len()) {
            Outcome::Stored(last) => {
                // A batch is stored as one contiguous run of sequences ending at `last`.
                let first = last + 1 - batch.len() as u64;
                for (i, pending) in batch.into_iter().enumerate() {
                    pending.held.stored();
                    let stored = Enqueued::Stored(first + i as u64);
                    let _ = pending.reply.send(Ok(Done::Enqueued(stored)));
                }
                return Ok(());
            }
            Outcome::Refused(limit) if batch.len() == 1 => {
                let pending = batch.into_iter().next().expect("one envelope");
                pending.fence.refused();
                let _ = pending.reply.send(Ok(Done::Enqueued(limit)));
                return Ok(());
            }
            Outcome::Refused(_) | Outcome::Duplicate => {
                // Nothing of the batch is stored: each envelope again on its own, in order
                // (a lone envelope is never refused as a batch: no deeper than this).
                // A plain publish of an envelope an earlier attempt did store is answered
                // as a duplicate with its sequence, and stored once.
                debug!(
                    "a batch of {} was refused; storing them one by one",
                    batch.len()
                );
                let mut rest = batch.into_iter();
                while let Some(pending) = rest.next() {
                    // Behind a refused one of its connection to the same recipient: held.
                    let Some(pending) = pending.unless_fenced() else {
                        continue;
                    };
                    if let Err(mut failed) = Box::pin(send(client, js, vec![pending])).await {
                        failed.extend(rest);
                        return Err(failed);
                    }
                }
                return Ok(());
            }
            Outcome::Unknown(e) if tokio::time::Instant::now() + pause < deadline => {
                warn!(
                    "JetStream did not store {} envelope(s) ({e}); retrying",
                    batch.len()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Outcome::Unknown(e) => {
                warn!(
                    "JetStream did not store {} envelope(s) ({e}); giving up",
                    batch.len()
                );
                return Err(batch);
            }
        }
    }
}

fn headers(pending: &Pending) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(FROM_HEADER, pending.from.as_str());
    headers.insert("Nats-Msg-Id", pending.msg_id.as_str());
    headers
}

async fn publish_one(
    js: &jetstream::Context,
    pending: &Pending,
) -> Result<jetstream::publish::PublishAck, String> {
    let ack = js
        .publish_with_headers(
            pending.subject.clone(),
            headers(pending),
            pending.payload.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map_err(|e| e.to_string())
}

/// Publishes `batch` as one atomic batch: all but the last as plain messages, the last
/// with the commit header, whose acknowledgement answers for the whole batch.
async fn commit_batch(
    client: &async_nats::Client,
    js: &jetstream::Context,
    batch: &[Pending],
) -> Result<jetstream::publish::PublishAck, String> {
    let id = format!("{:032x}", rand::random::<u128>());
    let n = batch.len();
    for (i, pending) in batch[..n - 1].iter().enumerate() {
        let mut headers = headers(pending);
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        client
            .publish_with_headers(pending.subject.clone(), headers, pending.payload.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    let last = &batch[n - 1];
    let mut headers = headers(last);
    headers.insert("Nats-Batch-Id", id.as_str());
    headers.insert("Nats-Batch-Sequence", n.to_string().as_str());
    headers.insert("Nats-Batch-Commit", "1");
    let ack = js
        .publish_with_headers(last.subject.clone(), headers, last.payload.clone())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{Outcome, outcome};

    #[test]
    fn a_lone_envelope_still_being_stored_is_retried_and_a_batch_is_split() {
        let in_process = || Err("duplicate message id is in process".to_owned());
        assert!(matches!(outcome(in_process(), 1), Outcome::Unknown(_)));
        assert!(matches!(outcome(in_process(), 3), Outcome::Duplicate));
        let silent = Err("timed out: didn't receive ack in time".to_owned());
        assert!(matches!(outcome(silent, 1), Outcome::Unknown(_)));
    }
}
