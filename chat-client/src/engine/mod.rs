//! The client core: one task that owns the connection, the identity, the E2E state and the
//! store. Front ends send [`Command`]s and receive [`Event`]s; nothing they call blocks.
//!
//! Flow: socket → frame → E2E open → store → event, and back: command → outbox (store) →
//! seal → frame → socket. The outbox is the source of truth for what still needs sending:
//! a message leaves it only when the recipient's receipt arrives, or with a reason.
//!
//! This file holds the task's life cycle (connect, back off, session loop); `commands`
//! handles what the front end asks, `inbound` what the server sends, `keys` contact keys
//! and held envelopes, `outbox` what we send.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_protocol::e2e::{Inbound, MessageId, Outbound, RotationPolicy};
use chat_protocol::identity::{Identity, PublicIdentity};
use chat_protocol::message::RequestId;
use chat_protocol::relay_id::RelayFingerprint;
use chat_protocol::trust::Pin;
use chat_protocol::{ClientMessage, Username};
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::{Rng, RngExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::api::{Command, ConnectionState, Event};
use crate::home::{Home, HomeError};
use crate::net::{self, ConnectError, Session};
use crate::store::{RowCipher, Store, StoreError, cipher::STORE_KEY_CONTEXT};

mod commands;
mod group_inbound;
mod group_sends;
mod groups;
pub use groups::group_name_problem;
mod inbound;
mod keys;
mod offers;
mod outbox;

/// Pause before resending after the server answered `rate_limited`.
const RATE_LIMIT_RETRY: Duration = Duration::from_secs(1);
/// How often late and expired messages are looked for, and stalled deliveries retried.
const HOUSEKEEPING: Duration = Duration::from_secs(10);
/// Frames handled before the answers they produced are written (batches receipts/acks).
const READ_BATCH: usize = 64;
/// Sends (texts, receipts, retry requests, group copies) awaiting the relay's answer at
/// once: half the relay's pipeline, so the rest of it is left for other requests and no
/// send is refused for a full pipeline (`shed_when_full`).
const SEND_WINDOW: usize = chat_protocol::message::MAX_PIPELINED / 2;
/// Deliveries kept in memory to retry after a local store failure (e.g. a full disk).
const MAX_STALLED: usize = 1000;
/// Forged envelopes from one sender are reported at most this often (with a count).
const UNDECRYPTABLE_EVERY: Duration = Duration::from_secs(60);
/// The relay's queue age limit is remembered under this `meta` name.
const META_QUEUE_MAX_AGE: &str = "relay_queue_max_age_secs";

/// How the core runs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub home: Home,
    /// Relay address, `HOST:PORT` or `HOST:PORT#FINGERPRINT`.
    pub server: String,
    pub username: Username,
    /// Passphrase of the identity key file (also used to encrypt a new one). With one,
    /// the store's texts and keys are encrypted at rest.
    pub passphrase: Option<String>,
    /// Size of a newly generated identity key.
    pub identity_bits: usize,
    pub rotation: RotationPolicy,
    /// Reconnect delays grow from `backoff_min` to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// We ping a quiet server this often, and drop a connection silent for 3x as long.
    pub ping_interval: Duration,
    /// Retry delay after a full recipient queue or a server-side failure.
    pub retry_later: Duration,
    /// A message sent this long ago without a receipt is reported `undelivered`.
    pub undelivered_after: Duration,
    /// A relay key seen for the first time waits for `TrustServerKey` (the window asks);
    /// otherwise it is pinned at once and reported (headless).
    pub confirm_new_relay_keys: bool,
    /// Most members a group may have (ours and ones we join): 256 unless configured.
    pub max_group_members: usize,
    /// Certificate authorities (PEM) trusted, besides the system's, to vouch for a relay
    /// named without a fingerprint and not pinned yet (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl ClientConfig {
    pub fn new(home: Home, server: String, username: Username) -> Self {
        Self {
            home,
            server,
            username,
            passphrase: None,
            identity_bits: chat_protocol::identity::IDENTITY_BITS,
            rotation: RotationPolicy::default(),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
            ping_interval: Duration::from_secs(25),
            retry_later: Duration::from_secs(30),
            undelivered_after: Duration::from_secs(24 * 3600),
            confirm_new_relay_keys: false,
            ca_file: None,
            max_group_members: chat_protocol::group::DEFAULT_MAX_MEMBERS,
        }
    }
}

