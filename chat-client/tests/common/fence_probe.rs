//! A relay stand-in that forwards every frame unchanged between one user's client and the
//! real relay, and checks the client against the relay's shed fence (docs/PROTOCOL.md,
//! "Limits"): after a send refused `server_busy` the relay writes a `Ping` and refuses
//! every send that reaches it before the `Pong` to its newest such ping. A client that
//! answers one fence ping while newer ones are on their way, and sends in between, has
//! those sends refused in turn, and can go on so for as long as it has something to send.
//!
//! The probe counts such sends: one the client writes after answering a fence ping while
//! the relay has already written a newer one that the client has not answered yet.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chat_protocol::identity::Identity;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use futures_util::{SinkExt, StreamExt};

use super::impostor::{Down, log_in_upstream, stand_in_listener};

/// What the probe saw, over all of the user's connections.
#[derive(Default)]
struct Seen {
    /// Sends refused `server_busy`.
    refusals: AtomicUsize,
    /// Sends written between answering a fence ping and answering the newest one.
    early_sends: AtomicUsize,
}

/// The relay's fence on one connection as the probe sees it.
#[derive(Default)]
struct Fence {
    /// The last frame the relay wrote was a `server_busy` refusal: its next `Ping` is the
    /// fence's.
    refused: bool,
    /// Fence pings written to the client and not answered yet.
    unanswered: HashSet<u64>,
    /// The client answered a fence ping while others were unanswered.
    answered_early: bool,
}

pub struct FenceProbe {
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    _runtime: tokio::runtime::Runtime,
}

impl FenceProbe {
    /// In front of the relay at `target`, for the user whose home is `home`.
    pub fn start(target: SocketAddr, home: &Path) -> Self {
        let pem = std::fs::read_to_string(home.join("identity.pem")).unwrap();
        let user = Arc::new(Identity::from_pem(&pem, None).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (acceptor, listener, addr) = stand_in_listener(&runtime);
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, user, counts) = (acceptor.clone(), user.clone(), counts.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let down = tokio_util::codec::Framed::new(
                        tls,
                        chat_protocol::codec::WireCodec::new(1 << 24),
                    );
                    let _ = forward(down, target, &user, &counts).await;
                });
            }
        });
        Self {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    /// Sends the relay refused `server_busy` so far.
    pub fn refusals(&self) -> usize {
        self.seen.refusals.load(Ordering::SeqCst)
    }

    /// Sends the client wrote after answering a fence ping while a newer one was
    /// unanswered (each is refused, and raises one more fence).
    pub fn early_sends(&self) -> usize {
        self.seen.early_sends.load(Ordering::SeqCst)
    }
}

/// One connection: logged in upstream, then every frame forwarded, the fence followed.
async fn forward(mut down: Down, target: SocketAddr, user: &Identity, seen: &Seen) -> Option<()> {
    let up = log_in_upstream(&mut down, target, user).await?;
    let fence = Mutex::new(Fence::default());
    let (mut up_tx, mut up_rx) = up.split();
    let (mut down_tx, mut down_rx) = down.split();
    let to_client = async {
        while let Some(Ok(msg)) = up_rx.next().await {
            {
                // Noted before the client can see it.
                let mut fence = fence.lock().unwrap();
                match &msg {
                    ServerMessage::Error {
                        id: Some(_),
                        code: ErrorCode::ServerBusy,
                        ..
                    } => {
                        seen.refusals.fetch_add(1, Ordering::SeqCst);
                        fence.refused = true;
                    }
                    ServerMessage::Ping { nonce } if fence.refused => {
                        fence.unanswered.insert(*nonce);
                        fence.refused = false;
                    }
                    _ => fence.refused = false,
                }
            }
            down_tx.send(msg).await.ok()?;
        }
        Some(())
    };
    let to_relay = async {
        while let Some(Ok(msg)) = down_rx.next().await {
            {
                let mut fence = fence.lock().unwrap();
                match &msg {
                    ClientMessage::Pong { nonce } if fence.unanswered.remove(nonce) => {
                        fence.answered_early = !fence.unanswered.is_empty();
                    }
                    ClientMessage::Send { .. } | ClientMessage::SendMany { .. }
                        if fence.answered_early =>
                    {
                        seen.early_sends.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            up_tx.send(msg).await.ok()?;
        }
        Some(())
    };
    tokio::select! {
        _ = to_client => {}
        _ = to_relay => {}
    }
    Some(())
}
