//! Delivery from the mailbox: each session with mail reads its recipient's subjects
//! through an ephemeral consumer made again whenever it fails or falls silent (the
//! backlog, then live envelopes, with no gap and no duplicate), given up after a quiet
//! spell for a wait without one ([`super::bell`]); acknowledged envelopes are removed in
//! gathered purges.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use chat_protocol::{ServerMessage, Username};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, info, warn};

use super::bell::Waited;
use super::{Cluster, FROM_HEADER};

/// Failures in a row after which a mailbox reader gives up (the session is closed, and
/// the client reconnects), if they also lasted [`super::RETRY_FOR`]: leader elections
/// after a node dies can refuse consumers for several seconds, quickly each time.
pub const READER_RETRIES: u32 = 40;

/// How long making a mailbox reader's consumer may take before it is tried again (a
/// healthy cluster answers in milliseconds).
const CONSUMER_PATIENCE: Duration = Duration::from_secs(5);

/// How often NATS tells a reader with nothing to read that its consumer is alive (the
/// idle heartbeat of each pull request). Two missed in a row and the reader makes its
/// consumer again: a consumer lost with a node, or cut off from its reader without a
/// reconnection or a leader election the relay sees, holds delivery up at most twice this.
/// (async-nats's ordered consumer, used before, waits for four missed 15 s heartbeats:
/// deliveries stalled for a minute after a node died.) Each session reading through a
/// consumer costs its relay one heartbeat message per interval while nothing comes (at
/// most `reader_idle_secs`; a waiting reader has no consumer: [`super::bell`]).
const IDLE_HEARTBEAT: Duration = Duration::from_secs(5);

/// How long each pull request waits for envelopes before the reader asks again.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// Envelopes asked for in one pull request (more are asked for once half are read).
const PULL_BATCH: usize = 500;

/// Bytes asked for in one pull request, unless the server takes larger messages (its
/// `max_payload`): a reader holds at most about twice this in envelopes NATS has sent it and
/// the session has not taken (async-nats asks for more once half is read). Without it,
/// [`PULL_BATCH`] full-size envelopes (500 × 68 KiB at the default frame limit) could sit
/// in each session's reader.
const PULL_BYTES: usize = 1 << 20;

/// Room for what a pull request's size is counted in besides the message itself (its
/// subject and reply subject).
const PULL_OVERHEAD: usize = 4096;

/// Payload bytes a mailbox reader hands its session ahead of what the session has written
/// (besides the channel's bound in envelopes). One envelope larger than this is handed
/// alone.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// How long the server keeps a reader's consumer after its last pull request (an ended
/// session's, or one made again, is removed then).
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

/// A session's mailbox reader: what it reads, and how far it has read, across its turns
/// of reading through a consumer and waiting for mail ([`super::bell`]).
pub(super) struct Reader {
    /// Whose mailbox it reads.
    user: Username,
    /// `<prefix>.inbox.<user>.>`: the user's subjects.
    pub(super) subject: String,
    /// The user's subject in the earlier layout (one per recipient).
    pub(super) legacy: String,
    /// The stream sequence to give from (0: from the first).
    pub(super) next: u64,
    /// Envelopes still to give before the backlog is read, as a consumer counted them
    /// when made (`Some(0)` before any was); `None` once caught up.
    pub(super) backlog: Option<u64>,
    /// Whether the subject of the earlier layout was found empty from the reader's place
    /// (checked once, before the first gets).
    pub(super) legacy_checked: bool,
    /// Disturbances seen (reconnections, leader elections).
    pub(super) disturbances: tokio::sync::watch::Receiver<u64>,
    failures: Failures,
    /// The session's room for envelopes handed over and not yet written.
    read_ahead: Arc<Semaphore>,
}

/// One stored envelope, as a consumer or a get found it.
pub(super) struct Envelope<'a> {
    /// Its subject (the recipient's, or the earlier layout's).
    pub(super) subject: &'a str,
    /// Its stream sequence: the envelope id.
    pub(super) sequence: u64,
    /// Its headers (the sender in [`FROM_HEADER`]).
    pub(super) headers: Option<&'a async_nats::HeaderMap>,
    /// The ciphertext.
    pub(super) payload: tokio_util::bytes::Bytes,
}

/// How reading through a consumer ended.
enum Read {
    /// Nothing came for `reader_idle_secs`: the consumer is deleted.
    Idle,
    /// The session ended, or the relay is shutting down.
    Ended,
}

