//! Operator commands on a cluster: the totals `admin stats` prints, and
//! `admin migrate --to-nats`, which copies an SQLite relay's accounts and queued envelopes
//! into the cluster.
//!
//! Migration is idempotent: accounts are written create-only (a name already bound to the
//! same key is skipped, to another key is a conflict, reported and not overwritten), and
//! each recipient's progress is recorded in the bucket `<prefix>_migrations` under
//! `<store id>.<recipient>` = the last SQLite envelope id copied. A second run copies only
//! what the first did not (new envelopes included). Every envelope is published with the
//! message id `migrate-<store id>-<envelope id>`, so one re-published after a crash
//! between a publish and its progress record (every [`PROGRESS_EVERY`] envelopes) is
//! dropped by JetStream if it comes within the stream's duplicate window.

use std::collections::HashSet;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chat_protocol::Username;
use futures_util::StreamExt;

use super::{Cluster, ClusterError, FROM_HEADER, refusal, token};
use crate::config::NatsBackend;
use crate::store::{Bind, Store, StoreError};

/// Envelopes copied between two progress records of one recipient.
pub const PROGRESS_EVERY: usize = 100;

/// Envelopes read from SQLite (and published before their acknowledgements are awaited)
/// at a time.
const BATCH: usize = 500;

/// Totals of a cluster, for `admin stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStats {
    /// Registered accounts (accounts are never removed in this backend).
    pub users: u64,
    /// Users with a session on some relay.
    pub online: u64,
    /// Relays whose heartbeat is current.
    pub relays: u64,
    /// Envelopes in the mailbox stream, and their bytes (payload and headers).
    pub queued: u64,
    pub queued_bytes: u64,
    /// Recipients with something queued.
    pub recipients_waiting: u64,
    /// The stream's Raft group: leader and each replica's state, in words.
    pub replication: String,
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// Accounts created in the cluster.
    pub accounts_created: u64,
    /// Accounts already in the cluster with the same key (an earlier run, or a user who
    /// registered on the cluster with the same key).
    pub accounts_present: u64,
    /// Names bound in the cluster to another key: not copied, nor their envelopes.
    pub conflicts: Vec<Username>,
    /// Envelopes copied by this run.
    pub envelopes_copied: u64,
    /// Envelopes an earlier run had copied.
    pub envelopes_skipped: u64,
    /// Envelopes the cluster refused (a recipient's mailbox or the stream was full), by
    /// recipient and count: they stay in the SQLite file; a later run retries them.
    pub refused: Vec<(Username, u64)>,
}

impl Migration {
    /// Whether everything in the SQLite file is now in the cluster.
    pub fn complete(&self) -> bool {
        self.conflicts.is_empty() && self.refused.is_empty()
    }
}

impl Cluster {
    /// Totals of the cluster, read from NATS (a scan of the session and relay keys).
    pub async fn stats(&self) -> Result<ClusterStats, StoreError> {
        let mut mailbox = self.mailbox.clone();
        let info = mailbox.info().await.map_err(super::cluster_err)?.clone();
        let users = self
            .accounts
            .status()
            .await
            .map_err(super::cluster_err)?
            .values();
        let (online, relays) = self.sessions.counts().await?;
        let replication = match &info.cluster {
            None => "one node".to_owned(),
            Some(group) => {
                let mut words = format!(
                    "leader {}",
                    group.leader.as_deref().unwrap_or("(none: electing)")
                );
                for peer in &group.replicas {
                    let state = if peer.offline {
                        "offline".to_owned()
                    } else if peer.current {
                        "current".to_owned()
                    } else {
                        format!("behind by {}", peer.lag.unwrap_or(0))
                    };
                    words.push_str(&format!(", {} {state}", peer.name));
                }
                words
            }
        };
        Ok(ClusterStats {
            users,
            online,
            relays,
            queued: info.state.messages,
            queued_bytes: info.state.bytes,
            recipients_waiting: self.recipients_waiting().await?,
            replication,
        })
    }

    /// How many recipients have something queued: the distinct recipients among the
    /// stream's subjects (one request per page of subjects).
    async fn recipients_waiting(&self) -> Result<u64, StoreError> {
        use futures_util::TryStreamExt;
        let mut subjects = self
            .mailbox
            .info_with_subjects(format!("{}>", self.inbox_prefix))
            .await
            .map_err(super::cluster_err)?;
        let mut recipients = HashSet::new();
        while let Some((subject, _)) = subjects.try_next().await.map_err(super::cluster_err)? {
            let rest = subject.strip_prefix(&self.inbox_prefix).unwrap_or(&subject);
            let recipient = rest.split('.').next().unwrap_or(rest);
            if !recipients.contains(recipient) {
                recipients.insert(recipient.to_owned());
            }
        }
        Ok(recipients.len() as u64)
    }

