//! The client core: one task that owns the connection, the identity, the E2E state and the
//! store. Front ends send [`Command`]s and receive [`Event`]s; nothing they call blocks.
//!
//! Flow: socket → frame → E2E open → store → event, and back: command → outbox (store) →
//! seal → frame → socket. The outbox is the source of truth for what still needs sending.
//!
//! This file holds the task's life cycle (connect, back off, session loop, commands);
//! `inbound` handles what the server sends, `outbox` what we send.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_protocol::e2e::{Inbound, MessageId, Outbound, RotationPolicy};
use chat_protocol::identity::{Identity, PublicIdentity};
use chat_protocol::message::RequestId;
use chat_protocol::safety::SafetyNumber;
use chat_protocol::trust::{self, Pin};
use chat_protocol::{ClientMessage, Username};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, RngExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use crate::api::{Command, ConnectionState, Event};
use crate::home::{Home, HomeError};
use crate::net::{self, Conn, ConnectError};
use crate::store::{Floors, Store, StoreError};

mod inbound;
mod outbox;

/// Pause before resending after the server answered `rate_limited`.
const RATE_LIMIT_RETRY: Duration = Duration::from_secs(1);

/// How the core runs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub home: Home,
    /// Relay address, `HOST:PORT`.
    pub server: String,
    pub username: Username,
    /// Passphrase of the identity key file (also used to encrypt a new one).
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
        debug!(?event, "event");
        let _ = self.tx.send(event);
        (self.notify)();
    }
}

/// E2E state with one contact (not persisted except for the floors).
struct Peer {
    outbound: Outbound,
    inbound: Inbound,
}

/// What a request we sent was for.
enum Pending {
    Send {
        id: MessageId,
        to: String,
    },
    Receipt,
    Key {
        user: String,
    },
    Users,
    /// Presence subscription for these (canonical) names.
    Watch {
        users: Vec<String>,
    },
}

/// Work held until a contact's key arrives.
enum Waiting {
    Envelope { envelope_id: u64, payload: Vec<u8> },
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
    identity: Identity,
    me: Username,
    peers: HashMap<String, Peer>,
    next_request: RequestId,
    pending: HashMap<RequestId, Pending>,
    /// Contacts whose key we asked the server for, with what waits on it.
    awaiting_key: HashMap<String, Vec<Waiting>>,
    /// Contacts whose key was checked with the server on this connection.
    checked_keys: HashSet<String>,
    /// Outbox messages sent on this connection and not yet answered.
    in_flight: HashSet<MessageId>,
    /// Shutdown was asked for: finish the outbox until this deadline.
    draining_until: Option<Instant>,
    ready_sent: bool,
    /// Delivered envelopes processed since the last write; acknowledged in one frame.
    acks: Vec<u64>,
    /// When to try the outbox again after the server asked us to slow down.
    retry_at: Option<Instant>,
    /// Users whose presence we follow: contacts, everyone we exchange messages with, and
    /// those asked for. Watched anew on every connection.
    watch_list: BTreeSet<String>,
}

