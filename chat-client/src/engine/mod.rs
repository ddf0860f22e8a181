//! The client core: one task that owns the connection, the identity, the E2E state and the
//! store. Front ends send [`Command`]s and receive [`Event`]s; nothing they call blocks.
//!
//! Flow: socket → frame → E2E open → store → event, and back: command → outbox (store) →
//! seal → frame → socket. The outbox is the source of truth for what still needs sending:
//! a message leaves it only when the recipient's receipt arrives, or with a reason.
//!
//! This file holds the engine's state; `lifecycle` runs the task (connect, back off,
//! reconnect), `session` one connected session's loop, `commands` what the front end
//! asks, `inbound` what the server sends, `peers` per-contact state and pins, `keys`
//! contact keys and held envelopes, `outbox` what we send.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_protocol::e2e::{Inbound, MessageId, Outbound, RotationPolicy};
use chat_protocol::identity::Identity;
use chat_protocol::message::RequestId;
use chat_protocol::{ClientMessage, Username};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::api::{Command, ConnectionState, Event};
use crate::home::Home;
use crate::store::{Store, StoreError};

mod commands;
mod full_queue;
mod group_changes;
mod group_checks;
mod group_inbound;
mod group_sends;
mod groups;
pub use groups::group_name_problem;
mod inbound;
mod keys;
mod lifecycle;
mod offers;
mod outbox;
mod peers;
mod replies;
mod session;
mod stalls;
mod unsettled;

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
/// Copies awaiting the relay's answer at once (a `SendMany` has one per member, a `Send`
/// one), counted before a send is added: with one more `SendMany` of at most
/// [`chat_protocol::message::MAX_FANOUT`] copies the total stays under the relay's 512
/// (4 × its pipeline), past which it sheds. Without it, three `SendMany`s to a
/// 200-member group passed 512 and every one written before the refusal was read was
/// refused in turn, each paced as a full fan-out: 12-33 s with nothing accepted.
const COPY_WINDOW: usize = 2 * chat_protocol::message::MAX_PIPELINED;
/// Queued messages a flush reads from the store at a time (ids and contacts, no bodies):
/// a flush stops once the window is full, usually within the first page.
const FLUSH_PAGE: usize = 128;
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
    /// Retry delay after a server-side failure, and the longest one after a full
    /// recipient queue.
    pub retry_later: Duration,
    /// First retry delay after a full recipient queue (`recipient_queue_full`); it
    /// doubles with each retry refused, up to `retry_later` while the recipient is
    /// offline and up to 4 s while they are online. A hold for a full queue ends at once
    /// when the recipient comes online or an envelope from them arrives (they are reading
    /// their queue).
    pub queue_full_retry: Duration,
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
            queue_full_retry: Duration::from_secs(1),
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

/// Texts queued with one commit at most, when that many `Send`s wait at once.
const SEND_BURST: usize = 256;

/// The front end's commands, read ahead by at most one: a run of `Send`s waiting at once
/// is taken together ([`Commands::sends_behind`]), and the command that ended the run is
/// the next one [`Commands::recv`] gives, so every command is handled in the order sent.
pub(super) struct Commands {
    rx: mpsc::UnboundedReceiver<Command>,
    next: Option<Command>,
}

