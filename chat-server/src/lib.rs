//! Secure Chat relay server.
//!
//! It knows usernames, their public keys and who is online, and forwards opaque
//! ciphertext between logged-in users. It never sees a message's contents.
//!
//! - [`config`]: settings (defaults, RON file, flags).
//! - [`store`]: durable account bindings and the store-and-forward queue (SQLite), with
//!   its quotas.
//! - [`writer`]: the one thread that writes to the store, group-committed and bounded.
//! - [`router`]: online sessions, presence, bounded per-connection queues.
//! - `connection`: one client's requests and relaying; `login`: its handshake.
//! - [`limits`]: rate limits by work, per-address limits, the pre-login budget.
//! - [`metrics`]: what was refused or ignored, for `admin stats`.
//! - [`overload`]: load shedding, a share of new sends refused while the relay is
//!   saturated.
//! - [`tls`]: the relay's TLS identity (key and certificate) in the data directory.
//! - [`cluster`]: the `Nats` backend, for many relays sharing one NATS JetStream cluster.
//!
//! [`run`] drives a listener until the shutdown future resolves.

pub mod cluster;
pub mod config;
mod connection;
pub mod fence;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod overload;
pub mod router;
pub mod store;
pub mod tls;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_protocol::{ErrorCode, ServerMessage};
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tracing::{debug, error, info, warn};

pub use config::Config;
use connection::Handler;
use limits::{AddressLimiter, NoSlot, PreLoginSlots};
use metrics::Metrics;
use router::Router;
use store::{Store, StoreError};

/// State shared by all connections.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: Router,
    pub(crate) store: Store,
    /// Queue inserts, acks and account binds, group-committed.
    pub(crate) writer: writer::Writer,
    /// Logged-in connections (`max_connections`): a slot is taken at login.
    pub(crate) slots: Arc<Semaphore>,
    /// New accounts per source address.
    pub(crate) registrations: AddressLimiter,
    /// Names senders' address groups in the queue (their shares).
    pub(crate) sources: limits::Sources,
    pub(crate) metrics: Metrics,
    /// The share of new sends refused while the relay is saturated.
    pub(crate) shedder: overload::Shedder,
    /// The `Nats` backend: accounts, sessions, presence and the queue live in the
    /// cluster, and `store` only counts what was refused.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
    /// Keys the names of addresses in the cluster ([`limits::shared_address_name`]):
    /// derived from the relay's TLS key, which every relay of a cluster shares.
    pub(crate) address_secret: [u8; 32],
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the relay's TLS identity: {0}")]
    Identity(#[from] tls::IdentityError),
    #[error("the relay's TLS configuration: {0}")]
    Tls(#[from] chat_protocol::tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// Serves `listener` over TLS 1.3 until `shutdown` resolves, then tells every client, lets
/// in-flight writes finish (up to the configured grace period) and returns. The TLS
/// identity comes from [`tls::load_or_create`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), RunError> {
    let identity = tls::load_or_create(&config)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let label = format!("fingerprint {}", identity.fingerprint);
    let secret = {
        use sha2::{Digest, Sha256};
        Sha256::new()
            .chain_update(b"secure-chat address names v1\0")
            .chain_update(identity.key.secret_der())
            .finalize()
            .into()
    };
    let transport = Transport::Tls(acceptor);
    serve(listener, config, shutdown, transport, &label, secret).await
}

/// [`run`] without TLS, for `cargo xtask bench`'s measure of what TLS costs: clients sign
/// an all-zero channel binding. Only in the `chat-server-plaintext-bench` binary.
#[cfg(feature = "bench-plaintext")]
pub async fn run_plaintext_bench(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
) -> Result<(), RunError> {
    let secret = rand::random();
    serve(
        listener,
        config,
        shutdown,
        Transport::Plain,
        "plaintext",
        secret,
    )
    .await
}

/// How accepted connections are wrapped.
#[derive(Clone)]
enum Transport {
    Tls(tokio_rustls::TlsAcceptor),
    #[cfg(feature = "bench-plaintext")]
    Plain,
}

/// Serves `listener` with `transport`; `label` ends the "listening on" log line.
async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future,
    acceptor: Transport,
    label: &str,
    address_secret: [u8; 32],
) -> Result<(), RunError> {
    let store = Store::open(&config.data_dir)?;
    let grace = config.shutdown_grace();
    let registrations = config.registrations;
    let cluster = match &config.backend {
        config::Backend::Sqlite => None,
        config::Backend::Nats(nats) => {
            Some(Arc::new(cluster::Cluster::connect(&config, nats).await?))
        }
    };
    let router = match cluster {
        Some(_) => Router::clustered(),
        None => Router::new(store.next_envelope_id()?),
    };
    let shared = Arc::new(Shared {
        router,
        cluster,
        writer: writer::Writer::start(
            store.clone(),
            config.live_grace(),
            config.writer_queue_bytes as usize,
        ),
        slots: Arc::new(Semaphore::new(config.max_connections)),
        registrations: AddressLimiter::new(config::RateLimit {
            per_second: registrations.per_hour / 3600.0,
            burst: registrations.burst,
        }),
        sources: limits::Sources::default(),
        address_secret,
        metrics: Metrics::default(),
        shedder: overload::Shedder::default(),
        config,
        store,
    });
    let pre_login = PreLoginSlots::new(
        shared.config.pre_login.max_connections,
        shared.config.pre_login.max_per_address,
    );
    // Handlers hold a receiver of `notify` and a clone of `done`: dropping `notify` tells
    // them to stop; `done` closing tells us they all have.
    let (notify, _) = broadcast::channel::<()>(1);
    let (done, mut all_done) = mpsc::channel::<()>(1);

    // A task of its own, on the workers: it measures how long they keep ready work
    // waiting.
    let monitor = shared.config.shed_target().map(|target| {
        let shared = shared.clone();
        tokio::spawn(async move { overload::monitor(&shared.shedder, target).await })
    });
    match listener.local_addr() {
        Ok(addr) => info!("listening on {addr} ({label})"),
        Err(e) => warn!("listening (address unknown: {e}) ({label})"),
    }
    tokio::select! {
        () = accept_loop(&listener, &acceptor, &shared, &pre_login, &notify, &done) => {}
        () = purge_loop(&shared) => {}
        () = metrics_loop(&shared) => {}
        () = cluster_loop(&shared) => {}
        _ = shutdown => info!(
            "shutting down: closing {} connections",
            shared.config.max_connections - shared.slots.available_permits()
        ),
    }
    if let Some(monitor) = monitor {
        monitor.abort();
    }
    // Sends still read during the grace period are not refused for a load now gone.
    shared.shedder.set(0.0);
    drop(listener);
    drop(notify);
    drop(done);
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        warn!("some connections did not close within {grace:?}; exiting anyway");
    }
    flush_metrics(&shared).await;
    if let Some(cluster) = &shared.cluster {
        // What was acknowledged is removed, so it is not delivered again.
        let _ = tokio::time::timeout(grace, cluster.flush_removals()).await;
    }
    info!("stopped");
    Ok(())
}

