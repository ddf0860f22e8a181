//! The `Nats` backend: relays of one deployment share accounts, sessions, presence and
//! the offline queue through a NATS JetStream cluster (layout and guarantees in
//! docs/CLUSTER.md).
//!
//! - Mailbox: the stream `<prefix>_mailbox`, subjects `<prefix>.inbox.<user>`, one per
//!   recipient. A send is `Ok` once JetStream acknowledged the publish, i.e. stored it on
//!   a quorum of replicas (each fsyncs first when nats-server runs with
//!   `sync_interval: always`). The stream sequence is the envelope id. Per-subject limit
//!   with discard-new is the per-recipient queue limit (`recipient_queue_full`); the
//!   stream's byte limit is the queue's total (`server_full`); max age expires envelopes.
//! - Delivery: each logged-in session reads its subject through an ordered consumer from
//!   the first envelope still stored: the backlog, then live envelopes, in stream order,
//!   with no gap and no duplicate. An `Ack` deletes the envelopes (by sequence).
//! - Accounts: the bucket `<prefix>_accounts`, user → public key, written create-only, so
//!   the first key to claim a name keeps it, cluster-wide.
//! - Sessions ([`sessions`]): the bucket `<prefix>_sessions`, user → owning relay and
//!   connection; its revision orders logins, the newest wins. The bucket
//!   `<prefix>_relays` holds each relay's heartbeat: the sessions of a relay whose
//!   heartbeat expired (it crashed) are removed by the others.
//!
//! Usernames may hold `.`, which NATS reserves as the token separator; in subjects and
//! keys it is written `=`, which usernames never hold ([`token`]).

mod admin;
mod layout;
mod outbox;
mod quota;
mod sessions;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use chat_protocol::{ServerMessage, Username};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::{Config, NatsBackend};
use crate::store::{Bind, Enqueued, StoreError};
use crate::writer::{Done, Ticket};

pub use admin::{ClusterStats, Migration};
pub use layout::DUPLICATE_WINDOW;
pub use outbox::RETRY_FOR;
pub use sessions::Login;

/// The header naming an envelope's sender.
pub const FROM_HEADER: &str = "Chat-From";

/// How long a relay (or an operator command) waits for a first connection to NATS.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// Accounts remembered as existing (they are never removed in the cluster backend), so a
/// send needs no lookup after the first. Past this many the memory is cleared.
const KNOWN_ACCOUNTS_MAX: usize = 100_000;

/// Why the relay could not set up its cluster backend.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {urls}: {detail}. Start nats-server with JetStream (see \
         docs/CLUSTER.md) or correct --nats"
    )]
    Connect { urls: String, detail: String },
    #[error(
        "cannot set up the JetStream {what} {name}: {detail}. Is JetStream enabled \
         (nats-server -js), are there at least stream_replicas ({replicas}) nodes \
         (--nats-replicas), and may JetStream store queue.max_total_bytes on each \
         (max_file_store)?"
    )]
    Setup {
        what: &'static str,
        name: String,
        replicas: usize,
        detail: String,
    },
    #[error(
        "migration into NATS at {urls} stopped: {detail}. What was copied stays; run the \
         same command again to continue"
    )]
    Migrate { urls: String, detail: String },
}

/// A username as one NATS subject token or key: `.` becomes `=`.
pub fn token(user: &Username) -> String {
    user.as_str().replace('.', "=")
}

/// The username a [`token`] was made from, if it is one.
pub fn user_of(token: &str) -> Option<Username> {
    Username::parse(&token.replace('=', ".")).ok()
}

/// A relay's handle on the cluster.
pub struct Cluster {
    js: jetstream::Context,
    /// Publishes envelopes in atomic batches (group commit).
    outbox: outbox::Outbox,
    mailbox: stream::Stream,
    /// `<prefix>.inbox.`
    inbox_prefix: String,
    accounts: kv::Store,
    /// Address name → token bucket for new accounts ([`Cluster::take_registration`]).
    registrations: kv::Store,
    sessions: sessions::Sessions,
    known: Mutex<HashSet<Username>>,
    /// Acknowledged envelopes not yet removed, by recipient ([`Cluster::delete`]).
    removals: Mutex<HashMap<Username, Removal>>,
    /// Whether the NATS connection is up (false while it reconnects).
    link: watch::Receiver<bool>,
    /// Whether the relay serves: the connection is up and the layout is in place.
    serving: watch::Sender<bool>,
    /// What the layout is made from, to make it again ([`Cluster::keep_serving`]).
    spec: Box<(Config, NatsBackend)>,
    /// When the sessions bucket was made, as JetStream says: another time after NATS
    /// comes back means the bucket is new (memory-backed, every node restarted).
    sessions_made: Mutex<String>,
    /// Counts disturbances (reconnections, stream leader elections): mailbox readers
    /// make their consumers again at each.
    disturbances: watch::Sender<u64>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("inbox_prefix", &self.inbox_prefix)
            .finish_non_exhaustive()
    }
}

