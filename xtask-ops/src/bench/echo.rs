//! The latency rows: echo pairs through the relay and through Redis at a fixed offered
//! load. A sends on schedule whatever happens to earlier messages (open loop, nothing it
//! sends waits for an answer), B sends each message straight back, and A records each
//! round trip from the time the message was due.
//!
//! Every message A schedules ends in exactly one of three ways, so none vanishes from
//! the figures: it came back (a round trip), the relay refused it or its echo with
//! `server_busy` (shed: a real client keeps it and retries), or it had not come back when
//! the run ended (counted with a lower bound: the run's end minus its due time).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use futures_util::{FutureExt, SinkExt, StreamExt};
use rsa::PrivateKey;

use super::load::relay_login;

/// What one echo run measured, all pairs together.
#[derive(Debug, Default)]
pub struct EchoRun {
    /// Round trips in µs: those that came back, then lower bounds for those that did not
    /// and were not shed.
    pub samples: Vec<u64>,
    /// Messages the relay refused with `server_busy` (A's send or B's echo of it).
    pub shed: usize,
    /// Messages A scheduled.
    pub offered: usize,
}

/// An echo run's round trips in µs (p50, p99, p99.9) and the share of offered messages
/// the relay shed (`0.0..=1.0`; always 0 for Redis, which has no such refusal).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub shed: f64,
}

impl EchoRun {
    pub fn latency(mut self) -> Latency {
        self.samples.sort_unstable();
        let s = &self.samples;
        let at = |q: f64| match s.len() {
            0 => 0,
            n => s[((n as f64 * q) as usize).min(n - 1)],
        };
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            shed: self.shed as f64 / self.offered.max(1) as f64,
        }
    }

    fn add(&mut self, other: EchoRun) {
        self.samples.extend(other.samples);
        self.shed += other.shed;
        self.offered += other.offered;
    }
}

/// One pair's messages by sequence number (the first 8 bytes of each payload, and the
/// request id of A's send and of B's echo): when each was due, and how it ended.
#[derive(Debug, Default)]
struct Ledger {
    /// Due time of each message, µs after the pair's start.
    due: Vec<u64>,
    /// Round trip of each message that came back.
    returned: Vec<Option<u64>>,
    shed: HashSet<u64>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

impl Ledger {
    /// Schedules the next message; returns its sequence number.
    fn schedule(&mut self, due: u64) -> u64 {
        self.due.push(due);
        self.returned.push(None);
        self.due.len() as u64 - 1
    }

    fn returned(&mut self, seq: u64, now: u64) {
        if let Some(slot) = self.returned.get_mut(seq as usize) {
            *slot = Some(now.saturating_sub(self.due[seq as usize]));
        }
    }

    fn shed(&mut self, seq: u64) {
        self.shed.insert(seq);
    }

    /// The pair's figures once the run (`run` long) ended.
    fn finish(&self, run: Duration) -> EchoRun {
        let end = run.as_micros() as u64;
        let mut out = EchoRun {
            offered: self.due.len(),
            ..EchoRun::default()
        };
        for (seq, (due, rtt)) in self.due.iter().zip(&self.returned).enumerate() {
            match rtt {
                Some(rtt) => out.samples.push(*rtt),
                None if self.shed.contains(&(seq as u64)) => out.shed += 1,
                None => out.samples.push(end.saturating_sub(*due)),
            }
        }
        out
    }
}

/// The due time to record for a tick due at `due`, in µs after `start`: now, unless the
/// tick is more than [`TIMER_SLACK`] late (the sender was held up), then `due` +
/// [`TIMER_SLACK`], so time held up counts in the round trip (no coordinated omission)
/// while the timer's own millisecond granularity does not.
fn stamp(start: Instant, due: tokio::time::Instant) -> u64 {
    let late_bound = due.into_std() + TIMER_SLACK;
    let at = Instant::now().min(late_bound);
    at.saturating_duration_since(start).as_micros() as u64
}

/// How late tokio's timer (1 ms resolution) may fire a tick on its own.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// What A's reader hands A's writer to send.
enum Answer {
    Ack(u64),
    Pong(u64),
}

fn body(seq: u64, payload: usize) -> Vec<u8> {
    let mut body = vec![0x5au8; payload.max(8)];
    body[..8].copy_from_slice(&seq.to_le_bytes());
    body
}

fn seq_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(
        payload[..8]
            .try_into()
            .expect("an echo payload holds 8 bytes"),
    )
}

