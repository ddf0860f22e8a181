//! One session per user, cluster-wide, the newest winning; and presence across relays.
//!
//! A login writes `user → "<relay id> <connection id>"` in the sessions bucket, on top
//! of what it read there (`login.rs`: a late write never lands over a newer login); the
//! revision JetStream gives that write orders it against every other login of the user.
//! Every relay follows the bucket (last value per key, then each change): a relay whose
//! session of a user is older than a newer write by someone else closes it with
//! `session_replaced`. A user is online while the key holds a value; a logout deletes it
//! only if the value is still that session's (compare-and-delete on its revision).
//!
//! A relay that crashes cannot log its users out. Each relay therefore refreshes its key
//! in the relays bucket every [`HEARTBEAT`]; the bucket's max age ([`RELAY_TTL`]) expires
//! a key that stops being refreshed, with a marker every relay sees. Every relay sweeps
//! the sessions whose owner has no live heartbeat (compare-and-delete, so racing sweeps
//! and a newer login are safe), and the users of a crashed relay go offline.
//!
//! The sessions bucket is kept in memory on the NATS nodes: restarting each node in turn
//! can leave it empty, its revisions starting again from 1, while this relay stays
//! connected; restarting every node at once makes it anew (another creation time). Either
//! way remembered revisions would make new logins look older than stale ones (a false
//! `session_replaced`), stale users would look online and this relay's users offline. A
//! relay therefore checks the bucket's creation time, and its last sequence against the
//! highest revision it has seen, at every [`HEARTBEAT`] while it serves and when its NATS
//! link comes back; a login that looks replaced is checked against the bucket itself. When
//! the history is found lost, the relay forgets what it learnt and writes its sessions
//! again (a key taken meanwhile by a login that began later is a newer login, which wins).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chat_protocol::{ErrorCode, Username};
use futures_util::StreamExt;
use rand::Rng;
use tracing::{debug, warn};

use super::{cluster_err, token, user_of};

mod history;
mod login;
use crate::router::Router;
use crate::store::StoreError;
pub use login::LOGIN_WINDOW;

/// How often a relay refreshes its heartbeat and sweeps dead relays' sessions.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long a heartbeat lasts: a relay silent this long is taken for dead.
pub const RELAY_TTL: Duration = Duration::from_secs(15);
/// How long one heartbeat write may take: a late one is as good as missed.
const HEARTBEAT_PATIENCE: Duration = Duration::from_secs(2);

/// What a login found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Login {
    /// The session's epoch: the bucket revision of its write.
    pub revision: u64,
    /// A newer login elsewhere already took over: close this one.
    pub replaced: bool,
}

/// This relay's sessions, and the last value of every key seen.
#[derive(Debug, Default)]
struct Known {
    /// user → this relay's session of the user.
    mine: HashMap<Username, Mine>,
    /// (user, connection) of the logins writing their session now.
    logging_in: HashSet<(Username, u64)>,
    /// user → (owner, revision) of the newest write seen while following the bucket.
    latest: HashMap<Username, (String, u64)>,
    /// Relays with a live heartbeat.
    alive: HashSet<String>,
    /// Since when the heartbeats have been followed: sessions are swept only after a
    /// whole [`RELAY_TTL`] of it.
    following_since: Option<tokio::time::Instant>,
    /// The highest sessions-bucket revision seen (our writes and the followed changes):
    /// the bucket's last sequence below it means the bucket lost its history.
    high: u64,
    /// A login was told it was replaced by a write the bucket no longer holds: the
    /// bucket lost its history (checked at the next heartbeat).
    lost: bool,
    /// When the bucket's stream was made (Unix time, ns), as last checked: another time
    /// means it was made anew. Not cleared by [`Sessions::reset`].
    created: i128,
    /// This relay's users whose session is to be written again: another relay deleted it
    /// (took this one for dead, its heartbeat late), or a rewrite failed. Written at the
    /// next heartbeat.
    rewrite: HashSet<Username>,
    /// When this relay's heartbeat was last written.
    beat_at: Option<tokio::time::Instant>,
}