/// The front end's side of a running core.
#[derive(Debug)]
pub struct ClientHandle {
    pub commands: mpsc::UnboundedSender<Command>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the core on the current tokio runtime. `notify` is called after every event
/// (the GUI passes `ctx.request_repaint`).
pub fn spawn(config: ClientConfig, notify: impl Fn() + Send + Sync + 'static) -> ClientHandle {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let sink = EventSink {
        tx: ev_tx,
        notify: std::sync::Arc::new(notify),
    };
    let task = tokio::spawn(async move {
        match Engine::start(config, &sink).await {
            Ok(engine) => engine.run(cmd_rx).await,
            Err(event) => {
                sink.emit(event);
                sink.emit(Event::Connection {
                    state: ConnectionState::Offline,
                    retry_in_ms: None,
                    reason: None,
                    queued: 0,
                    max_text_bytes: None,
                });
            }
        }
    });
    ClientHandle {
        commands: cmd_tx,
        events: ev_rx,
        task,
    }
}

#[derive(Clone)]
struct EventSink {
    tx: mpsc::UnboundedSender<Event>,
    notify: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl EventSink {
    fn emit(&self, event: Event) {
        // The kind only: events carry message texts, which never go to logs.
        debug!(event = event.name(), "event");
        let _ = self.tx.send(event);
        (self.notify)();
    }
}

/// E2E state with one contact: the sending epoch (memory only) and the receiving state
/// (a cache of what the store holds).
#[derive(Default)]
struct Peer {
    outbound: Outbound,
    inbound: Option<Inbound>,
}

/// What a request we sent was for.
enum Pending {
    Send {
        id: MessageId,
        to: String,
        epoch: u32,
    },
    Receipt {
        peer: String,
        ids: Vec<MessageId>,
        /// Our epoch it went under.
        epoch: u32,
    },
    Retry {
        peer: String,
        epochs: Vec<u32>,
        /// Our epoch it went under.
        epoch: u32,
    },
    Key {
        user: String,
    },
    /// The copies of a group message for these members (one `SendMany`).
    GroupSend {
        group: chat_protocol::group::GroupId,
        id: MessageId,
        members: Vec<String>,
    },
    Users,
    /// The session's `Sync`: answered once the backlog waiting at login was written.
    Sync,
    /// Presence subscription for these (canonical) names.
    Watch {
        users: Vec<String>,
    },
}

/// Where an envelope being processed came from, and so how it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Delivered now by the relay: acknowledged once dealt with.
    Relay(u64),
    /// Held in our store (key change pending): released once dealt with.
    Held(i64),
    /// A group envelope held in our store (its key or sender's membership was on its
    /// way): released once dealt with.
    GroupHeld(i64),
}

/// Work held until a contact's key arrives.
enum Waiting {
    Envelope {
        source: Source,
        payload: Vec<u8>,
        /// When it reached us: a key checked before that may have changed since.
        arrived: Instant,
    },
    Safety,
}

/// Why a connected session ended.
enum SessionEnd {
    Lost(String),
    Fatal { code: String, message: String },
    Shutdown,
}

struct Engine {
    config: ClientConfig,
    sink: EventSink,
    store: Store,
    /// Shared with the RSA worker.
    identity: std::sync::Arc<Identity>,
    me: Username,
    peers: HashMap<String, Peer>,
    /// Frames to write on the current connection (empty and unused while offline).
    out: Vec<ClientMessage>,
    online: bool,
    next_request: RequestId,
    pending: HashMap<RequestId, Pending>,
    /// Contacts whose key we asked the server for, with what waits on it.
    awaiting_key: HashMap<String, Vec<Waiting>>,
    /// Contacts whose key was checked with the server on this connection, and when.
    checked_keys: HashMap<String, Instant>,
    /// Outbox messages sent on this connection and not yet answered, with their epoch.
    in_flight: HashMap<MessageId, u32>,
    /// (peer, our epoch) the peer asked for again on this connection: whatever went under
    /// it and is answered `Ok` after that is sent again rather than taken as done.
    retired_out: HashSet<(String, u32)>,
    /// Receipts and retry requests sent on this connection and not yet answered.
    receipts_in_flight: HashSet<(String, MessageId)>,
    retries_in_flight: HashSet<(String, u32)>,
    /// Something was queued, receipted or released: seal and send before the next write.
    flush_due: bool,
    /// A flush stopped at [`SEND_WINDOW`]: flush again once an answer makes room.
    window_blocked: bool,
    /// Shutdown was asked for: finish the outbox until this deadline.
    draining_until: Option<Instant>,
    ready_sent: bool,
    /// Delivered envelopes processed since the last write; acknowledged in one frame.
    acks: Vec<u64>,
    /// When to try the outbox again after the server asked us to slow down.
    retry_at: Option<Instant>,
    /// Contacts nothing is sent to until then (their queue at the relay is full, …).
    hold: HashMap<String, Instant>,
    /// Users whose presence we follow: contacts, everyone we exchange messages with, and
    /// those asked for. Watched anew on every connection.
    watch_list: BTreeSet<String>,
    /// Who this session asked the relay to follow (at most `MAX_WATCHED`).
    watching: HashSet<String>,
    /// Largest frame the relay accepts (its `Hello`); 0 before the first connection.
    max_frame: usize,
    /// While connected: the relay's clock minus ours (ms). Ages of sent messages are
    /// judged by the relay's clock, so ours being off by days changes nothing.
    relay_clock: Option<i64>,
    /// Deliveries that failed to be stored (full disk), and all that came after them:
    /// retried in order, not acknowledged.
    stalled: VecDeque<(u64, String, Vec<u8>)>,
    /// A store failure happened during the current retry of `stalled`.
    stall_failed: bool,
    /// Deliveries were dropped from memory while stalled: renew the connection once the
    /// stalled ones are through, so the relay delivers the rest again in order.
    resync: bool,
    /// Key offers: cache, per-sender throttle, the RSA worker.
    offers: offers::Offers,
    /// Per sender: when a forged envelope was last reported, and how many since.
    undecryptable: HashMap<String, (Option<Instant>, usize)>,
    /// Our groups (a cache of the store).
    groups: groups::Groups,
    /// Members' copies of group messages sent on this connection and not yet answered.
    group_in_flight: HashSet<(MessageId, String)>,
    /// The relay answered this session's `Sync`: the backlog waiting at login has been
    /// read, so the membership changes in it are known before any group send goes out.
    synced: bool,
    /// Names whose key was asked for only to check that a new group member exists.
    member_lookups: HashSet<String>,
    /// Group creates and adds waiting for the relay to say their new members exist.
    awaiting_members: Vec<groups::AwaitingMembers>,
}