    /// Removes `user`'s account and purges their mailbox, freeing the name. Returns whether
    /// the account existed. Every relay forgets the name when it sees the removal
    /// ([`Cluster::forget_removed`]); a session of the user stays until it ends.
    pub async fn remove_user(&self, user: &Username) -> Result<bool, StoreError> {
        let patience = tokio::time::Instant::now() + super::PATIENCE;
        let existed = self.public_key(user, patience).await?.is_some();
        self.accounts
            .purge(token(user))
            .await
            .map_err(super::cluster_err)?;
        for filter in [
            format!("{}>", self.mailbox_prefix(user)),
            self.legacy_subject(user),
        ] {
            self.mailbox
                .purge()
                .filter(filter)
                .await
                .map_err(super::cluster_err)?;
        }
        self.forget(user);
        Ok(existed)
    }

    /// Follows removals in the accounts bucket, so that no relay keeps accepting mail for
    /// a removed name from its memory of names that exist. Returns only if the watch
    /// cannot be (re)started.
    pub(super) async fn forget_removed(&self) {
        let mut changes = match self.accounts.watch_all().await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!("cannot follow account removals: {e}");
                return;
            }
        };
        while let Some(change) = changes.next().await {
            match change {
                Ok(entry) if entry.operation != kv::Operation::Put => {
                    if let Some(user) = super::user_of(&entry.key) {
                        self.forget(&user);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("following account removals: {e}");
                    return;
                }
            }
        }
    }

    /// Copies `store`'s accounts and queued envelopes into the cluster (see the module
    /// documentation). `progress` is told each recipient done. Fails on the first error
    /// talking to NATS or reading SQLite; what was copied stays, and a rerun continues.
    pub async fn migrate_from(
        &self,
        store: &Store,
        nats: &NatsBackend,
        mut progress: impl FnMut(&Username, u64),
    ) -> Result<Migration, ClusterError> {
        let store_id = store
            .store_id()
            .map_err(|e| migration_error(nats, "read the SQLite file", e))?;
        let marks = super::layout::bucket(
            &self.js,
            kv::Config {
                bucket: format!("{}_migrations", nats.prefix),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: nats.stream_replicas,
                ..Default::default()
            },
        )
        .await?;
        let mut done = Migration::default();
        let mut after = String::new();
        loop {
            let accounts = store
                .accounts_after(&after, BATCH)
                .map_err(|e| migration_error(nats, "read the SQLite file", e))?;
            let Some((last, _)) = accounts.last() else {
                break;
            };
            after = last.as_str().to_owned();
            for (user, key) in accounts {
                let patience = tokio::time::Instant::now() + super::PATIENCE;
                match self.bind(&user, &key, patience).await.map_err(|e| {
                    migration_error(nats, "write the accounts bucket", e.to_string())
                })? {
                    Bind::Created => done.accounts_created += 1,
                    Bind::Existing => done.accounts_present += 1,
                    Bind::Taken => {
                        done.conflicts.push(user);
                        continue;
                    }
                }
                let copied = self
                    .migrate_queue(store, &store_id, &marks, &user, &mut done)
                    .await
                    .map_err(|e| migration_error(nats, "copy the queue", e))?;
                progress(&user, copied);
            }
        }
        Ok(done)
    }

    /// Copies `user`'s envelopes above the recorded mark; returns how many.
    async fn migrate_queue(
        &self,
        store: &Store,
        store_id: &str,
        marks: &kv::Store,
        user: &Username,
        done: &mut Migration,
    ) -> Result<u64, String> {
        let mark_key = format!("{store_id}.{}", token(user));
        let Mark {
            after: mark,
            mut round,
        } = match marks.get(&mark_key).await.map_err(|e| e.to_string())? {
            Some(value) => std::str::from_utf8(&value)
                .ok()
                .and_then(Mark::parse)
                .ok_or_else(|| format!("unreadable migration mark {mark_key}"))?,
            None => Mark::default(),
        };
        let waiting = |after| store.count_pending(user, after).map_err(|e| e.to_string());
        done.envelopes_skipped += waiting(0)? - waiting(mark)?;
        let mut copied = 0;
        let mut after = mark;
        // The SQLite store does not keep where a sender connected from.
        let subject =
            |sender: &str| self.subject(user, super::MIGRATED_ADDRESS, &sender.replace('.', "="));
        'batches: loop {
            let batch = store
                .pending(user, after, BATCH)
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                break;
            }
            // Published in order on one connection, acknowledged in order.
            let mut acks = Vec::with_capacity(batch.len());
            for queued in &batch {
                let message = jetstream::message::PublishMessage::build()
                    .payload(Bytes::copy_from_slice(&queued.payload))
                    .header(FROM_HEADER, queued.sender.as_str())
                    .message_id(Mark::message_id(store_id, queued.id, round));
                let ack = self
                    .js
                    .send_publish(subject(&queued.sender), message)
                    .await
                    .map_err(|e| e.to_string())?;
                acks.push((queued.id, ack));
            }
            let mut since_mark = 0;
            let mut acks = acks.into_iter();
            while let Some((id, ack)) = acks.next() {
                match ack.await {
                    Ok(_) => {
                        copied += 1;
                        after = id;
                        since_mark += 1;
                        if since_mark == PROGRESS_EVERY {
                            put_mark(marks, &mark_key, Mark { after, round }).await?;
                            since_mark = 0;
                        }
                    }
                    Err(e) => match refusal(&e.to_string()) {
                        Some(_) => {
                            // This and later envelopes stay in SQLite for a later run. A
                            // later one from another sender may have been stored (each
                            // sender's share is its own subject): it is removed again, so
                            // the copy stays in order and the mark says what was copied.
                            // JetStream remembers its message id: the next round publishes
                            // under new ids, so that it is not taken for a duplicate.
                            let mut removed = false;
                            for (_, later) in acks {
                                if let Ok(stored) = later.await {
                                    if !removed {
                                        round += 1;
                                        put_mark(marks, &mark_key, Mark { after, round }).await?;
                                        removed = true;
                                    }
                                    self.mailbox
                                        .delete_message(stored.sequence)
                                        .await
                                        .map_err(|e| e.to_string())?;
                                }
                            }
                            done.refused.push((user.clone(), waiting(after)?));
                            break 'batches;
                        }
                        _ => return Err(e.to_string()),
                    },
                }
            }
        }
        if after > mark {
            put_mark(marks, &mark_key, Mark { after, round }).await?;
        }
        done.envelopes_copied += copied;
        Ok(copied)
    }
}

