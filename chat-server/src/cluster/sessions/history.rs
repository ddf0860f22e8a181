//! The sessions bucket's history: whether it was lost (made anew, or emptied by restarts
//! under a connected relay), and writing this relay's sessions again after a loss or a
//! sweep (see the parent module's doc).

use chat_protocol::{ErrorCode, Username};
use futures_util::StreamExt;
use tracing::{debug, warn};

use super::super::api_gate::API_IN_FLIGHT;
use super::super::token;
use super::Sessions;
use super::login::Step;
use crate::router::Router;

/// What a relay had seen of the sessions bucket before asking for its state.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The highest revision seen.
    high: u64,
    /// A login found a remembered write missing from the bucket.
    lost: bool,
    /// The bucket stream's creation time (Unix ns).
    created: i128,
}

impl Seen {
    /// Given the stream's last sequence and creation time as its leader answered: how the
    /// bucket lost its history, or `None` if it kept it.
    fn verdict(self, last: u64, created: i128) -> Option<&'static str> {
        if created != self.created {
            Some("was made anew")
        } else if self.lost || last < self.high {
            Some("lost its history")
        } else {
            None
        }
    }
}

impl Sessions {
    /// Checks whether the sessions bucket lost its history (see the module's doc); if so,
    /// forgets what was learnt from it and writes this relay's sessions again. Returns
    /// whether it could tell: not if NATS did not answer, or the bucket's stream has no
    /// leader.
    pub(in crate::cluster) async fn check_history(&self, router: &Router) -> bool {
        // One check at a time (a heartbeat's and the link's return may meet).
        let _checking = self.checking.lock().await;
        // What was seen before asking: a write seen after the leader answered may be
        // above the last sequence it gave, which is no loss.
        let seen = {
            let known = self.known();
            Seen {
                high: known.high,
                lost: known.lost,
                created: known.created,
            }
        };
        // A fresh stream info request to the stream's leader (`kv::Store::status` only
        // returns the info cached when the bucket was opened).
        // Bounded by a try: a request that reaches the stream while it has no leader is
        // never answered, and would hold the relay's return for the client's timeout.
        let asked =
            tokio::time::timeout(super::super::patience::TRY, self.bucket.stream.get_info());
        let Ok(asked) = asked.await else {
            debug!("the session bucket's state was not read within a try");
            return false;
        };
        let info = match asked {
            // Without a leader a member answers from its own copy, which after a restart
            // may be empty while another member still holds the history: not a verdict.
            Ok(info) if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) => {
                return false;
            }
            Ok(info) => info,
            Err(e) => {
                debug!("cannot read the session bucket's state: {e}");
                return false;
            }
        };
        let (last, created) = (
            info.state.last_sequence,
            info.created.unix_timestamp_nanos(),
        );
        self.known().created = created;
        let Some(how) = seen.verdict(last, created) else {
            return true;
        };
        warn!(
            "the session bucket {how} (last revision {last}, {} seen): following it \
             afresh and writing this relay's sessions again",
            seen.high
        );
        // The followers read the bucket afresh (and presence with it).
        self.reset();
        {
            let mut known = self.known();
            let mine: Vec<Username> = known.mine.keys().cloned().collect();
            known.rewrite.extend(mine);
        }
        self.write_pending(router).await;
        true
    }

    /// Writes again the sessions in [`super::Known::rewrite`] that are still live here,
    /// [`API_IN_FLIGHT`] at a time (each is a read from the bucket's leader and a write:
    /// one after another, a relay's thousands of users stayed hidden for many seconds).
    pub(super) async fn write_pending(&self, router: &Router) {
        let pending: Vec<(Username, super::Mine)> = {
            let mut known = self.known();
            let pending = std::mem::take(&mut known.rewrite);
            pending
                .into_iter()
                .filter_map(|user| Some((user.clone(), *known.mine.get(&user)?)))
                .collect()
        };
        futures_util::stream::iter(pending)
            .for_each_concurrent(API_IN_FLIGHT, |(user, mine)| async move {
                self.write_again(&user, mine, router).await
            })
            .await;
    }

    /// Writes `user`'s session `mine` again after the bucket lost it or another relay
    /// swept it, unless a login that began later took the key (then that newer session
    /// wins and this one is closed). A write that fails is tried again at the next
    /// heartbeat.
    async fn write_again(&self, user: &Username, mine: super::Mine, router: &Router) {
        let (key, owner, conn) = (token(user), self.owner(mine.conn), mine.conn);
        let step = match self.held(&key).await {
            Ok(held) => held.step(0, &owner, mine.started_ms),
            Err(e) => {
                warn!(%user, "cannot read the session back: {e}; trying again");
                self.known().rewrite.insert(user.clone());
                return;
            }
        };
        let revision = match step {
            // Our own login after the loss already wrote it.
            Step::Written(revision) => revision,
            Step::Replaced => {
                self.known().forget(user, conn);
                router.kick(user, conn, ErrorCode::SessionReplaced);
                return;
            }
            Step::WriteOver(expected) => {
                match self
                    .write_over(&key, &owner, expected, mine.started_ms)
                    .await
                {
                    Ok(revision) => revision,
                    Err(e) => {
                        warn!(%user, "cannot write the session again: {e}; trying again");
                        self.known().rewrite.insert(user.clone());
                        return;
                    }
                }
            }
        };
        let (still_ours, seen_newer) = {
            let mut known = self.known();
            known.high = known.high.max(revision);
            let still_ours = match known.mine.get_mut(user) {
                Some(m) if m.conn == conn => {
                    m.revision = revision;
                    true
                }
                _ => false,
            };
            // The follower compared a login written over ours with our older revision.
            (still_ours, known.newer_seen(user, &owner, revision))
        };
        if still_ours
            && seen_newer
            && matches!(self.replaced_since(user, &owner, revision).await, Ok(true))
        {
            self.known().forget(user, conn);
            router.kick(user, conn, ErrorCode::SessionReplaced);
            return;
        }
        if !still_ours {
            // Logged out meanwhile: the key is not ours to keep.
            let _ = self
                .bucket
                .delete_expect_revision(&key, Some(revision))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    const SEEN: Seen = Seen {
        high: 10,
        lost: false,
        created: 7,
    };

    #[test]
    fn a_bucket_that_kept_its_history_gets_no_verdict() {
        assert_eq!(SEEN.verdict(10, 7), None);
        // Writes made since (by any relay) only raise the last sequence.
        assert_eq!(SEEN.verdict(25, 7), None);
    }

    #[test]
    fn a_last_sequence_below_what_was_seen_is_a_lost_history() {
        // Every node restarted in turn: the same stream, revisions from 1 again.
        assert_eq!(SEEN.verdict(3, 7), Some("lost its history"));
        // A login found a remembered write missing, whatever the sequence says.
        let lost = Seen { lost: true, ..SEEN };
        assert_eq!(lost.verdict(40, 7), Some("lost its history"));
    }

    #[test]
    fn another_creation_time_is_a_bucket_made_anew() {
        // Even when the new bucket has already been written past what was seen.
        assert_eq!(SEEN.verdict(50, 8), Some("was made anew"));
    }
}
