//! A malicious relay in front of the real one, for one user's connections. Over TLS a
//! network proxy can no longer tamper, so this stand-in does what only a relay can: it
//! terminates the client's TLS with its own key (the client pins it on first use, as it
//! would pin a malicious relay's), logs in upstream as that user with the user's own key
//! (read from their home, as a relay that *is* the user's relay would not even need), and
//! tampers with the frames in between.
//!
//! Tampering: on the first connection it drops the client's first `Send` and cuts the
//! connection (the client must send it again); on later ones it sends each `Send` three
//! times (replays) and holds the first one back until the next (or half a second later),
//! so they arrive reordered.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_protocol::codec::WireCodec;
use chat_protocol::identity::Identity;
use chat_protocol::tls::{PinVerifier, RelayIdentity};
use chat_protocol::{ClientMessage, ServerMessage, Username};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// A stand-in's connection to the real relay.
pub type Up =
    Framed<tokio_rustls::client::TlsStream<TcpStream>, WireCodec<ServerMessage, ClientMessage>>;
/// A stand-in's connection from the client.
pub type Down =
    Framed<tokio_rustls::server::TlsStream<TcpStream>, WireCodec<ClientMessage, ServerMessage>>;

pub struct TamperProxy {
    pub addr: SocketAddr,
    replayed: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl TamperProxy {
    /// In front of the relay at `target`, for the user whose home is `home`.
    pub fn start(target: SocketAddr, home: &Path) -> Self {
        let pem = std::fs::read_to_string(home.join("identity.pem")).unwrap();
        let user = Arc::new(Identity::from_pem(&pem, None).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (acceptor, listener, addr) = stand_in_listener(&runtime);
        let replayed = Arc::new(AtomicUsize::new(0));
        let counter = replayed.clone();
        runtime.spawn(async move {
            let mut index = 0;
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, user, counter) = (acceptor.clone(), user.clone(), counter.clone());
                let connection = index;
                index += 1;
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let down = Framed::new(tls, WireCodec::new(1 << 24));
                    let _ = relay(down, target, &user, connection, &counter).await;
                });
            }
        });
        Self {
            addr,
            replayed,
            _runtime: runtime,
        }
    }

    /// Extra copies of client frames sent so far.
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::SeqCst)
    }
}

/// A TLS listener on loopback under a fresh self-signed relay key of its own (what a
/// client meeting it for the first time pins), for relay stand-ins.
pub fn stand_in_listener(
    runtime: &tokio::runtime::Runtime,
) -> (tokio_rustls::TlsAcceptor, TcpListener, SocketAddr) {
    let key = RelayIdentity::generate_key_pem().unwrap();
    let cert = RelayIdentity::self_signed_pem(&key).unwrap();
    let own = RelayIdentity::from_pem(&cert, &key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(own.server_config().unwrap());
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    (acceptor, listener, addr)
}

/// One client connection: the login on both sides, then the frames, tampered with.
async fn relay(
    mut down: Down,
    target: SocketAddr,
    user: &Identity,
    connection: usize,
    replayed: &AtomicUsize,
) -> Option<()> {
    let up = log_in_upstream(&mut down, target, user).await?;
    let (mut up_tx, mut up_rx) = up.split();
    let (mut down_tx, mut down_rx) = down.split();
    let to_client = async move {
        while let Some(Ok(msg)) = up_rx.next().await {
            down_tx.send(msg).await.ok()?;
        }
        Some(())
    };
    let to_relay = async move {
        let mut held: Option<ClientMessage> = None;
        let mut sends = 0;
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), down_rx.next()).await;
            let msg = match next {
                Err(_) => {
                    if let Some(first) = held.take() {
                        up_tx.send(first).await.ok()?;
                    }
                    continue;
                }
                Ok(Some(Ok(msg))) => msg,
                Ok(_) => return Some(()),
            };
            if !matches!(msg, ClientMessage::Send { .. }) {
                up_tx.send(msg).await.ok()?;
                continue;
            }
            if connection == 0 {
                return None; // dropped, and the connection cut
            }
            sends += 1;
            if sends == 1 {
                held = Some(msg);
                continue;
            }
            for _ in 0..3 {
                up_tx.send(msg.clone()).await.ok()?;
            }
            replayed.fetch_add(2, Ordering::SeqCst);
            if let Some(first) = held.take() {
                for _ in 0..3 {
                    up_tx.send(first.clone()).await.ok()?;
                }
                replayed.fetch_add(2, Ordering::SeqCst);
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = to_relay => {}
    }
    Some(())
}

/// Logs the client on `down` in at the relay at `target` as `user` (whose key the
/// stand-in holds): Hello both ways, the client's `Register`/`Login` upstream, the relay's
/// challenge answered with `user`'s key and the upstream session's binding, and the
/// client's own proof taken unchecked. `None` if either side fails.
pub async fn log_in_upstream(down: &mut Down, target: SocketAddr, user: &Identity) -> Option<Up> {
    let config = PinVerifier::new(None).client_config().ok()?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("relay.test").ok()?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, TcpStream::connect(target).await.ok()?)
        .await
        .ok()?;
    let channel = chat_protocol::tls::channel_binding(tls.get_ref().1).ok()?;
    let mut up: Up = Framed::new(tls, WireCodec::new(1 << 24));
    // Hello both ways.
    let hello = down.next().await?.ok()?;
    up.send(hello).await.ok()?;
    let hello = up.next().await?.ok()?;
    down.send(hello).await.ok()?;
    // The client's Register/Login goes upstream; the relay's challenge is answered with the
    // user's key and this session's binding; the client proves to us (unchecked).
    let login = down.next().await?.ok()?;
    let username = match &login {
        ClientMessage::Register { username, .. } | ClientMessage::Login { username, .. } => {
            Username::parse(username).ok()?
        }
        _ => return None,
    };
    up.send(login).await.ok()?;
    let (challenge_id, nonce) = loop {
        match up.next().await?.ok()? {
            ServerMessage::Challenge { id, nonce } => break (id, nonce),
            ServerMessage::Ping { nonce } => up.send(ClientMessage::Pong { nonce }).await.ok()?,
            _ => {}
        }
    };
    let signature = user
        .sign_login(&mut rand::rng(), &username, &nonce, &channel)
        .ok()?;
    up.send(ClientMessage::Prove { id: 9, signature })
        .await
        .ok()?;
    down.send(ServerMessage::Challenge {
        id: challenge_id,
        nonce: [7; chat_protocol::message::CHALLENGE_LEN],
    })
    .await
    .ok()?;
    let _prove = down.next().await?.ok()?;
    Some(up)
}
