//! Hostile users against the real `chat-server` binary. Every attack runs for a bounded
//! time while a legitimate pair keeps chatting (alice → bob, one message every 20 ms, each
//! waiting for its `Ok`) and a third user keeps logging in and out. For each attack the
//! pair loses nothing and receives in order, every legitimate `Ok` arrives (p99 latency
//! printed), new logins succeed, the relay's memory stays under a bound, and the attacker
//! is paced, refused or closed with a clear error.
//!
//! One attack is one small function; a new kind is one more test.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username, auth};
use common::{Client, PATIENCE, key};
use rand::{Rng, RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_chat-server");
const MAX_FRAME: u32 = 65_536;
/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(10);
/// The relay's resident memory must stay under this during any attack.
const RSS_BOUND_KIB: u64 = 200 * 1024;
/// Where attackers connect from; the legitimate users use 127.0.0.1.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

struct Server {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the relay with these RON settings added to the test defaults.
    fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.ron");
        std::fs::write(
            &config,
            format!(
                "(listen: \"127.0.0.1:0\", max_frame_bytes: {MAX_FRAME}, login_timeout_secs: 2.0, \
                 write_timeout_secs: 1.0, send_queue_len: 8, {extra})"
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.split(" (").next().unwrap().trim().parse().unwrap();
            }
        };
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            child,
            addr,
            dir,
            log,
        }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    async fn user(&self, name: &str, k: usize) -> Client {
        let mut c = Client::connect(self.addr).await;
        c.hello().await;
        match c.register(name, key(k)).await {
            ServerMessage::Welcome { .. } => c,
            other => panic!("login of {name} failed: {other:?}"),
        }
    }

    /// A user logged in from the attacker's address.
    async fn attacker(&self, name: &str, k: usize) -> Client {
        self.user_from(name, k, ATTACKER).await
    }

    /// A user registered from `address`.
    async fn user_from(&self, name: &str, k: usize, address: Ipv4Addr) -> Client {
        let mut c = Client::connect_from(self.addr, address).await;
        c.hello().await;
        match c.register(name, key(k)).await {
            ServerMessage::Welcome { .. } => c,
            other => panic!("login of {name} failed: {other:?}"),
        }
    }

    /// Stops the relay (SIGTERM: it records its counters) and returns `admin stats`.
    fn stop_and_stats(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let out = Command::new(BIN)
            .args(["admin", "stats", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The number after `label:` in `admin stats` output.
fn stat(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
}

/// Reads what the server says to a raw connection until it closes: the error codes seen.
async fn errors_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<ErrorCode> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    let mut codes = Vec::new();
    let mut rest = &buf[..];
    while let Ok(Some((msg, used))) =
        chat_protocol::frame::parse::<ServerMessage>(rest, MAX_FRAME as usize)
    {
        if let ServerMessage::Error { code, .. } = msg {
            codes.push(code);
        }
        rest = &rest[used..];
    }
    codes
}

/// The legitimate users: alice → bob chatting, carol logging in and out, and a watch on
/// the relay's memory. Started before an attack, checked after it.
struct Legit {
    stop: Arc<AtomicBool>,
    chatting: tokio::task::JoinHandle<Vec<Duration>>,
    reading: tokio::task::JoinHandle<Vec<String>>,
    total: tokio::sync::oneshot::Sender<usize>,
    churn: tokio::task::JoinHandle<Vec<Duration>>,
    rss: tokio::task::JoinHandle<u64>,
}

/// What the legitimate users saw.
struct Report {
    sent: usize,
    p50: Duration,
    p99: Duration,
    logins: usize,
    slowest_login: Duration,
    rss_max_kib: u64,
}

impl Legit {
    async fn start(server: &Server) -> Self {
        key(3);
        let alice = server.user("alice", 0).await;
        let bob = server.user("bob", 1).await;
        server.user("carol", 2).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (total, total_rx) = tokio::sync::oneshot::channel();
        let addr = server.addr;
        let pid = server.child.id();
        Self {
            chatting: tokio::spawn(alice_chats(alice, stop.clone())),
            reading: tokio::spawn(bob_reads(bob, total_rx)),
            churn: tokio::spawn(carol_churns(addr, stop.clone())),
            rss: tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut max = 0;
                    while !stop.load(Ordering::Relaxed) {
                        max = max.max(Server::rss_kib(pid));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    max
                }
            }),
            total,
            stop,
        }
    }

    /// Stops the legitimate traffic and checks it: everything arrived, in order; every
    /// login worked; memory stayed bounded.
    async fn finish(self, attack: &str) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies = self.chatting.await.unwrap();
        let sent = latencies.len();
        self.total.send(sent).unwrap();
        let got = self.reading.await.unwrap();
        let expected: Vec<String> = (0..sent).map(|i| format!("msg {i}")).collect();
        assert!(sent > 20, "{attack}: the pair barely chatted ({sent})");
        assert_eq!(
            got, expected,
            "{attack}: the pair lost or reordered messages"
        );
        let logins = self.churn.await.unwrap();
        let rss_max_kib = self.rss.await.unwrap();
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        let report = Report {
            sent,
            p50: pct(0.50),
            p99: pct(0.99),
            logins: logins.len(),
            slowest_login: logins.iter().max().copied().unwrap_or_default(),
            rss_max_kib,
        };
        eprintln!(
            "{attack}: {} messages, Ok latency p50 {:?} p99 {:?}; {} logins, slowest {:?}; relay RSS max {} KiB",
            report.sent,
            report.p50,
            report.p99,
            report.logins,
            report.slowest_login,
            report.rss_max_kib
        );
        assert!(
            report.logins >= 5,
            "{attack}: only {} logins",
            report.logins
        );
        assert!(
            report.rss_max_kib < RSS_BOUND_KIB,
            "{attack}: relay RSS {} KiB",
            report.rss_max_kib
        );
        report
    }
}

