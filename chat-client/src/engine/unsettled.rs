//! Acceptances by the relay that could not be recorded (the store failed: a full disk).
//!
//! The relay has what it accepted, so such an item is **not sent again**: it stays marked
//! in flight (on this connection and the next ones) while recording it is retried every
//! [`RESETTLE_EVERY`]. Sending it again at once would fail to record again and go round
//! as fast as the relay answers, each round a copy stored for the recipient (who drops it
//! by id) until the relay refuses more. A client that stops first sends it again when it
//! starts: nothing recorded, nothing lost. Telling the failure follows
//! [`SettlingFailures`]: once per run, not once per answer.

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
    /// Receipts for `ids` from `peer`, sent in our `epoch`, are owed no more.
    Receipts {
        peer: String,
        ids: Vec<MessageId>,
        epoch: u32,
    },
    /// Retry requests to `peer` for its `epochs`, sent in our `epoch`, are owed no more.
    Retries {
        peer: String,
        epochs: Vec<u32>,
        epoch: u32,
    },
}

/// Which failures to record the relay's acceptances are told (with a `store_error`): the
/// first of a run, and one of another kind (a full disk, or not) than the one told last;
/// the same kind again, until a record succeeds, is only logged. Answers come by the
/// hundred while a disk is full, and each would fail the same way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SettlingFailures {
    /// `Some(full)`: a failure was told, of that kind, and no record succeeded since.
    told: Option<bool>,
}

impl SettlingFailures {
    /// A record succeeded: the next failure is told.
    pub(super) fn succeeded(&mut self) {
        self.told = None;
    }

    /// A record failed (`full`: for lack of disk space). Returns whether to tell it.
    pub(super) fn failed(&mut self, full: bool) -> bool {
        self.told.replace(full) != Some(full)
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
                let full = e.is_full();
                if self.settling_fails.failed(full) {
                    self.store_error(e);
                } else {
                    if full {
                        self.store.reclaim_log();
                    }
                    warn!("store error again (told already): {e}");
                }
                let answer = answer();
                self.keep_in_flight(&answer);
                self.unsettled.push(answer);
                let at = Instant::now() + RESETTLE_EVERY;
                self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                None
            }
        }
    }

    /// On a new connection (its in-flight sets start empty): what the relay accepted
    /// before, not yet recorded, is still not to be sent again.
    pub(super) fn unsettled_in_flight(&mut self) {
        for answer in std::mem::take(&mut self.unsettled) {
            self.keep_in_flight(&answer);
            self.unsettled.push(answer);
        }
    }

    /// Records again what could not be recorded (on the retry timer). What fails again
    /// waits for the next round.
    pub(super) fn resettle(&mut self) {
        for answer in std::mem::take(&mut self.unsettled) {
            match answer {
                Unsettled::Sent {
                    id,
                    to,
                    epoch,
                    accepted_at,
                } => {
                    let recorded = self.store.mark_sent(&id, epoch, accepted_at);
                    let retry = || Unsettled::Sent {
                        id,
                        to: to.clone(),
                        epoch,
                        accepted_at,
                    };
                    if let Some(done) = self.settled(recorded, retry) {
                        self.in_flight.remove(&id);
                        if done.is_some() {
                            self.sink.emit(Event::Sent {
                                to,
                                id: id_hex(&id),
                            });
                        }
                    }
                }
                Unsettled::GroupCopy {
                    group,
                    id,
                    member,
                    accepted_at,
                } => {
                    let recorded = self.store.group_send_done(&id, &member, accepted_at);
                    let retry = || Unsettled::GroupCopy {
                        group,
                        id,
                        member: member.clone(),
                        accepted_at,
                    };
                    if let Some(now_sent) = self.settled(recorded, retry) {
                        self.group_in_flight.remove(&(id, member));
                        if now_sent {
                            self.sink.emit(Event::GroupSent {
                                group: id_hex(&group),
                                id: id_hex(&id),
                            });
                        }
                    }
                }
                Unsettled::Receipts { peer, ids, epoch } => {
                    let recorded = self.store.receipts_sent(&peer, &ids, Some(epoch));
                    let retry = || Unsettled::Receipts {
                        peer: peer.clone(),
                        ids: ids.clone(),
                        epoch,
                    };
                    if self.settled(recorded, retry).is_some() {
                        for id in ids {
                            self.receipts_in_flight.remove(&(peer.clone(), id));
                        }
                    }
                }
                Unsettled::Retries {
                    peer,
                    epochs,
                    epoch,
                } => {
                    let recorded = self.store.retries_sent(&peer, &epochs, Some(epoch));
                    let retry = || Unsettled::Retries {
                        peer: peer.clone(),
                        epochs: epochs.clone(),
                        epoch,
                    };
                    if self.settled(recorded, retry).is_some() {
                        for e in epochs {
                            self.retries_in_flight.remove(&(peer.clone(), e));
                        }
                    }
                }
            }
        }
    }

    /// Marks `answer`'s item in flight, so that no flush sends it again.
    fn keep_in_flight(&mut self, answer: &Unsettled) {
        match answer {
            Unsettled::Sent { id, epoch, .. } => {
                self.in_flight.insert(*id, *epoch);
            }
            Unsettled::GroupCopy { id, member, .. } => {
                self.group_in_flight.insert((*id, member.clone()));
            }
            Unsettled::Receipts { peer, ids, .. } => {
                for id in ids {
                    self.receipts_in_flight.insert((peer.clone(), *id));
                }
            }
            Unsettled::Retries { peer, epochs, .. } => {
                for e in epochs {
                    self.retries_in_flight.insert((peer.clone(), *e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SettlingFailures;

    #[test]
    fn a_run_of_one_kind_is_told_once() {
        let mut f = SettlingFailures::default();
        assert!(f.failed(true));
        assert!(!f.failed(true));
        assert!(!f.failed(true));
        f.succeeded();
        assert!(f.failed(true), "a new run after a success is told");
        assert!(!f.failed(true));
    }

    #[test]
    fn another_kind_is_told_too() {
        let mut f = SettlingFailures::default();
        assert!(f.failed(true));
        assert!(f.failed(false), "not a full disk: something else to tell");
        assert!(!f.failed(false));
        assert!(f.failed(true), "full again, after the other kind");
        f.succeeded();
        assert!(f.failed(false));
    }
}
