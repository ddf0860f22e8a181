//! Test harness: a real server on 127.0.0.1:0 and raw protocol clients over real TCP and
//! TLS 1.3. The clients accept any relay key (pinning is the client's, tested there); the
//! login proof is bound to each connection's TLS session as the protocol requires.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chat_protocol::codec::WireCodec;
use chat_protocol::message::CHALLENGE_LEN;
use chat_protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage, Username, auth};
use chat_server::Config;
use futures_util::{SinkExt, StreamExt};
use rsa::PrivateKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

pub mod disk;
pub mod gate;
pub mod nats;

/// Long enough for a loaded CI machine, short enough to fail a hung test quickly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Sends the relay's logs (`tracing`) to the test's captured output, shown when a test
/// fails: `warn,chat_server=info`, or the filter in `TEST_LOG` (e.g.
/// `TEST_LOG=chat_server=debug,async_nats=debug`).
pub fn logs() {
    let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn,chat_server=info".into());
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .try_init();
}

/// Test keys are 2048-bit (the smallest the server accepts) to keep generation quick.
pub fn key(n: usize) -> &'static PrivateKey {
    static KEYS: OnceLock<Vec<PrivateKey>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..4)
            .map(|_| PrivateKey::new(&mut rand::rng(), 2048).unwrap())
            .collect()
    })[n]
}

/// Lifts the relay's per-address limits on new accounts and connections, for a test that
/// logs a crowd in from 127.0.0.1.
pub fn welcome_crowds(c: &mut Config) {
    c.registrations = chat_server::config::Registrations {
        per_hour: 1e6,
        burst: 1e6,
    };
    c.connect_rate = chat_server::config::RateLimit {
        per_second: 1e6,
        burst: 1e6,
    };
}

pub fn der(key: &PrivateKey) -> Vec<u8> {
    auth::public_key_der(&key.to_public_key())
}

/// Where a test relay keeps accounts, sessions and the offline queue: one test body runs
/// against each (`#[values(Sqlite, Nats)] backend: Backend` with rstest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The SQLite file in the relay's data directory (the default backend).
    Sqlite,
    /// A one-node NATS JetStream (a real nats-server) started for the test.
    Nats,
}

pub use Backend::{Nats, Sqlite};