/// With the cluster backend: follows the session bucket, and while NATS is unreachable
/// refuses new connections and, once it has been for [`cluster::LINK_GRACE`], closes
/// every session (clients reconnect, to another relay if they know one). Pending forever
/// with the SQLite backend.
async fn cluster_loop(shared: &Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return std::future::pending().await;
    };
    let mut connection = cluster.connection();
    let watch_connection = async {
        loop {
            if connection.changed().await.is_err() {
                return std::future::pending::<()>().await;
            }
            if *connection.borrow_and_update() {
                info!("serving: the cluster backend (NATS) is reachable again");
            } else {
                error!(
                    "not serving: lost the cluster backend (NATS); refusing new connections \
                     until it is back"
                );
                // The NATS client finds another node in moments when one fails: sessions
                // wait that out (their sends are retried meanwhile), not a longer outage.
                if cluster.outage_outlasts(cluster::LINK_GRACE).await {
                    error!(
                        "the cluster backend (NATS) stayed unreachable for {} s: closing \
                         every session",
                        cluster::LINK_GRACE.as_secs()
                    );
                    shared.router.kick_all(ErrorCode::ShuttingDown);
                }
            }
        }
    };
    tokio::select! {
        never = cluster.follow_sessions(&shared.router) => never,
        never = cluster.keep_serving(&shared.router) => never,
        () = watch_connection => {}
    }
}

/// Whether the relay can serve: always with SQLite, while NATS is reachable with the
/// cluster backend.
fn serving(shared: &Shared) -> bool {
    shared
        .cluster
        .as_ref()
        .is_none_or(|c| *c.connection().borrow())
}

async fn accept_loop(
    listener: &TcpListener,
    acceptor: &Transport,
    shared: &Arc<Shared>,
    pre_login: &PreLoginSlots,
    notify: &broadcast::Sender<()>,
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
            notify.subscribe(),
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
    shutdown: broadcast::Receiver<()>,
    slot: limits::PreLoginSlot,
    accepted: tokio::time::Instant,
) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> {
    let evicted = slot.eviction();
    let tls = tokio::select! {
        tls = tls_handshake(&acceptor, socket, &shared.config, accepted) => tls,
        () = evicted.notified() => Err("evicted by other logins".to_owned()),
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

/// Adds what was refused and ignored since the last time to the database's counters.
async fn flush_metrics(shared: &Arc<Shared>) {
    let deltas = shared.metrics.take_deltas();
    if deltas.is_empty() {
        return;
    }
    let store = shared.store.clone();
    let written = deltas.clone();
    let result = tokio::task::spawn_blocking(move || store.add_counters(&written)).await;
    if !matches!(result, Ok(Ok(()))) {
        shared.metrics.unflush(&deltas);
        warn!("could not record the operator counters; will try again");
    }
}

/// Records the counters every minute.
async fn metrics_loop(shared: &Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        flush_metrics(shared).await;
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
