//! The `Nats` backend: relays of one deployment share accounts, sessions, presence and
//! the offline queue through a NATS JetStream cluster (layout and guarantees in
//! docs/CLUSTER.md).
//!
//! - Mailbox: the stream `<prefix>_mailbox`, subjects
//!   `<prefix>.inbox.<recipient>.<address>.<sender>` (the address is the sender's
//!   address group, named by [`crate::limits::shared_address_name`]). A send is `Ok` once
//!   JetStream acknowledged the publish, i.e. stored it on a quorum of replicas (each
//!   fsyncs first when nats-server runs with `sync_interval: always`). The stream
//!   sequence is the envelope id. The per-subject limit with discard-new is one sender's
//!   share from one address (`recipient_queue_full`); the recipient's total and the
//!   shares over several addresses or senders are checked by [`tally`]; the stream's byte
//!   limit is the queue's total (`server_full`); max age expires envelopes.
//! - Delivery (`delivery.rs`, `bell.rs`): each session reads `<prefix>.inbox.<recipient>.>`
//!   from the first envelope still stored: the backlog, then live envelopes, in stream
//!   order, with no gap and no duplicate. Little mail is given by gets when a core NATS
//!   subscription to those subjects rings; much mail at once through an ordered consumer
//!   (made again when it fails or falls silent), given up after `reader_idle_secs` with
//!   nothing to read. An `Ack` deletes the
//!   envelopes (by sequence). Envelopes an earlier layout stored under the bare
//!   `<prefix>.inbox.<recipient>` are read (and removed) alike.
//! - Accounts: the bucket `<prefix>_accounts`, user → public key, written create-only, so
//!   the first key to claim a name keeps it, cluster-wide.
//! - Sessions ([`sessions`]): the bucket `<prefix>_sessions`, user → owning relay and
//!   connection; its revision orders logins, the newest wins. The bucket
//!   `<prefix>_relays` holds each relay's heartbeat: the sessions of a relay whose
//!   heartbeat expired (it crashed) are removed by the others.
//!
//! Usernames may hold `.`, which NATS reserves as the token separator; in subjects and
//! keys it is written `=`, which usernames never hold ([`token`]).

mod accounts;
mod admin;
mod api_gate;
mod bell;
pub use bell::BUSY_AFTER;
mod breaker;
mod delivery;
mod layout;
mod link;
pub mod nodes;
mod outbox;
mod patience;
mod quota;
mod removal;
mod sessions;
mod tally;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use chat_protocol::Username;
use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, NatsBackend};
use crate::fence::FenceTag;
use crate::store::{Enqueued, QueueLimits, StoreError};
use crate::writer::{Done, Ticket};

pub use admin::{ClusterStats, Migration};
pub use api_gate::API_IN_FLIGHT;
pub use delivery::{AbortOnDrop, MailboxRead, READER_RETRIES};
pub use layout::DUPLICATE_WINDOW;
pub use link::LINK_GRACE;
pub use outbox::RETRY_FOR;
pub use patience::PATIENCE;
pub use removal::REMOVE_EVERY;
use removal::Removal;
pub use sessions::{LOGIN_WINDOW, Login};
pub use tally::FAR_FOR;

