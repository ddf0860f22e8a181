//! The handshake of one connection: `Hello`, then `Register`/`Login`, a challenge, and the
//! `Prove` that answers it (see `chat_protocol::auth` and docs/PROTOCOL.md).
//!
//! Before the proof the server says nothing about whether a name exists: `Login` for an
//! unknown name gets a challenge like any other, and its proof is checked (and fails)
//! against a decoy key, so the answer and its timing are the same as for a wrong key.
//! Only `Register` for a name bound to another key says `username_taken` — registering
//! must say the name is taken. New accounts are limited per source address.

use chat_protocol::auth;
use chat_protocol::message::{CHALLENGE_LEN, RequestId};
use chat_protocol::{ErrorCode, PROTOCOL_VERSION, ServerMessage, Username};
use rand::Rng;
use tracing::{debug, warn};

use super::{Close, Handler, State, WRITE_BATCH, truncate};
use crate::cluster::LOGIN_WINDOW;

/// The longest a failed registration waits to give its address's token back to the
/// cluster before it answers (NATS may be the reason it failed).
const REFUND_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
use crate::metrics::Metrics;
use crate::store::{Bind, StoreError};
use crate::writer::cost;

/// Well-formed `Register`s and `Login`s one connection may begin (one with a name or key
/// that does not parse is refused at no cost and not counted). Our client makes one; a
/// failed one (a name taken, a refused registration, a storage failure) may be tried
/// again. Past this the connection is closed `rate_limited`: each attempt costs the relay
/// a key lookup and, with a proof, a signature check, and the login timeout alone would
/// let one connection loop them for 10 s.
pub(super) const LOGINS_PER_CONNECTION: u8 = 4;

/// An RSA-3072 public key nobody holds the private half of: `Login` proofs for names that
/// do not exist are checked against it (and fail), costing what a real check costs.
const DECOY_KEY: &[u8] = include_bytes!("decoy_key.der");

/// A challenge sent, waiting for its proof.
pub(super) struct PendingLogin {
    username: Username,
    public_key: Vec<u8>,
    nonce: [u8; CHALLENGE_LEN],
    /// The name is not registered and this is a `Register`: proving creates the account.
    creates: bool,
    /// The name does not exist and this is a `Login`: the proof is checked against the
    /// decoy key and can only fail.
    decoy: bool,
}