/// Alice sends Bob numbered messages until told to stop; returns each send's latency.
/// Every send must be accepted.
async fn alice_chats(mut alice: Client, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = latencies.len();
        let started = Instant::now();
        let reply = alice.send_to("bob", format!("msg {n}").as_bytes()).await;
        assert!(
            matches!(reply, ServerMessage::Ok { .. }),
            "send {n}: {reply:?}"
        );
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies
}

/// Bob reads and acknowledges until he has `n` messages (n arrives when Alice stops).
async fn bob_reads(mut bob: Client, total: tokio::sync::oneshot::Receiver<usize>) -> Vec<String> {
    let mut got = Vec::new();
    let mut total = total;
    let mut expected = None;
    loop {
        if expected == Some(got.len()) {
            return got;
        }
        let msg = tokio::select! {
            msg = bob.recv() => msg,
            n = &mut total, if expected.is_none() => { expected = Some(n.unwrap()); continue; }
        };
        match msg {
            ServerMessage::Deliver {
                envelope_id,
                from,
                payload,
            } => {
                assert_eq!(from, "alice");
                got.push(String::from_utf8(payload).unwrap());
                bob.send(ClientMessage::Ack {
                    envelope_ids: vec![envelope_id],
                })
                .await;
            }
            ServerMessage::Ping { nonce } => bob.send(ClientMessage::Pong { nonce }).await,
            _ => {}
        }
    }
}

/// Carol logs in and out again and again; returns how long each login took. Every login
/// must succeed.
async fn carol_churns(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut times = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut carol = Client::connect(addr).await;
        carol.hello().await;
        match carol.login("carol", key(2)).await {
            ServerMessage::Welcome { .. } => {}
            other => panic!("carol's login {} failed: {other:?}", times.len()),
        }
        times.push(started.elapsed());
        drop(carol);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    times
}

