//! A NATS node leaving the cluster for good, through the real binary: `admin evacuate-node`
//! moves its replicas, `admin forget-node` (system account) takes it out of the meta
//! group, and the three nodes left keep the queued mail and survive losing one more.

mod common;

use std::process::{Command, Output, Stdio};

use async_nats::jetstream;
use chat_protocol::{ClientMessage, ServerMessage};
use chat_server::cluster::nodes;
use common::nats::Nats;
use common::{TestServer, user_when_serving};

const BIN: &str = env!("CARGO_BIN_EXE_chat-server");

/// Runs the binary with `args`, `stdin` as its input (off the async runtime).
async fn admin(args: &[&str], stdin: &str) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The meta group's size as a node of the cluster reports it (system account).
async fn meta_size(url: &str, seed: &str) -> u64 {
    let client = async_nats::ConnectOptions::with_nkey(seed.to_owned())
        .connect(url)
        .await
        .unwrap();
    let reply = client
        .request("$SYS.REQ.SERVER.PING.JSZ", "{}".into())
        .await
        .unwrap();
    let jsz: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    jsz["data"]["meta_cluster"]["cluster_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no meta group in {jsz}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_for_good_and_the_rest_keep_every_message_and_their_quorum() {
    let system = nkeys::KeyPair::new_user();
    let seed = system.seed().unwrap();
    let mut nats = Nats::cluster_with_system_user(4, &system.public_key());
    // The relay knows nodes 0 and 1 only, so the second node killed below (2 or 3) is not
    // the one it talks to.
    let relay_urls = nats.urls()[..2].to_vec();
    let server = TestServer::start(|c| {
        c.backend = chat_server::config::Backend::Nats(chat_server::config::NatsBackend {
            urls: relay_urls,
            stream_replicas: 3,
            ..Default::default()
        })
    })
    .await;
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    for i in 0..20u8 {
        assert!(matches!(
            alice.send_to("bob", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }

    // A stream with one copy cannot be moved off its node: refused, and nothing moved.
    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "solo".into(),
        subjects: vec!["solo".into()],
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let placements = nodes::placements(&js).await.unwrap();
    let solo = placements.iter().find(|p| p.what == "solo").unwrap();
    let holder = solo.leader.clone().unwrap();
    let urls = nats.urls().join(",");
    let out = admin(&["admin", "evacuate-node", &holder, "--nats", &urls], "").await;
    assert!(!out.status.success());
    assert!(text(&out).contains("keeps its only copy"), "{}", text(&out));
    js.delete_stream("solo").await.unwrap();

    // The node leaving is the mailbox's leader (the hardest case).
    let mailbox = nodes::placements(&js)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.what.ends_with("_mailbox"))
        .unwrap();
    let leaving = mailbox.leader.clone().unwrap();
    let index = nats.nodes.iter().position(|n| n.name == leaving).unwrap();
    let others: Vec<String> = nats
        .nodes
        .iter()
        .filter(|n| n.name != leaving)
        .map(|n| n.url())
        .collect();
    let others = others.join(",");
    let out = admin(&["admin", "evacuate-node", &leaving, "--nats", &others], "").await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("holds no replica now"),
        "{}",
        text(&out)
    );
    for placement in nodes::placements(&js).await.unwrap() {
        assert!(placement.settled_without(&leaving), "{placement:?}");
    }
    // Again: nothing left to move.
    let out = admin(&["admin", "evacuate-node", &leaving, "--nats", &others], "").await;
    assert!(text(&out).contains("0 stream(s) moved"), "{}", text(&out));

    // Stopped, then forgotten; a seed that is not the system account's is refused.
    nats.nodes[index].kill();
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let args = [
        "admin",
        "forget-node",
        &leaving,
        "--system-nkey",
        "-",
        "--nats",
        &others,
    ];
    let out = admin(&args, &stranger).await;
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("authorization"),
        "{}",
        text(&out)
    );
    assert_eq!(
        meta_size(&nats.nodes[(index + 1) % 4].url(), &seed).await,
        4
    );
    let out = admin(&args, &seed).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("removed from the cluster"),
        "{}",
        text(&out)
    );
    let out = admin(&args, &seed).await;
    assert!(text(&out).contains("already removed"), "{}", text(&out));
    assert_eq!(
        meta_size(&nats.nodes[(index + 1) % 4].url(), &seed).await,
        3
    );

    // Three nodes left, which survive losing one more (the meta group's quorum is 2 of 3
    // now; of 4 it would have been 3): Bob logs in and gets all twenty, once, in order.
    let another = if index == 2 { 3 } else { 2 };
    nats.nodes[another].kill();
    // (The relay's NATS connection may have been to the node killed: it reconnects.)
    let mut bob = user_when_serving(&server, "bob", 1).await;
    // (If the node killed led the mailbox stream, Bob's reader waits for the election.)
    let mut got = Vec::new();
    let login = std::time::Instant::now();
    for _ in 0..20 {
        let Some(ServerMessage::Deliver {
            envelope_id: id,
            from,
            payload,
        }) = bob.recv_reply_within(6 * common::PATIENCE).await
        else {
            panic!("Bob got {} of 20 in {:?}", got.len(), login.elapsed());
        };
        assert_eq!(from, "alice");
        got.push(payload[0]);
        bob.send(ClientMessage::Ack {
            envelope_ids: vec![id],
        })
        .await;
    }
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
    eprintln!("the backlog came in {:?} after the login", login.elapsed());
    // Alice's session ended when the relay lost its NATS connection; she logs in again.
    drop(alice);
    let mut alice = user_when_serving(&server, "alice", 0).await;
    // The relay answers once JetStream stored the envelope: if the node killed led the
    // mailbox stream or a bucket the send touches, that waits for the election (the relay
    // retries for `outbox::RETRY_FOR`, 30 s).
    let stored = std::time::Instant::now();
    let reply = alice
        .send_to_within("bob", b"after", 6 * common::PATIENCE)
        .await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    eprintln!("\"after\" stored in {:?}", stored.elapsed());
    // Live delivery resumes once Bob's reader notices the stream's new leader (after the
    // kill), which may take longer than a plain delivery.
    let sent = std::time::Instant::now();
    match bob.recv_reply_within(6 * common::PATIENCE).await {
        Some(ServerMessage::Deliver { payload, .. }) => assert_eq!(payload, b"after"),
        other => panic!("expected the delivery of \"after\", got {other:?}"),
    }
    eprintln!("\"after\" delivered in {:?}", sent.elapsed());
}