/// A session this relay holds.
#[derive(Debug, Clone, Copy)]
struct Mine {
    conn: u64,
    /// The bucket revision of its last write.
    revision: u64,
    /// When its login began (Unix ms, this relay's clock): written with it, so a login
    /// that began later is told from an older one written late (`login.rs`).
    started_ms: u64,
}

impl Known {
    /// Whether a write of `user`'s key by another owner than `owner`, above `revision`,
    /// has been followed (the follower may see it before our own write returns).
    fn newer_seen(&self, user: &Username, owner: &str, revision: u64) -> bool {
        let newer = self.latest.get(user);
        newer.is_some_and(|(by, r)| *r > revision && by != owner)
    }

    /// Forgets `user`'s session on connection `conn`, if this relay holds it: returns its
    /// revision.
    fn forget(&mut self, user: &Username, conn: u64) -> Option<u64> {
        let mine = *self.mine.get(user)?;
        (mine.conn == conn).then(|| {
            self.mine.remove(user);
            mine.revision
        })
    }
}

pub(super) struct Sessions {
    bucket: kv::Store,
    /// For session writes with headers ([`login::STARTED_HEADER`]).
    js: async_nats::jetstream::Context,
    relays: kv::Store,
    /// Random per relay process: owners of sessions are told apart by it.
    relay_id: String,
    known: Mutex<Known>,
    /// Bumped by [`Sessions::reset`]: the followers watch the buckets afresh.
    generation: tokio::sync::watch::Sender<u64>,
    /// Held by the history check: one at a time.
    checking: tokio::sync::Mutex<()>,
    /// Reads from the bucket's leader pass it ([`super::api_gate`]): logins, sweeps and
    /// rewrites, apart from the mailbox readers' gate.
    api: super::api_gate::ApiGate,
}

impl Sessions {
    pub(super) fn new(
        bucket: kv::Store,
        relays: kv::Store,
        js: async_nats::jetstream::Context,
        api: super::api_gate::ApiGate,
    ) -> Self {
        let created = bucket.stream.cached_info().created.unix_timestamp_nanos();
        Self {
            bucket,
            js,
            relays,
            relay_id: format!("{:016x}", rand::rng().next_u64()),
            known: Mutex::new(Known {
                created,
                ..Known::default()
            }),
            generation: tokio::sync::watch::Sender::new(0),
            checking: tokio::sync::Mutex::new(()),
            api,
        }
    }