fn cluster_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Cluster(e.to_string())
}

impl Cluster {
    /// Connects to NATS and creates (or updates to `config`'s limits) the mailbox stream
    /// and the buckets. Fails if no server answers or JetStream refuses the layout.
    pub async fn connect(config: &Config, nats: &NatsBackend) -> Result<Self, ClusterError> {
        Self::connect_with(config, nats, true).await
    }

    /// As [`Self::connect`], for an operator command: creates what is missing but leaves
    /// an existing stream's limits as the relays set them.
    pub async fn connect_admin(config: &Config, nats: &NatsBackend) -> Result<Self, ClusterError> {
        Self::connect_with(config, nats, false).await
    }

    async fn connect_with(
        config: &Config,
        nats: &NatsBackend,
        adopt_limits: bool,
    ) -> Result<Self, ClusterError> {
        let (up, link) = watch::channel(true);
        let disturbances = watch::Sender::new(0u64);
        let disturbed = disturbances.clone();
        let options = async_nats::ConnectOptions::new()
            .name("secure-chat relay")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let (up, disturbed) = (up.clone(), disturbed.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            up.send_replace(true);
                            disturbed.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            up.send_replace(false);
                        }
                        other => info!("NATS: {other}"),
                    }
                }
            });
        let urls = nats.urls.join(",");
        let mut addrs = Vec::with_capacity(nats.urls.len());
        for url in &nats.urls {
            let addr =
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| ClusterError::Connect {
                        urls: url.clone(),
                        detail: format!("not a NATS URL ({e}); write nats://HOST:PORT"),
                    })?;
            addrs.push(addr);
        }
        let connect = options.connect(addrs.as_slice());
        let client = match tokio::time::timeout(CONNECT_PATIENCE, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(ClusterError::Connect {
                    urls,
                    detail: e.to_string(),
                });
            }
            Err(_) => {
                return Err(ClusterError::Connect {
                    urls,
                    detail: "no answer in 10 s".into(),
                });
            }
        };
        let js = jetstream::new(client.clone());
        // The client keeps trying to connect in the background: say that no server
        // answered, rather than let the layout's requests time out.
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Connect {
                    urls,
                    detail: format!(
                        "no NATS server answered within {} s (is nats-server running there, \
                         and reachable from this host?)",
                        CONNECT_PATIENCE.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let layout::Handles {
            mailbox,
            accounts,
            sessions,
            relays,
            registrations,
        } = layout::layout_patiently(&js, config, nats, adopt_limits).await?;
        let (replicas, name) = (
            nats.stream_replicas,
            mailbox.cached_info().config.name.clone(),
        );
        // A stream made by an operator command, or a server before 2.12, may not take
        // atomic batches: then every envelope is published on its own.
        let atomic = mailbox.cached_info().config.allow_atomic_publish;
        info!(
            "cluster backend: NATS at {urls}, stream {name}, {replicas} replica(s), \
             atomic batches {}",
            if atomic { "on" } else { "off" }
        );
        let sessions_made = made_at(&sessions).await;
        Ok(Self {
            outbox: outbox::Outbox::start(client, js.clone(), atomic),
            js,
            mailbox,
            inbox_prefix: format!("{}.inbox.", nats.prefix),
            accounts,
            registrations,
            sessions: sessions::Sessions::new(sessions, relays),
            known: Mutex::new(HashSet::new()),
            removals: Mutex::new(HashMap::new()),
            link,
            serving: watch::Sender::new(true),
            spec: Box::new((config.clone(), nats.clone())),
            sessions_made: Mutex::new(sessions_made),
            disturbances,
        })
    }

    /// Whether the relay can serve, and its changes: `false` while NATS is unreachable
    /// and until the layout is back in place after it returns.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Follows the NATS connection and says (through [`Cluster::connection`]) whether the
    /// relay serves: not while NATS is unreachable; when it is back, once the stream and
    /// buckets are there — made again if missing (a cluster whose every node restarted
    /// has lost the memory-backed session buckets; a relay would otherwise serve with
    /// every session write failing), and, if they are new, once what was learnt from the
    /// old ones is forgotten. Never returns.
    pub async fn keep_serving(&self) -> ! {
        let mut link = self.link.clone();
        let (config, nats) = &*self.spec;
        // The first connection (made before serving began) is no news.
        let mut lost = false;
        loop {
            if link.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if !*link.borrow_and_update() {
                lost = true;
                self.serving.send_replace(false);
                continue;
            }
            if !lost {
                continue;
            }
            // Back. Until the layout is checked, new sessions are refused.
            while *link.borrow() {
                match layout::layout(&self.js, config, nats, false).await {
                    Ok(layout::Handles { sessions, .. }) => {
                        lost = false;
                        let made = made_at(&sessions).await;
                        let mut known =
                            self.sessions_made.lock().unwrap_or_else(|p| p.into_inner());
                        if *known != made {
                            // A new bucket: what was learnt from the old one is void.
                            info!("the session buckets were made anew; reading them afresh");
                            *known = made;
                            self.sessions.reset();
                        }
                        drop(known);
                        self.serving.send_replace(true);
                        break;
                    }
                    Err(e) => {
                        warn!("NATS is reachable but the cluster's layout is not ready: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    fn subject(&self, user: &Username) -> String {
        format!("{}{}", self.inbox_prefix, token(user))
    }

    /// `user`'s public key, if the name is registered.
    pub async fn public_key(&self, user: &Username) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.accounts.get(token(user)).await.map_err(cluster_err)?;
        if key.is_some() {
            self.remember(user);
        }
        Ok(key.map(|k| k.to_vec()))
    }

    fn forget(&self, user: &Username) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }

    fn remember(&self, user: &Username) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_ACCOUNTS_MAX {
            known.clear();
        }
        known.insert(user.clone());
    }

    /// Whether `user` is registered (from memory after the first lookup).
    pub async fn exists(&self, user: &Username) -> Result<bool, StoreError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user)
        {
            return Ok(true);
        }
        Ok(self.public_key(user).await?.is_some())
    }

    /// Binds `user` to `public_key` unless the name is already bound, cluster-wide (a
    /// create-only write: of two relays racing, one wins).
    pub async fn bind(&self, user: &Username, public_key: &[u8]) -> Result<Bind, StoreError> {
        let created = self
            .accounts
            .create(token(user), Bytes::copy_from_slice(public_key))
            .await;
        match created {
            Ok(_) => {
                self.remember(user);
                Ok(Bind::Created)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.public_key(user).await? {
                    Some(stored) if stored == public_key => Ok(Bind::Existing),
                    _ => Ok(Bind::Taken),
                }
            }
            Err(e) => Err(cluster_err(e)),
        }
    }

    /// Publishes an envelope to `to`'s mailbox. Returns once it is queued behind every
    /// envelope submitted before it (so envelopes published one after another keep their
    /// order); the ticket answers once JetStream acknowledged it (`Stored(sequence)`) or
    /// refused it. Envelopes are group-committed in atomic batches ([`outbox`]).
    /// `msg_id` deduplicates a publish retried within the stream's duplicate window.
    pub async fn publish(
        &self,
        to: &Username,
        from: &Username,
        payload: Vec<u8>,
        msg_id: String,
    ) -> Ticket {
        let (reply, ticket) = Ticket::pending();
        if !self.exists(to).await.unwrap_or(true) {
            let _ = reply.send(Ok(Done::Enqueued(Enqueued::UnknownRecipient)));
            return ticket;
        }
        self.outbox
            .submit(outbox::Pending {
                subject: self.subject(to),
                from: from.as_str().to_owned(),
                payload: payload.into(),
                msg_id,
                reply,
            })
            .await;
        ticket
    }

    /// Streams `user`'s mailbox from its oldest envelope, then live ones, as `Deliver`s
    /// into the returned channel (of `capacity`; the reader's pace holds the consumer
    /// back). An error ends the stream with a description. Dropping the guard stops it.
    pub fn deliveries(
        self: &Arc<Self>,
        user: &Username,
        capacity: usize,
    ) -> (mpsc::Receiver<Result<ServerMessage, String>>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(capacity);
        let (cluster, subject) = (self.clone(), self.subject(user));
        let task = tokio::spawn(async move {
            if let Err(e) = cluster.read_mailbox(subject, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        (rx, AbortOnDrop(task))
    }

    /// Reads `subject` into `tx` from its first envelope on. The consumer is made again
    /// from the next sequence not yet given whenever it fails, and whenever the cluster was
    /// disturbed (this relay reconnected to NATS, or the stream elected a leader): an
    /// ephemeral consumer may have been lost with a node and would otherwise wait forever.
    /// Sequences already given are skipped, so a restart makes no gap and no duplicate.
    /// Gives up (an error, and the session is closed) after [`READER_RETRIES`] failures in
    /// a row.
    async fn read_mailbox(
        &self,
        subject: String,
        tx: &mpsc::Sender<Result<ServerMessage, String>>,
    ) -> Result<(), String> {
        let mut next = 0u64;
        let mut disturbances = self.disturbances.subscribe();
        let mut failures = 0;
        loop {
            disturbances.borrow_and_update();
            let deliver_policy = match next {
                0 => consumer::DeliverPolicy::All,
                start_sequence => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            };
            let consumer = self
                .mailbox
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: subject.clone(),
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string());
            let messages = match consumer {
                Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    failures += 1;
                    if failures > READER_RETRIES {
                        return Err(e);
                    }
                    debug!("cannot read {subject} ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    changed = disturbances.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        debug!("the cluster was disturbed: reading {subject} again from {next}");
                        break;
                    }
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        failures += 1;
                        if failures > READER_RETRIES {
                            return Err(e.to_string());
                        }
                        debug!("reading {subject} failed ({e}); reading again from {next}");
                        break;
                    }
                    None => break,
                };
                let Ok(info) = message.info() else { continue };
                let sequence = info.stream_sequence;
                if sequence < next {
                    continue;
                }
                failures = 0;
                next = sequence + 1;
                let from = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(FROM_HEADER))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let deliver = ServerMessage::Deliver {
                    envelope_id: sequence,
                    from,
                    payload: message.payload.to_vec(),
                };
                if tx.send(Ok(deliver)).await.is_err() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

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

    /// Removes every acknowledged envelope recorded so far, one purge per recipient.
    /// Failures are logged: an envelope not removed is delivered again at the next login
    /// (the client drops what it already has).
    pub async fn flush_removals(&self) {
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

    /// Follows JetStream's advisories of leader elections of the mailbox stream, counting
    /// each as a disturbance. Returns if the subscription fails or ends.
    async fn follow_leader_elections(&self) {
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

    async fn remove(&self, user: &Username, removal: Removal) {
        if let Some(below) = removal.below {
            let purged = self
                .mailbox
                .purge()
                .filter(self.subject(user))
                .sequence(below)
                .await;
            if let Err(e) = purged {
                warn!("cannot remove acknowledged envelopes of {user} below {below}: {e}");
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

    /// Records that `user` logged in on this relay's connection `conn_id` (see
    /// [`sessions`]).
    pub async fn login(&self, user: &Username, conn_id: u64) -> Result<Login, StoreError> {
        self.sessions.login(user, conn_id).await
    }

    /// Records that `user`'s connection `conn_id` ended.
    pub fn logout(&self, user: &Username, conn_id: u64) {
        self.sessions.logout(user, conn_id);
    }

    /// Follows the session bucket into `router` (presence, replaced sessions) until the
    /// relay stops.
    pub async fn follow_sessions(&self, router: &crate::router::Router) -> ! {
        let forget = async {
            loop {
                self.forget_removed().await;
                // Removals made while the watch was down were missed: forget every
                // remembered name (they are looked up again).
                self.known.lock().unwrap_or_else(|p| p.into_inner()).clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let remove = async {
            loop {
                tokio::time::sleep(REMOVE_EVERY).await;
                self.flush_removals().await;
            }
        };
        let leaders = async {
            loop {
                self.follow_leader_elections().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            never = self.sessions.follow(router) => never,
            never = forget => never,
            never = remove => never,
            never = leaders => never,
        }
    }
}

/// Failures in a row after which a mailbox reader gives up (the session is closed, and
/// the client reconnects).
pub const READER_RETRIES: u32 = 40;

/// How often acknowledged envelopes are removed from the mailbox (one purge per
/// recipient with acknowledgements).
pub const REMOVE_EVERY: Duration = Duration::from_millis(250);

/// Acknowledged envelopes of one recipient waiting for removal.
#[derive(Debug, Default)]
struct Removal {
    /// Everything in the subject below this was acknowledged: one purge.
    below: Option<u64>,
    /// Acknowledged ids at or above `below`: deleted one by one.
    ids: BTreeSet<u64>,
}

/// A publish JetStream refused because a limit was reached: which one.
fn refusal(error: &str) -> Option<Enqueued> {
    if error.contains("maximum messages per subject") {
        Some(Enqueued::Full)
    } else if error.contains("maximum bytes")
        || error.contains("maximum messages exceeded")
        || error.contains("insufficient resources")
    {
        Some(Enqueued::ServerFull)
    } else {
        None
    }
}

/// When JetStream made `bucket`'s stream (empty if it cannot say).
async fn made_at(bucket: &kv::Store) -> String {
    bucket
        .status()
        .await
        .map(|s| format!("{:?}", s.info.created))
        .unwrap_or_default()
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
    fn tokens_escape_the_dot_and_come_back() {
        let user = Username::parse("a.b-c_d").unwrap();
        assert_eq!(token(&user), "a=b-c_d");
        assert_eq!(user_of(&token(&user)), Some(user));
        assert_eq!(user_of("not*valid"), None);
    }

    #[test]
    fn limits_are_told_apart() {
        assert_eq!(
            refusal("nats: maximum messages per subject exceeded"),
            Some(Enqueued::Full)
        );
        assert_eq!(
            refusal("maximum bytes exceeded"),
            Some(Enqueued::ServerFull)
        );
        assert_eq!(refusal("timed out"), None);
    }
}
