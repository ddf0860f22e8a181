//! NATS nodes failing under the relays: a relay whose node dies keeps its sessions, and a
//! node leaving the cluster for good, through the real binary (`admin evacuate-node` moves
//! its replicas, `admin forget-node` (system account) takes it out of the meta group, and
//! the three nodes left keep the queued mail and survive losing one more).

mod common;

use std::process::{Command, Output, Stdio};

use async_nats::jetstream;
use chat_protocol::{ClientMessage, ServerMessage};
use chat_server::cluster::nodes;
use common::nats::Nats;
use common::{Client, PATIENCE, TestServer, user_when_serving};
use futures_util::TryStreamExt;

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

/// A relay given only `node` (it learns the others from it), the mailbox in 3 copies.
async fn relay_on(node: &common::nats::NatsNode) -> TestServer {
    let url = node.url();
    TestServer::start(|c| {
        c.backend = chat_server::config::Backend::Nats(chat_server::config::NatsBackend {
            urls: vec![url],
            stream_replicas: 3,
            ..Default::default()
        })
    })
    .await
}

/// The next delivery (within `patience`: after a node dies it waits for the mailbox
/// reader's new consumer), acknowledged; its payload.
async fn take(c: &mut Client, patience: std::time::Duration) -> Vec<u8> {
    c.take_within(patience).await.1
}

/// A relay whose NATS node dies keeps its sessions: the NATS client reconnects to another
/// node of the cluster (learnt from the one it was given) in moments, and what is sent
/// meanwhile is retried until JetStream takes it. The relay used to close every session at
/// once with `shutting_down` and refuse logins until its stream and buckets answered again
/// (about 10 s of leader elections); its clients, backing off, were gone for 42–58 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_nats_node_dies_keeps_its_sessions_and_loses_nothing() {
    let mut nats = Nats::cluster();
    // Given node 0 only, the relay talks to the node killed below.
    let server = relay_on(&nats.nodes[0]).await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    drop(server.user("carol", 2).await);
    let reply = alice.send_to("bob", &[0]).await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    assert_eq!(take(&mut bob, PATIENCE).await, [0]);

    tokio::task::block_in_place(|| nats.nodes[0].kill());
    // New logins are taken again once the elections are over (5.1-6.7 s after the kill
    // in 3 runs; 10.2-10.8 s while each check of the layout waited out the NATS client's
    // request timeout).
    drop(common::user_when_serving(&server, "carol", 2).await);
    // Each send is answered `Ok` once stored (after the elections the kill may cause),
    // on the session alice had: a `shutting_down` or a closed connection fails here.
    for i in 1..=5u8 {
        let reply = alice.send_to_within("bob", &[i], 6 * PATIENCE).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    // Bob, on his session too, gets each once, in order.
    for i in 1..=5u8 {
        assert_eq!(take(&mut bob, 6 * PATIENCE).await, [i]);
    }
    bob.send(ClientMessage::Ping { nonce: 7 }).await;
    let pong = bob.recv_reply_within(PATIENCE).await;
    assert_eq!(pong, Some(ServerMessage::Pong { nonce: 7 }), "nothing more");
}

/// Where `user`'s newest mailbox consumer lives (its node's name), and the mailbox stream's
/// leader, as the cluster reports them.
async fn reader_and_leader(js: &jetstream::Context, user: &str) -> (Option<String>, String) {
    let mailbox = nodes::placements(js)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.what.ends_with("_mailbox"))
        .unwrap();
    let stream = js.get_stream(&mailbox.what).await.unwrap();
    let consumers: Vec<_> = stream.consumers().try_collect().await.unwrap();
    let fragment = format!(".inbox.{user}.");
    let newest = consumers
        .into_iter()
        .filter(|c| {
            c.config
                .filter_subjects
                .iter()
                .any(|s| s.contains(&fragment))
        })
        .max_by_key(|c| c.created);
    let node = newest.and_then(|c| c.cluster.and_then(|c| c.leader));
    (node, mailbox.leader.unwrap())
}