    /// Forgets what was learnt from the buckets and follows them afresh, after NATS came
    /// back (the buckets may have been made anew, their revisions starting again at 1: a
    /// remembered revision would make every new login look older than a stale one).
    pub(super) fn reset(&self) {
        let mut known = self.known();
        known.latest.clear();
        known.alive.clear();
        known.following_since = None;
        known.high = 0;
        known.lost = false;
        drop(known);
        self.generation.send_modify(|g| *g += 1);
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owner(&self, conn_id: u64) -> String {
        format!("{} {conn_id}", self.relay_id)
    }

    pub(super) fn logout(&self, user: &Username, conn_id: u64) {
        let Some(revision) = self.known().forget(user, conn_id) else {
            return;
        };
        let (bucket, key) = (self.bucket.clone(), token(user));
        tokio::spawn(async move {
            // Retried while NATS does not answer (an election, a reconnection): a delete
            // lost would leave the user online (until a sweep finds the key held by no
            // connection here). Fails for good once a newer login replaced the value:
            // then it is not ours to delete.
            let deadline = tokio::time::Instant::now() + super::RETRY_FOR;
            loop {
                let Err(e) = bucket.delete_expect_revision(&key, Some(revision)).await else {
                    return;
                };
                match bucket.entry(&key).await {
                    Ok(Some(entry))
                        if entry.revision == revision && entry.operation == kv::Operation::Put => {}
                    Ok(_) => return,
                    Err(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    warn!("session {key} not deleted: {e}");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// (users with a session, relays with a current heartbeat), by scanning the keys.
    pub(super) async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let mut counts = [0u64; 2];
        for (count, bucket) in counts.iter_mut().zip([&self.bucket, &self.relays]) {
            let mut keys = bucket.keys().await.map_err(cluster_err)?;
            while let Some(key) = keys.next().await {
                key.map_err(cluster_err)?;
                *count += 1;
            }
        }
        Ok((counts[0], counts[1]))
    }

    /// Applies one change of the bucket.
    fn apply(&self, entry: kv::Entry, router: &Router) {
        let Some(user) = user_of(&entry.key) else {
            return;
        };
        let online = entry.operation == kv::Operation::Put;
        let mut known = self.known();
        known.high = known.high.max(entry.revision);
        if online {
            let owner = String::from_utf8_lossy(&entry.value).into_owned();
            if let Some(&Mine { conn, revision, .. }) = known.mine.get(&user)
                && revision < entry.revision
                && owner != self.owner(conn)
            {
                // No longer ours: its logout must not delete the newer session, and a
                // rewrite must not bring it back while its last sends finish.
                known.mine.remove(&user);
                router.kick(&user, conn, ErrorCode::SessionReplaced);
            }
            known.latest.insert(user.clone(), (owner, entry.revision));
        } else {
            let last = known.latest.remove(&user);
            // The key held this relay's live session, and not our logout deleted it (that
            // forgets the session first): a sweep. (Replaced by a newer login elsewhere,
            // the key held that one's.)
            if let Some(mine) = known.mine.get(&user)
                && mine.revision < entry.revision
                && last.is_some_and(|(by, _)| by == self.owner(mine.conn))
            {
                warn!(%user, "another relay removed a live session of this relay's");
                known.rewrite.insert(user.clone());
            }
        }
        drop(known);
        router.cluster_presence(&user, online);
    }

    /// Follows the buckets and beats the heart for as long as the relay runs; `serving`
    /// says whether the relay serves (the cluster's link and layout are up).
    pub(super) async fn follow(
        &self,
        router: &Router,
        serving: tokio::sync::watch::Receiver<bool>,
    ) -> ! {
        tokio::select! {
            never = self.follow_sessions(router) => never,
            never = self.follow_relays() => never,
            never = self.beat() => never,
            never = self.upkeep(router, serving) => never,
        }
    }

    /// Refreshes this relay's heartbeat every [`HEARTBEAT`], nothing else in the loop (so
    /// no other request delays it), each write given [`HEARTBEAT_PATIENCE`].
    async fn beat(&self) -> ! {
        loop {
            let put = self
                .relays
                .put(&self.relay_id, Bytes::from_static(b"alive"));
            match tokio::time::timeout(HEARTBEAT_PATIENCE, put).await {
                Ok(Ok(_)) => self.known().beat_at = Some(tokio::time::Instant::now()),
                Ok(Err(e)) => warn!("cannot refresh this relay's heartbeat: {e}"),
                Err(_) => warn!("cannot refresh this relay's heartbeat: NATS did not answer"),
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// Every [`HEARTBEAT`], while this relay's own heartbeats go through (else the
    /// relays bucket is unwell, and so are other relays' heartbeats: no one is judged):
    /// checks that the sessions bucket kept its history and writes swept sessions again
    /// (only while serving: otherwise NATS is unreachable or the layout unchecked, and the
    /// check runs when the link is back), and sweeps the sessions no connection holds:
    /// this relay's at once, those of relays without a heartbeat once this relay has
    /// followed the heartbeats for a whole TTL.
    async fn upkeep(&self, router: &Router, serving: tokio::sync::watch::Receiver<bool>) -> ! {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let (beating, since) = {
                let known = self.known();
                let beating = known
                    .beat_at
                    .is_some_and(|at| at.elapsed() <= 2 * HEARTBEAT);
                (beating, known.following_since)
            };
            if !beating {
                continue;
            }
            if *serving.borrow() {
                self.check_history(router).await;
                self.write_pending(router).await;
            }
            self.sweep(since.is_some_and(|s| s.elapsed() > RELAY_TTL))
                .await;
        }
    }

    /// Deletes sessions of this relay's that no connection here holds (a login's write
    /// that landed after the login gave up, a logout whose delete did not go through)
    /// and, if `others`, sessions owned by relays with no live heartbeat.
    async fn sweep(&self, others: bool) {
        let orphans: Vec<(Username, String, u64)> = {
            let known = self.known();
            known
                .latest
                .iter()
                .filter(|(user, (owner, _))| {
                    let (relay, conn) = owner.split_once(' ').unwrap_or_default();
                    if relay != self.relay_id {
                        return others && !known.alive.contains(relay);
                    }
                    let Ok(conn) = conn.parse::<u64>() else {
                        return true;
                    };
                    let live = known.mine.get(*user).is_some_and(|m| m.conn == conn);
                    !live && !known.logging_in.contains(&((*user).clone(), conn))
                })
                .map(|(user, (owner, revision))| (user.clone(), owner.clone(), *revision))
                .collect()
        };
        // [`API_IN_FLIGHT`] at a time: a crashed relay's users would otherwise show online
        // for as many round trips as it had sessions.
        let sweep_one = |(user, owner, revision): (Username, String, u64)| async move {
            debug!(%user, "removing a session no connection holds ({owner})");
            // Only if the key still holds what was seen, as its stream's leader says: what
            // was seen may be from before the bucket lost its history, its revision now
            // another login's. Fails harmlessly if another relay swept it first or the
            // user logged in again.
            let key = token(&user);
            if matches!(self.held(&key).await, Ok(login::Held::Session(by, r, _)) if by == owner && r == revision)
            {
                let _ = self
                    .bucket
                    .delete_expect_revision(key, Some(revision))
                    .await;
            }
        };
        futures_util::stream::iter(orphans)
            .for_each_concurrent(super::api_gate::API_IN_FLIGHT, sweep_one)
            .await;
    }

    /// Follows the heartbeats into the set of live relays.
    async fn follow_relays(&self) -> ! {
        let mut generation = self.generation.subscribe();
        loop {
            generation.borrow_and_update();
            match self.relays.watch_with_history(">").await {
                Ok(mut changes) => {
                    self.known()
                        .following_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    loop {
                        let change = tokio::select! {
                            change = changes.next() => change,
                            _ = generation.changed() => break,
                        };
                        let Some(Ok(entry)) = change else { break };
                        let put = entry.operation == kv::Operation::Put;
                        let mut known = self.known();
                        if put {
                            known.alive.insert(entry.key);
                        } else {
                            known.alive.remove(&entry.key);
                        }
                        drop(known);
                    }
                }
                Err(e) => warn!("cannot follow the relays' heartbeats: {e}; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Follows the sessions bucket, re-subscribing after errors.
    async fn follow_sessions(&self, router: &Router) -> ! {
        let mut generation = self.generation.subscribe();
        loop {
            if generation.has_changed().unwrap_or(false) {
                // Read afresh: who is online is learnt again.
                generation.borrow_and_update();
                router.cluster_presence_reset();
            }
            match self.bucket.watch_with_history(">").await {
                Ok(mut changes) => loop {
                    let change = tokio::select! {
                        change = changes.next() => change,
                        _ = generation.changed() => break,
                    };
                    match change {
                        Some(Ok(entry)) => self.apply(entry, router),
                        Some(Err(e)) => {
                            warn!("following the session bucket: {e}");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => warn!("cannot follow the session bucket: {e}; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
