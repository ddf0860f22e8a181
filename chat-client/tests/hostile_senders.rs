//! A hostile sender cannot make a client's key work (RSA) delay everyone else: replayed
//! offers cost a lookup, new offers from one sender are throttled, and the work runs
//! beside the engine. Real relay binary, real headless client processes, and mallory as
//! a raw protocol client that builds her own envelopes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_protocol::codec::WireCodec;
use chat_protocol::e2e::{Body, Content, Envelope, Outbound, Parties, RotationPolicy};
use chat_protocol::identity::{Identity, PublicIdentity};
use chat_protocol::{ClientMessage, PROTOCOL_VERSION, ServerMessage, Username, frame};
use common::{Client, Relay};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

type Conn =
    Framed<tokio_rustls::client::TlsStream<TcpStream>, WireCodec<ServerMessage, ClientMessage>>;

/// Mallory: a registered account speaking the protocol directly.
struct Mallory {
    conn: Conn,
    id: Identity,
    name: Username,
    next: u32,
}

impl Mallory {
    async fn login(addr: SocketAddr) -> Self {
        let id = Identity::generate_with_bits(&mut rand::rng(), 2048).unwrap();
        let name = Username::parse("mallory").unwrap();
        let config = chat_protocol::tls::PinVerifier::new(None)
            .client_config()
            .unwrap();
        let sni = tokio_rustls::rustls::pki_types::ServerName::try_from("relay.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(sni, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        let channel = chat_protocol::tls::channel_binding(tls.get_ref().1).unwrap();
        let mut conn = Framed::new(tls, WireCodec::new(1 << 20));
        conn.send(ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            software: "mallory".into(),
        })
        .await
        .unwrap();
        let mut m = Self {
            conn,
            id,
            name,
            next: 1,
        };
        m.reply().await;
        let public_key = m.id.public().der().to_vec();
        m.conn
            .send(ClientMessage::Register {
                id: 1,
                username: "mallory".into(),
                public_key,
            })
            .await
            .unwrap();
        let ServerMessage::Challenge { nonce, .. } = m.reply().await else {
            panic!("no challenge")
        };
        let signature =
            m.id.sign_login(&mut rand::rng(), &m.name, &nonce, &channel)
                .unwrap();
        m.conn
            .send(ClientMessage::Prove { id: 2, signature })
            .await
            .unwrap();
        assert!(matches!(m.reply().await, ServerMessage::Welcome { .. }));
        m
    }

    async fn reply(&mut self) -> ServerMessage {
        loop {
            match self.conn.next().await.unwrap().unwrap() {
                ServerMessage::Presence { .. } | ServerMessage::Deliver { .. } => continue,
                ServerMessage::Ping { nonce } => {
                    self.conn.send(ClientMessage::Pong { nonce }).await.unwrap()
                }
                msg => return msg,
            }
        }
    }

    async fn key_of(&mut self, user: &str) -> PublicIdentity {
        self.conn
            .send(ClientMessage::GetPublicKey {
                id: 3,
                username: user.into(),
            })
            .await
            .unwrap();
        match self.reply().await {
            ServerMessage::PublicKey { public_key, .. } => {
                PublicIdentity::from_der(&public_key).unwrap()
            }
            other => panic!("{other:?}"),
        }
    }

    /// A validly signed offer to `to` with a message whose ciphertext is junk; with
    /// `fresh`, a new offer (new epoch) every time.
    fn forged(&self, out: &mut Outbound, to: &Username, to_key: &PublicIdentity) -> Vec<u8> {
        let parties = Parties {
            me: &self.id,
            my_name: &self.name,
            peer_name: to,
            peer: to_key,
        };
        let content = Content {
            id: [9; 16],
            sent_at_ms: 1,
            body: Body::Text("x".into()),
        };
        let sealed = out
            .seal(
                &mut rand::rng(),
                parties,
                &content,
                1,
                RotationPolicy::default(),
            )
            .unwrap();
        let mut envelope: Envelope = frame::decode(&sealed.bytes).unwrap();
        envelope.ciphertext.iter_mut().for_each(|b| *b = 0);
        postcard::to_allocvec(&envelope).unwrap()
    }