/// A session's mailbox consumer lives on one node (one replica, in memory). When that node
/// dies and it is neither the relay's node nor the mailbox stream's leader, the relay sees no
/// reconnection and no election: only the consumer's silence tells. Deliveries used to stall
/// for a minute (async-nats's ordered consumer waits for four missed 15 s heartbeats); the
/// reader makes its consumer again after two missed 5 s heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_consumer_node_dies_unseen_reads_again_within_two_heartbeats() {
    let mut nats = Nats::cluster();
    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let server = relay_on(&nats.nodes[0]).await;
    let mut alice = server.user("alice", 0).await;
    // Bob logs in until his consumer is on a node whose death the relay cannot see
    // otherwise (placement is random among the stream's three). A burst makes his reader
    // read through a consumer (a few envelopes it reads by gets, without one).
    let burst: Vec<Vec<u8>> = (0..chat_server::cluster::BUSY_AFTER + 2)
        .map(|_| b"placed".to_vec())
        .collect();
    let mut placed = None;
    for _ in 0..40 {
        let mut bob = server.user("bob", 1).await;
        alice.send_burst("bob", &burst, PATIENCE).await;
        for payload in &burst {
            assert_eq!(&take(&mut bob, PATIENCE).await, payload);
        }
        let (node, leader) = reader_and_leader(&js, "bob").await;
        let node = node.expect("bob's consumer has a node");
        if node != nats.nodes[0].name && node != leader {
            placed = Some((bob, node));
            break;
        }
    }
    let (mut bob, node) = placed.expect("bob's consumer never landed on a third node");
    let index = nats.nodes.iter().position(|n| n.name == node).unwrap();
    tokio::task::block_in_place(|| nats.nodes[index].kill());

    let reply = alice.send_to("bob", b"after").await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    // Two heartbeats (10 s) and a new consumer; the old reader took 60 s.
    let sent = std::time::Instant::now();
    assert_eq!(take(&mut bob, 4 * PATIENCE).await, b"after");
    eprintln!("delivered {:?} after the send", sent.elapsed());
    bob.send(ClientMessage::Ping { nonce: 7 }).await;
    let pong = bob.recv_reply_within(PATIENCE).await;
    assert_eq!(pong, Some(ServerMessage::Pong { nonce: 7 }), "nothing more");
}

/// Every consumer of `stream`. By name (one page holds 1,024 names), then each one's info:
/// JetStream's paged list of infos is not in a stable order in a cluster, so its pages can
/// repeat some consumers and skip others.
async fn consumers(stream: &mut jetstream::stream::Stream) -> Vec<jetstream::consumer::Info> {
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    let mut infos = Vec::new();
    for name in names {
        // (One that expired since it was named is skipped.)
        let consumer: Result<jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(&name).await;
        if let Ok(consumer) = consumer {
            infos.push(consumer.cached_info().clone());
        }
    }
    infos
}

/// Sessions [`readers_made_again_at_once_never_overflow_jetstreams_api_queue`] keeps open:
/// twice what its nodes' API queues hold, and a group message's most recipients.
const MANY: usize = 255;