/// The address part of the subjects of envelopes copied by `admin migrate` (the SQLite
/// store does not keep where a sender connected from).
pub const MIGRATED_ADDRESS: &str = "migrated";

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
    registrations: quota::Registrations,
    sessions: sessions::Sessions,
    known: Mutex<HashSet<Username>>,
    /// The shares of recipients' mailboxes, as last counted.
    tallies: Arc<tally::Tallies>,
    /// The queue limits of this relay's configuration.
    limits: QueueLimits,
    /// Recipients whose mailbox held envelopes of the earlier layout (bare subject): their
    /// removals purge that subject too.
    legacy: Mutex<HashSet<Username>>,
    /// Acknowledged envelopes not yet removed, by recipient ([`Cluster::delete`]).
    removals: Mutex<HashMap<Username, Removal>>,
    /// Held through each removal round ([`Cluster::flush_removals`]): the last one, at
    /// shutdown, waits for a round under way.
    removing: tokio::sync::Mutex<()>,
    /// Whether the NATS connection is up (false while it reconnects).
    link: watch::Receiver<bool>,
    /// How many times the NATS connection was lost: a loss and return between two looks
    /// at `link` (which keeps only the last value) are still seen.
    drops: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the relay serves: the connection is up and the layout is in place.
    serving: watch::Sender<bool>,
    /// What the layout is made from, to make it again ([`Cluster::keep_serving`]).
    spec: Box<(Config, NatsBackend)>,
    /// Counts disturbances (reconnections, stream leader elections): mailbox readers
    /// make their consumers again at each, and waiting ones check their mailboxes.
    disturbances: watch::Sender<u64>,
    /// Bounds the JetStream API requests made per session or per recipient (mailbox
    /// consumers, leader gets of readers not caught up, removals); session reads and
    /// tally fetches each have their own.
    api: api_gate::ApiGate,
    /// Bounds the direct gets of waiting mailbox readers ([`bell`]): they are not
    /// JetStream API requests (nats-server does not queue them with those), so they do
    /// not take the places of consumer makings and removals at a disturbance.
    gets: api_gate::ApiGate,
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
        let drops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dropped = drops.clone();
        let disturbances = watch::Sender::new(0u64);
        let disturbed = disturbances.clone();
        let options = async_nats::ConnectOptions::new()
            .name("secure-chat relay")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let (up, disturbed, dropped) = (up.clone(), disturbed.clone(), dropped.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            up.send_replace(true);
                            disturbed.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            // Counted before it is told: whoever sees the change sees it.
                            dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
        // With retry_on_initial_connect this returns at once; the wait is below.
        let client =
            options
                .connect(addrs.as_slice())
                .await
                .map_err(|e| ClusterError::Connect {
                    urls: urls.clone(),
                    detail: e.to_string(),
                })?;
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
        let api = api_gate::ApiGate::default();
        Ok(Self {
            outbox: outbox::Outbox::start(client, js.clone(), atomic),
            // Session reads have a gate of their own: a login (which has a deadline)
            // never queues behind every reader remaking its consumer at an election.
            sessions: sessions::Sessions::new(
                sessions,
                relays,
                js.clone(),
                api_gate::ApiGate::default(),
            ),
            js,
            mailbox,
            inbox_prefix: format!("{}.inbox.", nats.prefix),
            accounts,
            registrations: quota::Registrations::new(registrations),
            known: Mutex::new(HashSet::new()),
            tallies: Arc::default(),
            limits: config.queue.limits(),
            legacy: Mutex::new(HashSet::new()),
            removals: Mutex::new(HashMap::new()),
            removing: tokio::sync::Mutex::new(()),
            link,
            drops,
            serving: watch::Sender::new(true),
            spec: Box::new((config.clone(), nats.clone())),
            disturbances,
            api,
            gets: api_gate::ApiGate::default(),
        })
    }

    /// Where an envelope from `from` (at the address named `address`) to `to` is stored.
    fn subject(&self, to: &Username, address: &str, from: &str) -> String {
        format!("{}{}.{address}.{from}", self.inbox_prefix, token(to))
    }

    /// The subjects of `user`'s mailbox: `<prefix>.inbox.<user>.` (add `>` for all).
    fn mailbox_prefix(&self, user: &Username) -> String {
        format!("{}{}.", self.inbox_prefix, token(user))
    }

    /// `user`'s subject in the earlier layout (one subject per recipient).
    fn legacy_subject(&self, user: &Username) -> String {
        format!("{}{}", self.inbox_prefix, token(user))
    }

    /// Publishes an envelope to `to`'s mailbox. Returns once it is queued behind every
    /// envelope submitted before it (so envelopes published one after another keep their
    /// order); the ticket answers once JetStream acknowledged it (`Stored(sequence)`) or
    /// refused it. Envelopes are group-committed in atomic batches ([`outbox`]).
    /// `msg_id` deduplicates a publish retried within the stream's duplicate window.
    /// `address` names the sender's address group; the recipient's total and the shares
    /// of `from` and of `address` are checked first ([`tally`]). `fence` places it among
    /// its connection's sends: it is refused `Fenced` if an earlier one to `to` was
    /// refused, here or in the outbox, and recorded if it is refused (`crate::fence`).
    pub async fn publish(
        &self,
        to: &Username,
        from: &Username,
        address: &str,
        payload: tokio_util::bytes::Bytes,
        msg_id: String,
        fence: FenceTag,
    ) -> Ticket {
        let (reply, ticket) = Ticket::pending();
        if !self.exists(to).await.unwrap_or(true) {
            let _ = reply.send(Ok(Done::Enqueued(Enqueued::UnknownRecipient)));
            return ticket;
        }
        // Checked after the lookups above, which may wait out an election: a refusal
        // of an earlier send may have come meanwhile.
        if fence.holds() {
            let _ = reply.send(Ok(Done::Enqueued(Enqueued::Fenced)));
            return ticket;
        }
        let prefix = self.mailbox_prefix(to);
        let sender = token(from);
        let held = match self
            .tallies
            .admit(&self.mailbox, &prefix, address, &sender, &self.limits)
            .await
        {
            Ok(held) => held,
            Err(refused) => {
                fence.refused();
                let _ = reply.send(Ok(Done::Enqueued(refused)));
                return ticket;
            }
        };
        self.outbox
            .submit(outbox::Pending {
                subject: self.subject(to, address, &sender),
                from: from.as_str().to_owned(),
                payload,
                msg_id,
                reply,
                held,
                fence,
            })
            .await;
        ticket
    }

    /// Records that `user` logged in on this relay's connection `conn_id` (see
    /// [`sessions`]), trying until `deadline` (at most [`LOGIN_WINDOW`] after the
    /// connection was accepted). Errors: NATS did not take the write by then.
    pub async fn login(
        &self,
        user: &Username,
        conn_id: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Login, StoreError> {
        self.sessions.login(user, conn_id, deadline).await
    }

    /// Records that `user`'s connection `conn_id` ended, then removes what it acknowledged
    /// now rather than at the next [`REMOVE_EVERY`]: a login right after on another relay
    /// reads the mailbox without it (unless it is quicker than one purge). Awaited by the
    /// connection, so a relay shutting down waits for it (within its grace period).
    pub async fn logout(&self, user: &Username, conn_id: u64) {
        self.sessions.logout(user, conn_id);
        self.flush_user(user).await;
    }

    /// Follows the session bucket into `router` (presence, replaced sessions) until the
    /// relay stops.
    pub async fn follow_sessions(self: &Arc<Self>, router: &crate::router::Router) -> ! {
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
                // In a task of its own: a shutdown that stops this loop does not stop a
                // round midway (its removals are already out of the map); the last
                // round waits for it.
                let cluster = self.clone();
                let _ = tokio::spawn(async move { cluster.flush_removals().await }).await;
            }
        };
        let leaders = async {
            loop {
                self.follow_leader_elections().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            never = self.sessions.follow(router, self.serving.subscribe()) => never,
            never = forget => never,
            never = remove => never,
            never = leaders => never,
        }
    }
}

/// A publish JetStream refused because a limit was reached: which one. The per-subject
/// limit is one sender's share from one address.
fn refusal(error: &str) -> Option<Enqueued> {
    if error.contains("maximum messages per subject") {
        Some(Enqueued::SenderShareFull)
    } else if error.contains("maximum bytes")
        || error.contains("maximum messages exceeded")
        || error.contains("insufficient resources")
    {
        Some(Enqueued::ServerFull)
    } else {
        None
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
            Some(Enqueued::SenderShareFull)
        );
        assert_eq!(
            refusal("maximum bytes exceeded"),
            Some(Enqueued::ServerFull)
        );
        assert_eq!(refusal("timed out"), None);
    }
}
