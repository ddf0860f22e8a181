//! Removing acknowledged envelopes from the mailbox: acknowledgements are gathered per
//! recipient and removed in rounds, one purge per recipient (plus single deletes for ids
//! above one not yet acknowledged), each request through the API gate.

use std::collections::BTreeSet;
use std::time::Duration;

use chat_protocol::Username;
use tracing::warn;

use super::Cluster;

/// How often acknowledged envelopes are removed from the mailbox (one purge per
/// recipient with acknowledgements).
pub const REMOVE_EVERY: Duration = Duration::from_millis(250);

/// Acknowledged envelopes of one recipient waiting for removal.
#[derive(Debug, Default)]
pub(super) struct Removal {
    /// Everything in the subject below this was acknowledged: one purge.
    below: Option<u64>,
    /// Acknowledged ids at or above `below`: deleted one by one.
    ids: BTreeSet<u64>,
}

impl Cluster {
    /// Records that `user`'s session acknowledged `ids`, each given to this session (in
    /// stream order, from the first in the mailbox); `floor` is the lowest id it was given
    /// and has not acknowledged (`u64::MAX` if none). They are removed by the next
    /// [`Cluster::flush_removals`] (every [`REMOVE_EVERY`]) or [`Cluster::flush_user`].
    ///
    /// Everything in the mailbox below `min(floor, max(ids) + 1)` was given to this session
    /// and acknowledged, so one purge of the subject up to there removes it all (the usual
    /// case: a client acknowledges in order); of two such bounds the higher holds. Ids
    /// above an unacknowledged one are deleted one by one. A removal costs JetStream a
    /// write and about as much CPU as several publishes, so acknowledgements are gathered:
    /// one purge per recipient per interval, whatever the number of Acks.
    pub fn delete(&self, user: &Username, ids: Vec<u64>, floor: u64) {
        let Some(&highest) = ids.iter().max() else {
            return;
        };
        let below = floor.min(highest.saturating_add(1));
        let mut removals = self.removals.lock().unwrap_or_else(|p| p.into_inner());
        let removal = removals.entry(user.clone()).or_default();
        if ids.iter().any(|&id| id < below) {
            removal.below = Some(removal.below.map_or(below, |b| b.max(below)));
        }
        removal
            .ids
            .extend(ids.into_iter().filter(|&id| id >= below));
        if let Some(below) = removal.below {
            removal.ids.retain(|&id| id >= below);
        }
    }

    /// Removes every acknowledged envelope recorded so far, one purge per recipient, each
    /// through the API gate. Failures are logged: an envelope not removed is delivered again at the next login
    /// (the client drops what it already has). One round at a time: a call waits for a
    /// round under way (so the last one, at shutdown, sends nothing after it).
    pub async fn flush_removals(&self) {
        let _round = self.removing.lock().await;
        let removals =
            std::mem::take(&mut *self.removals.lock().unwrap_or_else(|p| p.into_inner()));
        let work = removals
            .into_iter()
            .map(|(user, removal)| async move { self.remove(&user, removal).await });
        futures_util::future::join_all(work).await;
    }

    /// Removes what `user` acknowledged now (before a new session of theirs reads the
    /// mailbox on this relay, so it is not given what an older one acknowledged).
    pub async fn flush_user(&self, user: &Username) {
        let removal = self
            .removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
        if let Some(removal) = removal {
            self.remove(user, removal).await;
        }
    }

    async fn remove(&self, user: &Username, removal: Removal) {
        if let Some(below) = removal.below {
            let mut filters = vec![format!("{}>", self.mailbox_prefix(user))];
            if self
                .legacy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(user)
            {
                filters.push(self.legacy_subject(user));
            }
            for filter in filters {
                let _through = self.api.pass().await;
                let purged = self.mailbox.purge().filter(filter).sequence(below).await;
                if let Err(e) = purged {
                    warn!("cannot remove acknowledged envelopes of {user} below {below}: {e}");
                }
            }
        }
        let deletes = removal.ids.into_iter().map(|id| self.delete_one(id));
        futures_util::future::join_all(deletes).await;
    }

    /// Deletes one envelope, without overwriting its bytes on disk (`no_erase`: it is
    /// ciphertext, and erasing costs JetStream a second write).
    async fn delete_one(&self, id: u64) {
        #[derive(serde::Serialize)]
        struct Delete {
            seq: u64,
            no_erase: bool,
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            error: Option<ApiError>,
        }
        #[derive(serde::Deserialize)]
        struct ApiError {
            description: String,
        }
        let subject = format!(
            "STREAM.MSG.DELETE.{}",
            self.mailbox.cached_info().config.name
        );
        let _through = self.api.pass().await;
        let reply = self
            .js
            .request::<_, _, Reply>(
                subject,
                &Delete {
                    seq: id,
                    no_erase: true,
                },
            )
            .await;
        match reply {
            Ok(Reply { error: None }) => {}
            // Already gone (expired, purged, or acknowledged twice).
            Ok(Reply { error: Some(e) }) if e.description.contains("no message found") => {}
            Ok(Reply { error: Some(e) }) => {
                warn!(
                    "cannot delete acknowledged envelope {id}: {}",
                    e.description
                )
            }
            Err(e) => warn!("cannot delete acknowledged envelope {id}: {e}"),
        }
    }
}
