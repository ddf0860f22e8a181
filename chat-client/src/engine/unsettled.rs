//! Acceptances by the relay that could not be recorded (the store failed: a full disk).
//!
//! The relay has what it accepted, so such an item is **not sent again**: it stays marked
//! in flight (on this connection and the next ones) while recording it is retried every
//! [`RESETTLE_EVERY`]. Sending it again at once would fail to record again and go round
//! as fast as the relay answers, each round a copy stored for the recipient (who drops it
//! by id) until the relay refuses more. A client that stops first sends it again when it
//! starts: nothing recorded, nothing lost. Telling the failure follows
//! [`SettlingFailures`]: once per run, not once per answer.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

use chat_protocol::e2e::MessageId;
use chat_protocol::group::GroupId;
use tokio::time::Instant;
use tracing::warn;

use super::Engine;
use crate::api::{Event, id_hex};
use crate::store::StoreError;

/// How long after a failed record it is tried again.
pub(super) const RESETTLE_EVERY: Duration = Duration::from_secs(1);

/// An answer of the relay whose record failed, to record again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unsettled {
    /// Our text `id` to `to` (sealed in `epoch`) was accepted at `accepted_at` (ms).
    Sent {
        id: MessageId,
        to: String,
        epoch: u32,
        accepted_at: u64,
    },
    /// `member`'s copy of our group message `id` was accepted at `accepted_at` (ms), or
    /// refused for good (`None`).
    GroupCopy {
        group: GroupId,
        id: MessageId,
        member: String,
        accepted_at: Option<u64>,
    },
    /// `member`'s copy of our group message `id` is to be withdrawn (they left `group`).
    Withdrawal {
        group: GroupId,
        id: MessageId,
        member: String,
    },
    /// Our text `id` failed for good (`reason`, `message`: the `failed` event's fields).
    Failed {
        id: MessageId,
        reason: String,
        message: String,
    },
    /// Receipts for `ids` from `peer` are owed no more: sent in our `epoch`, or refused
    /// for good (`None`).
    Receipts {
        peer: String,
        ids: Vec<MessageId>,
        epoch: Option<u32>,
    },
    /// Retry requests to `peer` for its `epochs` are owed no more: sent in our `epoch`,
    /// or refused for good (`None`).
    Retries {
        peer: String,
        epochs: Vec<u32>,
        epoch: Option<u32>,
    },
}

impl Unsettled {
    /// Whether this went to `peer` sealed in one of our `epochs` (`None`: in any).
    fn sealed_for(&self, peer: &str, epochs: Option<&[u32]>) -> bool {
        let (to, epoch) = match self {
            Self::Sent { to, epoch, .. } => (to, Some(*epoch)),
            Self::Receipts { peer, epoch, .. } | Self::Retries { peer, epoch, .. } => {
                (peer, *epoch)
            }
            Self::GroupCopy { .. } | Self::Withdrawal { .. } | Self::Failed { .. } => {
                return false;
            }
        };
        to == peer
            && match (epochs, epoch) {
                (None, _) => true,
                (Some(list), Some(e)) => list.contains(&e),
                (Some(_), None) => false,
            }
    }
}

/// Which failures to record the relay's answers are told (with a `store_error`): the
/// first, one of another kind (a full disk, or not) than the one told last, and one of
/// the same kind only after a record succeeded and [`TELL_AGAIN_AFTER`] has passed since
/// it was told; the rest are only logged. Answers come by the hundred while a disk is
/// full, and each would fail the same way; a nearly full disk lets some records through
/// between failures (two copies of one group message: one recorded, one not), which is
/// still the same episode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SettlingFailures {
    /// The kind of the failure told last (`true`: a full disk), and when.
    told: Option<(bool, Instant)>,
    /// A record succeeded since.
    recovered: bool,
}

/// How long a failure of the kind told last goes untold, records succeeding or not.
pub(super) const TELL_AGAIN_AFTER: Duration = Duration::from_secs(30);

impl SettlingFailures {
    /// A record succeeded.
    pub(super) fn succeeded(&mut self) {
        self.recovered = true;
    }

    /// A record failed at `now` (`full`: for lack of disk space). Returns whether to
    /// tell it.
    pub(super) fn failed(&mut self, full: bool, now: Instant) -> bool {
        let tell = match self.told {
            None => true,
            Some((kind, at)) => {
                kind != full || (self.recovered && now.duration_since(at) >= TELL_AGAIN_AFTER)
            }
        };
        if tell {
            self.told = Some((full, now));
            self.recovered = false;
        }
        tell
    }
}

impl Engine {
    /// The result of recording `answer`, what the relay accepted. A failure leaves the
    /// item as the store had it (a text stays queued) and keeps it in flight, not to be
    /// sent again, while the record is retried (the module's doc); it is told as
    /// [`SettlingFailures`] says.
    pub(super) fn settled<T>(
        &mut self,
        result: Result<T, StoreError>,
        answer: impl FnOnce() -> Unsettled,
    ) -> Option<T> {
        match result {
            Ok(value) => {
                self.settling_fails.succeeded();
                Some(value)
            }
            Err(e) => {
                self.store_failed(e);
                let answer = answer();
                self.set_in_flight(&answer, true);
                self.unsettled.push(answer);
                let at = Instant::now() + RESETTLE_EVERY;
                self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                None
            }
        }
    }