    /// Sends all `payloads` to `to`, pipelined with at most our client's window in flight
    /// (the relay refuses sends over its pipeline); every one must be accepted.
    async fn send_all(&mut self, to: &str, payloads: impl IntoIterator<Item = Vec<u8>>) {
        const WINDOW: usize = chat_protocol::message::MAX_PIPELINED / 2;
        let mut in_flight = 0;
        for payload in payloads {
            if in_flight == WINDOW {
                self.conn.flush().await.unwrap();
                let reply = self.reply().await;
                assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
                in_flight -= 1;
            }
            self.next += 1;
            self.conn
                .feed(ClientMessage::Send {
                    id: self.next,
                    to: to.into(),
                    payload,
                })
                .await
                .unwrap();
            in_flight += 1;
        }
        self.conn.flush().await.unwrap();
        for _ in 0..in_flight {
            let reply = self.reply().await;
            assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
        }
    }
}

/// What a real message may wait behind a hostile queue. The fault this guards against is
/// an RSA-3072 unwrap per hostile offer: at least 30 ms each in a debug build, so 200 take
/// 6 s or more and 5,000 minutes. Without it the wait is a few hundred milliseconds; the
/// bound leaves a loaded 2-core machine room (measured figures belong to the bench).
const HOSTILE_QUEUE_BOUND: Duration = Duration::from_secs(3);

/// Bob registers and goes away; mallory queues `payloads` for him, then alice her real
/// message. Returns how long after bob comes back alice's message is shown.
fn delay_behind(payloads: impl FnOnce(&Mallory, &PublicIdentity) -> Vec<Vec<u8>>) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_config(
        "127.0.0.1:0",
        &dir.path().join("relay"),
        "(rate_limit: (per_second: 10000000.0, burst: 10000000.0), \
         queue: (max_sender_share: 1.0, max_envelopes_per_user: 20000))",
    );
    let bob_home = dir.path().join("bob");
    assert_eq!(Client::ready(relay.addr, "bob", &bob_home).quit(), 0);
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mallory = rt.block_on(async {
        let mut m = Mallory::login(relay.addr).await;
        let bob_key = m.key_of("bob").await;
        let payloads = payloads(&m, &bob_key);
        m.send_all("bob", payloads).await;
        m
    });
    alice.send("/msg bob the real one");
    alice.expect("sent", |e| e["event"] == "sent");
    let mut bob = Client::start(relay.addr, "bob", &bob_home);
    bob.connected();
    let back = Instant::now();
    let got = bob.message_from("alice");
    let delay = back.elapsed();
    assert_eq!(got["text"], "the real one");
    // Mallory's forgeries are reported, not shown, and not as 5000 alarms.
    let errors = bob.drain(Duration::from_millis(500));
    assert!(
        bob.seen_of("message").iter().all(|e| e["from"] == "alice"),
        "a forgery was shown"
    );
    let alarms = errors.iter().filter(|e| e["event"] == "error").count();
    assert!(alarms <= 3, "{alarms} alarms");
    delay
}

#[test]
fn five_thousand_replayed_offers_barely_delay_a_real_message() {
    let delay = delay_behind(|m, bob_key| {
        let bob = Username::parse("bob").unwrap();
        let one = m.forged(&mut Outbound::default(), &bob, bob_key);
        vec![one; 5000]
    });
    eprintln!("behind 5,000 replays of one offer: shown {delay:?} after bob came back");
    assert!(delay < HOSTILE_QUEUE_BOUND, "{delay:?}");
}

#[test]
fn many_new_offers_from_one_stranger_do_not_hold_up_a_contact() {
    let delay = delay_behind(|m, bob_key| {
        let bob = Username::parse("bob").unwrap();
        (0..200)
            .map(|_| m.forged(&mut Outbound::default(), &bob, bob_key))
            .collect()
    });
    eprintln!("behind 200 new offers from a stranger: shown {delay:?} after bob came back");
    assert!(delay < HOSTILE_QUEUE_BOUND, "{delay:?}");
}
