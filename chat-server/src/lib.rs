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
//! - `accept`: new connections, their TLS handshake and the limits on them.
//! - `connection`: one client's requests and relaying; `login`: its handshake.
//! - [`fence`]: a refused send is never overtaken by a later one to the same recipient.
//! - [`limits`]: rate limits by work, per-address limits, the pre-login budget.
//! - [`metrics`]: what was refused or ignored, for `admin stats`.
//! - [`overload`]: load shedding, a share of new sends refused while the relay is
//!   saturated.
//! - [`tls`]: the relay's TLS identity (key and certificate) in the data directory.
//! - [`cluster`]: the `Nats` backend, for many relays sharing one NATS JetStream cluster.
//!
//! [`run`] drives a listener until the shutdown future resolves.

mod accept;
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
use std::time::Duration;

use chat_protocol::ErrorCode;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Config;
use limits::{AddressLimiter, PreLoginSlots};
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
    // Handlers hold a child of `stop` and a clone of `done`: cancelling `stop` tells them
    // to stop; `done` closing tells us they all have. Each has a token of its own, so
    // waiting for it touches no state shared with other connections (a broadcast
    // receiver polled on every turn of a session's loop locked the channel's one mutex).
    let stop = CancellationToken::new();
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
        () = accept::accept_loop(&listener, &acceptor, &shared, &pre_login, &stop, &done) => {}
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
    stop.cancel();
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