/// Echo pairs through the relay at `rate` messages/s per pair for `run`. A's schedule
/// queues each message for its writer, which sends everything queued in one write, so
/// backpressure delays messages without slowing the schedule (as Redis's multiplexed
/// connection queues commands). B answers everything it read in one write with one
/// `Ack`, as the real client does; A acknowledges what it reads with its next write.
pub async fn relay_echo(
    addr: &str,
    key: &PrivateKey,
    tag: &str,
    pairs: usize,
    payload: usize,
    rate: f64,
    run: Duration,
) -> anyhow::Result<EchoRun> {
    let mut ledgers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let (a_name, b_name) = (format!("{tag}a{i}"), format!("{tag}b{i}"));
        let b = relay_login(addr, &b_name, key, None).await?;
        let a = relay_login(addr, &a_name, key, None).await?;
        let ledger = SharedLedger::default();
        ledgers.push(ledger.clone());
        let start = Instant::now();

        let (mut sink, mut stream) = b.split();
        let book = ledger.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(first)) = stream.next().await {
                let mut envelope_ids = Vec::new();
                let mut next = Some(first);
                while let Some(msg) = next.take() {
                    match msg {
                        ServerMessage::Deliver {
                            envelope_id,
                            payload,
                            ..
                        } => {
                            let echo = ClientMessage::Send {
                                id: seq_of(&payload) as u32,
                                to: a_name.clone(),
                                payload,
                            };
                            if sink.feed(echo).await.is_err() {
                                return;
                            }
                            envelope_ids.push(envelope_id);
                        }
                        ServerMessage::Error {
                            id: Some(id),
                            code: ErrorCode::ServerBusy,
                            ..
                        } => book.lock().expect("ledger").shed(u64::from(id)),
                        ServerMessage::Ping { nonce }
                            if sink.feed(ClientMessage::Pong { nonce }).await.is_err() =>
                        {
                            return;
                        }
                        _ => {}
                    }
                    next = stream.next().now_or_never().flatten().and_then(Result::ok);
                }
                let done = if envelope_ids.is_empty() {
                    sink.flush().await
                } else {
                    sink.send(ClientMessage::Ack { envelope_ids }).await
                };
                if done.is_err() {
                    return;
                }
            }
        }));

        let (mut sink, mut stream) = a.split();
        // A's reader hands envelope ids and pings to A's writer, which answers them.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let book = ledger.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    ServerMessage::Deliver {
                        envelope_id,
                        payload,
                        ..
                    } => {
                        let now = start.elapsed().as_micros() as u64;
                        book.lock().expect("ledger").returned(seq_of(&payload), now);
                        let _ = ack_tx.send(Answer::Ack(envelope_id));
                    }
                    ServerMessage::Ping { nonce } => {
                        let _ = ack_tx.send(Answer::Pong(nonce));
                    }
                    ServerMessage::Error {
                        id: Some(id),
                        code: ErrorCode::ServerBusy,
                        ..
                    } => book.lock().expect("ledger").shed(u64::from(id)),
                    _ => {}
                }
            }
        }));

        let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<u64>();
        tasks.push(tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut envelope_ids = Vec::new();
                while let Ok(answer) = ack_rx.try_recv() {
                    match answer {
                        Answer::Ack(id) => envelope_ids.push(id),
                        Answer::Pong(nonce)
                            if sink.feed(ClientMessage::Pong { nonce }).await.is_err() =>
                        {
                            return;
                        }
                        Answer::Pong(_) => {}
                    }
                }
                if !envelope_ids.is_empty()
                    && sink
                        .feed(ClientMessage::Ack { envelope_ids })
                        .await
                        .is_err()
                {
                    return;
                }
                let mut next = Some(first);
                while let Some(seq) = next.take() {
                    let msg = ClientMessage::Send {
                        id: seq as u32,
                        to: b_name.clone(),
                        payload: body(seq, payload),
                    };
                    if sink.feed(msg).await.is_err() {
                        return;
                    }
                    next = queued.try_recv().ok();
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        }));
        let book = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            loop {
                let due = tick.tick().await;
                if start.elapsed() >= run {
                    return;
                }
                let due = stamp(start, due);
                let seq = book.lock().expect("ledger").schedule(due);
                if queue.send(seq).is_err() {
                    return;
                }
            }
        }));
    }
    finish(ledgers, tasks, run).await
}

