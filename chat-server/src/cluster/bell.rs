//! A mailbox reader with little to read holds no consumer. It waits on a core NATS
//! subscription to its recipient's mailbox subjects, the *bell*: NATS hands every message
//! published on a subject to its subscribers as well as to the stream that stores it, so
//! each envelope sent to the recipient rings it. When it rings, or a check is due (at once,
//! [`BELL_SETTLE`] after the first check, after every disturbance, and about every
//! [`IDLE_CHECK`]), the reader gives what the mailbox holds from where it stands by
//! *gets*: the first stored envelope from its next sequence on, one at a time, until none
//! is left. Only a session given [`BUSY_AFTER`] envelopes within [`BUSY_WINDOW`] or in one
//! go (a sender in full flow, a backlog) reads through a consumer ([`super::delivery`]), until it
//! has been quiet for `reader_idle_secs`.
//!
//! Why: JetStream makes every consumer through the cluster's meta layer (a Raft
//! proposal), a few dozen a second on a small machine, and an idle one costs a heartbeat
//! every 5 s. A burst of logins (a relay restarted, its sessions coming back) queued one
//! consumer per session, and mail to the sessions at the back waited minutes. A get is
//! answered by one server without any proposal.
//!
//! Gets and order: every get starts from the reader's next sequence, and a replica holds a
//! prefix of the stream, so a replica behind its leader can only answer "none" early,
//! never skip an envelope. Until the session has caught up (its backlog given, after
//! which `Sync` is answered) gets go to the stream's leader (`STREAM.MSG.GET`, through
//! the API gate), whose "none" is the truth; after that, direct gets (answered by any
//! replica, their own gate), whose "none" may be a moment late. A bell rings when the
//! envelope is published, which can be before the stream has stored it (or for one it
//! refuses): a ring names its publish's message id, and the reader looks again, for up
//! to [`RING_PATIENCE`], until an envelope with that id is given.
//!
//! Where a bell can stay silent for a stored envelope, and what finds it:
//! - published before the subscription reached the node it was published on (interest
//!   travels between nodes in moments), or a get answered by a replica a moment behind:
//!   the check [`BELL_SETTLE`] after the first;
//! - published while this relay's NATS connection was down (subscriptions are made again
//!   when it returns): the reconnection is a disturbance, and a check follows it;
//! - the route between two live nodes cut while the stream still stores, or a replica
//!   cut off from its leader answering the checks: the periodic check once the cut heals.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, RawMessageErrorKind};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Cluster;
use super::delivery::{Envelope, MailboxRead, Reader};

/// How long after a waiting reader's first check (or the first after a disturbance) it
/// checks a second time.
const BELL_SETTLE: Duration = Duration::from_secs(1);

/// About how often a waiting reader checks its mailbox: each time within a quarter of this
/// either way, so that readers who began together (a burst of logins) spread out. A check
/// that finds nothing is one direct get. What only this check finds is mail whose ring was
/// lost without a disturbance the relay sees (a route between two live nodes cut while
/// the stream still stores): it waits at most this and a quarter after the cut heals.
/// Idle sessions' checks are most of what they cost the servers: at 30,000 sessions on the
/// bench's cluster, 0.63 cores at 30 s, 0.27 at 120 s (docs/PERFORMANCE.md).
const IDLE_CHECK: Duration = Duration::from_secs(120);

/// How long after a failed check a reader tries again; doubled after each failure in a
/// row, up to [`CHECK_RETRY_MAX`].
const CHECK_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between failed checks.
const CHECK_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long one get may take.
const GET_PATIENCE: Duration = Duration::from_secs(5);

/// Envelopes a reader gives by gets within [`BUSY_WINDOW`] before it reads through a
/// consumer instead (a backlog, or a sender in full flow): a get is a round trip per
/// envelope, a consumer streams them.
pub const BUSY_AFTER: usize = 16;

/// The span over which [`BUSY_AFTER`] counts.
const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// How long a ring's envelope is looked for: its publish may still be on its way into the
/// stream (an atomic batch is stored when its last envelope is), or the stream refused it.
const RING_PATIENCE: Duration = Duration::from_secs(2);

/// The first wait before looking again for a rung envelope not found yet; doubled each
/// time, up to [`RING_RETRY_MAX`].
const RING_RETRY: Duration = Duration::from_millis(5);

/// The longest wait between looks for a rung envelope.
const RING_RETRY_MAX: Duration = Duration::from_millis(250);

/// Looks for a rung envelope that found none, after which the stream's leader is asked (a
/// direct get may reach a replica behind it).
const LEADER_AFTER_MISSES: u32 = 3;