impl Engine {
    async fn start(config: ClientConfig, sink: &EventSink) -> Result<Self, Event> {
        let home = config.home.clone();
        let passphrase = config.passphrase.clone();
        for warning in home.warnings() {
            warn!("{warning}");
            sink.emit(Event::warning("home_permissions", warning.clone()));
        }
        let home_err = |e: HomeError| {
            let code = match &e {
                HomeError::Identity { source, .. } => match source {
                    chat_protocol::identity::IdentityError::WrongPassphrase => "wrong_passphrase",
                    chat_protocol::identity::IdentityError::PassphraseRequired => {
                        "passphrase_required"
                    }
                    _ => "identity_unreadable",
                },
                _ => "home_unusable",
            };
            Event::error(code, e.to_string())
        };
        let loaded = {
            let home = home.clone();
            let passphrase = passphrase.clone();
            // scrypt takes a while: off the async threads.
            tokio::task::spawn_blocking(move || home.load_identity(passphrase.as_deref()))
                .await
                .map_err(|e| Event::error("internal", e.to_string()))?
                .map_err(home_err)?
        };
        let (identity, encrypted) = match loaded {
            Some(loaded) => loaded,
            None => {
                sink.emit(Event::Status {
                    message: "Generating your identity key (RSA-3072); this takes a few seconds…"
                        .into(),
                });
                let bits = config.identity_bits;
                let encrypted = passphrase.is_some();
                let (home, passphrase) = (home.clone(), passphrase.clone());
                let identity = tokio::task::spawn_blocking(move || {
                    let identity = Identity::generate_with_bits(&mut rand::rng(), bits)
                        .map_err(|e| Event::error("internal", e.to_string()))?;
                    home.save_identity(&identity, passphrase.as_deref())
                        .map_err(home_err)?;
                    Ok::<_, Event>(identity)
                })
                .await
                .map_err(|e| Event::error("internal", e.to_string()))??;
                sink.emit(Event::Status {
                    message: format!("Identity key created: {}", identity.fingerprint()),
                });
                (identity, encrypted)
            }
        };
        // A passphrase given for a key file that has none: protect the file (and the
        // store) with it now, rather than ignore it.
        let encrypted = match (&passphrase, encrypted) {
            (Some(pass), false) => {
                home.save_identity(&identity, Some(pass))
                    .map_err(home_err)?;
                sink.emit(Event::warning(
                    "passphrase_added",
                    format!(
                        "{} was not protected by a passphrase; it is encrypted with the one given \
                         now, and so are your stored messages. Keep the passphrase: it is needed \
                         from now on",
                        home.identity_path().display()
                    ),
                ));
                true
            }
            _ => encrypted,
        };
        let cipher = RowCipher::new(identity.derive_key(STORE_KEY_CONTEXT), encrypted);
        let store = Store::open(home.dir(), cipher).map_err(|e| {
            Event::error(
                "store_unusable",
                format!(
                    "{e}. The database is {}; move it aside to start with an empty history \
                     (your identity and contacts' messages still queued on the relay are kept).",
                    home.dir().join(Store::FILE_NAME).display()
                ),
            )
        })?;
        let groups = store
            .groups()
            .map_err(|e| Event::error("store_unusable", format!("groups could not be read: {e}")))?
            .into_iter()
            .map(|g| (g.membership.current().id, g))
            .collect();
        Ok(Self {
            groups,
            group_in_flight: HashSet::new(),
            synced: false,
            member_lookups: HashSet::new(),
            awaiting_members: Vec::new(),
            me: config.username.clone(),
            config,
            sink: sink.clone(),
            store,
            identity: std::sync::Arc::new(identity),
            peers: HashMap::new(),
            out: Vec::new(),
            online: false,
            next_request: 100,
            pending: HashMap::new(),
            awaiting_key: HashMap::new(),
            checked_keys: HashMap::new(),
            in_flight: HashMap::new(),
            retired_out: HashSet::new(),
            receipts_in_flight: HashSet::new(),
            retries_in_flight: HashSet::new(),
            flush_due: false,
            window_blocked: false,
            draining_until: None,
            ready_sent: false,
            acks: Vec::new(),
            retry_at: None,
            hold: HashMap::new(),
            watch_list: BTreeSet::new(),
            watching: HashSet::new(),
            max_frame: 0,
            relay_clock: None,
            stalled: VecDeque::new(),
            stall_failed: false,
            resync: false,
            offers: offers::Offers::new(),
            undecryptable: HashMap::new(),
        })
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut attempt: u32 = 0;
        // Connections in a row that opened but got no answer at all, before any login.
        let mut silent: u32 = 0;
        let mut ever_connected = false;
        let relays = match net::check_server_address(&self.config.server) {
            Ok(list) => list.relays,
            Err(message) => {
                self.sink.emit(Event::error("invalid_server", message));
                return self.stay_offline(&mut commands).await;
            }
        };
        // The relay of the list tried next: after a failure, the next one, at once; after
        // a whole round of failures, the first again, after the backoff.
        let mut current = 0;
        // Read once, when first needed: only for a relay whose key is not pinned.
        let mut authorities = None;
        loop {
            let address = relays[current].clone();
            self.connection_event(ConnectionState::Connecting, None);
            // The relays of a list share one key: one pinned for any of them is expected
            // of all.
            let home = &self.config.home;
            let pinned = crate::known_relays::pinned(home, &address.host_port).or_else(|| {
                relays
                    .iter()
                    .find_map(|r| crate::known_relays::pinned(home, &r.host_port))
            });
            let expect = match (address.fingerprint, pinned) {
                (Some(fp), _) | (None, Some(fp)) => net::Expect::Pinned(fp),
                (None, None) if self.config.confirm_new_relay_keys => net::Expect::AskFirst,
                (None, None) => net::Expect::FirstUse,
            };
            // A --ca-file is checked even while a pin makes it unneeded, so a bad one is
            // found when it is given, not on the day the pin is removed.
            if (self.config.ca_file.is_some() || !matches!(expect, net::Expect::Pinned(_)))
                && authorities.is_none()
            {
                match net::authorities(self.config.ca_file.as_deref()) {
                    Ok(roots) => authorities = Some(roots),
                    Err(message) => {
                        self.sink.emit(Event::error("invalid_ca_file", message));
                        return self.stay_offline(&mut commands).await;
                    }
                }
            }
            let roots = authorities.as_ref().and_then(Option::as_ref);
            let connected = net::connect(&address, expect, roots, &self.me, &self.identity).await;
            let failure = match connected {
                Ok(session) => {
                    attempt = 0;
                    silent = 0;
                    ever_connected = true;
                    info!(registered = session.registered, "connected");
                    // A key a certificate authority vouched for is pinned as a first use's
                    // would be, so a later impostor with any other certificate is a
                    // mismatch, not a new first use.
                    if pinned != Some(session.fingerprint) {
                        self.pin_relay(
                            &address.host_port,
                            session.fingerprint,
                            pinned.is_none() && address.fingerprint.is_none(),
                            false,
                            session.certified,
                        );
                    }
                    // The key is the cluster's: pinned for the other relays of the list too.
                    for other in &relays {
                        if crate::known_relays::pinned(&self.config.home, &other.host_port)
                            .is_none()
                        {
                            let _ = crate::known_relays::pin(
                                &self.config.home,
                                &other.host_port,
                                session.fingerprint,
                            );
                        }
                    }
                    match self.session(session, &mut commands).await {
                        SessionEnd::Shutdown => return self.stop(),
                        SessionEnd::Fatal { code, message } => {
                            self.sink.emit(Event::error(code, message));
                            return self.stay_offline(&mut commands).await;
                        }
                        SessionEnd::Lost(reason) => reason,
                    }
                }
                Err(ConnectError::Fatal { code, message }) => {
                    self.sink.emit(Event::error(code, message));
                    return self.stay_offline(&mut commands).await;
                }
                Err(ConnectError::KeyMismatch {
                    expected,
                    presented,
                }) => {
                    // Where the expected key came from decides what the user can do.
                    let source = if address.fingerprint.is_some() {
                        format!(
                            "{expected} was given with the address (#fingerprint after the \
                             port, on the command line or in the saved server setting). If \
                             you typed or pasted it, check it against the relay operator's for \
                             a typo first. Otherwise someone may be impersonating the relay. \
                             If its operator tells you the key really changed, compare the new \
                             fingerprint with them and give the address as {}#{presented}",
                            address.host_port
                        )
                    } else {
                        format!(
                            "{expected} is pinned for it since an earlier connection. Someone \
                             may be impersonating the relay. If its operator tells you the key \
                             really changed, compare the new fingerprint with them and start \
                             with --server {}#{presented} (or remove its line from {})",
                            address.host_port,
                            self.config
                                .home
                                .dir()
                                .join(crate::known_relays::FILE)
                                .display()
                        )
                    };
                    self.sink.emit(Event::error(
                        "server_key_mismatch",
                        format!(
                            "the relay at {} presented the key {presented}, but {source}. \
                             Nothing was sent; your messages stay in the outbox.",
                            address.host_port,
                        ),
                    ));
                    self.sink.emit(Event::ServerKey {
                        server: address.host_port.clone(),
                        fingerprint: presented.to_string(),
                        first_use: false,
                        needs_confirmation: true,
                        certified: false,
                    });
                    if !self.await_trust(&address.host_port, &mut commands).await {
                        return; // already offline
                    }
                    continue;
                }
                Err(ConnectError::Unpinned { presented }) => {
                    self.sink.emit(Event::ServerKey {
                        server: address.host_port.clone(),
                        fingerprint: presented.to_string(),
                        first_use: true,
                        needs_confirmation: true,
                        certified: false,
                    });
                    if !self.await_trust(&address.host_port, &mut commands).await {
                        return; // already offline
                    }
                    continue;
                }
                Err(ConnectError::Silent(reason))
                    if !ever_connected && silent as usize >= relays.len() =>
                {
                    // Twice in a row and never a relay here: most likely the wrong port.
                    self.sink.emit(Event::error(
                        "not_a_relay",
                        format!(
                            "{reason}, twice: it does not answer like a Secure Chat relay (a \
                             relay greets at once). Check the address and port (the relay's \
                             default port is 65432)"
                        ),
                    ));
                    return self.stay_offline(&mut commands).await;
                }
                Err(ConnectError::Silent(reason)) => {
                    silent += 1;
                    reason
                }
                Err(ConnectError::Transient(reason)) => {
                    silent = 0;
                    reason
                }
            };
            if self.draining_until.is_some_and(|d| Instant::now() >= d) {
                return self.stop();
            }
            current = (current + 1) % relays.len();
            if current != 0 {
                // Another relay of the cluster may be up: try it at once.
                warn!(
                    "{} failed: {failure}; trying {}",
                    address.host_port, relays[current].host_port
                );
                self.emit_connection(
                    ConnectionState::Reconnecting,
                    Some(Duration::ZERO),
                    Some(failure),
                );
                continue;
            }
            let delay = backoff(attempt, self.config.backoff_min, self.config.backoff_max);
            attempt = attempt.saturating_add(1);
            warn!("disconnected: {failure}; retrying in {delay:?}");
            self.emit_connection(ConnectionState::Reconnecting, Some(delay), Some(failure));
            if self.wait_offline(delay, &mut commands).await {
                return self.stop();
            }
        }
    }