/// Waits out the run (every pair started before this is called), then stops every task
/// of it, so nothing of this run loads the next measurement, and adds up the pairs.
async fn finish(
    ledgers: Vec<SharedLedger>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    run: Duration,
) -> anyhow::Result<EchoRun> {
    tokio::time::sleep(run).await;
    for t in &tasks {
        t.abort();
    }
    let mut total = EchoRun::default();
    for ledger in ledgers {
        total.add(ledger.lock().expect("ledger").finish(run));
    }
    Ok(total)
}

/// The same echo pattern over Redis channels. Both ends publish without waiting for each
/// reply (pipelined on the multiplexed connection, which writes what is queued together),
/// as the relay's echo ends send without waiting for each `Ok`: the same open-loop load.
pub async fn redis_echo(
    url: &str,
    tag: &str,
    pairs: usize,
    payload: usize,
    rate: f64,
    run: Duration,
) -> anyhow::Result<EchoRun> {
    let client = redis::Client::open(url)?;
    let mut ledgers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let (to_b, to_a) = (format!("{tag}ab{i}"), format!("{tag}ba{i}"));
        let mut b_sub = client.get_async_pubsub().await?;
        b_sub.subscribe(&to_b).await?;
        let b_pub = client.get_multiplexed_async_connection().await?;
        let echo_channel = to_a.clone();
        tasks.push(tokio::spawn(async move {
            let mut messages = b_sub.on_message();
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    msg = messages.next() => {
                        let Some(msg) = msg else { return };
                        let cmd = redis::cmd("PUBLISH")
                            .arg(&echo_channel)
                            .arg(msg.get_payload_bytes())
                            .to_owned();
                        let mut c = b_pub.clone();
                        inflight.push(async move { cmd.query_async::<i64>(&mut c).await });
                    }
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        if done.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
        let mut a_sub = client.get_async_pubsub().await?;
        a_sub.subscribe(&to_a).await?;
        let a_pub = client.get_multiplexed_async_connection().await?;
        let ledger = SharedLedger::default();
        ledgers.push(ledger.clone());
        let start = Instant::now();
        let book = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut messages = a_sub.on_message();
            while let Some(msg) = messages.next().await {
                let now = start.elapsed().as_micros() as u64;
                let seq = seq_of(msg.get_payload_bytes());
                book.lock().expect("ledger").returned(seq, now);
            }
        }));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut inflight = futures_util::stream::FuturesUnordered::new();
            while start.elapsed() < run {
                tokio::select! {
                    due = tick.tick() => {
                        if start.elapsed() >= run {
                            break;
                        }
                        let due = stamp(start, due);
                        let seq = ledger.lock().expect("ledger").schedule(due);
                        let cmd = redis::cmd("PUBLISH").arg(&to_b).arg(body(seq, payload)).to_owned();
                        let mut c = a_pub.clone();
                        inflight.push(async move { cmd.query_async::<i64>(&mut c).await });
                    }
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        if done.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    finish(ledgers, tasks, run).await
}