/// What outlives a relay between [`TestServer::stop`] and [`TestServer::start_in`]: its
/// data directory and, with the NATS backend, its nats-server.
pub struct Persisted {
    pub dir: tempfile::TempDir,
    nats: Option<Arc<nats::Nats>>,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    nats: Option<Arc<nats::Nats>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A relay with the SQLite backend (unless `tweak` changes it).
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::on(Sqlite, tweak).await
    }

    /// A relay with `backend` (a fresh nats-server for `Nats`), then `tweak`.
    pub async fn on(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let nats = match backend {
            Sqlite => None,
            Nats => Some(Arc::new(
                tokio::task::spawn_blocking(nats::Nats::single)
                    .await
                    .unwrap(),
            )),
        };
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(Persisted { dir, nats }, tweak).await
    }

    /// A relay on what an earlier one left: the same data directory and nats-server.
    pub async fn start_in(persisted: Persisted, tweak: impl FnOnce(&mut Config)) -> Self {
        let Persisted { dir, nats } = persisted;
        logs();
        // Generate the test keys before any timeout starts ticking.
        key(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            // A debug relay on a loaded CI machine is slow enough to shed (by design), and
            // these tests pipeline sends and expect them taken; shedding has its own test.
            shed_delay_ms: 0.0,
            // Pacing, not refusing, a full pipeline: these tests pipeline hundreds of raw
            // sends and expect each taken (tests/overload.rs has both settings).
            shed_when_full: false,
            ..Config::default()
        };
        if let Some(nats) = &nats {
            config.backend = nats.backend(1);
        }
        tweak(&mut config);
        config.validate().unwrap();
        let on_nats = matches!(config.backend, chat_server::config::Backend::Nats(_));
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            chat_server::run(listener, config, rx).await.unwrap();
        });
        if on_nats {
            // The relay accepts once JetStream is set up (up to 30 s on a cluster that is
            // still electing its leaders): wait for that before a test's own patience
            // starts ticking.
            let stream = TcpStream::connect(addr).await.unwrap();
            tokio::time::timeout(5 * PATIENCE, tls(stream))
                .await
                .expect("the relay did not start serving within 50 s")
                .expect("TLS handshake failed");
        }
        Self {
            addr,
            dir,
            backend: if nats.is_some() { Nats } else { Sqlite },
            nats,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Persisted {
        self.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.task.take().unwrap())
            .await
            .expect("server did not stop in time")
            .unwrap();
        Persisted {
            dir: self.dir,
            nats: self.nats,
        }
    }

    /// How many envelopes the backend holds, as its own store counts them (the SQLite
    /// file, or the JetStream mailbox stream).
    pub async fn queued(&self) -> u64 {
        match &self.nats {
            None => {
                let store = chat_server::store::Store::open(&self.dir.path().join("data")).unwrap();
                store.stats().unwrap().queued
            }
            Some(nats) => {
                let client = async_nats::connect(nats.urls()[0].as_str()).await.unwrap();
                let js = async_nats::jetstream::new(client);
                let mut stream = js.get_stream("chat_mailbox").await.unwrap();
                stream.info().await.unwrap().state.messages
            }
        }
    }

    /// With the NATS backend: how many of the mailbox stream's envelopes, from its first,
    /// the furthest consumer has sent its relay.
    pub async fn mailbox_sent(&self) -> u64 {
        let nats = self.nats.as_ref().expect("a relay on the NATS backend");
        let client = async_nats::connect(nats.urls()[0].as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("chat_mailbox").await.unwrap();
        let first = stream.info().await.unwrap().state.first_sequence;
        let mut consumers = stream.consumers();
        let mut furthest = 0;
        while let Some(info) = consumers.next().await {
            furthest = furthest.max(info.unwrap().delivered.stream_sequence);
        }
        (furthest + 1).saturating_sub(first)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// A client that has said Hello and logged in as `name` with test key `k`.
    pub async fn user(&self, name: &str, k: usize) -> Client {
        let mut c = self.client().await;
        c.hello().await;
        match c.register(name, key(k)).await {
            ServerMessage::Welcome { .. } => c,
            other => panic!("login of {name} failed: {other:?}"),
        }
    }
}

/// A TCP connection to `addr` from the loopback address `source`.
pub async fn connect_from(
    addr: SocketAddr,
    source: std::net::Ipv4Addr,
) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(addr).await
}

/// A TCP connection from `source` and its TLS handshake (any relay key accepted).
pub async fn tls_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> std::io::Result<Tls> {
    tls(connect_from(addr, source).await?).await
}

/// A TLS session to the relay.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// The TLS handshake over `stream`, accepting whatever key the relay presents.
pub async fn tls(stream: TcpStream) -> std::io::Result<Tls> {
    let config = chat_protocol::tls::PinVerifier::new(None)
        .client_config()
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
}

pub struct Client {
    pub framed: Framed<Tls, WireCodec<ServerMessage, ClientMessage>>,
    next_id: u32,
}

impl Client {
    /// The next delivery within `patience` (skipping presence notices and pings),
    /// acknowledged: (envelope id, payload). Panics if something else comes, or nothing.
    pub async fn take_within(&mut self, patience: Duration) -> (u64, Vec<u8>) {
        match self.recv_reply_within(patience).await {
            Some(ServerMessage::Deliver {
                envelope_id,
                payload,
                ..
            }) => {
                self.send(ClientMessage::Ack {
                    envelope_ids: vec![envelope_id],
                })
                .await;
                (envelope_id, payload)
            }
            other => panic!("expected a delivery within {patience:?}, got {other:?}"),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::over(stream).await
    }

    /// Connects from a chosen loopback source address (127.0.0.x), as another host would.
    pub async fn connect_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> Self {
        Self::over(connect_from(addr, source).await.unwrap()).await
    }

    async fn over(stream: TcpStream) -> Self {
        let tls = tokio::time::timeout(PATIENCE, tls(stream))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake failed");
        Self {
            framed: Framed::new(tls, WireCodec::new(16 * 1024 * 1024)),
            next_id: 1,
        }
    }

    /// The TLS session's channel binding (what a login proof must cover).
    pub fn channel(&self) -> auth::ChannelBinding {
        chat_protocol::tls::channel_binding(self.framed.get_ref().get_ref().1).unwrap()
    }

    pub fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, msg: ClientMessage) {
        self.framed.send(msg).await.unwrap();
    }

