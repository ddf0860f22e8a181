//! A mailbox reader with nothing to read holds no consumer. It waits on a core NATS
//! subscription to its recipient's mailbox subjects, the *bell*: NATS hands every message
//! published on a subject to its subscribers as well as to the stream that stores it, so
//! each envelope sent to the recipient rings it. It also checks the mailbox with a direct
//! get when it begins to wait, [`BELL_SETTLE`] later, after every disturbance, and about
//! every [`IDLE_CHECK`]. Mail found either way sends it back to reading through a consumer
//! from where it stopped ([`super::delivery`]), which gives whatever is stored from there,
//! so a bell rung before its envelope is stored (or for one the stream refuses) loses
//! nothing and gives nothing twice.
//!
//! Why: JetStream makes every consumer through the cluster's meta layer (a Raft
//! proposal), a few dozen a second on a small machine, and an idle one costs a heartbeat
//! every 5 s. A burst of logins (a relay restarted, its sessions coming back) queued one
//! consumer per session, and mail to the sessions at the back waited minutes; now a login
//! costs a subscription and a direct get, and a consumer is made only for mail.
//!
//! Where a bell can stay silent for a stored envelope, and what finds it:
//! - published before the subscription reached the node it was published on (interest
//!   travels between nodes in moments), or a check answered by a replica a moment behind
//!   its leader (direct gets are served by every replica): the check [`BELL_SETTLE`] after
//!   subscribing;
//! - published while this relay's NATS connection was down (subscriptions are made again
//!   when it returns): the reconnection is a disturbance, and a check follows it;
//! - the route between two live nodes cut while the stream still stores: the check every
//!   [`IDLE_CHECK`] or so, the bound on the delay in that case.

use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::Cluster;
use super::delivery::{MailboxRead, Reader};

/// How long after subscribing (or after a disturbance) a waiting reader checks its
/// mailbox a second time.
const BELL_SETTLE: Duration = Duration::from_secs(1);

/// About how often a waiting reader checks its mailbox: each time within a quarter of this
/// either way, so that readers who began together (a burst of logins) spread out. Each
/// check is one or two direct gets (the user's subjects, then the earlier layout's).
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// How long after a failed check a reader tries again; doubled after each failure in a
/// row, up to [`IDLE_CHECK`].
const CHECK_RETRY: Duration = Duration::from_secs(1);

/// How long one direct get of a check may take.
const CHECK_PATIENCE: Duration = Duration::from_secs(5);

/// How a wait for mail ended.
pub(super) enum Waited {
    /// The mailbox may hold an envelope from the reader's next sequence on.
    Mail,
    /// The session ended, or the relay is shutting down.
    Ended,
}

/// What woke a waiting reader.
enum Woke {
    /// The bell rang (`false`: the subscription ended, the NATS client is closed).
    Rung(bool),
    /// The cluster was disturbed (`false`: the relay is shutting down).
    Disturbed(bool),
    /// A check is due.
    Due,
}

impl Cluster {
    /// Waits, holding no consumer, until `reader`'s mailbox may hold an envelope from
    /// `reader.next` on: its bell rang, or a check found one. A check that finds nothing
    /// while the reader has not caught up sends [`MailboxRead::CaughtUp`] to `tx` (the
    /// backlog is read). Checks that fail are tried again (they never end the session;
    /// the bell still rings meanwhile). Errors if the subscription cannot be made or ends
    /// (the NATS client was closed).
    pub(super) async fn wait_for_mail(
        &self,
        reader: &mut Reader,
        tx: &mpsc::Sender<Result<MailboxRead, String>>,
    ) -> Result<Waited, String> {
        let client = self.js.client();
        let mut bells = Vec::with_capacity(2);
        for subject in [&reader.subject, &reader.legacy] {
            let bell = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
            bells.push(bell);
        }
        let mut bells = futures_util::stream::select_all(bells);
        let mut checks = Checks::new(Instant::now());
        loop {
            let woke = tokio::select! {
                rung = bells.next() => Woke::Rung(rung.is_some()),
                changed = reader.disturbances.changed() => Woke::Disturbed(changed.is_ok()),
                () = tokio::time::sleep_until(checks.due()) => Woke::Due,
            };
            match woke {
                Woke::Rung(true) => return Ok(Waited::Mail),
                Woke::Rung(false) => {
                    return Err(format!("the subscription to {} ended", reader.subject));
                }
                Woke::Disturbed(false) => return Ok(Waited::Ended),
                Woke::Disturbed(true) => checks.disturbed(Instant::now()),
                Woke::Due => match self.mail_after(reader).await {
                    Ok(true) => return Ok(Waited::Mail),
                    Ok(false) => {
                        checks.checked(Instant::now(), rand::random());
                        if reader.backlog.take().is_some()
                            && tx.send(Ok(MailboxRead::CaughtUp)).await.is_err()
                        {
                            return Ok(Waited::Ended);
                        }
                    }
                    Err(e) => {
                        debug!("cannot check {} ({e}); trying again", reader.subject);
                        checks.failed(Instant::now());
                    }
                },
            }
        }
    }

