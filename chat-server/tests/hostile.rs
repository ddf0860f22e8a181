//! Hostile clients against the real `chat-server` binary while a legitimate pair keeps
//! chatting: every attack gets its documented error or disconnect, the server's memory stays
//! bounded, and the pair loses nothing (every message arrives, once, in order).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username, auth};
use common::{Client, PATIENCE, key};
use rand::{Rng, RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_chat-server");
const MAX_CONNECTIONS: usize = 64;
const MAX_FRAME: u32 = 65_536;

struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.ron");
        std::fs::write(
            &config,
            format!(
                "(listen: \"127.0.0.1:0\", max_connections: {MAX_CONNECTIONS}, \
                 max_frame_bytes: {MAX_FRAME}, login_timeout_secs: 2.0, \
                 write_timeout_secs: 1.0, send_queue_len: 8)"
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn,chat_server=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    async fn user(&self, name: &str, k: usize) -> Client {
        let mut c = Client::connect(self.addr).await;
        c.hello().await;
        match c.register(name, key(k)).await {
            ServerMessage::Welcome { .. } => c,
            other => panic!("login of {name} failed: {other:?}"),
        }
    }
}

/// Reads what the server says to a raw connection until it closes: the error codes seen.
async fn errors_until_closed(stream: &mut TcpStream) -> Vec<ErrorCode> {
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

/// Alice sends Bob numbered messages until told to stop; returns how many she sent. Every
/// send must be accepted.
async fn alice_chats(mut alice: Client, stop: Arc<AtomicBool>) -> usize {
    let mut sent = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let reply = alice.send_to("bob", format!("msg {sent}").as_bytes()).await;
        assert!(
            matches!(reply, ServerMessage::Ok { .. }),
            "send {sent}: {reply:?}"
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sent
}

/// Bob reads and acknowledges until he has `n` messages (n arrives when Alice stops).
async fn bob_reads(mut bob: Client, total: tokio::sync::oneshot::Receiver<usize>) -> Vec<String> {
    let mut got = Vec::new();
    let mut total = total;
    let mut expected = None;
    loop {
        if let Ok(n) = total.try_recv() {
            expected = Some(n);
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_while_a_pair_chats() {
    key(3);
    let server = Server::start();
    let addr = server.addr;
    let alice = server.user("alice", 0).await;
    let bob = server.user("bob", 1).await;
    let baseline_rss = server.rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let (total_tx, total_rx) = tokio::sync::oneshot::channel();
    let chatting = tokio::spawn(alice_chats(alice, stop.clone()));
    let reading = tokio::spawn(bob_reads(bob, total_rx));

    // Random bytes: refused as malformed or (a random length prefix) too large.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    for _ in 0..20 {
        let mut noise = vec![0u8; rng.random_range(1..4096)];
        rng.fill_bytes(&mut noise);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&noise).await;
        let _ = s.shutdown().await;
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
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&len.to_be_bytes()).await.unwrap();
        assert_eq!(
            errors_until_closed(&mut s).await,
            [ErrorCode::FrameTooLarge]
        );
    }

    // Slowloris: a Hello trickled one byte per second never completes the login.
    let slowloris = tokio::spawn(async move {
        let hello = chat_protocol::frame::encode(
            &ClientMessage::Hello {
                version: chat_protocol::PROTOCOL_VERSION,
                software: "slow".repeat(10),
            },
            MAX_FRAME as usize,
        )
        .unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        for byte in hello {
            if s.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        errors_until_closed(&mut s).await
    });

    // Abrupt disconnects mid-frame, before and after login.
    for i in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 0, 1, 0, 1, 2, 3][..3 + i % 4])
            .await
            .unwrap();
        drop(s);
    }
    let mut cut = server.user("carol", 2).await;
    cut.raw(&[0, 0, 0, 200, 9, 9]).await;
    drop(cut);

    // Logins: a bad signature is refused and closed.
    let mut mallory = Client::connect(addr).await;
    mallory.hello().await;
    let id = mallory.id();
    mallory
        .send(ClientMessage::Register {
            id,
            username: "mallory".into(),
            public_key: common::der(key(3)),
        })
        .await;
    assert!(matches!(
        mallory.recv_reply().await,
        ServerMessage::Challenge { .. }
    ));
    let id = mallory.id();
    mallory
        .send(ClientMessage::Prove {
            id,
            signature: vec![0x41; 384],
        })
        .await;
    mallory.expect_error(ErrorCode::BadSignature).await;
    mallory.expect_closed().await;

    // Repeated challenges: each replaces the last, and a proof for an old one fails.
    let mut mallory = Client::connect(addr).await;
    mallory.hello().await;
    let mut nonces = Vec::new();
    for _ in 0..5 {
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
    assert_eq!(nonces.len(), 5, "challenges must be fresh");
    // Even with alice's real key, a signature over a stale nonce is refused.
    let alice_name = Username::parse("alice").unwrap();
    let stale = auth::sign_login(key(0), &mut rand::rng(), &alice_name, &nonces[0]).unwrap();
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
    server.user(&longest, 2).await;
    for bad in [
        "n".repeat(chat_protocol::username::MAX_LEN + 1),
        String::new(),
        "bad name".into(),
        "x".repeat(60_000),
    ] {
        let mut c = Client::connect(addr).await;
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
    let sleepy = server.user("sleepy", 3).await;
    let mut flooder = server.user("flood", 2).await;
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

    // Twice the connection limit at once: the excess is told `server_busy` and closed at
    // once; the rest are served, and (never logging in) closed at the login timeout.
    let mut floods = tokio::task::JoinSet::new();
    for _ in 0..2 * MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        floods.spawn(async move { errors_until_closed(&mut s).await });
    }
    let (mut busy, mut timed_out) = (0, 0);
    while let Some(codes) = floods.join_next().await {
        match codes.unwrap()[..] {
            [ErrorCode::ServerBusy] => busy += 1,
            [ErrorCode::LoginTimeout] => timed_out += 1,
            ref other => panic!("unexpected answer to a flood connection: {other:?}"),
        }
    }
    // The pair, the flooder and the longest-name user hold some of the slots.
    assert!(
        busy >= MAX_CONNECTIONS,
        "only {busy} told busy, {timed_out} served"
    );
    assert!(timed_out <= MAX_CONNECTIONS - 3, "{timed_out} served");

    let rss_under_attack = server.rss_kib();
    let slow_codes = slowloris.await.unwrap();
    assert!(
        slow_codes.contains(&ErrorCode::LoginTimeout),
        "{slow_codes:?}"
    );

    // The flooded user comes back and gets every message.
    let mut sleepy = server.user("sleepy", 3).await;
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

    // The pair never noticed.
    stop.store(true, Ordering::Relaxed);
    let sent = chatting.await.unwrap();
    total_tx.send(sent).unwrap();
    let got = reading.await.unwrap();
    let expected: Vec<String> = (0..sent).map(|i| format!("msg {i}")).collect();
    assert!(sent > 10, "the pair barely chatted: {sent}");
    assert_eq!(got, expected);

    // Memory stayed bounded: no per-attack growth that a longer attack would multiply.
    let growth = rss_under_attack.saturating_sub(baseline_rss);
    eprintln!("server RSS: {baseline_rss} KiB before, {rss_under_attack} KiB under attack");
    assert!(growth < 64 * 1024, "RSS grew by {growth} KiB");
    // And it still serves newcomers.
    server.user("dave", 2).await;
}