/// Checks failed in a row after which a waiting reader warns (and again every this many).
const WARN_AFTER_FAILURES: u32 = 10;

/// Rings (message ids) a reader remembers at most; past this it looks for
/// [`RING_PATIENCE`] after the last ring for anything at all.
const RINGS_KEPT: usize = 256;

/// How a wait for mail ended.
pub(super) enum Waited {
    /// More mail than gets should carry: read through a consumer.
    Busy,
    /// The session ended, or the relay is shutting down.
    Ended,
}

/// What woke a waiting reader.
enum Woke {
    /// The bell rang.
    Rung,
    /// The bell's subscription ended: the NATS client is closed.
    Unsubscribed,
    /// The cluster was disturbed (a reconnection, a leader election).
    Disturbed,
    /// The cluster handle that counts disturbances is gone (the relay is shutting down;
    /// a reader is normally stopped before, by its session's guard).
    ShuttingDown,
    /// A check is due.
    Due,
}

/// Envelopes given by gets lately: [`BUSY_AFTER`] within a [`BUSY_WINDOW`] is busy.
#[derive(Debug)]
struct Pace {
    since: Instant,
    given: usize,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            given: 0,
        }
    }

    /// One more given at `now`; whether that makes the reader busy.
    fn given(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) >= BUSY_WINDOW {
            *self = Self::new(now);
        }
        self.given += 1;
        self.given >= BUSY_AFTER
    }
}

/// How giving a mailbox's envelopes by gets ended.
enum Drained {
    /// None is left (and no ring is awaited).
    Empty,
    /// [`BUSY_AFTER`] given within [`BUSY_WINDOW`] or in one drain, or an envelope of the
    /// earlier layout found.
    Busy,
    /// The session ended.
    Ended,
    /// None is left, and a ring's envelope was not found within [`RING_PATIENCE`] (refused,
    /// or stored late).
    Lapsed,
    /// A get failed.
    Failed(String),
}

/// Whether a waiting reader still awaits a ring's envelope.
#[derive(Debug, PartialEq, Eq)]
enum Awaiting {
    /// One rang within [`RING_PATIENCE`] and is not given yet.
    Some,
    /// None.
    None,
    /// None now, but one lapsed unanswered since the last look.
    Lapsed,
}