    /// Whether `reader`'s mailbox holds an envelope from `reader.next` on: a direct get of
    /// the first one on its subjects, then (if none) on its subject of the earlier layout,
    /// through the API gate. Errors if a get fails or takes over [`CHECK_PATIENCE`].
    async fn mail_after(&self, reader: &Reader) -> Result<bool, String> {
        let _through = self.api.pass().await;
        let from = reader.next.max(1);
        for subject in [&reader.subject, &reader.legacy] {
            let get = self
                .mailbox
                .direct_get_next_for_subject(subject.as_str(), Some(from));
            match tokio::time::timeout(CHECK_PATIENCE, get).await {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out".into()),
            }
        }
        Ok(false)
    }
}

/// When a waiting reader next checks its mailbox: at once, [`BELL_SETTLE`] after the
/// first check that found nothing, then every [`IDLE_CHECK`] ± a quarter; after a failed
/// check, [`CHECK_RETRY`] later, doubling up to [`IDLE_CHECK`]; at once after a
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
        self.retry = (self.retry * 2).min(IDLE_CHECK);
    }

    /// The cluster was disturbed at `now`.
    fn disturbed(&mut self, now: Instant) {
        self.due = now;
        self.settled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_reader_checks_at_once_after_settling_then_spread_around_the_period() {
        let start = Instant::now();
        let mut checks = Checks::new(start);
        assert_eq!(checks.due(), start);
        checks.checked(start, 0.0);
        assert_eq!(checks.due(), start + BELL_SETTLE);
        let settled = start + BELL_SETTLE;
        checks.checked(settled, 0.0);
        assert_eq!(checks.due(), settled + IDLE_CHECK.mul_f64(0.75));
        checks.checked(settled, 0.999);
        assert!(checks.due() > settled + IDLE_CHECK.mul_f64(1.24));
        assert!(checks.due() < settled + IDLE_CHECK.mul_f64(1.25));
        // Out-of-range jitter stays within the quarter.
        checks.checked(settled, 7.0);
        assert_eq!(checks.due(), settled + IDLE_CHECK.mul_f64(1.25));
    }

    #[test]
    fn failed_checks_back_off_to_the_period_and_a_success_resets_the_backoff() {
        let start = Instant::now();
        let mut checks = Checks::new(start);
        let mut waits = Vec::new();
        for _ in 0..7 {
            checks.failed(start);
            waits.push(checks.due() - start);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        checks.checked(start, 0.5);
        checks.failed(start);
        assert_eq!(checks.due(), start + CHECK_RETRY);
    }

    #[test]
    fn a_disturbance_makes_a_check_due_at_once_and_settles_again() {
        let start = Instant::now();
        let mut checks = Checks::new(start);
        checks.checked(start, 0.0);
        checks.checked(start, 0.0);
        let later = start + Duration::from_secs(3);
        checks.disturbed(later);
        assert_eq!(checks.due(), later);
        checks.checked(later, 0.0);
        assert_eq!(checks.due(), later + BELL_SETTLE);
    }
}
