//! Load generators speaking to the relay (our protocol, over the real codec) and to Redis
//! (PUBLISH/SUBSCRIBE) in the same patterns, so the two are measured alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_protocol::codec::WireCodec;
use chat_protocol::{ClientMessage, PROTOCOL_VERSION, ServerMessage, Username, auth};
use futures_util::{FutureExt, SinkExt, StreamExt};
use rsa::PrivateKey;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;

/// TLS to the relay, or plain TCP to the benchmark-only plaintext relay.
type Stream = tokio_util::either::Either<tokio_rustls::client::TlsStream<TcpStream>, TcpStream>;
pub(super) type Conn = Framed<Stream, WireCodec<ServerMessage, ClientMessage>>;

/// Connects over TLS (to `addr`, `HOST:PORT#FINGERPRINT`: the key is checked as the
/// client checks it; plain `HOST:PORT` is the benchmark-only plaintext relay, reached
/// over TCP with an all-zero channel binding) and logs in as a new account `name`, signing with `key`. `source`
/// picks the local loopback address (several allow more connections than one address has
/// ports).
pub async fn relay_login(
    addr: &str,
    name: &str,
    key: &PrivateKey,
    source: Option<[u8; 4]>,
) -> anyhow::Result<Conn> {
    let address: chat_protocol::relay_id::RelayAddress = addr.parse()?;
    let stream = match source {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((std::net::Ipv4Addr::from(ip), 0).into())?;
            socket.connect(address.host_port.parse()?).await?
        }
        None => TcpStream::connect(&address.host_port).await?,
    };
    stream.set_nodelay(true)?;
    let (stream, channel) = match address.fingerprint {
        Some(fingerprint) => {
            let config = chat_protocol::tls::PinVerifier::new(Some(fingerprint)).client_config()?;
            let sni = rustls::pki_types::ServerName::try_from("relay.bench")?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(sni, stream)
                .await?;
            let channel = chat_protocol::tls::channel_binding(tls.get_ref().1)?;
            (tokio_util::either::Either::Left(tls), channel)
        }
        None => (
            tokio_util::either::Either::Right(stream),
            Default::default(),
        ),
    };
    let mut conn = Framed::new(stream, WireCodec::new(1 << 20));
    let hello = ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        software: "bench".into(),
    };
    let register = ClientMessage::Register {
        id: 1,
        username: name.into(),
        public_key: auth::public_key_der(&key.to_public_key()),
    };
    let mut sent = conn.feed(hello).await;
    if sent.is_ok() {
        sent = conn.send(register).await;
    }
    if let Err(e) = sent {
        // A relay that refuses a connection says why before it closes it.
        let said = tokio::time::timeout(Duration::from_secs(1), conn.next()).await;
        if let Ok(Some(Ok(ServerMessage::Error { code, message, .. }))) = said {
            anyhow::bail!("login of {name} refused: {code}: {message}");
        }
        return Err(e.into());
    }
    let user = Username::parse(name)?;
    loop {
        match conn.next().await.context("relay closed during login")?? {
            ServerMessage::Challenge { nonce, .. } => {
                let signature = auth::sign_login(key, &mut rand::rng(), &user, &nonce, &channel)?;
                conn.send(ClientMessage::Prove { id: 2, signature }).await?;
            }
            ServerMessage::Welcome { .. } => return Ok(conn),
            ServerMessage::Error { code, message, .. } => {
                anyhow::bail!("login of {name}: {code}: {message}")
            }
            _ => {}
        }
    }
}

/// A throughput pattern: `pairs` sender→receiver streams of `payload`-byte messages, each
/// sender with at most `window` sends awaiting the server's answer (1: wait for each).
/// `tag` keeps names and channels of one run apart from the others.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub tag: String,
    pub pairs: usize,
    pub payload: usize,
    pub window: usize,
}

