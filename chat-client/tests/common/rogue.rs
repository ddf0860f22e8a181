//! What a malicious relay can do to groups, played over the real protocol.
//!
//! - [`Mallory`]: an account the relay controls (a relay can register any name it
//!   likes). It speaks the real wire protocol and real end-to-end encryption through
//!   `chat_protocol`, so it can put anything it can *sign* into members' 1:1 channels —
//!   and nothing signed by anyone else, which is the point of the tests.
//! - [`Tap`]: the relay in front of one user's connections (terminating their TLS, as
//!   the relay they pinned does): it records the group envelopes that user uploads,
//!   hands that user extra deliveries stamped with any sender name, and keeps back what
//!   the relay sends that user until told (a slow network, or a relay taking its time).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_protocol::codec::WireCodec;
use chat_protocol::e2e::{Body, Content, Inbound, Outbound, Parties, RotationPolicy};
use chat_protocol::identity::{Identity, PublicIdentity};
use chat_protocol::tls::PinVerifier;
use chat_protocol::{ClientMessage, PROTOCOL_VERSION, ServerMessage, Username};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

type Up =
    Framed<tokio_rustls::client::TlsStream<TcpStream>, WireCodec<ServerMessage, ClientMessage>>;
/// Group envelopes a user uploaded: (to, payload).
type Uploads = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Which messages from the relay a [`Tap`] keeps back.
type Rule = Box<dyn Fn(&ServerMessage) -> bool + Send>;

/// What a [`Tap`] keeps back from its user: messages matching `rule`, in order.
#[derive(Default)]
struct KeptBack {
    rule: Option<Rule>,
    kept: Vec<ServerMessage>,
}

/// Starts `name` once against the relay (so its identity exists), then behind a tap.
pub fn behind_tap(relay: &super::Relay, name: &str, home: &Path) -> (Tap, super::Client) {
    assert_eq!(super::Client::ready(relay.addr, name, home).quit(), 0);
    let tap = Tap::start(relay.addr, home);
    let client = super::Client::ready(tap.addr, name, home);
    (tap, client)
}
type Down =
    Framed<tokio_rustls::server::TlsStream<TcpStream>, WireCodec<ClientMessage, ServerMessage>>;

/// A TLS connection to the relay, logged in as `name` with `identity`.
async fn login(target: SocketAddr, name: &Username, identity: &Identity) -> Up {
    let config = PinVerifier::new(None).client_config().unwrap();
    let server = tokio_rustls::rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server, TcpStream::connect(target).await.unwrap())
        .await
        .unwrap();
    let channel = chat_protocol::tls::channel_binding(tls.get_ref().1).unwrap();
    let mut up: Up = Framed::new(tls, WireCodec::new(1 << 24));
    up.send(ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        software: "rogue/1".into(),
    })
    .await
    .unwrap();
    up.send(ClientMessage::Register {
        id: 1,
        username: name.to_string(),
        public_key: identity.public().der().to_vec(),
    })
    .await
    .unwrap();
    loop {
        match up.next().await.unwrap().unwrap() {
            ServerMessage::Challenge { nonce, .. } => {
                let signature = identity
                    .sign_login(&mut rand::rng(), name, &nonce, &channel)
                    .unwrap();
                up.send(ClientMessage::Prove { id: 2, signature })
                    .await
                    .unwrap();
            }
            ServerMessage::Welcome { .. } => return up,
            ServerMessage::Error { message, .. } => panic!("rogue login refused: {message}"),
            _ => {}
        }
    }
}

/// An account of the relay's, speaking the real protocol and real E2E.
pub struct Mallory {
    rt: tokio::runtime::Runtime,
    conn: Up,
    pub name: Username,
    pub identity: Identity,
    next_id: u32,
    keys: HashMap<String, PublicIdentity>,
    inbound: HashMap<String, Inbound>,
    outbound: HashMap<String, Outbound>,
}

impl Mallory {
    pub fn connect(relay: SocketAddr, name: &str) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let name = Username::parse(name).unwrap();
        let identity = Identity::generate_with_bits(&mut rand::rng(), 2048).unwrap();
        let conn = rt.block_on(login(relay, &name, &identity));
        Self {
            rt,
            conn,
            name,
            identity,
            next_id: 10,
            keys: HashMap::new(),
            inbound: HashMap::new(),
            outbound: HashMap::new(),
        }
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// `user`'s key as the relay has it.
    pub fn key(&mut self, user: &str) -> PublicIdentity {
        if let Some(key) = self.keys.get(user) {
            return key.clone();
        }
        let id = self.id();
        self.rt
            .block_on(self.conn.send(ClientMessage::GetPublicKey {
                id,
                username: user.into(),
            }))
            .unwrap();
        loop {
            if let ServerMessage::PublicKey { public_key, .. } = self.next_frame() {
                let key = PublicIdentity::from_der(&public_key).unwrap();
                self.keys.insert(user.into(), key.clone());
                return key;
            }
        }
    }