/// An `Ack` frame as big as a frame can be: ~65,000 one-byte ids.
fn ack_flood_frame() -> Vec<u8> {
    let ids: Vec<u64> = (0..65_000u64).map(|i| i % 128).collect();
    chat_protocol::frame::encode(
        &ClientMessage::Ack { envelope_ids: ids },
        MAX_FRAME as usize,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_flood() {
    let server = Server::start("");
    let legit = Legit::start(&server).await;
    // Three accounts send the largest Ack frames they can, as fast as they can.
    let frame = ack_flood_frame();
    let mut flooders = tokio::task::JoinSet::new();
    for (i, name) in ["fl0", "fl1", "fl2"].into_iter().enumerate() {
        let mut c = server.attacker(name, i % 4).await;
        let frame = frame.clone();
        flooders.spawn(async move {
            let deadline = tokio::time::Instant::now() + ATTACK;
            let mut frames = 0usize;
            while tokio::time::timeout_at(deadline, c.raw(&frame))
                .await
                .is_ok()
            {
                frames += 1;
            }
            frames
        });
    }
    let mut frames = Vec::new();
    while let Some(n) = flooders.join_next().await {
        frames.push(n.unwrap());
    }
    legit.finish("ack flood").await;
    let stats = server.stop_and_stats();
    eprintln!("ack flood: frames written per attacker {frames:?}");
    // Paced: without pacing a loopback socket takes thousands of these in 10 s.
    assert!(frames.iter().all(|&n| n < 400), "not paced: {frames:?}");
    assert!(stat(&stats, "ack ids ignored") > 65_000, "{stats}");
}

/// `SendMany` floods: three accounts fan a 1 KiB payload out to 255 names as fast as they
/// are answered. Every copy is charged (a quarter token and a quarter per KiB), so one
/// fan-out costs ~132 tokens and an attacker gets about one answered per 1.3 s after its
/// burst, each answered in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_flood() {
    let server = Server::start("");
    let legit = Legit::start(&server).await;
    let to: Vec<String> = (0..chat_protocol::message::MAX_FANOUT)
        .map(|i| format!("nobody{i}"))
        .collect();
    let mut flooders = tokio::task::JoinSet::new();
    for (i, name) in ["fo0", "fo1", "fo2"].into_iter().enumerate() {
        let mut c = server.attacker(name, i % 4).await;
        let to = to.clone();
        flooders.spawn(async move {
            let deadline = tokio::time::Instant::now() + ATTACK;
            let mut answered = 0usize;
            loop {
                let id = c.id();
                let payload = vec![7; 1024];
                let to = to.clone();
                c.send(ClientMessage::SendMany { id, to, payload }).await;
                match tokio::time::timeout_at(deadline, c.recv_reply()).await {
                    Ok(ServerMessage::Outcomes { id: got, outcomes }) => {
                        assert_eq!(got, id);
                        assert_eq!(outcomes, vec![Some(ErrorCode::UnknownUser); 255]);
                        answered += 1;
                    }
                    Ok(other) => panic!("expected Outcomes: {other:?}"),
                    Err(_) => return answered,
                }
            }
        });
    }
    let mut answered = Vec::new();
    while let Some(n) = flooders.join_next().await {
        answered.push(n.unwrap());
    }
    legit.finish("fan-out flood").await;
    eprintln!("fan-out flood: fan-outs answered per attacker {answered:?}");
    // Served, but paced: charged per frame alone they would get hundreds each.
    assert!(
        answered.iter().all(|&n| (1..=12).contains(&n)),
        "{answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_fill_a_recipients_queue() {
    // A small queue, so filling it is quick; three new accounts per address.
    let server = Server::start(
        "queue: (max_envelopes_per_user: 400, max_sender_share: 0.25), \
         registrations: (per_hour: 1.0, burst: 3.0)",
    );
    let legit = Legit::start(&server).await;
    // Vic and a friend of hers, from an address of their own.
    for name in ["vic", "friend"] {
        let mut c = Client::connect_from(server.addr, Ipv4Addr::new(127, 0, 0, 4)).await;
        c.hello().await;
        assert!(matches!(
            c.register(name, key(3)).await,
            ServerMessage::Welcome { .. }
        ));
    }
    // Three throwaway accounts from one address, and one more from a second address.
    let mut strangers = Vec::new();
    for i in 0..3 {
        strangers.push(server.attacker(&format!("stranger{i}"), i % 4).await);
    }
    let other_address = Ipv4Addr::new(127, 0, 0, 5);
    strangers.push(server.user_from("elsewhere", 3, other_address).await);
    // A fourth throwaway account from the same address is refused.
    let mut fourth = Client::connect_from(server.addr, ATTACKER).await;
    fourth.hello().await;
    match fourth.register("stranger3", key(3)).await {
        ServerMessage::Error {
            code: ErrorCode::RateLimited,
            message,
            ..
        } => assert!(message.contains("too many accounts"), "{message}"),
        other => panic!("a fourth account was allowed: {other:?}"),
    }
    let deadline = Instant::now() + ATTACK;
    let mut queued_by = Vec::new();
    for s in &mut strangers {
        let mut queued = 0;
        loop {
            assert!(Instant::now() < deadline, "never refused");
            match s.send_to("vic", &[7; 1024]).await {
                ServerMessage::Ok { .. } => queued += 1,
                ServerMessage::Error {
                    code: ErrorCode::RecipientQueueFull,
                    message,
                    ..
                } => {
                    assert!(message.contains("one sender"), "{message}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        queued_by.push(queued);
    }
    // A quarter of vic's queue per address, however many accounts it has.
    assert_eq!(queued_by, [100, 0, 0, 100]);
    // Vic's friend still gets through.
    let mut friend = Client::connect(server.addr).await;
    friend.hello().await;
    friend.login("friend", key(3)).await;
    for _ in 0..10 {
        assert!(matches!(
            friend.send_to("vic", b"hi").await,
            ServerMessage::Ok { .. }
        ));
    }
    tokio::time::sleep(ATTACK.saturating_sub(deadline.elapsed())).await;
    legit.finish("strangers fill a queue").await;
    let stats = server.stop_and_stats();
    assert_eq!(stat(&stats, "refused, sender's share full"), 4, "{stats}");
    assert_eq!(stat(&stats, "registrations refused"), 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_queue_is_bounded() {
    // 400 KiB for everyone, half of it per address; live deliveries acknowledged within
    // a second never count.
    let server = Server::start(
        "queue: (max_total_bytes: 409600, max_source_share: 0.5, live_grace_secs: 1.0)",
    );
    for i in 0..4 {
        server.user(&format!("away{i}"), 3).await;
    }
    let legit = Legit::start(&server).await;
    // Two accounts from one address, then one from a second address, each sending until
    // refused: the first address stops at its half, the second at the server's bound.
    let fill = |mut filler: Client, what: &'static str| async move {
        let deadline = Instant::now() + ATTACK / 2;
        let (mut stored, mut refused) = (0usize, 0usize);
        while Instant::now() < deadline && refused < 3 {
            let to = format!("away{}", stored % 4);
            match filler.send_to(&to, &[1; 8192]).await {
                ServerMessage::Ok { .. } => stored += 1,
                ServerMessage::Error {
                    code: ErrorCode::ServerFull,
                    message,
                    ..
                } => {
                    assert!(message.contains(what), "{message}");
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(refused > 0, "the bound was never reached");
        stored
    };
    let first = fill(server.attacker("filler", 3).await, "your address").await
        + fill(server.attacker("filler2", 3).await, "your address").await;
    assert_eq!(
        first,
        204_800 / 8192,
        "one address: half the queue, however many accounts"
    );
    let second = fill(
        server
            .user_from("filler3", 3, Ipv4Addr::new(127, 0, 0, 5))
            .await,
        "storage for undelivered messages is full",
    )
    .await;
    assert_eq!(first + second, 409_600 / 8192, "then the server's bound");
    legit.finish("the whole queue fills").await;
    let stats = server.stop_and_stats();
    assert!(stat(&stats, "queued bytes") <= 409_600, "{stats}");
    assert!(stat(&stats, "refused, server full") >= 1, "{stats}");
    assert!(
        stat(&stats, "refused, address's share full") >= 2,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_a_connection_storm_keep_nobody_out() {
    let server = Server::start(
        "pre_login: (max_connections: 64, max_per_address: 16, first_byte_timeout_secs: 1.0), \
         connect_rate: (per_second: 50.0, burst: 100.0)",
    );
    let legit = Legit::start(&server).await;
    let addr = server.addr;
    // Raw sockets that never start TLS are closed at the first-byte deadline, without a
    // byte of answer (there is no plaintext to answer in).
    for _ in 0..4 {
        let mut s = common::connect_from(addr, ATTACKER).await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}: {buf:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    // 200 sockets that finish the TLS handshake and then never send a byte, all at once,
    // from one address.
    let mut silent = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut s = common::tls_from(addr, ATTACKER).await.unwrap();
        silent.spawn(async move {
            let started = Instant::now();
            (errors_until_closed(&mut s).await, started.elapsed())
        });
    }
    // And a storm of new connections from another address, as fast as they go, for the
    // rest of the attack: each waits a moment for the relay's answer, then hangs up.
    let storm = tokio::spawn(async move {
        let deadline = Instant::now() + ATTACK;
        let mut tries = tokio::task::JoinSet::new();
        let (mut refused, mut total) = (0, 0);
        while Instant::now() < deadline {
            if tries.len() >= 256
                && let Some(r) = tries.join_next().await
            {
                total += 1;
                refused += usize::from(r.unwrap_or(false));
            }
            tries.spawn(async move {
                let Ok(mut s) = common::tls_from(addr, Ipv4Addr::new(127, 0, 0, 3)).await else {
                    return false;
                };
                let mut buf = [0u8; 256];
                // Refused at once: the relay writes `server_busy` right after the handshake.
                matches!(
                    tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await,
                    Ok(Ok(n)) if n > 0
                )
            });
        }
        while let Some(r) = tries.join_next().await {
            total += 1;
            refused += usize::from(r.unwrap_or(false));
        }
        (refused, total)
    });
    let (mut busy, mut timed_out) = (0, 0);
    while let Some(result) = silent.join_next().await {
        let (codes, after) = result.unwrap();
        match codes[..] {
            [ErrorCode::ServerBusy] => busy += 1,
            [ErrorCode::LoginTimeout] => {
                timed_out += 1;
                assert!(
                    after < Duration::from_secs(3),
                    "first-byte deadline: {after:?}"
                );
            }
            ref other => panic!("unexpected answer to a silent socket: {other:?}"),
        }
    }
    eprintln!("silent sockets: {busy} refused busy, {timed_out} closed at the first-byte deadline");
    assert!(
        timed_out <= 16,
        "{timed_out} got a pre-login slot from one address"
    );
    assert!(busy >= 184);
    let (refused, total) = storm.await.unwrap();
    eprintln!("connection storm: {refused} of {total} refused at once");
    assert!(refused > total / 2, "{refused} of {total}");
    legit.finish("silent sockets and a connection storm").await;
    let stats = server.stop_and_stats();
    assert!(
        stat(&stats, "connections refused before login") >= 184,
        "{stats}"
    );
}

/// Slow logins from many addresses, each holding all the slots it may, reopened as soon as
/// they are closed: the budget is full the whole time, and still every fresh login (carol,
/// from an address holding none) gets in, by taking the busiest address's oldest slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_logins_from_many_addresses_keep_nobody_out() {
    let server = Server::start(
        "pre_login: (max_connections: 64, max_per_address: 16, first_byte_timeout_secs: 1.0), \
         connect_rate: (per_second: 1000.0, burst: 1000.0)",
    );
    let legit = Legit::start(&server).await;
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = tokio::task::JoinSet::new();
    // 8 addresses × 16 = twice the budget, each socket trickling a Hello byte by byte.
    for a in 1..=8u8 {
        for _ in 0..16 {
            let stop = stop.clone();
            attackers.spawn(async move {
                let hello = chat_protocol::frame::encode(
                    &ClientMessage::Hello {
                        version: chat_protocol::PROTOCOL_VERSION,
                        software: "slow".into(),
                    },
                    MAX_FRAME as usize,
                )
                .unwrap();
                let mut evicted = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = common::tls_from(addr, Ipv4Addr::new(127, 0, 1, a)).await
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // One byte every 300 ms, never the last: held until the relay closes it.
                    let mut bytes = hello[..hello.len() - 1].iter();
                    let mut sent = 0;
                    loop {
                        if let Some(byte) = bytes.next() {
                            if s.write_all(&[*byte]).await.is_err() {
                                break;
                            }
                            sent += 1;
                        }
                        let mut buf = [0u8; 512];
                        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf))
                            .await
                        {
                            Err(_) if !stop.load(Ordering::Relaxed) => continue,
                            Err(_) => break,
                            // Answered after holding a slot a while: evicted. At once:
                            // refused (no slot); back off a little before trying again.
                            Ok(Ok(n)) if n > 0 && sent > 1 => {
                                evicted += 1;
                                break;
                            }
                            Ok(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                break;
                            }
                        }
                    }
                }
                evicted
            });
        }
    }
    // Let the attackers fill the budget, then let carol churn through it.
    tokio::time::sleep(ATTACK).await;
    let report = legit.finish("slow logins from many addresses").await;
    stop.store(true, Ordering::Relaxed);
    let mut told = 0;
    while let Some(n) = attackers.join_next().await {
        told += n.unwrap();
    }
    eprintln!("slow logins: {told} attacker sockets were evicted for a fresh login");
    assert!(
        report.logins >= 20,
        "carol logged in only {} times",
        report.logins
    );
    assert!(
        report.slowest_login < Duration::from_secs(2),
        "a fresh login waited {:?}",
        report.slowest_login
    );
    assert!(
        told >= report.logins,
        "each login took an attacker's slot: {told}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_says_nothing_about_which_names_exist() {
    let server = Server::start("");
    let legit = Legit::start(&server).await;
    // A known name with a wrong key, and an unknown name: the same answers, in order.
    let mut outcomes = Vec::new();
    for name in ["alice", "nobody-by-this-name"] {
        let mut c = Client::connect_from(server.addr, ATTACKER).await;
        c.hello().await;
        let id = c.id();
        c.send(ClientMessage::Login {
            id,
            username: name.into(),
        })
        .await;
        let challenge = c.recv_reply().await;
        assert!(
            matches!(challenge, ServerMessage::Challenge { .. }),
            "{name}: {challenge:?}"
        );
        let id = c.id();
        c.send(ClientMessage::Prove {
            id,
            signature: vec![0x41; 384],
        })
        .await;
        let answer = match c.recv_reply().await {
            ServerMessage::Error { code, message, .. } => (code, message),
            other => panic!("{other:?}"),
        };
        c.expect_closed().await;
        outcomes.push(answer);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(outcomes[0].0, ErrorCode::BadSignature);
    tokio::time::sleep(ATTACK / 2).await;
    legit.finish("login probing").await;
    // And the relay's log says nothing about who logged in or out.
    let log = server.log.lock().unwrap().clone();
    for name in ["alice", "bob", "carol"] {
        assert!(!log.contains(name), "{name} in the relay's log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_slowloris_and_a_never_reading_user() {
    // Loose rate limits here: the flood must fill the sleepy user's socket quickly.
    // Loose rate limits and sender share here: the flood must fill the sleepy user's socket.
    let server = Server::start(
        "rate_limit: (per_second: 5000.0, burst: 10000.0), queue: (max_sender_share: 1.0)",
    );
    let addr = server.addr;
    let legit = Legit::start(&server).await;

    // Random bytes instead of TLS, and the old plaintext Hello: closed without any
    // protocol answer (at most a TLS alert).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let old_hello = chat_protocol::frame::encode(
        &ClientMessage::Hello {
            version: 4,
            software: "chat-client/0.1.0".into(),
        },
        MAX_FRAME as usize,
    )
    .unwrap();
    for attempt in 0..10 {
        let mut bytes = vec![0u8; rng.random_range(1..4096)];
        rng.fill_bytes(&mut bytes);
        if attempt == 0 {
            bytes = old_hello.clone();
        }
        let mut s = common::connect_from(addr, ATTACKER).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let codes = errors_until_closed(&mut s).await;
        assert!(codes.is_empty(), "a protocol answer without TLS: {codes:?}");
    }
    // Random bytes inside TLS: refused as malformed or (a random length prefix) too large.
    for _ in 0..20 {
        let mut noise = vec![0u8; rng.random_range(1..4096)];
        rng.fill_bytes(&mut noise);
        let mut s = common::tls_from(addr, ATTACKER).await.unwrap();
        let _ = s.write_all(&noise).await;
        let _ = s.flush().await;
        let codes = errors_until_closed(&mut s).await;
        assert!(
            codes.iter().all(|c| matches!(
                c,
                ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge | ErrorCode::ProtocolViolation
            )),
            "{codes:?}"
        );
    }

    // A 4 GiB length prefix, and a frame one byte over the limit: refused before any body.
    for len in [u32::MAX, MAX_FRAME + 1] {
        let mut s = common::tls_from(addr, ATTACKER).await.unwrap();
        s.write_all(&len.to_be_bytes()).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            errors_until_closed(&mut s).await,
            [ErrorCode::FrameTooLarge]
        );
    }

    // Slowloris: a Hello trickled one byte at a time never completes the login.
    let slowloris = tokio::spawn(async move {
        let hello = chat_protocol::frame::encode(
            &ClientMessage::Hello {
                version: chat_protocol::PROTOCOL_VERSION,
                software: "slow".repeat(10),
            },
            MAX_FRAME as usize,
        )
        .unwrap();
        let mut s = common::tls_from(addr, ATTACKER).await.unwrap();
        for byte in hello {
            if s.write_all(&[byte]).await.is_err() || s.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        errors_until_closed(&mut s).await
    });
    // Slowloris on the handshake: a TLS record header trickled one byte at a time is cut
    // at the login timeout, with no answer.
    let handshake_slowloris = tokio::spawn(async move {
        let mut s = common::connect_from(addr, ATTACKER).await.unwrap();
        let started = Instant::now();
        for byte in [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ]
        .into_iter()
        .cycle()
        .take(200)
        {
            if s.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        started.elapsed()
    });

    // Abrupt disconnects mid-frame, before and after login.
    for i in 0..10 {
        let mut s = common::tls_from(addr, ATTACKER).await.unwrap();
        s.write_all(&[0, 0, 1, 0, 1, 2, 3][..3 + i % 4])
            .await
            .unwrap();
        s.flush().await.unwrap();
        drop(s);
        // And mid-handshake.
        let mut raw = common::connect_from(addr, ATTACKER).await.unwrap();
        raw.write_all(&[0x16, 0x03, 0x01][..1 + i % 3])
            .await
            .unwrap();
        drop(raw);
    }
    let mut cut = server.attacker("cutter", 2).await;
    cut.raw(&[0, 0, 0, 200, 9, 9]).await;
    drop(cut);

    // Repeated challenges (as many as one connection may ask for: 4): each replaces the
    // last, and a proof for an old one fails.
    let mut mallory = Client::connect_from(addr, ATTACKER).await;
    mallory.hello().await;
    let mut nonces = Vec::new();
    for _ in 0..4 {
        let id = mallory.id();
        mallory
            .send(ClientMessage::Login {
                id,
                username: "alice".into(),
            })
            .await;
        match mallory.recv_reply().await {
            ServerMessage::Challenge { nonce, .. } => nonces.push(nonce),
            other => panic!("expected a challenge, got {other:?}"),
        }
    }
    nonces.dedup();
    assert_eq!(nonces.len(), 4, "challenges must be fresh");
    // Even with alice's real key, a signature over a stale nonce is refused.
    let alice_name = Username::parse("alice").unwrap();
    let stale = auth::sign_login(
        key(0),
        &mut rand::rng(),
        &alice_name,
        &nonces[0],
        &mallory.channel(),
    )
    .unwrap();
    let id = mallory.id();
    mallory
        .send(ClientMessage::Prove {
            id,
            signature: stale,
        })
        .await;
    mallory.expect_error(ErrorCode::BadSignature).await;
    mallory.expect_closed().await;

    // Names at and past the limits.
    let longest = "n".repeat(chat_protocol::username::MAX_LEN);
    server.attacker(&longest, 2).await;
    for bad in [
        "n".repeat(chat_protocol::username::MAX_LEN + 1),
        String::new(),
        "bad name".into(),
        "x".repeat(60_000),
    ] {
        let mut c = Client::connect_from(addr, ATTACKER).await;
        c.hello().await;
        let id = c.id();
        c.send(ClientMessage::Register {
            id,
            username: bad.clone(),
            public_key: common::der(key(3)),
        })
        .await;
        c.expect_error(ErrorCode::InvalidUsername).await;
    }

    // A client that never reads while another floods it: dropped, its mail kept.
    let sleepy = server.attacker("sleepy", 3).await;
    let mut flooder = server.attacker("flood", 2).await;
    let payload = vec![0x5a; 60_000];
    let mut flooded = 0usize;
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    while flooder.online().await.contains(&"sleepy".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sleepy never dropped"
        );
        let reply = flooder.send_to("sleepy", &payload).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
        flooded += 1;
    }
    drop(sleepy);
    let slow_codes = slowloris.await.unwrap();
    assert!(
        slow_codes.contains(&ErrorCode::LoginTimeout),
        "{slow_codes:?}"
    );
    let cut_after = handshake_slowloris.await.unwrap();
    assert!(
        cut_after < Duration::from_secs(20),
        "a trickled handshake was held for {cut_after:?}"
    );

    // The flooded user comes back and gets every message.
    let mut sleepy = Client::connect_from(addr, ATTACKER).await;
    sleepy.hello().await;
    sleepy.login("sleepy", key(3)).await;
    for i in 0..flooded {
        match sleepy.recv_reply().await {
            ServerMessage::Deliver {
                envelope_id,
                payload: p,
                ..
            } => {
                assert_eq!(p.len(), payload.len(), "message {i}");
                sleepy
                    .send(ClientMessage::Ack {
                        envelope_ids: vec![envelope_id],
                    })
                    .await;
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
    legit
        .finish("malformed input, slowloris, a never-reading user")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_connection_limit_of_logged_in_users() {
    let server = Server::start("max_connections: 24");
    // Real accounts from several addresses log in and stay: the 25th and later are told
    // `server_busy` (after their proof), and the 24 keep being served.
    let mut kept = Vec::new();
    let mut busy = 0;
    for i in 0..48 {
        let source = Ipv4Addr::new(127, 0, 1, (i % 8) as u8 + 1);
        let mut c = Client::connect_from(server.addr, source).await;
        c.hello().await;
        match c.register(&format!("many{i}"), key(i % 4)).await {
            ServerMessage::Welcome { .. } => kept.push(c),
            ServerMessage::Error {
                code: ErrorCode::ServerBusy,
                ..
            } => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((kept.len(), busy), (24, 24));
    for c in &mut kept {
        assert_eq!(c.online().await.len(), 24);
    }
    // One leaves: the next one gets in.
    kept.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut late = Client::connect(server.addr).await;
    late.hello().await;
    assert!(matches!(
        late.register("late", key(0)).await,
        ServerMessage::Welcome { .. }
    ));
}