impl Handler {
    pub(super) async fn hello(&mut self, version: u16, software: &str) -> Result<(), Close> {
        if !matches!(self.state, State::AwaitHello) {
            return Err(Close::tell(
                ErrorCode::ProtocolViolation,
                "Hello may only be sent once",
            ));
        }
        if version != PROTOCOL_VERSION {
            return Err(Close::tell(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this server speaks protocol version {PROTOCOL_VERSION}, the client sent {version}; update the client"
                ),
            ));
        }
        debug!(conn = self.conn_id, software = %truncate(software, 64), "hello");
        self.state = State::AwaitLogin;
        self.write(ServerMessage::Hello {
            version: PROTOCOL_VERSION,
            software: concat!("chat-server/", env!("CARGO_PKG_VERSION")).into(),
            max_frame: self.shared.config.max_frame_bytes as u32,
            queue_max_age_secs: self.shared.config.queue.max_age_secs as u64,
            server_time_secs: super::unix_secs(),
        })
        .await
    }

    /// Register (with a key) or Login (without): check the name and key, send a challenge.
    pub(super) async fn begin_login(
        &mut self,
        id: RequestId,
        username: &str,
        offered_key: Option<Vec<u8>>,
    ) -> Result<(), Close> {
        if matches!(self.state, State::Ready(_)) {
            return self
                .fail(id, ErrorCode::ProtocolViolation, "already logged in")
                .await;
        }
        let username = match Username::parse(username) {
            Ok(u) => u,
            Err(e) => {
                return self
                    .fail(id, ErrorCode::InvalidUsername, e.to_string())
                    .await;
            }
        };
        if let Some(key) = &offered_key
            && let Err(e) = auth::parse_public_key(key)
        {
            return self
                .fail(id, ErrorCode::InvalidPublicKey, e.to_string())
                .await;
        }
        // Counted once the request is well-formed: what follows costs a lookup.
        if self.logins_begun >= LOGINS_PER_CONNECTION {
            debug!(conn = self.conn_id, peer = %self.peer, "too many logins on one connection");
            return Err(Close::tell(
                ErrorCode::RateLimited,
                format!(
                    "more than {LOGINS_PER_CONNECTION} logins were begun on this connection; connect again"
                ),
            ));
        }
        self.logins_begun += 1;
        let stored = match self
            .public_key(username.clone(), self.login_deadline())
            .await
        {
            Ok(stored) => stored,
            Err(close) => return self.fail_internal(id, close).await,
        };
        let (public_key, creates, decoy) = match (stored, offered_key) {
            (Some(stored), Some(offered)) if stored != offered => {
                return self.username_taken(id, &username).await;
            }
            (None, Some(offered)) => (offered, true, false),
            (Some(_), Some(offered)) => (offered, false, false),
            (Some(stored), None) => (stored, false, false),
            // Said no differently from a wrong key: after the proof.
            (None, None) => (DECOY_KEY.to_vec(), false, true),
        };
        let nonce = random_nonce();
        self.state = State::AwaitProof(PendingLogin {
            username,
            public_key,
            nonce,
            creates,
            decoy,
        });
        self.write(ServerMessage::Challenge { id, nonce }).await
    }

    pub(super) async fn prove(&mut self, id: RequestId, signature: &[u8]) -> Result<(), Close> {
        let pending = match std::mem::replace(&mut self.state, State::AwaitLogin) {
            State::AwaitProof(pending) => pending,
            other => {
                self.state = other;
                return self
                    .fail(
                        id,
                        ErrorCode::ProtocolViolation,
                        "no login challenge is pending",
                    )
                    .await;
            }
        };
        let verified = auth::verify_login(
            &pending.public_key,
            &pending.username,
            &pending.nonce,
            &self.channel,
            signature,
        );
        if verified.is_err() || pending.decoy {
            debug!(conn = self.conn_id, peer = %self.peer, "bad login signature");
            return Err(Close::tell(
                ErrorCode::BadSignature,
                "the login signature does not match the account key (or there is no such account)",
            ));
        }
        let allowed = if !pending.creates {
            Ok(())
        } else {
            match self.may_register().await {
                Ok(allowed) => allowed,
                Err(e) => return self.fail_internal(id, e).await,
            }
        };
        if let Err(wait) = allowed {
            Metrics::inc(&self.shared.metrics.registrations_refused);
            warn!(peer = %self.peer, "registration refused: too many new accounts from this address");
            let minutes = wait.as_secs().div_ceil(60).max(1);
            return self
                .fail(
                    id,
                    ErrorCode::RateLimited,
                    format!(
                        "too many accounts were created from your address recently; try again in {minutes} min"
                    ),
                )
                .await;
        }
        let (user, key) = (pending.username.clone(), pending.public_key);
        let bound = match self.shared.cluster.clone() {
            Some(cluster) => cluster.bind(&user, &key, self.login_deadline()).await,
            None => {
                let room = self.shared.writer.reserve(cost::bind(key.len())).await;
                self.shared.writer.bind(room, user, key).bound().await
            }
        };
        if pending.creates && !matches!(bound, Ok(Bind::Created)) {
            // No account was made: the token it took goes back.
            self.refund_registration().await;
        }
        let bind = match bound {
            Ok(bind) => bind,
            Err(close) => return self.fail_internal(id, close).await,
        };
        let username = pending.username;
        if bind == Bind::Taken {
            // Another key registered the name between our challenge and this proof.
            return self.username_taken(id, &username).await;
        }
        // A logged-in user takes one of `max_connections` slots; the pre-login slot goes.
        let Ok(slot) = self.shared.slots.clone().try_acquire_owned() else {
            return Err(Close::tell(
                ErrorCode::ServerBusy,
                "the server is at its connection limit; try again later",
            ));
        };
        self.slot = Some(slot);
        self.pre_login = None;
        self.join(username, bind == Bind::Created, id).await
    }

    /// Whether this address may create one more account now (else how long until it
    /// may): this relay's own limiter, then, with the cluster backend, the address's
    /// bucket in the cluster, so the limit holds however many relays it tries.
    /// (Not an `async fn`: the future must not hold `&self`, see [`Handler::store`].)
    fn may_register(
        &self,
    ) -> impl Future<Output = Result<Result<(), std::time::Duration>, StoreError>> + Send + 'static
    {
        let ip = self.peer.ip();
        let here = self
            .shared
            .registrations
            .check(ip, std::time::Instant::now());
        let cluster = self.shared.cluster.clone();
        let limit = self.registration_limit();
        let name = crate::limits::shared_address_name(&self.shared.address_secret, ip);
        let shared = self.shared.clone();
        let deadline = self.login_deadline();
        async move {
            match (here, cluster) {
                (Err(wait), _) => Ok(Err(wait)),
                (Ok(()), None) => Ok(Ok(())),
                (Ok(()), Some(cluster)) => {
                    let taken = cluster.take_registration(&name, limit, deadline).await;
                    if taken.is_err() {
                        // Not this address's doing: this relay's token goes back.
                        let now = std::time::Instant::now();
                        shared.registrations.refund(ip, now);
                    }
                    taken
                }
            }
        }
    }

    /// Until when the cluster's account and session requests of this login keep trying
    /// through a NATS disturbance: given up before our client gives up on this relay (see
    /// [`LOGIN_WINDOW`]).
    fn login_deadline(&self) -> tokio::time::Instant {
        self.accepted + self.shared.config.login_timeout().min(LOGIN_WINDOW)
    }

    /// New accounts per address, as a token bucket per second.
    fn registration_limit(&self) -> crate::config::RateLimit {
        let r = self.shared.config.registrations;
        crate::config::RateLimit {
            per_second: r.per_hour / 3600.0,
            burst: r.burst,
        }
    }

    /// Gives back the tokens [`Self::may_register`] took (this relay's, and the cluster's
    /// within [`REFUND_WITHIN`]) when no account was made after all: a storage failure, or
    /// the name registered by another key meanwhile. Without it a node's election could
    /// lock everyone behind an address out for an hour.
    /// (Not an `async fn`, as [`Self::may_register`].)
    fn refund_registration(&self) -> impl Future<Output = ()> + Send + 'static {
        let ip = self.peer.ip();
        let now = std::time::Instant::now();
        self.shared.registrations.refund(ip, now);
        let cluster = self.shared.cluster.clone();
        let limit = self.registration_limit();
        let name = crate::limits::shared_address_name(&self.shared.address_secret, ip);
        async move {
            let Some(cluster) = cluster else {
                return;
            };
            let within = tokio::time::Instant::now() + REFUND_WITHIN;
            if let Err(e) = cluster.refund_registration(&name, limit, within).await {
                warn!("a registration token could not be given back: {e}");
            }
        }
    }

    async fn username_taken(&mut self, id: RequestId, name: &Username) -> Result<(), Close> {
        self.fail(
            id,
            ErrorCode::UsernameTaken,
            format!("the name {name} belongs to another key; choose another name"),
        )
        .await
    }

    /// Logs `username` in (the proof passed): joins the router, reads the backlog once
    /// what an earlier session left is durable, and says `Welcome`.
    async fn join(
        &mut self,
        username: Username,
        registered: bool,
        id: RequestId,
    ) -> Result<(), Close> {
        let config = &self.shared.config;
        self.membership = Some(self.shared.router.join(
            &username,
            self.conn_id,
            crate::router::OutboxBound {
                messages: config.send_queue_len,
                bytes: usize::try_from(config.send_queue_bytes).unwrap_or(usize::MAX),
            },
        ));
        debug!(conn = self.conn_id, user = %username, registered, "logged in");
        self.state = State::Ready(username.clone());
        if let Some(cluster) = self.shared.cluster.clone() {
            // The newest login of the user anywhere in the cluster wins.
            match cluster
                .login(&username, self.conn_id, self.login_deadline())
                .await
            {
                Ok(login) if login.replaced => {
                    let code = ErrorCode::SessionReplaced;
                    self.shared.router.kick(&username, self.conn_id, code);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(conn = self.conn_id, "could not record the session: {e}");
                    return Err(Close::tell(
                        ErrorCode::Internal,
                        "the server could not record your login in its cluster in time; \
                         reconnect in a moment",
                    ));
                }
            }
            // What an earlier session here acknowledged is removed first; then the mailbox
            // is read from its oldest envelope on: backlog, then live.
            cluster.flush_user(&username).await;
            let (inbox, reader) = cluster.deliveries(&username, WRITE_BATCH);
            self.cluster_inbox = Some(inbox);
            self._mailbox_reader = Some(reader);
        } else {
            // Stored envelopes go out first, in order, then live ones. Envelopes an
            // earlier session of ours was given may still be held for its Ack or on their
            // way to disk: let them land before the first read.
            self.backlog_done = false;
            self.settling = Some(self.shared.writer.barrier());
        }
        let welcome = self
            .write(ServerMessage::Welcome {
                id,
                username: username.to_string(),
                registered,
            })
            .await;
        self.trim_after_login();
        welcome
    }
}

fn random_nonce() -> [u8; CHALLENGE_LEN] {
    let mut nonce = [0u8; CHALLENGE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_decoy_key_is_a_usable_rsa_3072_key() {
        let key = chat_protocol::auth::parse_public_key(super::DECOY_KEY).unwrap();
        use rsa::traits::PublicKeyParts;
        assert_eq!(key.n().bit_width(), 3072);
    }
}