    fn next_frame(&mut self) -> ServerMessage {
        let conn = &mut self.conn;
        let frame = self
            .rt
            .block_on(async { tokio::time::timeout(super::PATIENCE, conn.next()).await })
            .expect("the relay said nothing")
            .unwrap()
            .unwrap();
        if let ServerMessage::Ping { nonce } = frame {
            self.rt
                .block_on(self.conn.send(ClientMessage::Pong { nonce }))
                .unwrap();
        }
        frame
    }

    /// The next 1:1 body anyone sends us, opened (acknowledged to the relay).
    pub fn next_body(&mut self) -> (String, Body) {
        loop {
            let ServerMessage::Deliver {
                envelope_id,
                from,
                payload,
            } = self.next_frame()
            else {
                continue;
            };
            self.rt
                .block_on(self.conn.send(ClientMessage::Ack {
                    envelope_ids: vec![envelope_id],
                }))
                .unwrap();
            let key = self.key(&from);
            let peer = Username::parse(&from).unwrap();
            let parties = Parties {
                me: &self.identity,
                my_name: &self.name,
                peer_name: &peer,
                peer: &key,
            };
            let state = self.inbound.entry(from.clone()).or_default();
            if let Ok(opened) = state.open(parties, &payload) {
                return (from, opened.content.body);
            }
        }
    }

    /// The next body matching `pred`.
    pub fn body_where(&mut self, pred: impl Fn(&Body) -> bool) -> Body {
        loop {
            let (_, body) = self.next_body();
            if pred(&body) {
                return body;
            }
        }
    }

    /// Sends `body` to `to` in a real 1:1 envelope from us.
    pub fn send_body(&mut self, to: &str, body: Body) {
        let key = self.key(to);
        let peer = Username::parse(to).unwrap();
        let parties = Parties {
            me: &self.identity,
            my_name: &self.name,
            peer_name: &peer,
            peer: &key,
        };
        let content = Content {
            id: rand::random(),
            sent_at_ms: 1,
            body,
        };
        let sealed = self
            .outbound
            .entry(to.into())
            .or_default()
            .seal(
                &mut rand::rng(),
                parties,
                &content,
                1,
                RotationPolicy::default(),
            )
            .unwrap();
        let id = self.id();
        self.rt
            .block_on(self.conn.send(ClientMessage::Send {
                id,
                to: to.into(),
                payload: sealed.bytes,
            }))
            .unwrap();
        loop {
            match self.next_frame() {
                ServerMessage::Ok { id: ok } if ok == id => return,
                ServerMessage::Error {
                    id: Some(e),
                    message,
                    ..
                } if e == id => {
                    panic!("rogue send refused: {message}")
                }
                _ => {}
            }
        }
    }
}

/// The relay in front of one user: records their group uploads, injects deliveries.
pub struct Tap {
    pub addr: SocketAddr,
    uploads: Uploads,
    inject: Arc<Mutex<Option<mpsc::UnboundedSender<ServerMessage>>>>,
    kept_back: Arc<Mutex<KeptBack>>,
    _runtime: tokio::runtime::Runtime,
}

