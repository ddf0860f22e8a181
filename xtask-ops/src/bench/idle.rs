//! Idle authenticated connections: the server memory each one costs (RSS per connection),
//! for the relay over TLS, the plaintext relay and Redis over TLS.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use xtask::procs::Processes;

use super::load;
use super::servers::{Redis, Relay, rss_bytes, start_redis, start_relay, start_relay_exe};

/// `--connections-only`: `n` idle authenticated connections to each system in turn (a
/// fresh relay over TLS, a fresh plaintext relay, a fresh Redis over TLS), the RSS each
/// adds per connection, and how long it took to open them all.
pub(super) fn connections_only(
    rt: &tokio::runtime::Runtime,
    procs: &mut Processes,
    (bin, plain_exe): (&Path, &Path),
    key: &rsa::PrivateKey,
    n: usize,
    out: &Path,
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let relay = start_relay(procs, bin, data.path())?;
    let (relay_conn, relay_secs) = rt.block_on(relay_connections(&relay, key, n, 0))?;
    eprintln!("relay over TLS: {n} connections in {relay_secs:.0} s, {relay_conn:.0} B each");
    procs.stop_last()?;
    let data_plain = tempfile::tempdir()?;
    let plain = start_relay_exe(procs, plain_exe, data_plain.path())?;
    let (plain_conn, plain_secs) = rt.block_on(relay_connections(&plain, key, n, 1))?;
    eprintln!("relay without TLS: {n} connections in {plain_secs:.0} s, {plain_conn:.0} B each");
    procs.stop_last()?;
    let redis = start_redis(procs)?;
    let (redis_conn, redis_secs) = rt.block_on(redis_connections(&redis, n, 2))?;
    eprintln!("redis over TLS: {n} connections in {redis_secs:.0} s, {redis_conn:.0} B each");
    let machine = super::report::machine();
    println!("machine: {machine}");
    println!("idle connections held open at once: {n} (relay: logged in; Redis: after one PING)");
    println!("| system | RSS bytes per connection | seconds to open all |");
    println!("|--------|-------------------------:|--------------------:|");
    println!("| relay (TLS) | {relay_conn:.0} | {relay_secs:.0} |");
    println!("| relay (no TLS) | {plain_conn:.0} | {plain_secs:.0} |");
    println!("| Redis (TLS) | {redis_conn:.0} | {redis_secs:.0} |");
    let json = json!({
        "machine": machine,
        "connections": n,
        "relay_bytes_each": relay_conn, "relay_seconds": relay_secs,
        "relay_plaintext_bytes_each": plain_conn, "relay_plaintext_seconds": plain_secs,
        "redis_bytes_each": redis_conn, "redis_seconds": redis_secs,
    });
    let path = out.join("bench-connections.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Authenticated connections held open, each answering the relay's pings.
pub(super) struct Held {
    /// One task per connection; it ends when the relay closes the connection.
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// How many are still open.
    pub(super) open: Arc<AtomicUsize>,
    /// How many envelopes were delivered to them (each acknowledged).
    pub(super) delivered: Arc<AtomicUsize>,
    /// Logins tried again after one failed.
    pub(super) retried: usize,
    /// Seconds it took to open them all.
    pub(super) secs: f64,
}

impl Held {
    /// How many are still open; then closes them all.
    pub(super) fn close(self) -> usize {
        let still = self.open.load(Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
        }
        still
    }
}

/// How [`hold`] logs in: how many at once, and how many times a failed login is tried
/// again (after 1 s, 2 s, ...; as a client does, whose relay was too busy to answer).
#[derive(Debug, Clone, Copy)]
pub(super) struct Logins {
    pub(super) at_once: usize,
    pub(super) retries: usize,
}

/// Logs in accounts `idle{i}` for every `i` in `range` (from the loopback source of `i`
/// in `block`, as `logins` says) on the relay at `addr`, and holds them open, each
/// answering the relay's pings as a client does, so none times out while the rest log in
/// (100,000 logins take minutes), and acknowledging what is delivered to it (counted).
///
/// # Errors
/// The first login that failed `logins.retries + 1` times (connection refused, TLS, the
/// relay's refusal), with its last error.
pub(super) async fn hold(
    addr: &str,
    key: &rsa::PrivateKey,
    range: std::ops::Range<usize>,
    block: u8,
    how: Logins,
) -> anyhow::Result<Held> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(range.len());
    let mut logins = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(how.at_once));
    let retried = Arc::new(AtomicUsize::new(0));
    for i in range {
        let (addr, key, sem, retried) =
            (addr.to_owned(), key.clone(), sem.clone(), retried.clone());
        logins.spawn(async move {
            let source = source_in(block, i);
            let mut attempt = 0;
            loop {
                let permit = sem.acquire().await;
                let login = load::relay_login(&addr, &format!("idle{i}"), &key, Some(source)).await;
                drop(permit);
                match login {
                    Err(_) if attempt < how.retries => {
                        attempt += 1;
                        retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
                    }
                    done => return done.with_context(|| format!("after {attempt} retries")),
                }
            }
        });
    }
    let open = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    while let Some(conn) = logins.join_next().await {
        let mut conn = conn??;
        let (open, delivered) = (open.clone(), delivered.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tasks.push(tokio::spawn(async move {
            use chat_protocol::{ClientMessage, ServerMessage};
            use futures_util::{SinkExt, StreamExt};
            while let Some(Ok(msg)) = conn.next().await {
                let answer = match msg {
                    ServerMessage::Ping { nonce } => ClientMessage::Pong { nonce },
                    ServerMessage::Deliver { envelope_id, .. } => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                        ClientMessage::Ack {
                            envelope_ids: vec![envelope_id],
                        }
                    }
                    _ => continue,
                };
                if conn.send(answer).await.is_err() {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Held {
        tasks,
        open,
        delivered,
        retried: retried.load(Ordering::Relaxed),
        secs,
    })
}

/// Source addresses for connection `i`: 20,000 per loopback address (ports run out at ~28k).
pub(super) fn source(i: usize) -> [u8; 4] {
    source_in(0, i)
}

/// As [`source`], in loopback block `127.BLOCK.0.0/24`: each system of the memory test has
/// its own, since the ports of one system's closed connections stay in TIME_WAIT for a
/// minute (three systems of 10,000 from one address ran out of ports: "address already in
/// use").
fn source_in(block: u8, i: usize) -> [u8; 4] {
    [127, block, 0, 1 + (i / 20_000) as u8]
}

/// Per connection, the relay's RSS growth with `n` authenticated connections held open
/// (each answering pings, as clients do), and the seconds it took to open them all.
pub(super) async fn relay_connections(
    relay: &Relay,
    key: &rsa::PrivateKey,
    n: usize,
    block: u8,
) -> anyhow::Result<(f64, f64)> {
    let before = rss_bytes(relay.pid)?;
    let how = Logins {
        at_once: 64,
        retries: 0,
    };
    let held = hold(&relay.addr, key, 0..n, block, how).await?;
    let secs = held.secs;
    // Let the server settle (blocking-pool threads, allocator) before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(relay.pid)?;
    let still = held.close();
    anyhow::ensure!(
        still == n,
        "only {still} of {n} connections were still open when the relay's memory was read"
    );
    Ok(((after - before) / n as f64, secs))
}

/// As [`relay_connections`] for Redis over TLS (each connection has sent one PING).
pub(super) async fn redis_connections(
    redis: &Redis,
    n: usize,
    block: u8,
) -> anyhow::Result<(f64, f64)> {
    let before = rss_bytes(redis.pid)?;
    let started = Instant::now();
    let config = chat_protocol::tls::PinVerifier::new(None).client_config()?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::from(source_in(block, i)), 0).into())?;
        let tcp = socket.connect(([127, 0, 0, 1], redis.port).into()).await?;
        let sni = rustls::pki_types::ServerName::try_from("redis.bench")?;
        let mut s = connector.connect(sni, tcp).await?;
        // One command so the server has set the client up, as a logged-in relay client.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        anyhow::ensure!(
            &buf == b"+PONG\r\n",
            "Redis refused idle connection {i}: {}",
            String::from_utf8_lossy(&buf)
        );
        conns.push(s);
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(redis.pid)?;
    Ok(((after - before) / n as f64, secs))
}