    pub async fn raw(&mut self, bytes: &[u8]) {
        self.framed.get_mut().write_all(bytes).await.unwrap();
    }

    /// The next message, failing the test if none comes or the connection closes.
    pub async fn recv(&mut self) -> ServerMessage {
        match tokio::time::timeout(PATIENCE, self.framed.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(other) => panic!("connection ended instead of a message: {other:?}"),
            Err(_) => panic!("no message within {PATIENCE:?}"),
        }
    }

    /// The next message that is not a presence notice or ping, waiting up to `patience`
    /// (`None` if none came).
    pub async fn recv_reply_within(&mut self, patience: Duration) -> Option<ServerMessage> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(Some(Ok(ServerMessage::Presence { .. }))) => {}
                // Answered, as a client must (a relay that shed a send waits for it).
                Ok(Some(Ok(ServerMessage::Ping { nonce }))) => {
                    self.send(ClientMessage::Pong { nonce }).await
                }
                Ok(Some(Ok(msg))) => return Some(msg),
                Ok(other) => panic!("connection ended instead of a message: {other:?}"),
                Err(_) => return None,
            }
        }
    }

    /// The next message that is not a presence notice or ping (pings are answered).
    pub async fn recv_reply(&mut self) -> ServerMessage {
        loop {
            match self.recv().await {
                ServerMessage::Presence { .. } => continue,
                ServerMessage::Ping { nonce } => self.send(ClientMessage::Pong { nonce }).await,
                msg => return msg,
            }
        }
    }

    /// The next `Deliver` as (envelope id, sender, payload), skipping presence notices
    /// and pings.
    pub async fn delivery(&mut self) -> (u64, String, Vec<u8>) {
        match self.recv_reply().await {
            ServerMessage::Deliver {
                envelope_id,
                from,
                payload,
            } => (envelope_id, from, payload),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Expects an `Error` with `code`, skipping presence notices.
    pub async fn expect_error(&mut self, code: ErrorCode) -> Option<u32> {
        match self.recv_reply().await {
            ServerMessage::Error { code: got, id, .. } if got == code => id,
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    /// Expects the server to close the connection (after any messages, which are skipped).
    pub async fn expect_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("connection still open after {PATIENCE:?}"),
            }
        }
    }

    pub async fn hello(&mut self) {
        self.send(ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
        })
        .await;
        match self.recv().await {
            ServerMessage::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// Register-or-login with `key`; returns the server's final answer.
    pub async fn register(&mut self, name: &str, key: &PrivateKey) -> ServerMessage {
        let id = self.id();
        self.send(ClientMessage::Register {
            id,
            username: name.into(),
            public_key: der(key),
        })
        .await;
        self.answer_challenge(name, key).await
    }

    pub async fn login(&mut self, name: &str, key: &PrivateKey) -> ServerMessage {
        let id = self.id();
        self.send(ClientMessage::Login {
            id,
            username: name.into(),
        })
        .await;
        self.answer_challenge(name, key).await
    }

    async fn answer_challenge(&mut self, name: &str, key: &PrivateKey) -> ServerMessage {
        let nonce: [u8; CHALLENGE_LEN] = match self.recv_reply().await {
            ServerMessage::Challenge { nonce, .. } => nonce,
            other => return other,
        };
        let user = Username::parse(name).unwrap();
        let signature =
            auth::sign_login(key, &mut rand::rng(), &user, &nonce, &self.channel()).unwrap();
        let id = self.id();
        self.send(ClientMessage::Prove { id, signature }).await;
        self.recv_reply().await
    }

    pub async fn online(&mut self) -> Vec<String> {
        let id = self.id();
        self.send(ClientMessage::ListUsers { id }).await;
        match self.recv_reply().await {
            ServerMessage::Users { id: got, online } if got == id => online,
            other => panic!("expected Users, got {other:?}"),
        }
    }

    /// Asks until `name` is listed online (or offline, if `online` is false): presence
    /// crosses relays through the session bucket, a moment after the login.
    pub async fn until_online(&mut self, name: &str, online: bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.online().await.iter().any(|n| n == name) != online {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never became {}",
                if online { "online" } else { "offline" }
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Watches `names` for presence; returns those online now.
    pub async fn watch(&mut self, names: &[&str]) -> Vec<String> {
        let id = self.id();
        self.send(ClientMessage::Watch {
            id,
            usernames: names.iter().map(|n| n.to_string()).collect(),
        })
        .await;
        match self.recv_reply().await {
            ServerMessage::Users { id: got, online } if got == id => online,
            other => panic!("expected Users, got {other:?}"),
        }
    }

    /// Sends `payloads` to `to` without waiting between them (a sender in full flow), then
    /// expects an `Ok` for each, in order, within `patience`.
    pub async fn send_burst(&mut self, to: &str, payloads: &[Vec<u8>], patience: Duration) {
        let mut ids = Vec::new();
        for payload in payloads {
            let id = self.id();
            ids.push(id);
            self.send(ClientMessage::Send {
                id,
                to: to.into(),
                payload: payload.clone(),
            })
            .await;
        }
        for id in ids {
            match self.recv_reply_within(patience).await {
                Some(ServerMessage::Ok { id: got }) => assert_eq!(got, id, "answers in order"),
                other => panic!("expected Ok for send {id}, got {other:?}"),
            }
        }
    }

    /// Sends `payload` to `to`; panics unless the server answers `Ok`.
    pub async fn send_ok(&mut self, to: &str, payload: &[u8]) {
        let reply = self.send_to(to, payload).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }

    /// Sends `payload` to `to` and returns the server's answer.
    pub async fn send_to(&mut self, to: &str, payload: &[u8]) -> ServerMessage {
        self.send_to_within(to, payload, PATIENCE).await
    }

    /// Sends `payload` to `to` and returns the server's answer, waiting up to `patience` for
    /// it (the relay answers `Ok` only once the envelope is stored, which in a cluster can
    /// wait for a stream's leader election).
    pub async fn send_to_within(
        &mut self,
        to: &str,
        payload: &[u8],
        patience: Duration,
    ) -> ServerMessage {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let id = self.id();
            self.send(ClientMessage::Send {
                id,
                to: to.into(),
                payload: payload.to_vec(),
            })
            .await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(reply) = self.recv_reply_within(left).await else {
                panic!("no answer to a Send within {patience:?}");
            };
            match &reply {
                ServerMessage::Ok { id: got } | ServerMessage::Error { id: Some(got), .. } => {
                    assert_eq!(*got, id, "reply to another request")
                }
                _ => {}
            }
            if !matches!(
                reply,
                ServerMessage::Error {
                    code: ErrorCode::ServerBusy,
                    id: Some(_),
                    ..
                }
            ) {
                return reply;
            }
            // Shed by a saturated relay (a debug build under a flood), or held behind an
            // earlier refusal: the client keeps the message and tries again once it has
            // answered the Ping the relay wrote behind the refusal (sent before that, the
            // retry would be refused in turn).
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.recv()).await {
                Ok(ServerMessage::Ping { nonce }) => self.send(ClientMessage::Pong { nonce }).await,
                Ok(other) => panic!("expected the Ping behind a refusal, got {other:?}"),
                Err(_) => panic!("no Ping behind a refusal within {patience:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Logs `name` in with test key `k` once the relay serves again (after NATS came back).
pub async fn user_when_serving(relay: &TestServer, name: &str, k: usize) -> Client {
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let mut c = relay.client().await;
        c.send(ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            software: "test".into(),
        })
        .await;
        let last = match c.recv().await {
            ServerMessage::Hello { .. } => match c.login(name, key(k)).await {
                ServerMessage::Welcome { .. } => return c,
                other => other,
            },
            other => other,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never served {name} again; last: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
