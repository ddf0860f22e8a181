//! The engine task's life cycle: open the home and the store, then connect, back off and
//! reconnect until the front end quits; trust decisions on a relay's key; staying offline
//! when asked.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use chat_protocol::identity::Identity;
use chat_protocol::relay_id::RelayFingerprint;
use rand::RngExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use super::{ClientConfig, Commands, Engine, EventSink, SessionEnd, offers};
use crate::api::{Command, ConnectionState, Event};
use crate::home::HomeError;
use crate::net::{self, ConnectError};
use crate::store::{RowCipher, Store, cipher::STORE_KEY_CONTEXT};

impl Engine {
    pub(super) async fn start(config: ClientConfig, sink: &EventSink) -> Result<Self, Event> {
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
            in_flight: HashSet::new(),
            retired_out: HashSet::new(),
            receipts_in_flight: HashSet::new(),
            retries_in_flight: HashSet::new(),
            settling_fails: Default::default(),
            unsettled: Vec::new(),
            flush_due: false,
            window_blocked: false,
            relay: None,
            shed_fence: false,
            draining_until: None,
            ready_sent: false,
            acks: Vec::new(),
            retry_at: None,
            hold: HashMap::new(),
            queue_full: HashMap::new(),
            online_peers: HashSet::new(),
            watch_list: BTreeSet::new(),
            watching: HashSet::new(),
            max_frame: 0,
            relay_clock: None,
            stalled: VecDeque::new(),
            stall_failed: false,
            left_after: HashMap::new(),
            offers: offers::Offers::new(),
            undecryptable: HashMap::new(),
        })
    }

    pub(super) async fn run(mut self, commands: mpsc::UnboundedReceiver<Command>) {
        let mut commands = Commands::new(commands);
        let mut attempt: u32 = 0;
        // Connections in a row that opened but got no answer at all, before any login.
        let mut silent: u32 = 0;
        let mut ever_connected = false;
        let relays = match net::check_server_address(&self.config.server) {
            Ok(list) => list.relays,
            Err(message) => return self.fail("invalid_server", message, &mut commands).await,
        };
        // The relay of the list tried next: after a failure, the next one, at once; after
        // a whole round of failures, the first again, after the backoff.
        let mut current = 0;
        // Read once, when first needed: only for a relay whose key is not pinned.
        let mut authorities = None;
        loop {
            let address = relays[current].clone();
            self.relay = Some(address.host_port.clone());
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
                        return self.fail("invalid_ca_file", message, &mut commands).await;
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
                            return self.fail(&code, message, &mut commands).await;
                        }
                        SessionEnd::Lost(reason) => reason,
                    }
                }
                Err(ConnectError::Fatal { code, message }) => {
                    return self.fail(&code, message, &mut commands).await;
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
                    let message = format!(
                        "{reason}, twice: it does not answer like a Secure Chat relay (a relay \
                         greets at once). Check the address and port (the relay's default port \
                         is 65432)"
                    );
                    return self.fail("not_a_relay", message, &mut commands).await;
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

    pub(super) fn stop(&mut self) {
        self.connection_event(ConnectionState::Offline, None);
    }

    /// Records `fingerprint` as the key of the relay at `host_port` and says so.
    pub(super) fn pin_relay(
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
    pub(super) async fn await_trust(&mut self, host_port: &str, commands: &mut Commands) -> bool {
        let why = format!("the key {host_port} presented waits for confirmation");
        self.emit_connection(ConnectionState::Offline, None, Some(why));
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

    /// A fatal error: says so (`error` `code`), then stays offline.
    async fn fail(&mut self, code: &str, message: String, commands: &mut Commands) {
        self.sink.emit(Event::error(code, message.clone()));
        self.stay_offline(message, commands).await;
    }

    /// After a fatal error (`why`, the `connection` event's `reason`, which tells this
    /// stop from one that was asked for): serve local commands until shutdown.
    async fn stay_offline(&mut self, why: String, commands: &mut Commands) {
        self.emit_connection(ConnectionState::Offline, None, Some(why));
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Shutdown { .. } => return,
                // Not "once reconnected": this client will not reconnect.
                Command::ListUsers | Command::Reconnect => self.sink.emit(Event::error(
                    "not_connected",
                    "not connected: the relay refused this client (see the error above), so it \
                     will not reconnect",
                )),
                cmd => self.command_offline(cmd),
            }
        }
    }

    /// Handles commands while disconnected for `delay`, or until `Reconnect` asks for the
    /// next attempt now. Returns true on shutdown.
    pub(super) async fn wait_offline(&mut self, delay: Duration, commands: &mut Commands) -> bool {
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
                    // The next attempt now; `attempt` is kept, so a failure waits as long
                    // as it would have.
                    Some(Command::Reconnect) => return false,
                    Some(Command::Send { to, text }) => {
                        self.enqueue_burst(commands.burst(to, text));
                    }
                    Some(cmd) => self.command_offline(cmd),
                }
            }
        }
    }
}

fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    // Full jitter in [exp/2, exp] so many clients don't reconnect in lockstep.
    let half = exp / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
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