/// How far the migration of one recipient's queue got: every envelope up to `after` (an
/// SQLite id) is in the cluster. `round` counts the times envelopes stored past a refused
/// one were removed again; it is part of the message ids, so that JetStream's duplicate
/// window does not take their next copy for the removed one. Kept as `"<after>"` (round
/// 0) or `"<after> <round>"`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Mark {
    after: u64,
    round: u64,
}

impl Mark {
    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split(' ');
        let after = words.next()?.parse().ok()?;
        let round = words.next().map_or(Some(0), |w| w.parse().ok())?;
        words.next().is_none().then_some(Self { after, round })
    }

    fn message_id(store_id: &str, id: u64, round: u64) -> String {
        match round {
            0 => format!("migrate-{store_id}-{id}"),
            round => format!("migrate-{store_id}-{id}-r{round}"),
        }
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.round {
            0 => write!(f, "{}", self.after),
            round => write!(f, "{} {round}", self.after),
        }
    }
}

async fn put_mark(marks: &kv::Store, key: &str, mark: Mark) -> Result<(), String> {
    marks
        .put(key, Bytes::from(mark.to_string()))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn migration_error(nats: &NatsBackend, what: &str, detail: impl std::fmt::Display) -> ClusterError {
    ClusterError::Migrate {
        urls: nats.urls.join(","),
        detail: format!("cannot {what}: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::Mark;

    #[test]
    fn marks_read_back_and_old_ones_are_round_zero() {
        for mark in [
            Mark { after: 0, round: 0 },
            Mark {
                after: 42,
                round: 0,
            },
            Mark {
                after: 42,
                round: 3,
            },
        ] {
            assert_eq!(Mark::parse(&mark.to_string()), Some(mark));
        }
        assert_eq!(
            Mark::parse("17"),
            Some(Mark {
                after: 17,
                round: 0
            })
        );
        for bad in ["", "x", "1 2 3", "1 x", "-1"] {
            assert_eq!(Mark::parse(bad), None, "{bad:?}");
        }
        assert_ne!(Mark::message_id("s", 5, 0), Mark::message_id("s", 5, 1));
        assert_eq!(Mark::message_id("s", 5, 0), "migrate-s-5");
    }
}
