//! Accepting connections: the per-address connection rate, the pre-login budget, the
//! TLS handshake within its deadlines, and the answer to a connection refused for a limit.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_protocol::{ErrorCode, ServerMessage};
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::connection::{self, Handler};
use crate::limits::{self, AddressLimiter, NoSlot, PreLoginSlots};
use crate::metrics::Metrics;
use crate::{Config, Shared, Transport, serving};

pub(crate) async fn accept_loop(
    listener: &TcpListener,
    acceptor: &Transport,
    shared: &Arc<Shared>,
    pre_login: &PreLoginSlots,
    stop: &CancellationToken,
    done: &mpsc::Sender<()>,
) {
    let next_id = AtomicU64::new(1);
    let connect_rate = AddressLimiter::new(shared.config.connect_rate);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(e) => {
                // Usually EMFILE/ENFILE: wait for connections to close rather than spin.
                error!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        // Until it logs in, a connection holds only a pre-login slot: a small budget of
        // its own, a few per address, and a short first-byte deadline.
        let refused = match connect_rate.check(peer.ip(), std::time::Instant::now()) {
            _ if !serving(shared) => Some(
                "this relay has lost its cluster backend; connect to another relay of the \
                 cluster, or try again in a moment"
                    .to_owned(),
            ),
            Err(wait) => Some(format!(
                "too many new connections from your address; try again in {} s",
                wait.as_secs().max(1)
            )),
            Ok(()) => None,
        };
        let slot = match refused {
            Some(why) => Err(why),
            None => pre_login.take(peer.ip()).map_err(|no| match no {
                NoSlot::AddressFull => {
                    "too many connections from your address are still logging in; try again later"
                        .to_owned()
                }
                NoSlot::Full => "the server is busy; try again later".to_owned(),
            }),
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(why) => {
                Metrics::inc(&shared.metrics.connections_refused);
                debug!(%peer, "refused before login: {why}");
                tokio::spawn(refuse(
                    acceptor.clone(),
                    socket,
                    shared.config.max_frame_bytes,
                    why,
                ));
                continue;
            }
        };
        let accepted = tokio::time::Instant::now();
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let (acceptor, shared, shutdown, done) = (
            acceptor.clone(),
            shared.clone(),
            stop.child_token(),
            done.clone(),
        );
        let task = async move {
            // The handshake, then the session, each boxed: a phase is on the heap only
            // while it runs, where an unboxed task keeps room for both (and for the values
            // passed between them) for the connection's lifetime. Its future is 208 B; the
            // unboxed one was a 3.5 KB allocation (docs/PERFORMANCE.md, "Idle connections").
            let connect = Box::pin(connect(
                acceptor, socket, peer, conn_id, shared, shutdown, slot, accepted,
            ));
            let session = connect.await;
            if let Some(session) = session {
                session.await;
            }
            drop(done);
        };
        tokio::spawn(task);
    }
}

/// A new connection's TLS handshake (unless another login evicts it first) and its
/// handler: the session to run, or `None` if it ended before one began.
#[allow(clippy::too_many_arguments)]
async fn connect(
    acceptor: Transport,
    socket: TcpStream,
    peer: std::net::SocketAddr,
    conn_id: u64,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    slot: limits::PreLoginSlot,
    accepted: tokio::time::Instant,
) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> {
    let evicted = slot.eviction();
    let tls = tokio::select! {
        tls = tls_handshake(&acceptor, socket, &shared.config, accepted) => tls,
        () = evicted.notified() => Err("evicted by other logins".to_owned()),
        // A handshake still under way does not hold up the relay's shutdown.
        () = shutdown.cancelled() => Err("the relay is shutting down".to_owned()),
    };
    match tls.and_then(|tls| {
        Handler::new(tls, peer, conn_id, shared, shutdown, slot, accepted)
            .map_err(|e| e.to_string())
    }) {
        Ok(handler) => Some(Box::pin(Box::new(handler).run())),
        Err(why) => {
            debug!(conn = conn_id, %peer, "TLS handshake failed: {why}");
            None
        }
    }
}

/// The TLS handshake of a new connection: its first byte within the first-byte timeout,
/// all of it within the login timeout (counted from `accepted`). A client that is not
/// speaking TLS (the old plaintext `Hello`, noise) is closed without any answer.
async fn tls_handshake(
    acceptor: &Transport,
    socket: TcpStream,
    config: &Config,
    accepted: tokio::time::Instant,
) -> Result<connection::Stream, String> {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(
        accepted + config.first_byte_timeout(),
        socket.peek(&mut first),
    )
    .await
    {
        Err(_) => return Err("nothing sent".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(0)) => return Err("closed".into()),
        Ok(Ok(_)) => {}
    }
    // Only the benchmark build has a second transport.
    #[cfg_attr(
        not(feature = "bench-plaintext"),
        allow(clippy::infallible_destructuring_match)
    )]
    let acceptor = match acceptor {
        Transport::Tls(acceptor) => acceptor,
        #[cfg(feature = "bench-plaintext")]
        Transport::Plain => return Ok(tokio_util::either::Either::Right(socket)),
    };
    match tokio::time::timeout_at(accepted + config.login_timeout(), acceptor.accept(socket)).await
    {
        Err(_) => Err("the handshake was not completed in time".into()),
        #[cfg(not(feature = "bench-plaintext"))]
        Ok(result) => result.map_err(|e| e.to_string()),
        #[cfg(feature = "bench-plaintext")]
        Ok(result) => result
            .map(tokio_util::either::Either::Left)
            .map_err(|e| e.to_string()),
    }
}

/// Tells a connection over a limit why it is closed (over TLS), without waiting long on
/// it: a second for the handshake and the answer together.
async fn refuse(acceptor: Transport, socket: TcpStream, max_frame: usize, why: String) {
    // Only the benchmark build has a second transport.
    #[cfg_attr(
        not(feature = "bench-plaintext"),
        allow(clippy::infallible_destructuring_match)
    )]
    let acceptor = match acceptor {
        Transport::Tls(acceptor) => acceptor,
        #[cfg(feature = "bench-plaintext")]
        Transport::Plain => return,
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async move {
        let tls = acceptor.accept(socket).await.ok()?;
        let codec = chat_protocol::codec::WireCodec::<(), ServerMessage>::new(max_frame);
        let mut framed = tokio_util::codec::FramedWrite::new(tls, codec);
        let busy = ServerMessage::Error {
            id: None,
            code: ErrorCode::ServerBusy,
            message: why,
        };
        framed.send(busy).await.ok()
    })
    .await;
}
