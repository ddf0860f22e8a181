//! Sending to a contact whose queue at the relay is full (`recipient_queue_full`): how
//! long their messages are held, what ends a hold sooner (they came online, something
//! from them arrived: they are reading their queue), how few go while it stays full, and
//! how often the user is told.
//!
//! Holds grow from `queue_full_retry` (1 s) by doubling per retry round refused, at most
//! `retry_later` (30 s), or [`ONLINE_RETRY`] while the contact is online. While a queue is
//! full, one message to that contact is in flight at a time (a probe): a round that
//! uploaded the whole send window would have every message after the first refused
//! anyway (the relay holds a recipient's later sends behind a refused one), at the cost
//! of their upload and a refusal each.

use std::collections::hash_map::Entry;
use std::time::Duration;

use tokio::time::Instant;

use super::Engine;

/// Longest hold while the contact is online: their queue drains as they read it.
const ONLINE_RETRY: Duration = Duration::from_secs(4);
/// A contact's full queue is told to the user at most this often.
const TOLD_EVERY: Duration = Duration::from_secs(60);

/// A contact whose queue at the relay was found full.
#[derive(Debug)]
pub(super) struct FullQueue {
    /// Retry rounds refused since a send to them was last accepted, they came online, or
    /// something from them arrived: the next hold doubles with each.
    rounds: u32,
    /// No send to them has been accepted since the last refusal: one goes at a time.
    probing: bool,
    /// When a send to them was last refused.
    last: Instant,
    /// When the user was last told.
    told: Instant,
}

impl Engine {
    /// How long to hold `peer` after the relay refused a send to them
    /// `recipient_queue_full`: `queue_full_retry` doubled for each retry round refused
    /// before this one (the refusals of sends pipelined together count once), at most
    /// `retry_later`, or [`ONLINE_RETRY`] while they are online. A refusal more than
    /// twice `retry_later` after the previous one starts afresh. Returns the delay and
    /// whether to tell the user (at most once per [`TOLD_EVERY`] and contact).
    pub(super) fn queue_full_delay(&mut self, peer: &str) -> (Duration, bool) {
        let now = Instant::now();
        let held = self.hold.get(peer).is_some_and(|until| *until > now);
        let (full, tell) = match self.queue_full.entry(peer.to_owned()) {
            Entry::Occupied(entry) => {
                let full = entry.into_mut();
                if now.duration_since(full.last) > 2 * self.config.retry_later {
                    full.rounds = 0;
                }
                let tell = now.duration_since(full.told) >= TOLD_EVERY;
                if tell {
                    full.told = now;
                }
                (full, tell)
            }
            Entry::Vacant(entry) => (
                entry.insert(FullQueue {
                    rounds: 0,
                    probing: true,
                    last: now,
                    told: now,
                }),
                true,
            ),
        };
        if full.rounds == 0 || !held {
            full.rounds += 1;
        }
        full.probing = true;
        full.last = now;
        let mut delay = self
            .config
            .queue_full_retry
            .saturating_mul(1 << (full.rounds - 1).min(16))
            .min(self.config.retry_later);
        if self.online_peers.contains(peer) {
            delay = delay.min(ONLINE_RETRY);
        }
        (delay, tell)
    }

    /// What the user is told when a send to `peer` is refused `recipient_queue_full`
    /// (`relay_says`: the relay's reason, its advice to try again left out: we do) and
    /// held for `delay`.
    pub(super) fn full_queue_notice(
        &self,
        peer: &str,
        relay_says: &str,
        delay: Duration,
    ) -> String {
        let reason = super::replies::relay_reason(relay_says);
        let first = delay.as_secs().max(1);
        if self.online_peers.contains(peer) {
            format!(
                "{reason}; your messages to {peer} stay queued and go as {peer} reads that \
                 queue: tried again in {first} s, then at most {} s apart",
                ONLINE_RETRY.as_secs()
            )
        } else {
            format!(
                "{reason}; your messages to {peer} stay queued: tried again in {first} s, \
                 then at most {} s apart, and at once when {peer} comes online",
                self.config.retry_later.as_secs().max(1)
            )
        }
    }

    /// Whether messages to `peer` go one at a time: their queue was found full and no
    /// send to them was accepted since.
    pub(super) fn probing(&self, peer: &str) -> bool {
        self.queue_full.get(peer).is_some_and(|full| full.probing)
    }

    /// The relay says watched `peer` is `online` (or not).
    pub(super) fn peer_presence(&mut self, peer: &str, online: bool) {
        if online {
            self.online_peers.insert(peer.to_owned());
            self.peer_active(peer);
        } else {
            self.online_peers.remove(peer);
        }
    }

    /// The relay accepted a send to `peer`: all may go again, and a later full queue
    /// starts the backoff afresh.
    pub(super) fn peer_accepted(&mut self, peer: &str) {
        if let Some(full) = self.queue_full.get_mut(peer) {
            full.rounds = 0;
            // The rest waited for this answer: they go now.
            self.flush_due |= std::mem::take(&mut full.probing);
        }
    }

    /// Forgets contacts whose queue was last found full long enough ago.
    pub(super) fn forget_full_queues(&mut self) {
        self.queue_full
            .retain(|_, full| full.probing || full.told.elapsed() < TOLD_EVERY);
    }

    /// `peer` shows they are online (a presence notice) or reading (an envelope from them,
    /// such as a receipt for what was waiting for them). Their queue at the relay drains
    /// as they read it, so a hold for a full queue ends at once and its backoff starts
    /// afresh: messages to a contact who was offline with a full queue go as soon as they
    /// are back, not after the rest of a pause of up to `retry_later`. Only one goes until
    /// it is accepted (the contact may not have read their queue yet), so this costs at
    /// most one refused send per sign. Other holds stay.
    pub(super) fn peer_active(&mut self, peer: &str) {
        let Some(full) = self.queue_full.get_mut(peer).filter(|full| full.probing) else {
            return;
        };
        full.rounds = 0;
        let Some(until) = self.hold.get_mut(peer) else {
            return;
        };
        let now = Instant::now();
        if *until > now {
            *until = now;
            self.flush_due = true;
        }
    }
}