impl Commands {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<Command>) -> Self {
        Self { rx, next: None }
    }

    /// The next command; `None` once the front end is gone. Cancel-safe (as
    /// `mpsc::UnboundedReceiver::recv`): a command read ahead is given at the first poll.
    pub(super) async fn recv(&mut self) -> Option<Command> {
        match self.next.take() {
            Some(cmd) => Some(cmd),
            None => self.rx.recv().await,
        }
    }

    /// The `Send` (to, text) just received, with the `Send`s already waiting behind it:
    /// [`SEND_BURST`] at most, without waiting for more; a command of another kind ends
    /// the run and is kept for [`Commands::recv`].
    pub(super) fn burst(&mut self, to: String, text: String) -> Vec<(String, String)> {
        let mut sends = vec![(to, text)];
        while sends.len() < SEND_BURST && self.next.is_none() {
            match self.rx.try_recv() {
                Ok(Command::Send { to, text }) => sends.push((to, text)),
                Ok(other) => self.next = Some(other),
                Err(_) => break,
            }
        }
        sends
    }
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
                let reason = match &event {
                    Event::Error { message, .. } => Some(message.clone()),
                    _ => None,
                };
                sink.emit(event);
                sink.emit(Event::Connection {
                    state: ConnectionState::Offline,
                    retry_in_ms: None,
                    reason,
                    queued: 0,
                    max_text_bytes: None,
                    server: None,
                });
                // What a front end sent meanwhile is answered after the stop: its reports
                // said, the rest told as not done. Closed first, so nothing sent from now
                // on is taken and dropped unanswered (the sender gets it back).
                let mut cmd_rx = cmd_rx;
                cmd_rx.close();
                while let Ok(cmd) = cmd_rx.try_recv() {
                    if let Some(event) = cmd.not_done() {
                        sink.emit(event);
                    }
                }
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
    /// Outbox messages sent and not yet answered on this connection, or answered and
    /// not yet recorded (held by [`Unsettled`](unsettled::Unsettled) entries).
    in_flight: HashSet<MessageId>,
    /// (peer, our epoch) the peer asked for again on this connection: whatever went under
    /// it and is answered `Ok` after that is sent again rather than taken as done.
    retired_out: HashSet<(String, u32)>,
    /// Receipts and retry requests sent on this connection and not yet answered.
    receipts_in_flight: HashSet<(String, MessageId)>,
    retries_in_flight: HashSet<(String, u32)>,
    /// Failures to record what the relay accepted (a text or group copy sent, receipts or
    /// retry requests owed no more) since the last record that succeeded: what was told.
    settling_fails: unsettled::SettlingFailures,
    /// What the relay accepted and the store failed to record: kept in flight (not sent
    /// again) and recorded again on the retry timer.
    unsettled: Vec<unsettled::Unsettled>,
    /// Something was queued, receipted or released: seal and send before the next write.
    flush_due: bool,
    /// A flush stopped at [`SEND_WINDOW`]: flush again once an answer makes room.
    window_blocked: bool,
    /// The relay (`host:port`) connected to or being tried, for `connection` events.
    relay: Option<String>,
    /// The relay shed a send (`server_busy`): nothing new is sent until every send in
    /// flight is answered and the `Ping` after them answered. The relay refuses every
    /// send that reaches it before the `Pong` to its newest fence ping; a send written
    /// before that `Pong` (to another contact, whose messages are not held) was refused
    /// in turn and raised a newer ping, and so on for as long as other contacts had
    /// messages queued: a 200-member group's sender stayed refused for minutes.
    shed_fence: bool,
    /// Shutdown was asked for: finish the outbox until this deadline.
    draining_until: Option<Instant>,
    ready_sent: bool,
    /// Delivered envelopes processed since the last write; acknowledged in one frame.
    acks: Vec<u64>,
    /// When to try the outbox again after the server asked us to slow down, and to record
    /// again what could not be recorded (`unsettled`).
    retry_at: Option<Instant>,
    /// Contacts nothing is sent to until then (their queue at the relay is full, …).
    hold: HashMap<String, Instant>,
    /// Contacts whose queue at the relay was found full (see `full_queue`).
    queue_full: HashMap<String, full_queue::FullQueue>,
    /// Watched contacts the relay last said are online (this connection).
    online_peers: HashSet<String>,
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
    /// Per sender, the relay's id of the first of its envelopes left to the relay this
    /// session. Every later one of that sender is left too (relay ids grow in delivery
    /// order): opening a later one first would show it out of order, and once it moved
    /// the replay window (64 messages) past the left one, that one would be taken for a
    /// duplicate when delivered again — lost. Not empty: the connection is renewed once
    /// nothing waits in memory, so the relay delivers them again in order.
    left_after: HashMap<String, u64>,
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
    awaiting_members: Vec<group_checks::AwaitingMembers>,
}

impl Engine {
    /// Queues a request for the server, remembering in `pending` what its answer (matched
    /// by request id; ids from 100 up, wrapping) is for.
    fn request(&mut self, what: Pending, make: impl FnOnce(RequestId) -> ClientMessage) {
        self.next_request = self.next_request.wrapping_add(1).max(100);
        let id = self.next_request;
        self.pending.insert(id, what);
        self.out.push(make(id));
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
            server: self.relay.clone(),
        });
    }

    fn store_error(&self, e: StoreError) {
        warn!("store error: {e}");
        let hint = if e.is_full() {
            self.store.reclaim_log();
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

/// Envelopes kept in memory per sender while they wait (for the sender's key, or behind
/// its key offer); more are left to the relay. In debug builds
/// `CHAT_TEST_MAX_WAITING=N` lowers it, so tests reach the limit with a few messages.
fn max_waiting() -> usize {
    const MAX_WAITING: usize = 1000;
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        static LIMIT: OnceLock<usize> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            std::env::var("CHAT_TEST_MAX_WAITING")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(MAX_WAITING)
        })
    }
    #[cfg(not(debug_assertions))]
    MAX_WAITING
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