/// What a session's mailbox read hands it.
#[derive(Debug)]
pub enum MailboxRead {
    /// The next envelope, as a `Deliver`, and its share of the reader's
    /// [`READ_AHEAD_BYTES`]: the session drops it once the `Deliver` is written.
    Deliver(ServerMessage, OwnedSemaphorePermit),
    /// Every envelope the mailbox held when the session began has been handed over (a
    /// client's `Sync` is answered from here on).
    CaughtUp,
}

/// Why a mailbox reader left its consumer.
enum Left {
    /// The cluster was disturbed: the consumer may be lost, and is made again.
    Disturbed,
    /// The server ended the pull stream.
    Ended,
    /// Nothing came for the backend's `reader_idle_secs`: the reader waits for mail
    /// without a consumer.
    Idle,
    /// Reading failed (an error, missed heartbeats, a consumer sequence skipped).
    Failed(String),
}

/// A mailbox reader's failures in a row.
#[derive(Debug, Default)]
struct Failures {
    count: u32,
    since: Option<tokio::time::Instant>,
}

impl Reader {
    /// Whether an envelope of `len` payload bytes can be handed to the session now, without
    /// waiting: room in the read-ahead ([`READ_AHEAD_BYTES`]) and in `tx`.
    pub(super) fn has_room(
        &self,
        len: usize,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
    ) -> bool {
        let share = len.clamp(1, READ_AHEAD_BYTES);
        self.read_ahead.available_permits() >= share && tx.capacity() > 0
    }
}

impl Failures {
    /// Counts one more; whether the reader should give up.
    fn give_up(&mut self) -> bool {
        self.count += 1;
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        self.count > READER_RETRIES && since.elapsed() >= super::RETRY_FOR
    }
}