    fn stop(&mut self) {
        self.connection_event(ConnectionState::Offline, None);
    }

    /// Records `fingerprint` as the key of the relay at `host_port` and says so.
    fn pin_relay(
        &mut self,
        host_port: &str,
        fingerprint: RelayFingerprint,
        first_use: bool,
        confirmed: bool,
        certified: bool,
    ) {
        if let Err(e) = crate::known_relays::pin(&self.config.home, host_port, fingerprint) {
            self.sink.emit(Event::warning(
                "relay_key_not_saved",
                format!(
                    "the relay's key could not be saved ({e}); it will be checked again next time"
                ),
            ));
        }
        if !confirmed {
            self.sink.emit(Event::ServerKey {
                server: host_port.to_owned(),
                fingerprint: fingerprint.to_string(),
                first_use: first_use && !certified,
                needs_confirmation: false,
                certified,
            });
        }
    }

    /// Offline until the user pins a relay key (`TrustServerKey`: returns true, to connect
    /// again) or quits (false). Other commands are served offline meanwhile.
    async fn await_trust(
        &mut self,
        host_port: &str,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        self.connection_event(ConnectionState::Offline, None);
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Shutdown { .. } => return false,
                Command::TrustServerKey { fingerprint } => match fingerprint.parse() {
                    Ok(fp) => {
                        self.pin_relay(host_port, fp, false, true, false);
                        return true;
                    }
                    Err(e) => self
                        .sink
                        .emit(Event::error("invalid_fingerprint", format!("{e}"))),
                },
                cmd => self.command_offline(cmd),
            }
        }
        false
    }

    /// After a fatal error: serve local commands until shutdown.
    async fn stay_offline(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) {
        self.connection_event(ConnectionState::Offline, None);
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Shutdown { .. } => return,
                // Not "once reconnected": this client will not reconnect.
                Command::ListUsers => self.sink.emit(Event::error(
                    "not_connected",
                    "not connected: the relay refused this client (see the error above), so it \
                     will not reconnect",
                )),
                cmd => self.command_offline(cmd),
            }
        }
    }

    /// Handles commands while disconnected for `delay`. Returns true on shutdown.
    async fn wait_offline(
        &mut self,
        delay: Duration,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        let until = Instant::now() + delay;
        let until = self.draining_until.map_or(until, |d| until.min(d));
        loop {
            tokio::select! {
                _ = sleep_until(until) => return self.draining_until.is_some_and(|d| Instant::now() >= d),
                cmd = commands.recv() => match cmd {
                    None => return true,
                    Some(Command::Shutdown { flush_for }) => {
                        if self.store.outbox_len().unwrap_or(0) == 0 {
                            return true;
                        }
                        self.draining_until = Some(Instant::now() + flush_for);
                        // Keep trying to connect until the deadline.
                    }
                    Some(cmd) => self.command_offline(cmd),
                }
            }
        }
    }

    /// One connected session, until it ends.
    async fn session(
        &mut self,
        session: Session,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> SessionEnd {
        let Session {
            mut conn,
            max_frame,
            queue_max_age_secs,
            clock_offset_ms,
            ..
        } = session;
        self.max_frame = max_frame;
        self.relay_clock = Some(clock_offset_ms);
        if let Err(e) = self.store.set_meta(META_QUEUE_MAX_AGE, queue_max_age_secs) {
            self.store_error(e);
        }
        self.online = true;
        let end = self.session_loop(&mut conn, commands).await;
        self.online = false;
        self.relay_clock = None;
        self.out.clear();
        self.stalled.clear();
        self.resync = false;
        self.offers.forget_waiting();
        end
    }

    async fn session_loop(
        &mut self,
        conn: &mut net::Conn,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> SessionEnd {
        self.pending.clear();
        self.awaiting_key.clear();
        self.checked_keys.clear();
        self.in_flight.clear();
        self.retired_out.clear();
        self.hold.clear();
        self.receipts_in_flight.clear();
        self.retries_in_flight.clear();
        self.group_in_flight.clear();
        self.synced = false;
        self.forget_member_checks();
        self.acks.clear();
        self.out.clear();
        // A new connection starts new epochs towards everyone.
        for peer in self.peers.values_mut() {
            peer.outbound.rotate();
        }
        if !self.ready_sent {
            self.ready_sent = true;
            self.sink.emit(Event::Ready {
                user: self.me.to_string(),
                fingerprint: self.identity.fingerprint().to_string(),
            });
            match self.store.contacts().and_then(|users| {
                let verified = self.store.verified_contacts()?;
                let archived = self.store.archived_contacts()?;
                let mut last = self.store.last_messages()?;
                last.retain(|m| users.binary_search(&m.user).is_ok());
                Ok((users, verified, last, archived))
            }) {
                Ok((users, verified, last, archived)) => self.sink.emit(Event::Contacts {
                    users,
                    verified,
                    last,
                    archived,
                }),
                Err(e) => self.store_error(e),
            }
            self.group_command(Command::Groups);
        }
        self.connection_event(ConnectionState::Connected, None);

        // Presence is only sent to watchers: follow our contacts on every connection, the
        // most recent conversations first (a session may follow only so many).
        self.watching.clear();
        let mut all = match self.store.contacts_by_recency() {
            Ok(users) => users,
            Err(e) => {
                self.store_error(e);
                Vec::new()
            }
        };
        let known: HashSet<&String> = all.iter().collect();
        let asked: Vec<String> = self
            .watch_list
            .iter()
            .filter(|u| !known.contains(u))
            .cloned()
            .collect();
        // Fellow group members too (their presence dots), after the contacts.
        let me = self.me.clone();
        let members: BTreeSet<String> = self
            .groups
            .values()
            .map(|g| g.membership.current())
            .filter(|s| s.is_member(&me))
            .flat_map(|s| s.members.iter().map(|u| u.to_string()))
            .filter(|u| !known.contains(u) && !asked.contains(u))
            .collect();
        all.extend(asked);
        all.extend(members);
        self.watch_list.extend(all.iter().cloned());
        self.send_watch(all);
        // Group sends wait until the backlog is read (a removal may be in it).
        self.request(Pending::Sync, |id| ClientMessage::Sync { id });
        self.release_held_for_usable_keys();
        self.housekeeping();
        self.flush_due = true;

        let ping_interval = self.config.ping_interval;
        let mut last_heard = Instant::now();
        let mut pinged = false;
        let mut housekeeping_at = Instant::now() + HOUSEKEEPING;
        loop {
            if self.window_blocked && !self.send_window_full() {
                self.window_blocked = false;
                self.flush_due = true;
            }
            if std::mem::take(&mut self.flush_due) {
                self.flush();
            }
            if !self.acks.is_empty() {
                self.out.push(ClientMessage::Ack {
                    envelope_ids: std::mem::take(&mut self.acks),
                });
            }
            for msg in self.out.drain(..) {
                if let Err(e) = conn.feed(msg).await {
                    return SessionEnd::Lost(format!("write failed: {e}"));
                }
            }
            if let Err(e) = conn.flush().await {
                return SessionEnd::Lost(format!("write failed: {e}"));
            }
            if let Some(deadline) = self.draining_until
                && (Instant::now() >= deadline || self.store.outbox_len().unwrap_or(0) == 0)
            {
                return SessionEnd::Shutdown;
            }
            let wake = if pinged {
                last_heard + ping_interval * 3
            } else {
                last_heard + ping_interval
            };
            let wake = wake.min(housekeeping_at);
            let wake = self.offers.next_wake().map_or(wake, |t| wake.min(t));
            let wake = self.draining_until.map_or(wake, |d| wake.min(d));
            let wake = self.retry_at.map_or(wake, |r| wake.min(r));
            tokio::select! {
                frame = conn.next() => {
                    let mut frame = frame;
                    // Handle what is already buffered before writing the answers, so
                    // acknowledgements and receipts go out in batches.
                    for handled in 1.. {
                        match frame {
                            None => return SessionEnd::Lost("the server closed the connection".into()),
                            Some(Err(e)) => return SessionEnd::Lost(crate::net::connection_lost(&e)),
                            Some(Ok(msg)) => {
                                last_heard = Instant::now();
                                pinged = false;
                                if let Some(end) = self.server_message(msg) {
                                    return end;
                                }
                            }
                        }
                        if handled == READ_BATCH {
                            break;
                        }
                        // Only what is buffered already: a frame taken here is handled.
                        match conn.next().now_or_never() {
                            Some(next) => frame = next,
                            None => break,
                        }
                    }
                },
                cmd = commands.recv() => match cmd {
                    None => return SessionEnd::Shutdown,
                    Some(Command::Shutdown { flush_for }) => {
                        self.draining_until = Some(Instant::now() + flush_for);
                    }
                    Some(cmd) => self.command_online(cmd),
                },
                Some(done) = self.offers.done_rx.recv() => self.offer_unwrapped(done),
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if self.retry_at.is_some_and(|r| now >= r) {
                        self.retry_at = None;
                        self.flush_due = true;
                    }
                    if self.offers.next_wake().is_some_and(|t| now >= t) {
                        self.offers_unthrottled();
                    }
                    if now >= housekeeping_at {
                        housekeeping_at = now + HOUSEKEEPING;
                        self.housekeeping();
                        self.retry_stalled();
                        self.flush_undecryptable();
                        if self.resync && self.stalled.is_empty() {
                            return SessionEnd::Lost("catching up after the local store could not write".into());
                        }
                    }
                    if now >= last_heard + ping_interval * 3 {
                        return SessionEnd::Lost("the server stopped answering".into());
                    }
                    if !pinged && now >= last_heard + ping_interval {
                        pinged = true;
                        self.out.push(ClientMessage::Ping { nonce: rand::rng().next_u64() });
                    }
                }
            }
        }
    }

    /// Sends nothing to `peer` for `delay`. Returns whether it was not held already.
    fn hold_peer(&mut self, peer: &str, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        match self.hold.insert(peer.to_owned(), until) {
            Some(before) if before > Instant::now() => {
                self.hold.insert(peer.to_owned(), before.max(until));
                false
            }
            _ => true,
        }
    }

    /// Whether nothing may be sent to `peer` now. A held peer's hold end is a time to
    /// try again (a hold may have been extended past the retry already set).
    fn held(&mut self, peer: &str) -> bool {
        match self.hold.get(peer).copied() {
            Some(until) if until > Instant::now() => {
                self.retry_at = Some(self.retry_at.map_or(until, |r| r.min(until)));
                true
            }
            Some(_) => {
                self.hold.remove(peer);
                false
            }
            None => false,
        }
    }

    fn request(&mut self, what: Pending, make: impl FnOnce(RequestId) -> ClientMessage) {
        self.next_request = self.next_request.wrapping_add(1).max(100);
        let id = self.next_request;
        self.pending.insert(id, what);
        self.out.push(make(id));
    }

    fn peer(&mut self, name: &str) -> &mut Peer {
        self.peers.entry(name.to_owned()).or_default()
    }

    /// `name`'s receiving state (from the store the first time).
    fn inbound_state(&mut self, name: &str) -> Result<Inbound, StoreError> {
        if let Some(state) = self.peers.get(name).and_then(|p| p.inbound.clone()) {
            return Ok(state);
        }
        let state = match self.store.inbound_state(name) {
            Ok(state) => state,
            Err(StoreError::Undecryptable(_)) => {
                // Unreadable state is lost state: start afresh; retry requests recover.
                warn!(
                    peer = name,
                    "stored end-to-end state unreadable; starting afresh"
                );
                self.store.reset_state(name)?;
                Inbound::default()
            }
            Err(e) => return Err(e),
        };
        self.peer(name).inbound = Some(state.clone());
        Ok(state)
    }

    fn pin(&mut self, user: &str) -> Option<Pin> {
        match self.store.pin(user) {
            Ok(pin) => pin,
            Err(e) => {
                self.store_error(e);
                None
            }
        }
    }

    /// Saves a pin; false (and the user told) if the store could not write it.
    fn save_pin(&mut self, user: &str, pin: &Pin) -> bool {
        match self.store.save_pin(user, pin) {
            Ok(()) => true,
            Err(e) => {
                self.store_error(e);
                false
            }
        }
    }

    /// Saves a new contact's pin, listed or not (see `Store::save_pin_unlisted`); false
    /// (and the user told) if the store could not write it.
    fn save_new_pin(&mut self, user: &str, pin: &Pin, listed: bool) -> bool {
        let saved = if listed {
            self.store.save_pin(user, pin)
        } else {
            self.store.save_pin_unlisted(user, pin)
        };
        saved.map_err(|e| self.store_error(e)).is_ok()
    }

    /// The pinned, usable key of `user`, parsed.
    fn usable_key(&mut self, user: &str) -> Option<(Username, PublicIdentity)> {
        let pin = self.pin(user).filter(Pin::usable)?;
        let name = Username::parse(user).ok()?;
        let public = PublicIdentity::from_der(&pin.key).ok()?;
        Some((name, public))
    }

    /// Canonical form of a user-typed contact name, or an error event.
    fn contact_name(&self, raw: &str) -> Option<String> {
        match Username::parse(raw.trim()) {
            Ok(name) => Some(name.to_string()),
            Err(e) => {
                self.sink
                    .emit(Event::error("invalid_username", format!("{raw:?}: {e}")));
                None
            }
        }
    }

    fn connection_event(&self, state: ConnectionState, retry: Option<Duration>) {
        self.emit_connection(state, retry, None);
    }

    fn emit_connection(
        &self,
        state: ConnectionState,
        retry: Option<Duration>,
        reason: Option<String>,
    ) {
        self.sink.emit(Event::Connection {
            state,
            retry_in_ms: retry.map(|d| d.as_millis() as u64),
            reason,
            queued: self.store.outbox_len().unwrap_or(0)
                + self.store.group_sends_len().unwrap_or(0),
            max_text_bytes: (state == ConnectionState::Connected && self.max_frame > 0)
                .then(|| self.largest_text()),
        });
    }

    fn store_error(&self, e: StoreError) {
        warn!("store error: {e}");
        let hint = if e.is_full() {
            "the disk is full; free some space (nothing is lost: it is retried)"
        } else {
            "check free disk space and the home directory's permissions"
        };
        self.sink
            .emit(Event::error("store_error", format!("{e}; {hint}")));
    }
}

/// Test hook, in debug builds only: with `CHAT_TEST_ABORT_AFTER_STORES=N` the process
/// aborts right after the N-th received text is committed and before its `Ack` is
/// written — the crash window between store and acknowledgement, hit on purpose.
#[cfg(debug_assertions)]
fn crash_point_after_store() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static LEFT: OnceLock<Option<AtomicU64>> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        std::env::var("CHAT_TEST_ABORT_AFTER_STORES")
            .ok()
            .and_then(|n| n.parse().ok())
            .map(AtomicU64::new)
    });
    if let Some(left) = left
        && left.fetch_sub(1, Ordering::SeqCst) == 1
    {
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
fn crash_point_after_store() {}

fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    // Full jitter in [exp/2, exp] so many clients don't reconnect in lockstep.
    let half = exp / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

impl Engine {
    /// The relay's clock now (ms since the Unix epoch), while connected.
    fn relay_now_ms(&self) -> Option<u64> {
        self.relay_clock
            .map(|offset| (now_ms() as i64).saturating_add(offset).max(0) as u64)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_id() -> MessageId {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..20 {
            let d = backoff(attempt, min, max);
            let exp = min.saturating_mul(1 << attempt.min(16)).min(max);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
    }
}