/// JetStream queues API requests (making or deleting a consumer, a purge, a read from a
/// stream's leader) up to its `request_queue_limit` (10,000 by default), and when one more
/// arrives it drops every request queued, answering none. At a disturbance (here the
/// mailbox stream's leader steps down) every session's mailbox reader makes its consumer
/// again, a removal round purges one subject per recipient, and the first send to each
/// recipient fetches its mailbox's tally (a stream info): each was one request per
/// session, all at once. With more sessions than the queue holds (across all relays), every
/// one was dropped, the readers waited out their 5 s patience and asked again, all at once.
/// The relay keeps at most 32 of each kind in flight (96 in all, over its three gates).
/// Here the queue holds 128, a group message goes to 255 sessions at once, and they make
/// their consumers again at once: no node drops a request, and every session is given
/// what was sent after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_made_again_at_once_never_overflow_jetstreams_api_queue() {
    let nats = Nats::cluster_with("request_queue_limit: 128");
    let mut backend = nats.backend(3);
    // Readers keep their consumers through the whole setup (minutes on a busy machine).
    if let chat_server::config::Backend::Nats(n) = &mut backend {
        n.reader_idle_secs = 3600.0;
    }
    let server = TestServer::start(|c| {
        c.backend = backend;
        common::welcome_crowds(c);
    })
    .await;
    let mut alice = server.user("alice", 0).await;
    let mut users = Vec::new();
    for i in 0..MANY {
        users.push(server.user(&format!("u{i}"), 1 + i % 3).await);
    }
    // A group message to all 255 (a tally fetch for each recipient, all at once), then a
    // burst to each, more within a second than a reader gives by gets: every reader reads
    // through a consumer. Each is given all and acknowledges (removal rounds then purge
    // 255 subjects).
    let id = alice.id();
    let to: Vec<String> = (0..MANY).map(|i| format!("u{i}")).collect();
    let payload = b"before".to_vec();
    alice
        .send(ClientMessage::SendMany { id, to, payload })
        .await;
    match alice.recv_reply_within(6 * PATIENCE).await {
        Some(ServerMessage::Outcomes { id: got, outcomes }) => {
            assert_eq!(got, id);
            assert!(outcomes.iter().all(Option::is_none), "{outcomes:?}");
        }
        other => panic!("expected the outcomes, got {other:?}"),
    }
    let burst = vec![b"before".to_vec(); chat_server::cluster::BUSY_AFTER + 2];
    for i in 0..MANY {
        alice.send_burst(&format!("u{i}"), &burst, PATIENCE).await;
    }
    for user in &mut users {
        for _ in 0..=burst.len() {
            assert_eq!(take(user, PATIENCE).await, b"before");
        }
    }

    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let mailbox = nodes::placements(&js)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.what.ends_with("_mailbox"))
        .unwrap()
        .what;
    let mut stream = js.get_stream(&mailbox).await.unwrap();
    let made_before = consumers(&mut stream)
        .await
        .into_iter()
        .map(|c| c.created)
        .max()
        .unwrap();
    let reply = js
        .client()
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{mailbox}"),
            "".into(),
        )
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["success"], true, "stepdown refused: {reply}");

    // Each session is given what is sent after the election, once.
    for i in 0..MANY {
        let reply = alice
            .send_to_within(&format!("u{i}"), b"after", 6 * PATIENCE)
            .await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    for user in &mut users {
        assert_eq!(take(user, 6 * PATIENCE).await, b"after");
    }
    for user in &mut users {
        user.send(ClientMessage::Ping { nonce: 7 }).await;
        let pong = user.recv_reply_within(PATIENCE).await;
        assert_eq!(pong, Some(ServerMessage::Pong { nonce: 7 }), "nothing more");
    }
    // Through a consumer made after the election, for every one of them.
    let consumers = consumers(&mut stream).await;
    let remade = (0..MANY)
        .filter(|i| {
            let fragment = format!(".inbox.u{i}.");
            consumers.iter().any(|c| {
                c.created > made_before
                    && c.config
                        .filter_subjects
                        .iter()
                        .any(|s| s.contains(&fragment))
            })
        })
        .count();
    assert_eq!(remade, MANY, "readers that made their consumer again");
    for node in &nats.nodes {
        let log = node.log();
        assert!(
            !log.contains("queue limit reached"),
            "{} dropped API requests:\n{log}",
            node.name
        );
    }
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
    // Alice logs in afresh once the relay serves (her first session is not under test
    // here: a_relay_whose_nats_node_dies_keeps_its_sessions_and_loses_nothing is).
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
