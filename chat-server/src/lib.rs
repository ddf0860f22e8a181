//! Secure Chat relay server.
//!
//! It knows usernames, their public keys and who is online, and forwards opaque
//! ciphertext between logged-in users. It never sees a message's contents.
//!
//! - [`config`]: settings (defaults, RON file, flags).
//! - [`store`]: durable account bindings and the store-and-forward queue (SQLite).
//! - [`router`]: online sessions, presence, bounded per-connection queues.
//! - `connection`: one client's handshake, login and requests.
//! - [`limits`]: per-connection rate limiting.
//!
//! [`run`] drives a listener until the shutdown future resolves.

pub mod config;
mod connection;
pub mod limits;
pub mod router;
pub mod store;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_protocol::{ErrorCode, ServerMessage};
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tracing::{error, info, warn};

pub use config::Config;
use connection::Handler;
use router::Router;
use store::{Store, StoreError};

/// State shared by all connections.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: Router,
    pub(crate) store: Store,
    /// Queue inserts, acks and account binds, group-committed.
    pub(crate) writer: writer::Writer,
}

/// Serves `listener` until `shutdown` resolves, then tells every client, lets in-flight
/// writes finish (up to the configured grace period) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), StoreError> {
    let store = Store::open(&config.data_dir)?;
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let grace = config.shutdown_grace();
    let shared = Arc::new(Shared {
        router: Router::new(store.next_envelope_id()?),
        writer: writer::Writer::start(store.clone(), config.live_grace()),
        config,
        store,
    });
    // Handlers hold a receiver of `notify` and a clone of `done`: dropping `notify` tells
    // them to stop; `done` closing tells us they all have.
    let (notify, _) = broadcast::channel::<()>(1);
    let (done, mut all_done) = mpsc::channel::<()>(1);

    match listener.local_addr() {
        Ok(addr) => info!("listening on {addr}"),
        Err(e) => warn!("listening (address unknown: {e})"),
    }
    tokio::select! {
        () = accept_loop(&listener, &shared, &limit, &notify, &done) => {}
        () = purge_loop(&shared) => {}
        _ = shutdown => info!("shutting down: closing {} connections", shared.config.max_connections - limit.available_permits()),
    }
    drop(listener);
    drop(notify);
    drop(done);
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        warn!("some connections did not close within {grace:?}; exiting anyway");
    }
    info!("stopped");
    Ok(())
}

async fn accept_loop(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    notify: &broadcast::Sender<()>,
    done: &mpsc::Sender<()>,
) {
    let next_id = AtomicU64::new(1);
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached; refusing");
            tokio::spawn(refuse(socket, shared.config.max_frame_bytes));
            continue;
        };
        let handler = Handler::new(
            socket,
            peer,
            next_id.fetch_add(1, Ordering::Relaxed),
            shared.clone(),
            notify.subscribe(),
        );
        let done = done.clone();
        tokio::spawn(async move {
            handler.run().await;
            drop(permit);
            drop(done);
        });
    }
}

/// Deletes expired queued envelopes now and every `purge_interval_secs`.
async fn purge_loop(shared: &Arc<Shared>) {
    let queue = shared.config.queue;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(queue.purge_interval_secs));
    loop {
        tick.tick().await;
        let store = shared.store.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let max_age = queue.max_age_secs as u64;
        match tokio::task::spawn_blocking(move || store.purge_expired(now, max_age)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(expired = n, "purged expired queued envelopes"),
            Ok(Err(e)) => error!("purging expired envelopes failed: {e}"),
            Err(e) => error!("purge task failed: {e}"),
        }
    }
}

/// Tells a connection over the limit why it is closed, without waiting long on it.
async fn refuse(socket: TcpStream, max_frame: usize) {
    let codec = chat_protocol::codec::WireCodec::<(), ServerMessage>::new(max_frame);
    let mut framed = tokio_util::codec::FramedWrite::new(socket, codec);
    let busy = ServerMessage::Error {
        id: None,
        code: ErrorCode::ServerBusy,
        message: "the server is at its connection limit; try again later".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), framed.send(busy)).await;
}