impl Tap {
    /// In front of the relay at `target`, for the user whose home is `home`.
    pub fn start(target: SocketAddr, home: &Path) -> Self {
        let pem = std::fs::read_to_string(home.join("identity.pem")).unwrap();
        let user = Arc::new(Identity::from_pem(&pem, None).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (acceptor, listener, addr) = super::impostor::stand_in_listener(&runtime);
        let uploads: Uploads = Arc::default();
        let inject: Arc<Mutex<Option<mpsc::UnboundedSender<ServerMessage>>>> = Arc::default();
        let kept_back: Arc<Mutex<KeptBack>> = Arc::default();
        let (rec, inj, keep) = (uploads.clone(), inject.clone(), kept_back.clone());
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, user, rec, inj, keep) = (
                    acceptor.clone(),
                    user.clone(),
                    rec.clone(),
                    inj.clone(),
                    keep.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let down: Down = Framed::new(tls, WireCodec::new(1 << 24));
                    relay(down, target, &user, rec, inj, keep).await;
                });
            }
        });
        Self {
            addr,
            uploads,
            inject,
            kept_back,
            _runtime: runtime,
        }
    }

    /// From now on, keeps back what the relay sends the user that matches `rule`, in
    /// order, until [`Tap::release`].
    pub fn keep_back(&self, rule: impl Fn(&ServerMessage) -> bool + Send + 'static) {
        self.kept_back.lock().unwrap().rule = Some(Box::new(rule));
    }

    /// Hands the user what was kept back, in order, and keeps nothing back any more.
    pub fn release(&self) {
        let kept = {
            let mut kept_back = self.kept_back.lock().unwrap();
            kept_back.rule = None;
            std::mem::take(&mut kept_back.kept)
        };
        let tx = self.injector();
        for msg in kept {
            tx.send(msg).unwrap();
        }
    }

    /// Group envelopes the user uploaded so far: (to, payload).
    pub fn group_uploads(&self) -> Vec<(String, Vec<u8>)> {
        self.uploads.lock().unwrap().clone()
    }

    /// Where injected messages go to the user's connection.
    fn injector(&self) -> mpsc::UnboundedSender<ServerMessage> {
        let tx = self.inject.lock().unwrap().clone();
        tx.expect("the user is connected")
    }

    /// Delivers `payload` to the user as if `from` had sent it.
    pub fn deliver(&self, envelope_id: u64, from: &str, payload: Vec<u8>) {
        self.injector()
            .send(ServerMessage::Deliver {
                envelope_id,
                from: from.into(),
                payload,
            })
            .unwrap();
    }
}

async fn relay(
    mut down: Down,
    target: SocketAddr,
    user: &Identity,
    uploads: Uploads,
    inject: Arc<Mutex<Option<mpsc::UnboundedSender<ServerMessage>>>>,
    kept_back: Arc<Mutex<KeptBack>>,
) {
    // The client's Hello and login are answered here; upstream we log in ourselves.
    let Some(Ok(ClientMessage::Hello { .. })) = down.next().await else {
        return;
    };
    let hello = ServerMessage::Hello {
        version: PROTOCOL_VERSION,
        software: "tap/1".into(),
        max_frame: 65536,
        queue_max_age_secs: 30 * 86_400,
        server_time_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    };
    if down.send(hello).await.is_err() {
        return;
    }
    let Some(Ok(login_msg)) = down.next().await else {
        return;
    };
    let name = match &login_msg {
        ClientMessage::Register { username, .. } | ClientMessage::Login { username, .. } => {
            Username::parse(username).unwrap()
        }
        _ => return,
    };
    let Some(id) = login_msg.request_id() else {
        return;
    };
    if down
        .send(ServerMessage::Challenge {
            id,
            nonce: [7; chat_protocol::message::CHALLENGE_LEN],
        })
        .await
        .is_err()
    {
        return;
    }
    let Some(Ok(ClientMessage::Prove { id, .. })) = down.next().await else {
        return;
    };
    if down
        .send(ServerMessage::Welcome {
            id,
            username: name.to_string(),
            registered: false,
        })
        .await
        .is_err()
    {
        return;
    }
    let up = login(target, &name, user).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    *inject.lock().unwrap() = Some(tx);
    let (mut up_tx, mut up_rx) = up.split();
    let (mut down_tx, mut down_rx) = down.split();
    let to_client = async move {
        loop {
            let msg = tokio::select! {
                m = up_rx.next() => match m {
                    Some(Ok(m)) => {
                        let mut kept_back = kept_back.lock().unwrap();
                        if kept_back.rule.as_ref().is_some_and(|keep| keep(&m)) {
                            kept_back.kept.push(m);
                            continue;
                        }
                        m
                    }
                    _ => return,
                },
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            if down_tx.send(msg).await.is_err() {
                return;
            }
        }
    };
    let to_relay = async move {
        while let Some(Ok(msg)) = down_rx.next().await {
            let group = |payload: &[u8]| {
                payload.first() == Some(&chat_protocol::group::GROUP_ENVELOPE_VERSION)
            };
            match &msg {
                ClientMessage::Send { to, payload, .. } if group(payload) => {
                    uploads.lock().unwrap().push((to.clone(), payload.clone()));
                }
                ClientMessage::SendMany { to, payload, .. } if group(payload) => {
                    let mut uploads = uploads.lock().unwrap();
                    uploads.extend(to.iter().map(|to| (to.clone(), payload.clone())));
                }
                _ => {}
            }
            if up_tx.send(msg).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = to_relay => {}
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}