impl Engine {
    async fn start(config: ClientConfig, sink: &EventSink) -> Result<Self, Event> {
        let home = config.home.clone();
        let passphrase = config.passphrase.clone();
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
        let identity = match home
            .load_identity(passphrase.as_deref())
            .map_err(home_err)?
        {
            Some(identity) => identity,
            None => {
                sink.emit(Event::Status {
                    message: "Generating your identity key (RSA-3072); this takes a few seconds…"
                        .into(),
                });
                let bits = config.identity_bits;
                let identity = tokio::task::spawn_blocking(move || {
                    Identity::generate_with_bits(&mut rand::rng(), bits)
                })
                .await
                .map_err(|e| Event::error("internal", e.to_string()))?
                .map_err(|e| Event::error("internal", e.to_string()))?;
                home.save_identity(&identity, passphrase.as_deref())
                    .map_err(home_err)?;
                sink.emit(Event::Status {
                    message: format!("Identity key created: {}", identity.fingerprint()),
                });
                identity
            }
        };
        let store =
            Store::open(home.dir()).map_err(|e| Event::error("store_unusable", e.to_string()))?;
        Ok(Self {
            me: config.username.clone(),
            config,
            sink: sink.clone(),
            store,
            identity,
            peers: HashMap::new(),
            next_request: 100,
            pending: HashMap::new(),
            awaiting_key: HashMap::new(),
            checked_keys: HashSet::new(),
            in_flight: HashSet::new(),
            draining_until: None,
            ready_sent: false,
            acks: Vec::new(),
            retry_at: None,
            watch_list: BTreeSet::new(),
        })
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut attempt: u32 = 0;
        loop {
            self.connection_event(ConnectionState::Connecting, None);
            let connected = net::connect(&self.config.server, &self.me, &self.identity).await;
            let failure = match connected {
                Ok((conn, registered)) => {
                    attempt = 0;
                    info!(user = %self.me, registered, "connected");
                    match self.session(conn, &mut commands).await {
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
                Err(ConnectError::Transient(reason)) => reason,
            };
            if self.draining_until.is_some_and(|d| Instant::now() >= d) {
                return self.stop();
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

    /// After a fatal error: serve local commands until shutdown.
    async fn stay_offline(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) {
        self.connection_event(ConnectionState::Offline, None);
        while let Some(cmd) = commands.recv().await {
            if matches!(cmd, Command::Shutdown { .. }) {
                return;
            }
            self.command_offline(cmd);
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

    fn command_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Send { to, text } => {
                let _ = self.enqueue(&to, text);
            }
            Command::ListUsers => self.sink.emit(Event::error(
                "not_connected",
                "not connected to the server; the list will be available once reconnected",
            )),
            other => self.local_command(other, None),
        }
    }

    /// One connected session, until it ends.
    async fn session(
        &mut self,
        mut conn: Conn,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> SessionEnd {
        self.pending.clear();
        self.awaiting_key.clear();
        self.checked_keys.clear();
        self.in_flight.clear();
        self.acks.clear();
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
            match self.store.contacts() {
                Ok(users) => self.sink.emit(Event::Contacts { users }),
                Err(e) => self.store_error(e),
            }
        }
        self.connection_event(ConnectionState::Connected, None);

        let mut out: Vec<ClientMessage> = Vec::new();
        // Presence is only sent to watchers: follow our contacts on every connection.
        match self.store.contacts() {
            Ok(users) => self.watch_list.extend(users),
            Err(e) => self.store_error(e),
        }
        let all: Vec<String> = self.watch_list.iter().cloned().collect();
        self.send_watch(all, &mut out);
        self.flush_outbox(&mut out);

        let ping_interval = self.config.ping_interval;
        let mut last_heard = Instant::now();
        let mut pinged = false;
        loop {
            if !self.acks.is_empty() {
                out.push(ClientMessage::Ack {
                    envelope_ids: std::mem::take(&mut self.acks),
                });
            }
            for msg in out.drain(..) {
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
            let wake = self.draining_until.map_or(wake, |d| wake.min(d));
            let wake = self.retry_at.map_or(wake, |r| wake.min(r));
            tokio::select! {
                frame = conn.next() => match frame {
                    None => return SessionEnd::Lost("the server closed the connection".into()),
                    Some(Err(e)) => return SessionEnd::Lost(format!("connection error: {e}")),
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        pinged = false;
                        if let Some(end) = self.server_message(msg, &mut out) {
                            return end;
                        }
                    }
                },
                cmd = commands.recv() => match cmd {
                    None => return SessionEnd::Shutdown,
                    Some(Command::Shutdown { flush_for }) => {
                        self.draining_until = Some(Instant::now() + flush_for);
                    }
                    Some(cmd) => self.command_online(cmd, &mut out),
                },
                _ = sleep_until(wake) => {
                    if self.retry_at.is_some_and(|r| Instant::now() >= r) {
                        self.retry_at = None;
                        self.flush_outbox(&mut out);
                    }
                    if Instant::now() >= last_heard + ping_interval * 3 {
                        return SessionEnd::Lost("the server stopped answering".into());
                    }
                    if !pinged {
                        pinged = true;
                        out.push(ClientMessage::Ping { nonce: rand::rng().next_u64() });
                    }
                }
            }
        }
    }

    fn command_online(&mut self, cmd: Command, out: &mut Vec<ClientMessage>) {
        match cmd {
            Command::Send { to, text } => {
                if self.enqueue(&to, text) {
                    self.flush_outbox(out);
                }
            }
            Command::ListUsers => {
                self.request(out, Pending::Users, |id| ClientMessage::ListUsers { id })
            }
            Command::Watch { users } => self.watch(users, Some(out)),
            other => self.local_command(other, Some(out)),
        }
    }

    /// Commands that work on local state; `out` is there when connected.
    fn local_command(&mut self, cmd: Command, out: Option<&mut Vec<ClientMessage>>) {
        match cmd {
            Command::Safety { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.pin(&user) {
                    Some(_) => self.emit_safety(&user),
                    None => match out {
                        Some(out) => self.fetch_key(&user, Some(Waiting::Safety), out),
                        None => self.sink.emit(Event::error(
                            "not_connected",
                            format!("{user}'s key is not known yet; connect to fetch it"),
                        )),
                    },
                }
            }
            Command::Unverify { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                if let Some(pin) = self.pin(&user) {
                    self.save_pin(
                        &user,
                        &Pin {
                            verified: false,
                            ..pin
                        },
                    );
                    self.emit_safety(&user);
                }
            }
            Command::Verify { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.pin(&user) {
                    Some(pin) if pin.usable() => {
                        self.save_pin(&user, &Pin { verified: true, ..pin });
                        self.emit_safety(&user);
                    }
                    Some(_) => self.sink.emit(Event::error(
                        "key_changed",
                        format!("{user}'s key changed; compare the new safety number and accept the key before verifying"),
                    )),
                    None => self.sink.emit(Event::error(
                        "unknown_contact",
                        format!("no key for {user} yet; open the safety number first"),
                    )),
                }
            }
            Command::AcceptKey { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                let Some(accepted) = self.pin(&user).as_ref().and_then(trust::accept_pending)
                else {
                    self.sink.emit(Event::error(
                        "no_key_change",
                        format!("{user} has no new key waiting to be accepted"),
                    ));
                    return;
                };
                self.save_pin(&user, &accepted);
                // Fresh E2E state for the new key; the floors keep replays out.
                self.peers.remove(&user);
                self.emit_safety(&user);
                if let Some(out) = out {
                    self.flush_outbox(out);
                }
            }
            Command::History { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.store.history(&user, 10_000) {
                    Ok(items) => self.sink.emit(Event::History { user, items }),
                    Err(e) => self.store_error(e),
                }
            }
            Command::Watch { users } => self.watch(users, None),
            Command::Send { .. } | Command::ListUsers | Command::Shutdown { .. } => {}
        }
    }

    fn request(
        &mut self,
        out: &mut Vec<ClientMessage>,
        what: Pending,
        make: impl FnOnce(RequestId) -> ClientMessage,
    ) {
        self.next_request = self.next_request.wrapping_add(1).max(100);
        let id = self.next_request;
        self.pending.insert(id, what);
        out.push(make(id));
    }

    fn peer<'a>(peers: &'a mut HashMap<String, Peer>, name: &str, floors: Floors) -> &'a mut Peer {
        peers.entry(name.to_owned()).or_insert_with(|| Peer {
            outbound: Outbound::after(floors.out_created_ms),
            inbound: Inbound::after(floors.in_offer_ms),
        })
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

    fn save_pin(&mut self, user: &str, pin: &Pin) {
        if let Err(e) = self.store.save_pin(user, pin) {
            self.store_error(e);
        }
    }

    /// The pinned, usable key of `user`, parsed.
    fn usable_key(&mut self, user: &str) -> Option<(Username, PublicIdentity)> {
        let pin = self.pin(user).filter(Pin::usable)?;
        let name = Username::parse(user).ok()?;
        let public = PublicIdentity::from_der(&pin.key).ok()?;
        Some((name, public))
    }

    fn emit_safety(&mut self, user: &str) {
        let Some(pin) = self.pin(user) else { return };
        // While a change is pending, show the number for the *new* key: that is what the
        // user must compare before accepting it.
        let key = pin.pending.as_ref().unwrap_or(&pin.key);
        let (Ok(name), Ok(public)) = (Username::parse(user), PublicIdentity::from_der(key)) else {
            return;
        };
        let number = SafetyNumber::new((&self.me, self.identity.public()), (&name, &public));
        self.sink.emit(Event::Safety {
            user: user.to_owned(),
            number: number.to_string(),
            verified: pin.verified && pin.pending.is_none(),
            key_changed: pin.pending.is_some(),
        });
    }

    /// Follows the presence of `users` (now if connected, else from the next connection).
    pub(super) fn watch(&mut self, users: Vec<String>, out: Option<&mut Vec<ClientMessage>>) {
        let me = self.me.to_string();
        let names: Vec<String> = users.iter().filter_map(|u| self.contact_name(u)).collect();
        let new: Vec<String> = names
            .into_iter()
            .filter(|u| *u != me && self.watch_list.insert(u.clone()))
            .collect();
        if let Some(out) = out {
            self.send_watch(new, out);
        }
    }

    fn send_watch(&mut self, mut users: Vec<String>, out: &mut Vec<ClientMessage>) {
        if users.is_empty() {
            return;
        }
        users.truncate(chat_protocol::message::MAX_WATCHED);
        let usernames = users.clone();
        self.request(out, Pending::Watch { users }, |id| ClientMessage::Watch {
            id,
            usernames,
        });
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
            queued: self.store.outbox_len().unwrap_or(0),
        });
    }

    fn store_error(&self, e: StoreError) {
        warn!("store error: {e}");
        self.sink.emit(Event::error(
            "store_error",
            format!("{e}; check free disk space and the home directory's permissions"),
        ));
    }
}

fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    // Full jitter in [exp/2, exp] so many clients don't reconnect in lockstep.
    let half = exp / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
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