impl Cluster {
    /// Waits for mail without a consumer, giving what comes by gets, until more comes at
    /// once than gets should carry ([`Waited::Busy`]) or the session ends. The first time
    /// the mailbox is found empty from `reader.next` on while the reader has not caught
    /// up, [`MailboxRead::CaughtUp`] goes to `tx`. Checks that fail are tried again (they
    /// never end the session; the bell still rings meanwhile). Errors if the subscription
    /// cannot be made or ends (the NATS client was closed).
    pub(super) async fn wait_for_mail(
        &self,
        reader: &mut Reader,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
    ) -> Result<Waited, String> {
        let mut bell = self
            .js
            .client()
            .subscribe(reader.subject.clone())
            .await
            .map_err(|e| format!("cannot subscribe to {}: {e}", reader.subject))?;
        let mut rings = Rings::default();
        let mut pace = Pace::new(Instant::now());
        let mut checks = Checks::new(Instant::now());
        let mut failures = 0u32;
        loop {
            let woke = tokio::select! {
                ring = bell.next() => match ring {
                    Some(ring) => {
                        rings.rung(ring.headers.as_ref(), Instant::now());
                        Woke::Rung
                    }
                    None => Woke::Unsubscribed,
                },
                changed = reader.disturbances.changed() => match changed {
                    Ok(()) => Woke::Disturbed,
                    Err(_) => Woke::ShuttingDown,
                },
                () = tokio::time::sleep_until(checks.due()) => Woke::Due,
            };
            match woke {
                Woke::Unsubscribed => {
                    return Err(format!("the subscription to {} ended", reader.subject));
                }
                Woke::ShuttingDown => return Ok(Waited::Ended),
                Woke::Disturbed => checks.disturbed(Instant::now()),
                Woke::Rung | Woke::Due => {
                    let drained = self.drain(reader, tx, &mut bell, &mut rings, &mut pace);
                    let drained = drained.await;
                    if !matches!(drained, Drained::Failed(_)) {
                        failures = 0;
                    }
                    match drained {
                        Drained::Empty if matches!(woke, Woke::Due) => {
                            checks.checked(Instant::now(), rand::random());
                        }
                        Drained::Empty => {}
                        Drained::Lapsed => checks.lapsed(Instant::now()),
                        Drained::Busy => return Ok(Waited::Busy),
                        Drained::Ended => return Ok(Waited::Ended),
                        Drained::Failed(e) => {
                            failures += 1;
                            if failures.is_multiple_of(WARN_AFTER_FAILURES) {
                                warn!(
                                    "cannot read {} ({e}; {failures} tries in a row): its \
                                     session gets no mail until NATS answers gets \
                                     (JetStream's direct and message gets)",
                                    reader.subject
                                );
                            } else {
                                debug!("cannot read {} ({e}); trying again", reader.subject);
                            }
                            checks.failed(Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// Gives `reader` the envelopes its mailbox holds from `reader.next` on, one get each,
    /// folding in rings that come meanwhile, until none is left and no ring is awaited;
    /// sends [`MailboxRead::CaughtUp`] the first time none is left (gets go to the
    /// stream's leader until then). Stops once `pace` says busy or [`BUSY_AFTER`] were
    /// given in this drain (a backlog), and (before catching up)
    /// if the subject of the earlier layout holds any: a consumer reads both in stream
    /// order.
    async fn drain(
        &self,
        reader: &mut Reader,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
        bell: &mut async_nats::Subscriber,
        rings: &mut Rings,
        pace: &mut Pace,
    ) -> Drained {
        let leader = reader.backlog.is_some();
        if leader && !reader.legacy_checked {
            match self.first_stored(&reader.legacy, reader.next, true).await {
                Ok(Some(_)) => return Drained::Busy,
                Ok(None) => reader.legacy_checked = true,
                Err(e) => return Drained::Failed(e),
            }
        }
        let mut retry = RING_RETRY;
        // Given in this drain, one after another: a backlog.
        let mut in_a_row = 0;
        // Looks that found nothing while a ring was awaited: after a few, the leader is
        // asked (a replica may be behind).
        let mut misses = 0;
        loop {
            while let Some(Some(ring)) = bell.next().now_or_never() {
                rings.rung(ring.headers.as_ref(), Instant::now());
            }
            let leader = reader.backlog.is_some() || misses >= LEADER_AFTER_MISSES;
            match self
                .first_stored(&reader.subject, reader.next, leader)
                .await
            {
                Ok(Some(envelope)) if envelope.sequence < reader.next => {
                    return Drained::Failed(format!(
                        "a get from {} answered {}",
                        reader.next, envelope.sequence
                    ));
                }
                // No room for it now (the client reads slowly): a consumer reads on, its
                // pulls bounded in bytes, rather than rings piling up here meanwhile.
                Ok(Some(envelope)) if !reader.has_room(envelope.payload.len(), tx) => {
                    return Drained::Busy;
                }
                Ok(Some(envelope)) => {
                    rings.stored(&envelope.headers);
                    let envelope = Envelope {
                        subject: envelope.subject.as_str(),
                        sequence: envelope.sequence,
                        headers: Some(&envelope.headers),
                        payload: envelope.payload.clone(),
                    };
                    if !self.give(reader, tx, envelope).await {
                        return Drained::Ended;
                    }
                    retry = RING_RETRY;
                    in_a_row += 1;
                    if pace.given(Instant::now()) || in_a_row >= BUSY_AFTER {
                        return Drained::Busy;
                    }
                }
                Ok(None) => {
                    if reader.backlog.take().is_some()
                        && tx.send(Ok(MailboxRead::CaughtUp)).await.is_err()
                    {
                        return Drained::Ended;
                    }
                    match rings.awaiting(Instant::now()) {
                        Awaiting::Some => {}
                        Awaiting::None => return Drained::Empty,
                        Awaiting::Lapsed => return Drained::Lapsed,
                    }
                    misses += 1;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RING_RETRY_MAX);
                }
                Err(e) => return Drained::Failed(e),
            }
        }
    }

    /// The first envelope stored on `subject` from sequence `from` on (`None` if there is
    /// none): from the stream's leader through the API gate if `leader`, else a direct get
    /// answered by any replica, through the gets' gate. Errors if the get fails or takes
    /// over [`GET_PATIENCE`].
    pub(super) async fn first_stored(
        &self,
        subject: &str,
        from: u64,
        leader: bool,
    ) -> Result<Option<StreamMessage>, String> {
        let from = from.max(1);
        if leader {
            let _through = self.api.pass().await;
            let get = self.mailbox.get_first_raw_message_by_subject(subject, from);
            found(get, |e| e.kind() == RawMessageErrorKind::NoMessageFound).await
        } else {
            let _through = self.gets.pass().await;
            let get = self
                .mailbox
                .direct_get_next_for_subject(subject, Some(from));
            found(get, |e| e.kind() == DirectGetErrorKind::NotFound).await
        }
    }
}

/// What a get answered, given at most [`GET_PATIENCE`]: the envelope, `None` if
/// `not_found` says its error means none is stored, else the error.
async fn found<E: std::fmt::Display>(
    get: impl std::future::Future<Output = Result<StreamMessage, E>>,
    not_found: impl Fn(&E) -> bool,
) -> Result<Option<StreamMessage>, String> {
    match tokio::time::timeout(GET_PATIENCE, get).await {
        Ok(Ok(envelope)) => Ok(Some(envelope)),
        Ok(Err(e)) if not_found(&e) => Ok(None),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The message id a publish carried (`Nats-Msg-Id`), if any.
fn message_id(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str())
}

/// The rings a waiting reader has not yet found the envelope of: by message id, and when
/// each rang.
#[derive(Debug, Default)]
struct Rings {
    awaited: HashMap<String, Instant>,
    /// The last ring that named no id (or came with [`RINGS_KEPT`] awaited): any envelope
    /// given after it answers it.
    unnamed: Option<Instant>,
}

impl Rings {
    /// A ring at `now`, of a publish with `headers`.
    fn rung(&mut self, headers: Option<&HeaderMap>, now: Instant) {
        match message_id(headers) {
            Some(id) if self.awaited.len() < RINGS_KEPT => {
                self.awaited.insert(id.to_owned(), now);
            }
            _ => self.unnamed = Some(now),
        }
    }

    /// An envelope with `headers` was given.
    fn stored(&mut self, headers: &HeaderMap) {
        if let Some(id) = message_id(Some(headers)) {
            self.awaited.remove(id);
        }
        self.unnamed = None;
    }

    /// Whether a ring within [`RING_PATIENCE`] of `now` is still awaited. Older ones are
    /// dropped (their envelopes were refused, are older than the reader's place, or are
    /// stored late: [`Awaiting::Lapsed`] says so, for a check soon).
    fn awaiting(&mut self, now: Instant) -> Awaiting {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < RING_PATIENCE;
        let before = self.awaited.len() + usize::from(self.unnamed.is_some());
        self.awaited.retain(|_, at| fresh(at));
        self.unnamed = self.unnamed.filter(fresh);
        let after = self.awaited.len() + usize::from(self.unnamed.is_some());
        match (after, before) {
            (0, 0) => Awaiting::None,
            (0, _) => Awaiting::Lapsed,
            _ => Awaiting::Some,
        }
    }
}

/// When a waiting reader next checks its mailbox: at once, [`BELL_SETTLE`] after the
/// first check that found nothing, then every [`IDLE_CHECK`] ± a quarter; after a failed
/// check, [`CHECK_RETRY`] later, doubling up to [`CHECK_RETRY_MAX`]; at once after a
/// disturbance (then settling again: the subscription was made again on reconnecting).
#[derive(Debug)]
struct Checks {
    due: Instant,
    /// Whether a check found nothing since the bell was last (re)subscribed.
    settled: bool,
    /// The wait after the next failure.
    retry: Duration,
}

impl Checks {
    /// A check due at `now`.
    fn new(now: Instant) -> Self {
        Self {
            due: now,
            settled: false,
            retry: CHECK_RETRY,
        }
    }

    /// When the next check is due.
    fn due(&self) -> Instant {
        self.due
    }

    /// A check at `now` found nothing; `jitter` in [0, 1) places the next periodic one.
    fn checked(&mut self, now: Instant, jitter: f64) {
        let wait = if self.settled {
            IDLE_CHECK.mul_f64(0.75 + jitter.clamp(0.0, 1.0) / 2.0)
        } else {
            BELL_SETTLE
        };
        self.due = now + wait;
        self.settled = true;
        self.retry = CHECK_RETRY;
    }

    /// A check at `now` failed.
    fn failed(&mut self, now: Instant) {
        self.due = now + self.retry;
        self.retry = (self.retry * 2).min(CHECK_RETRY_MAX);
    }

    /// The cluster was disturbed at `now`.
    fn disturbed(&mut self, now: Instant) {
        self.due = now;
        self.settled = false;
    }

    /// A ring's envelope was not found by `now` within [`RING_PATIENCE`] (stored late, or
    /// looked for on a replica behind): a check [`BELL_SETTLE`] later, then settling again.
    fn lapsed(&mut self, now: Instant) {
        self.due = now + BELL_SETTLE;
        self.settled = false;
    }
}

#[cfg(test)]
mod tests;