    /// A store failure told as [`SettlingFailures`] says: once per run of one kind.
    /// For failures that recur on their own (each answer, each housekeeping round).
    pub(super) fn store_failed(&mut self, e: StoreError) {
        let full = e.is_full();
        if self.settling_fails.failed(full, Instant::now()) {
            self.store_error(e);
        } else {
            if full {
                self.store.reclaim_log();
            }
            warn!("store error again (told already): {e}");
        }
    }

    /// On a new connection (its in-flight sets start empty): what the relay accepted
    /// before, not yet recorded, is still not to be sent again.
    pub(super) fn unsettled_in_flight(&mut self) {
        let unsettled = std::mem::take(&mut self.unsettled);
        for answer in &unsettled {
            self.set_in_flight(answer, true);
        }
        self.unsettled = unsettled;
    }

    /// What went to `peer` sealed in one of our `epochs` (`None`: in any, e.g. its key
    /// changed) and waits to be recorded is to be sent again after all, sealed anew: the
    /// peer cannot open it (it asked for those epochs again). The store still has it
    /// queued or owed, so the next flush takes it.
    pub(super) fn unsettled_resealed(&mut self, peer: &str, epochs: Option<&[u32]>) {
        let (again, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unsettled)
            .into_iter()
            .partition(|answer| answer.sealed_for(peer, epochs));
        self.unsettled = kept;
        for answer in &again {
            self.set_in_flight(answer, false);
        }
        self.flush_due = true;
    }

    /// Records again what could not be recorded (on the retry timer), oldest first; at
    /// the first that fails again the rest wait, untried, for the next round (a full
    /// disk costs one failed write a round, not one per item).
    pub(super) fn resettle(&mut self) {
        let mut waiting = std::mem::take(&mut self.unsettled).into_iter();
        while let Some(answer) = waiting.next() {
            let before = self.unsettled.len();
            self.resettle_one(answer);
            if self.unsettled.len() > before {
                self.unsettled.extend(waiting);
                return;
            }
        }
    }

    /// Records one answer again, as when it came; on failure it goes back to
    /// `unsettled`.
    fn resettle_one(&mut self, answer: Unsettled) {
        self.set_in_flight(&answer, false);
        match answer {
            Unsettled::Sent {
                id,
                to,
                epoch,
                accepted_at,
            } => self.record_sent(id, to, epoch, accepted_at),
            Unsettled::GroupCopy {
                group,
                id,
                member,
                accepted_at,
            } => self.record_group_copy(group, id, &member, accepted_at),
            Unsettled::Withdrawal { group, id, member } => {
                // Back in the group meanwhile: the next flush sends the copy after all.
                if !self.sends_to(&group, &member) {
                    self.withdraw_group_send(group, id, &member);
                }
            }
            Unsettled::Failed {
                id,
                reason,
                message,
            } => self.fail_message(&id, &reason, &message),
            Unsettled::Receipts { peer, ids, epoch } => self.record_receipts(peer, ids, epoch),
            Unsettled::Retries {
                peer,
                epochs,
                epoch,
            } => self.record_retries(peer, epochs, epoch),
        }
    }

    /// Our text `id` to `to`, sealed in `epoch`, was accepted at `accepted_at` (ms).
    pub(super) fn record_sent(&mut self, id: MessageId, to: String, epoch: u32, accepted_at: u64) {
        let recorded = self.store.mark_sent(&id, epoch, accepted_at);
        let unsettled = || Unsettled::Sent {
            id,
            to: to.clone(),
            epoch,
            accepted_at,
        };
        if let Some(Some(_)) = self.settled(recorded, unsettled) {
            self.sink.emit(Event::Sent {
                to,
                id: id_hex(&id),
            });
        }
    }

    /// `member`'s copy of our group message `id` was accepted at `accepted_at` (ms), or
    /// refused for good (`None`).
    pub(super) fn record_group_copy(
        &mut self,
        group: GroupId,
        id: MessageId,
        member: &str,
        accepted_at: Option<u64>,
    ) {
        let recorded = self.store.group_send_done(&id, member, accepted_at);
        let unsettled = || Unsettled::GroupCopy {
            group,
            id,
            member: member.to_owned(),
            accepted_at,
        };
        if let Some(true) = self.settled(recorded, unsettled) {
            self.sink.emit(Event::GroupSent {
                group: id_hex(&group),
                id: id_hex(&id),
            });
        }
    }

