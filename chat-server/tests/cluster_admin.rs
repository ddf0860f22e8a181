//! Operator commands with the cluster backend, through the real binary: `admin migrate
//! --to-nats` (an SQLite relay's accounts and queue into a cluster), `admin stats` and
//! `admin remove-user` on the cluster, and `admin health` on both backends.

mod common;

use std::process::{Command, Output};

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use common::nats::Nats;
use common::{TestServer, key};

const BIN: &str = env!("CARGO_BIN_EXE_chat-server");

/// Runs the binary with `args` (off the async runtime: it starts its own).
async fn admin(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output().unwrap())
        .await
        .unwrap()
}

/// `admin migrate --to-nats URL --replicas 1 --data-dir DATA`.
async fn migrate(url: &str, data: &str) -> Output {
    admin(&[
        "admin",
        "migrate",
        "--to-nats",
        url,
        "--replicas",
        "1",
        "--data-dir",
        data,
    ])
    .await
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The number after `label` in `admin stats` output.
fn stat(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} in:\n{text}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_an_sqlite_relay_copies_everything_once() {
    // An SQLite relay with three accounts and mail waiting for carol (offline).
    let sqlite = TestServer::start(|_| {}).await;
    drop(sqlite.user("carol", 2).await);
    let mut alice = sqlite.user("alice", 0).await;
    let mut bob = sqlite.user("bob", 1).await;
    for i in 0..150u8 {
        let sender = if i % 3 == 0 { &mut bob } else { &mut alice };
        assert!(matches!(
            sender.send_to("carol", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }
    // Dave's name is taken in the cluster by another key before the migration.
    drop(sqlite.user("dave", 3).await);
    drop((alice, bob));
    let persisted = sqlite.stop().await;
    let data = persisted.dir.path().join("data");
    let data = data.to_str().unwrap();

    let nats = Nats::single();
    let url = nats.urls()[0].clone();
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    drop(relay.user("dave", 0).await);

    let first = migrate(&url, data).await;
    let said = text(&first);
    assert_eq!(first.status.code(), Some(1), "dave's conflict: {said}");
    assert!(said.contains("3 created"), "{said}");
    assert!(said.contains("150 copied"), "{said}");
    assert!(
        said.contains("conflict: dave is bound to another key"),
        "{said}"
    );

    // Again: nothing new is copied, nothing twice.
    let second = migrate(&url, data).await;
    let said = text(&second);
    assert!(said.contains("0 created, 3 already there"), "{said}");
    assert!(said.contains("0 copied, 150 copied before"), "{said}");

    let stats = admin(&["admin", "stats", "--nats", &url]).await;
    let said = text(&stats);
    assert!(stats.status.success(), "{said}");
    assert_eq!(stat(&said, "users:"), 4, "alice, bob, carol and dave");
    assert_eq!(stat(&said, "queued envelopes:"), 150);
    assert_eq!(stat(&said, "users with mail queued:"), 1);
    assert_eq!(stat(&said, "relays:"), 1);

    // Carol logs in on the cluster with her key: all 150, in order, from the right
    // senders; alice and bob keep their names (another key is refused).
    let mut carol = relay.user("carol", 2).await;
    for i in 0..150u8 {
        let (_, from, payload) = carol.delivery().await;
        assert_eq!(payload, vec![i]);
        assert_eq!(from, if i % 3 == 0 { "bob" } else { "alice" });
    }
    let mut mallory = relay.client().await;
    mallory.hello().await;
    assert!(matches!(
        mallory.register("alice", key(3)).await,
        ServerMessage::Error {
            code: ErrorCode::UsernameTaken,
            ..
        }
    ));
}

/// A child process, SIGKILLed (if still running) and waited for at the latest on drop.
struct Reaped(std::process::Child);

impl Reaped {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Envelopes in the mailbox stream, asked of NATS at `url`.
async fn stream_messages(url: &str) -> u64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    match js.get_stream("chat_mailbox").await {
        Ok(mut stream) => stream.info().await.unwrap().state.messages,
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_killed_midway_and_run_again_copies_everything_once() {
    // Within one sender's share of a mailbox in the cluster (2,500 by default).
    const N: usize = 2000;
    let sqlite = TestServer::start(|c| {
        c.queue.max_sender_share = 1.0;
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
    })
    .await;
    drop(sqlite.user("carol", 2).await);
    let mut alice = sqlite.user("alice", 0).await;
    for i in 0..N {
        let id = alice.id();
        alice
            .send(ClientMessage::Send {
                id,
                to: "carol".into(),
                payload: (i as u32).to_be_bytes().to_vec(),
            })
            .await;
    }
    for _ in 0..N {
        assert!(matches!(alice.recv_reply().await, ServerMessage::Ok { .. }));
    }
    drop(alice);
    let persisted = sqlite.stop().await;
    let data = persisted.dir.path().join("data");

    // SIGKILLed once some envelopes are in the stream, before all are.
    let nats = Nats::single();
    let url = nats.urls()[0].clone();
    let mut child = Reaped(
        Command::new(BIN)
            .args(["admin", "migrate", "--to-nats", &url, "--replicas", "1"])
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let copied_at_kill = loop {
        let n = stream_messages(&url).await;
        if n >= 150 || tokio::time::Instant::now() >= deadline {
            child.kill();
            assert!(n >= 150, "nothing copied in {:?}", common::PATIENCE);
            break stream_messages(&url).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert!(
        (copied_at_kill as usize) < N,
        "the migration finished before it was killed"
    );

    // Run again: the rest is copied, nothing twice.
    let data = data.to_str().unwrap();
    let again = migrate(&url, data).await;
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    assert_eq!(stream_messages(&url).await, N as u64, "{said}");
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let mut carol = relay.user("carol", 2).await;
    for i in 0..N {
        let (_, from, payload) = carol.delivery().await;
        assert_eq!(
            (from.as_str(), payload),
            ("alice", (i as u32).to_be_bytes().to_vec()),
            "once each, in order"
        );
    }
}

/// Reads `n` deliveries, acknowledging each; returns (sender, first payload byte).
async fn read_and_ack(c: &mut common::Client, n: usize) -> Vec<(String, u8)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let (id, from, payload) = c.delivery().await;
        got.push((from, payload[0]));
        c.send(ClientMessage::Ack {
            envelope_ids: vec![id],
        })
        .await;
    }
    got
}

/// A migration refused part way by one sender's share in the cluster: envelopes of other
/// senders behind the refused one are not left in the cluster out of order (they are
/// removed again), and once the recipient has read their mail the next run copies the
/// rest in order — none taken for a duplicate of its removed copy, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_refused_by_a_share_resumes_in_order_and_loses_nothing() {
    let sqlite = TestServer::start(|c| c.queue.max_sender_share = 1.0).await;
    drop(sqlite.user("carol", 2).await);
    for (name, k, range) in [("alice", 0, 0..30u8), ("bob", 1, 30..40)] {
        let mut sender = sqlite.user(name, k).await;
        for i in range {
            assert!(matches!(
                sender.send_to("carol", &[i]).await,
                ServerMessage::Ok { .. }
            ));
        }
    }
    let persisted = sqlite.stop().await;
    let data = persisted.dir.path().join("data");
    let data = data.to_str().unwrap();
    // In the cluster one sender may hold 20 of carol's 40.
    let config = persisted.dir.path().join("cluster.ron");
    std::fs::write(
        &config,
        "(queue: (max_envelopes_per_user: 40, max_sender_share: 0.5))",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let nats = Nats::single();
    let url = nats.urls()[0].clone();
    let args = [
        "admin",
        "migrate",
        "--to-nats",
        &url,
        "--replicas",
        "1",
        "--config",
        config,
        "--data-dir",
        data,
    ];
    let first = admin(&args).await;
    let said = text(&first);
    assert_eq!(first.status.code(), Some(1), "{said}");
    assert!(said.contains("20 copied, 0 copied before"), "{said}");
    assert!(said.contains("refused: 20 envelope(s) for carol"), "{said}");
    assert_eq!(stream_messages(&url).await, 20, "bob's were removed again");

    let relay = TestServer::start(|c| {
        c.backend = nats.backend(1);
        c.queue.max_envelopes_per_user = 40;
        c.queue.max_sender_share = 0.5;
    })
    .await;
    let mut carol = relay.user("carol", 2).await;
    let expected = |range: std::ops::Range<u8>| -> Vec<(String, u8)> {
        range
            .map(|i| ((if i < 30 { "alice" } else { "bob" }).to_owned(), i))
            .collect()
    };
    assert_eq!(read_and_ack(&mut carol, 20).await, expected(0..20));
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while stream_messages(&url).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "acks not applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Within JetStream's duplicate window of the removed copies.
    let second = admin(&args).await;
    let said = text(&second);
    assert!(second.status.success(), "{said}");
    assert!(said.contains("20 copied, 20 copied before"), "{said}");
    assert_eq!(read_and_ack(&mut carol, 20).await, expected(20..40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_frees_the_name_cluster_wide_and_drops_their_mail() {
    let nats = Nats::single();
    let url = nats.urls()[0].clone();
    let a = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;
    drop(a.user("carol", 2).await);
    let mut alice = b.user("alice", 0).await;
    // Relay B now remembers that carol exists.
    for _ in 0..3 {
        assert!(matches!(
            alice.send_to("carol", b"old").await,
            ServerMessage::Ok { .. }
        ));
    }

    let removed = admin(&["admin", "remove-user", "carol", "--nats", &url]).await;
    assert!(removed.status.success(), "{}", text(&removed));
    let again = admin(&["admin", "remove-user", "carol", "--nats", &url]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("no user named carol"),
        "{}",
        text(&again)
    );

    // Relay B forgets the name (it saw the removal): mail to carol is refused.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        match alice.send_to("carol", b"after").await {
            ServerMessage::Error {
                code: ErrorCode::UnknownUser,
                ..
            } => break,
            ServerMessage::Ok { .. } => {
                assert!(tokio::time::Instant::now() < deadline, "still accepted");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    // A new carol (another key) gets the name, and none of the old carol's mail.
    let mut new_carol = a.user("carol", 3).await;
    new_carol.send(ClientMessage::Ping { nonce: 7 }).await;
    assert_eq!(
        new_carol.recv_reply().await,
        ServerMessage::Pong { nonce: 7 },
        "nothing of the old account's mail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_whether_a_relay_serves() {
    let mut nats = Nats::single();
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let address = relay.addr.to_string();
    let serving = admin(&["admin", "health", "--address", &address]).await;
    assert!(serving.status.success(), "{}", text(&serving));
    assert!(text(&serving).starts_with("serving:"), "{}", text(&serving));
    let mut alice = relay.user("alice", 0).await;

    // NATS gone: the relay refuses clients, and health says why.
    nats.nodes[0].kill();
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let said = loop {
        let probe = admin(&["admin", "health", "--address", &address, "--timeout", "2"]).await;
        if !probe.status.success() {
            break text(&probe);
        }
        assert!(tokio::time::Instant::now() < deadline, "still serving");
    };
    // Said plainly on standard output (a monitor's line), exit status 1.
    assert!(said.starts_with("not serving: "), "{said}");
    assert!(said.contains("server_busy"), "{said}");
    // A session outlives a short loss, not this one: closed once the grace is over, so
    // its client can try another relay.
    let closed = alice
        .recv_reply_within(chat_server::cluster::LINK_GRACE + common::PATIENCE)
        .await;
    assert!(
        matches!(
            closed,
            Some(ServerMessage::Error {
                code: ErrorCode::ShuttingDown,
                ..
            })
        ),
        "{closed:?}"
    );
    alice.expect_closed().await;

    // NATS back: serving again.
    nats.nodes[0].restart();
    let deadline = tokio::time::Instant::now() + 3 * common::PATIENCE;
    while !admin(&["admin", "health", "--address", &address])
        .await
        .status
        .success()
    {
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Nothing listening: a clear reason, exit 1.
    let port = common::nats::free_port();
    let nobody = admin(&["admin", "health", "--address", &format!("127.0.0.1:{port}")]).await;
    assert_eq!(nobody.status.code(), Some(1));
    assert!(
        text(&nobody).contains("is the relay running"),
        "{}",
        text(&nobody)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_given_a_bad_or_silent_nats_says_which_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let relay = |nats: &str| {
        let nats = nats.to_owned();
        let data = data.to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["--listen", "127.0.0.1:0", "--data-dir", &data])
                .args(["--nats", &nats, "--nats-replicas", "1"])
                .output()
                .unwrap()
        })
    };
    // Not a URL: refused before connecting.
    let bad = relay("http//bad url").await.unwrap();
    let said = text(&bad);
    assert_eq!(bad.status.code(), Some(1), "{said}");
    assert!(
        said.contains("is not a NATS URL; write nats://HOST:PORT"),
        "{said}"
    );
    // Nothing listening: says it could not reach NATS there, not that JetStream timed out.
    let port = common::nats::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let silent = relay(&url).await.unwrap();
    let said = text(&silent);
    assert_eq!(silent.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("cannot reach NATS at {url}")),
        "{said}"
    );
    assert!(said.contains("no NATS server answered"), "{said}");
}

/// A session with sends under way when NATS goes is closed with the others once the grace
/// is over (its client then tries another relay), not only once those sends give up: one
/// handed to NATS waits for JetStream's answer, and one still being checked (the
/// recipient's account, its mailbox's tally) waits on NATS before it is published. Such a
/// session used to hear of the close 30–40 s later (its client stuck on a dead relay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_on_a_send_is_closed_with_the_rest_when_nats_stays_gone() {
    let mut nats = Nats::single();
    let a = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;
    // Carol registered at B: A has never looked her up. Bob is known to A, and his
    // mailbox's tally fresh.
    drop(b.user("carol", 2).await);
    drop(a.user("bob", 1).await);
    let mut alice = a.user("alice", 0).await;
    let reply = alice.send_to("bob", b"before").await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    nats.nodes[0].kill();
    let lost = std::time::Instant::now();
    let mut ids = Vec::new();
    for to in ["bob", "carol"] {
        let id = alice.id();
        let (to, payload) = (to.to_owned(), b"hi".to_vec());
        alice.send(ClientMessage::Send { id, to, payload }).await;
        ids.push(id);
    }
    // Closed within the grace and a margin; the send may be answered (refused) first.
    let within = chat_server::cluster::LINK_GRACE + common::PATIENCE;
    loop {
        let left = within.saturating_sub(lost.elapsed());
        match alice.recv_reply_within(left).await {
            Some(ServerMessage::Error {
                code: ErrorCode::ShuttingDown,
                ..
            }) => break,
            Some(ServerMessage::Error { id: Some(got), .. }) if ids.contains(&got) => {}
            other => panic!(
                "expected the session closed within {within:?} of the loss, got {other:?} after {:?}",
                lost.elapsed()
            ),
        }
    }
    eprintln!("closed after {:?}", lost.elapsed());
    alice.expect_closed().await;
}