/// Counts what receivers got while `measuring` is set.
#[derive(Default)]
pub struct Counter {
    pub measuring: AtomicBool,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

impl Counter {
    fn record(&self, bytes: usize) {
        if self.measuring.load(Ordering::Relaxed) {
            self.messages.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Runs one sender→receiver stream per pair through the relay until `stop`; `window` is
/// how many sends may await the server's `Ok` (1: wait for each).
pub async fn relay_pairs(
    addr: &str,
    key: &PrivateKey,
    p: Pattern,
    counter: Arc<Counter>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    relay_pairs_between((addr, addr), key, p, counter, stop).await
}

/// As [`relay_pairs`], with the senders on one relay and the receivers on another (two
/// relays of a cluster): `(senders' relay, receivers' relay)`.
pub async fn relay_pairs_between(
    (send_addr, recv_addr): (&str, &str),
    key: &PrivateKey,
    p: Pattern,
    counter: Arc<Counter>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Pattern {
        tag,
        pairs,
        payload,
        window,
    } = p;
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let to = format!("{tag}r{i}");
        let receiver = relay_login(recv_addr, &to, key, None).await?;
        let sender = relay_login(send_addr, &format!("{tag}s{i}"), key, None).await?;
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = receiver.split();
            // Like the real client: one Ack for everything read, once the input drains.
            while let Some(Ok(first)) = stream.next().await {
                let mut envelope_ids = Vec::new();
                for (envelope_id, payload) in ready_deliveries(first, &mut stream) {
                    counter.record(payload.len());
                    envelope_ids.push(envelope_id);
                }
                if !envelope_ids.is_empty()
                    && sink
                        .send(ClientMessage::Ack { envelope_ids })
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }));
        let (mut sink, mut stream) = sender.split();
        let permits = Arc::new(Semaphore::new(window));
        let oks = permits.clone();
        // Pings go to the writer: a relay that shed a send waits for the Pong.
        let (pong, mut pongs) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    // A send refused (`server_busy` while the relay sheds load) is answered
                    // too: its place in the window is free again.
                    ServerMessage::Ok { .. } | ServerMessage::Error { id: Some(_), .. } => {
                        oks.add_permits(1)
                    }
                    ServerMessage::Ping { nonce } => {
                        let _ = pong.send(nonce);
                    }
                    _ => {}
                }
            }
        }));
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let body = vec![0xa5u8; payload];
            let mut id = 10u32;
            while !stop.load(Ordering::Relaxed) {
                let permit = tokio::select! {
                    permit = permits.acquire() => permit,
                    Some(nonce) = pongs.recv() => {
                        if sink.send(ClientMessage::Pong { nonce }).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let Ok(permit) = permit else {
                    return;
                };
                permit.forget();
                // Every send the window allows now goes out in one write, as the Redis
                // client's multiplexed connection pipelines the PUBLISHes queued on it.
                let mut more = 1;
                loop {
                    id = id.wrapping_add(1);
                    let msg = ClientMessage::Send {
                        id,
                        to: to.clone(),
                        payload: body.clone(),
                    };
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                    match permits.try_acquire() {
                        Ok(permit) if more < window => {
                            permit.forget();
                            more += 1;
                        }
                        _ => break,
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        }));
    }
    Ok(tasks)
}

/// The same pattern over Redis: a subscriber per pair on its own channel, a publisher
/// that waits for PUBLISH replies with the same window.
pub async fn redis_pairs(
    url: &str,
    p: Pattern,
    counter: Arc<Counter>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Pattern {
        tag,
        pairs,
        payload,
        window,
    } = p;
    let client = redis::Client::open(url)?;
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let channel = format!("{tag}c{i}");
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                counter.record(msg.get_payload_bytes().len());
            }
        }));
        // One connection per publisher, as each relay sender has its own.
        let conn = client.get_multiplexed_async_connection().await?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let body = vec![0xa5u8; payload];
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            while !stop.load(Ordering::Relaxed) {
                while inflight.len() < window {
                    let mut c = conn.clone();
                    let cmd = redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(&body[..])
                        .to_owned();
                    inflight.push(async move { cmd.query_async::<i64>(&mut c).await });
                }
                if inflight.next().await.is_some_and(|r| r.is_err()) {
                    return;
                }
            }
        }));
    }
    Ok(tasks)
}

/// The deliveries among `first` and every message already read after it, as
/// (envelope id, payload): what a client handles before it acknowledges, once its input
/// drains.
fn ready_deliveries(
    first: ServerMessage,
    stream: &mut futures_util::stream::SplitStream<Conn>,
) -> Vec<(u64, Vec<u8>)> {
    let mut deliveries = Vec::new();
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if let ServerMessage::Deliver {
            envelope_id,
            payload,
            ..
        } = msg
        {
            deliveries.push((envelope_id, payload));
        }
        next = stream.next().now_or_never().flatten().and_then(Result::ok);
    }
    deliveries
}

/// Starts the load, measures deliveries over `run_for` after a short warm-up, stops it.
/// Returns (messages/s, MB/s).
pub(super) async fn measure<F, Fut>(run_for: Duration, start: F) -> anyhow::Result<(f64, f64)>
where
    F: FnOnce(Arc<Counter>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>,
{
    let seen = window(run_for, Duration::from_millis(300), start, || Ok(())).await?;
    Ok((seen.messages / seen.secs, seen.bytes / seen.secs / 1e6))
}

/// What one measuring window saw: deliveries, its length, and `probe` at its start and end.
pub(super) struct Window<T> {
    pub(super) messages: f64,
    pub(super) bytes: f64,
    pub(super) secs: f64,
    pub(super) before: T,
    pub(super) after: T,
}

/// Starts the load, waits `warmup`, counts deliveries over `run_for` (calling `probe` as
/// the window opens and closes), then stops the load.
pub(super) async fn window<F, Fut, T>(
    run_for: Duration,
    warmup: Duration,
    start: F,
    mut probe: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Window<T>>
where
    F: FnOnce(Arc<Counter>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>,
{
    let counter = Arc::new(Counter::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start(counter.clone(), stop.clone()).await?;
    tokio::time::sleep(warmup).await;
    let before = probe()?;
    counter.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(run_for).await;
    counter.measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let after = probe()?;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(Window {
        messages: counter.messages.load(Ordering::Relaxed) as f64,
        bytes: counter.bytes.load(Ordering::Relaxed) as f64,
        secs,
        before,
        after,
    })
}