impl Cluster {
    /// Streams `user`'s mailbox from its oldest envelope, then live ones, as `Deliver`s
    /// into the returned channel (of `capacity` envelopes and [`READ_AHEAD_BYTES`] of
    /// payload; the reader's pace holds the consumer back). An error ends the stream with a
    /// description. Dropping the guard stops it.
    pub fn deliveries(
        self: &Arc<Self>,
        user: &Username,
        capacity: usize,
    ) -> (mpsc::Receiver<Result<MailboxRead, String>>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(capacity);
        let (cluster, user) = (self.clone(), user.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = cluster.read_mailbox(&user, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        (rx, AbortOnDrop(task))
    }

    /// Reads `user`'s mailbox into `tx` from its first envelope on, in turns: it waits for
    /// mail without a consumer, giving what comes by gets ([`Cluster::wait_for_mail`]: a
    /// core NATS subscription, gets one envelope at a time); when more comes at once than
    /// gets should carry, it reads through a consumer ([`Cluster::read_until_idle`]) until
    /// nothing has come for the backend's `reader_idle_secs`, then waits again. Every envelope is given once, in stream order,
    /// across the turns. Ends when `tx` closes or the relay shuts down; an error ends the
    /// session with a description.
    async fn read_mailbox(
        &self,
        user: &Username,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
    ) -> Result<(), String> {
        let mut reader = Reader {
            user: user.clone(),
            subject: format!("{}>", self.mailbox_prefix(user)),
            legacy: self.legacy_subject(user),
            next: 0,
            backlog: Some(0),
            legacy_checked: false,
            disturbances: self.disturbances.subscribe(),
            failures: Failures::default(),
            read_ahead: Arc::new(Semaphore::new(READ_AHEAD_BYTES)),
        };
        loop {
            if let Waited::Ended = self.wait_for_mail(&mut reader, tx).await? {
                return Ok(());
            }
            debug!(
                "much mail for {}: reading through a consumer",
                reader.subject
            );
            if let Read::Ended = self.read_until_idle(&mut reader, tx).await? {
                return Ok(());
            }
            debug!("nothing for {} lately: waiting for mail", reader.subject);
        }
    }

    /// Reads `reader`'s mailbox into `tx` through a consumer until it has given nothing for
    /// the backend's `reader_idle_secs` ([`Read::Idle`]: the consumer is deleted), or `tx`
    /// closes or the relay shuts down ([`Read::Ended`]). The consumer (ephemeral,
    /// one replica in memory, no acknowledgements: what JetStream calls an ordered consumer)
    /// is made again from the next sequence not yet given whenever it fails, falls silent
    /// (two [`IDLE_HEARTBEAT`]s missed), skips a delivery (its consumer sequence jumps), and
    /// whenever the cluster was disturbed (this relay reconnected to NATS, or the stream
    /// elected a leader): an ephemeral consumer may have been lost with a node and would
    /// otherwise wait forever. Sequences already given are skipped, so a restart makes no gap
    /// and no duplicate. Each making waits for a place in the relay's API gate
    /// ([`super::api_gate`]): at a disturbance every reader with a consumer makes it again
    /// at once.
    /// Once as many envelopes as the first consumer (re)made before that point had pending
    /// are given, [`MailboxRead::CaughtUp`] follows them, once. Gives up (an error, and
    /// the session is closed) after [`READER_RETRIES`] failures in a row lasting
    /// [`super::RETRY_FOR`].
    async fn read_until_idle(
        &self,
        reader: &mut Reader,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
    ) -> Result<Read, String> {
        let idle = Duration::from_secs_f64(self.spec.1.reader_idle_secs);
        let (subject, legacy) = (reader.subject.clone(), reader.legacy.clone());
        loop {
            // Through the API gate first (every reader makes its consumer again at a
            // disturbance). A disturbance while waiting changes nothing: nothing was asked.
            let through = self.api.pass().await;
            reader.disturbances.borrow_and_update();
            let deliver_policy = match reader.next {
                0 => consumer::DeliverPolicy::All,
                start_sequence => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            };
            let make = async {
                let consumer = self
                    .mailbox
                    .create_consumer(consumer::pull::Config {
                        filter_subjects: vec![subject.clone(), legacy.clone()],
                        deliver_policy,
                        ack_policy: consumer::AckPolicy::None,
                        max_deliver: 1,
                        num_replicas: 1,
                        memory_storage: true,
                        inactive_threshold: CONSUMER_INACTIVE,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let info = consumer.cached_info();
                let (pending, name) = (info.num_pending, info.name.clone());
                // No message in the stream is larger than what the server took (unless
                // its operator lowered it since).
                let max_payload = self.js.client().server_info().max_payload;
                let PullLimits {
                    batch,
                    bytes,
                    expires,
                    heartbeat,
                } = pull_limits(&info.config, max_payload);
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(batch)
                    .max_bytes_per_batch(bytes)
                    .expires(expires)
                    .heartbeat(heartbeat)
                    .messages()
                    .await;
                match messages {
                    Ok(messages) => Ok::<_, String>((pending, name, messages)),
                    Err(e) => {
                        // Made but never read: deleted now rather than left to
                        // `CONSUMER_INACTIVE`.
                        self.forget_consumer(name);
                        Err(e.to_string())
                    }
                }
            };
            // A request made while JetStream has no leader to answer it hangs until it
            // times out, even once one is elected: an election starts the making again.
            let made = tokio::select! {
                made = tokio::time::timeout(CONSUMER_PATIENCE, make) => {
                    made.unwrap_or_else(|_| Err("timed out making a consumer".into()))
                }
                changed = reader.disturbances.changed() => {
                    if changed.is_err() {
                        return Ok(Read::Ended);
                    }
                    debug!("the cluster was disturbed while making a consumer for {subject}");
                    continue;
                }
            };
            drop(through);
            let (mut messages, name) = match made {
                Ok((pending, name, messages)) => {
                    debug!("reading {subject} from {} ({pending} pending)", reader.next);
                    if reader.backlog.is_some() {
                        // Counted from `next`: a remade consumer starts where we stopped.
                        reader.backlog = Some(pending);
                    }
                    (messages, name)
                }
                Err(e) => {
                    if reader.failures.give_up() {
                        return Err(e);
                    }
                    debug!("cannot read {subject} ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let made_at = tokio::time::Instant::now();
            // Given up once nothing has come for `idle` (counted while waiting for NATS,
            // not while the session is slow to take what was given).
            let mut idle_at = made_at + idle;
            // The consumer sequence of the last envelope this consumer gave.
            let mut given = 0u64;
            let left = loop {
                if reader.backlog == Some(0) {
                    // Counted by the consumer's server, which may be behind the leader:
                    // caught up once the leader has nothing more either (else, or if it
                    // does not answer, after the next envelope, or at the next wait).
                    if let Ok(true) = self.nothing_more_stored(reader).await {
                        reader.backlog = None;
                        if tx.send(Ok(MailboxRead::CaughtUp)).await.is_err() {
                            return Ok(Read::Ended);
                        }
                    } else {
                        reader.backlog = Some(1);
                    }
                }
                let message = tokio::select! {
                    message = messages.next() => message,
                    changed = reader.disturbances.changed() => {
                        if changed.is_err() {
                            return Ok(Read::Ended);
                        }
                        debug!(
                            "the cluster was disturbed: reading {subject} again from {}",
                            reader.next
                        );
                        break Left::Disturbed;
                    }
                    () = tokio::time::sleep_until(idle_at) => break Left::Idle,
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => break Left::Failed(e.to_string()),
                    None => break Left::Ended,
                };
                let Ok(info) = message.info() else { continue };
                if info.consumer_sequence != given + 1 {
                    break Left::Failed("a delivery went missing".into());
                }
                given = info.consumer_sequence;
                let sequence = info.stream_sequence;
                if sequence < reader.next {
                    continue;
                }
                let envelope = Envelope {
                    subject: message.subject.as_str(),
                    sequence,
                    headers: message.headers.as_ref(),
                    payload: message.payload.clone(),
                };
                if !self.give(reader, tx, envelope).await {
                    return Ok(Read::Ended);
                }
                if let Some(left) = reader.backlog.as_mut() {
                    *left = left.saturating_sub(1);
                }
                idle_at = tokio::time::Instant::now() + idle;
            };
            // A consumer that gave envelopes, lived through heartbeats, or was read until
            // the cluster was disturbed worked: failures count afresh (an idle session
            // lives through an election storm). One that fails at once every time (a
            // limit the server refuses every pull for, say) ends the session after
            // `READER_RETRIES`.
            if given > 0
                || matches!(left, Left::Disturbed | Left::Idle)
                || made_at.elapsed() >= 3 * IDLE_HEARTBEAT
            {
                reader.failures = Failures::default();
            }
            if let Left::Idle = left {
                self.forget_consumer(name);
                return Ok(Read::Idle);
            }
            if let Left::Failed(e) = left {
                if reader.failures.give_up() {
                    return Err(e);
                }
                debug!(
                    "reading {subject} failed ({e}); reading again from {}",
                    reader.next
                );
                self.forget_consumer(name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the leader says `reader`'s mailbox holds nothing from `reader.next` on (on
    /// its subjects and the earlier layout's): what a consumer counted as pending when made
    /// may come from a replica behind its leader, so `CaughtUp` waits for this too.
    async fn nothing_more_stored(&self, reader: &Reader) -> Result<bool, String> {
        for subject in [&reader.subject, &reader.legacy] {
            if self
                .first_stored(subject, reader.next, true)
                .await?
                .is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hands `envelope` to `reader`'s session as a `Deliver` (once room for its payload is
    /// free among what the session has not written yet: [`READ_AHEAD_BYTES`]), and moves
    /// the reader past it. False if the session ended.
    pub(super) async fn give(
        &self,
        reader: &mut Reader,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
        envelope: Envelope<'_>,
    ) -> bool {
        reader.next = envelope.sequence + 1;
        if envelope.subject == reader.legacy {
            self.legacy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(reader.user.clone());
        }
        let from = envelope
            .headers
            .and_then(|h| h.get(FROM_HEADER))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        // At most READ_AHEAD_BYTES handed over and not yet written (a larger envelope
        // waits for all of it).
        let share = envelope.payload.len().clamp(1, READ_AHEAD_BYTES) as u32;
        let Ok(room) = reader.read_ahead.clone().acquire_many_owned(share).await else {
            return false;
        };
        let deliver = ServerMessage::Deliver {
            envelope_id: envelope.sequence,
            from,
            payload: envelope.payload.to_vec(),
        };
        tx.send(Ok(MailboxRead::Deliver(deliver, room)))
            .await
            .is_ok()
    }

    /// Deletes the mailbox consumer `name` in the background. Its server would keep it
    /// (and answer its pending pull) until it has been inactive for `CONSUMER_INACTIVE`;
    /// its node may be gone, so a reader does not wait for this, and a failure only
    /// leaves it to that timeout. The request passes the API gate.
    fn forget_consumer(&self, name: String) {
        let (mailbox, api) = (self.mailbox.clone(), self.api.clone());
        tokio::spawn(async move {
            let _through = api.pass().await;
            let _ = tokio::time::timeout(CONSUMER_PATIENCE, mailbox.delete_consumer(&name)).await;
        });
    }

    /// Follows JetStream's advisories of leader elections of the mailbox stream, counting
    /// each as a disturbance. Returns if the subscription fails or ends.
    pub(super) async fn follow_leader_elections(&self) {
        let subject = format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
            self.mailbox.cached_info().config.name
        );
        let mut elections = match self.js.client().subscribe(subject).await {
            Ok(elections) => elections,
            Err(e) => {
                warn!("cannot follow the mailbox stream's leader elections: {e}");
                return;
            }
        };
        while elections.next().await.is_some() {
            info!("the mailbox stream elected a leader");
            self.disturbances.send_modify(|n| *n += 1);
        }
    }
}

/// What each pull request of a mailbox reader asks for.
#[derive(Debug, PartialEq, Eq)]
struct PullLimits {
    /// Envelopes.
    batch: usize,
    /// Bytes (of messages as the server counts them).
    bytes: usize,
    /// How long the request waits for envelopes.
    expires: Duration,
    /// How often the server says the consumer is alive while there is nothing to send.
    heartbeat: Duration,
}

/// The pull requests for a consumer made with `config` as the server returned it, on a
/// server that takes messages of up to `max_payload` bytes: [`PULL_BATCH`], [`PULL_BYTES`]
/// (raised so that the largest message fits: async-nats 0.51 asks again for ever when one
/// does not), [`PULL_EXPIRES`] and [`IDLE_HEARTBEAT`], lowered to the limits the server
/// copies into every consumer (its `jetstream.limits.max_request_batch`, `max_bytes`,
/// a `max_expires`), which it enforces by refusing every pull over them; the heartbeat at
/// most half the wait, as the server requires.
fn pull_limits(config: &consumer::Config, max_payload: usize) -> PullLimits {
    let batch = match usize::try_from(config.max_batch) {
        Ok(max) if max > 0 => PULL_BATCH.min(max),
        _ => PULL_BATCH,
    };
    let bytes = PULL_BYTES.max(max_payload.saturating_add(PULL_OVERHEAD));
    let bytes = match usize::try_from(config.max_bytes) {
        Ok(max) if max > 0 => bytes.min(max),
        _ => bytes,
    };
    let expires = match config.max_expires {
        max if max.is_zero() => PULL_EXPIRES,
        max => PULL_EXPIRES.min(max),
    };
    PullLimits {
        batch,
        bytes,
        expires,
        heartbeat: IDLE_HEARTBEAT.min(expires / 2),
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_stay_within_the_limits_the_server_copies_into_a_consumer() {
        let config = |max_batch, max_expires| consumer::Config {
            max_batch,
            max_expires,
            ..Default::default()
        };
        let limits = |batch, expires, heartbeat| PullLimits {
            batch,
            bytes: PULL_BYTES,
            expires,
            heartbeat,
        };
        let small = 64 * 1024;
        assert_eq!(
            pull_limits(&config(0, Duration::ZERO), small),
            limits(PULL_BATCH, PULL_EXPIRES, IDLE_HEARTBEAT)
        );
        assert_eq!(
            pull_limits(&config(10, Duration::ZERO), small),
            limits(10, PULL_EXPIRES, IDLE_HEARTBEAT)
        );
        assert_eq!(
            pull_limits(&config(10_000, Duration::from_secs(60)), small),
            limits(PULL_BATCH, PULL_EXPIRES, IDLE_HEARTBEAT)
        );
        // A short wait: the heartbeat is at most half of it.
        assert_eq!(
            pull_limits(&config(-1, Duration::from_secs(4)), small),
            limits(PULL_BATCH, Duration::from_secs(4), Duration::from_secs(2))
        );
    }

    #[test]
    fn a_pull_asks_for_bytes_enough_for_the_largest_message_the_server_takes() {
        let config = |max_bytes| consumer::Config {
            max_bytes,
            ..Default::default()
        };
        // NATS's default max_payload (1 MiB) and a raised one (8 MiB).
        assert_eq!(
            pull_limits(&config(0), 1 << 20).bytes,
            (1 << 20) + PULL_OVERHEAD
        );
        assert_eq!(
            pull_limits(&config(-1), 8 << 20).bytes,
            (8 << 20) + PULL_OVERHEAD
        );
        assert_eq!(pull_limits(&config(0), 1000).bytes, PULL_BYTES);
        // Within the server's limit on a request's bytes, which it enforces by refusing.
        assert_eq!(pull_limits(&config(300_000), 1000).bytes, 300_000);
    }
}