    /// Receipts for `ids` to `peer` are owed no more: sent in our `epoch`, or refused
    /// for good (`None`).
    pub(super) fn record_receipts(
        &mut self,
        peer: String,
        ids: Vec<MessageId>,
        epoch: Option<u32>,
    ) {
        let recorded = self.store.receipts_sent(&peer, &ids, epoch);
        self.settled(recorded, || Unsettled::Receipts { peer, ids, epoch });
    }

    /// Retry requests to `peer` for its `epochs` are owed no more: sent in our `epoch`,
    /// or refused for good (`None`).
    pub(super) fn record_retries(&mut self, peer: String, epochs: Vec<u32>, epoch: Option<u32>) {
        let recorded = self.store.retries_sent(&peer, &epochs, epoch);
        self.settled(recorded, || Unsettled::Retries {
            peer,
            epochs,
            epoch,
        });
    }

    /// Marks `answer`'s item in flight (`flying`), so that no flush sends it again, or
    /// lifts the mark, so that a flush may.
    fn set_in_flight(&mut self, answer: &Unsettled, flying: bool) {
        fn mark<T: Eq + Hash>(set: &mut HashSet<T>, item: T, flying: bool) {
            if flying {
                set.insert(item);
            } else {
                set.remove(&item);
            }
        }
        match answer {
            Unsettled::Sent { id, .. } | Unsettled::Failed { id, .. } => {
                mark(&mut self.in_flight, *id, flying);
            }
            Unsettled::GroupCopy { id, member, .. } | Unsettled::Withdrawal { id, member, .. } => {
                mark(&mut self.group_in_flight, (*id, member.clone()), flying);
            }
            Unsettled::Receipts { peer, ids, .. } => {
                for id in ids {
                    mark(&mut self.receipts_in_flight, (peer.clone(), *id), flying);
                }
            }
            Unsettled::Retries { peer, epochs, .. } => {
                for e in epochs {
                    mark(&mut self.retries_in_flight, (peer.clone(), *e), flying);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{SettlingFailures, TELL_AGAIN_AFTER, Unsettled};

    #[test]
    fn what_was_sealed_for_a_peer_in_an_epoch_is_found() {
        let sent = Unsettled::Sent {
            id: [1; 16],
            to: "bob".into(),
            epoch: 3,
            accepted_at: 0,
        };
        assert!(sent.sealed_for("bob", Some(&[2, 3])));
        assert!(!sent.sealed_for("bob", Some(&[4])));
        assert!(!sent.sealed_for("carol", Some(&[3])));
        assert!(sent.sealed_for("bob", None), "a changed key: any epoch");
        let refused = Unsettled::Receipts {
            peer: "bob".into(),
            ids: vec![[2; 16]],
            epoch: None,
        };
        assert!(
            !refused.sealed_for("bob", Some(&[3])),
            "refused: sealed in none"
        );
        assert!(refused.sealed_for("bob", None));
        let retries = Unsettled::Retries {
            peer: "bob".into(),
            epochs: vec![7],
            epoch: Some(5),
        };
        assert!(
            retries.sealed_for("bob", Some(&[5])),
            "by the epoch it went in"
        );
        assert!(
            !retries.sealed_for("bob", Some(&[7])),
            "not by the epochs it asks for"
        );
        let failed = Unsettled::Failed {
            id: [1; 16],
            reason: "expired".into(),
            message: String::new(),
        };
        assert!(
            !failed.sealed_for("bob", None),
            "not sent again: nothing to reseal"
        );
    }

    #[test]
    fn a_run_of_one_kind_is_told_once() {
        let t0 = Instant::now();
        let mut f = SettlingFailures::default();
        assert!(f.failed(true, t0));
        assert!(!f.failed(true, t0));
        assert!(
            !f.failed(true, t0 + TELL_AGAIN_AFTER * 3),
            "no record between"
        );
        f.succeeded();
        let later = t0 + TELL_AGAIN_AFTER * 4;
        assert!(f.failed(true, later), "a new run, after a success, later");
        assert!(!f.failed(true, later));
    }

    #[test]
    fn records_getting_through_between_failures_are_one_episode() {
        // A nearly full disk: one copy's record succeeds, the next one's fails, over
        // and over (a group message to two members each).
        let t0 = Instant::now();
        let mut f = SettlingFailures::default();
        assert!(f.failed(true, t0));
        for n in 1..=10 {
            f.succeeded();
            let now = t0 + Duration::from_millis(n);
            assert!(!f.failed(true, now), "told again at round {n}");
        }
        f.succeeded();
        assert!(
            f.failed(true, t0 + TELL_AGAIN_AFTER),
            "still failing, much later"
        );
    }

    #[test]
    fn another_kind_is_told_too() {
        let t0 = Instant::now();
        let mut f = SettlingFailures::default();
        assert!(f.failed(true, t0));
        assert!(
            f.failed(false, t0),
            "not a full disk: something else to tell"
        );
        assert!(!f.failed(false, t0));
        assert!(f.failed(true, t0), "full again, after the other kind");
        f.succeeded();
        assert!(f.failed(false, t0));
    }
}
