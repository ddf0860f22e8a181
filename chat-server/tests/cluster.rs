//! The cluster backend: relays sharing one NATS JetStream (real nats-server processes on
//! 127.0.0.1, real relays, raw protocol clients over TLS).

mod common;

use std::net::Ipv4Addr;

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use common::disk::SmallDisk;
use common::nats::Nats;
use common::{Client, PATIENCE, TestServer, key, user_when_serving};

/// Waits until the mailbox stream holds none of the envelopes `ids` (acknowledged).
async fn removed(nats: &Nats, ids: &[u64]) {
    let mailbox = mailbox(nats).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let held = held(&mailbox, ids).await;
        if held == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{held} acknowledged envelope(s) still in the mailbox"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The mailbox stream on `nats`.
async fn mailbox(nats: &Nats) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    js.get_stream("chat_mailbox").await.unwrap()
}

/// How many of `ids` are still in the mailbox `stream`, looked at once.
async fn held(stream: &async_nats::jetstream::stream::Stream, ids: &[u64]) -> usize {
    let mut held = 0;
    for &id in ids {
        held += usize::from(stream.get_raw_message(id).await.is_ok());
    }
    held
}

/// Reads `n` deliveries from alice, one-byte payloads 0, 1, ... in order, acknowledges
/// them and waits until the Ack is processed: their ids.
async fn take_and_ack(to: &mut Client, n: u8) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (id, from, payload) = to.delivery().await;
        assert_eq!((from.as_str(), payload), ("alice", vec![i]), "in order");
        ids.push(id);
    }
    to.send(ClientMessage::Ack {
        envelope_ids: ids.clone(),
    })
    .await;
    to.online().await; // the Ack was processed before this reply
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_nats_node_are_one_service() {
    let nats = Nats::single();
    let a = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;

    // Alice on A, bob on B: each sees the other online, and they chat both ways.
    let mut alice = a.user("alice", 0).await;
    let mut bob = b.user("bob", 1).await;
    alice.until_online("bob", true).await;
    bob.until_online("alice", true).await;
    assert!(matches!(
        alice.send_to("bob", b"hi bob").await,
        ServerMessage::Ok { .. }
    ));
    let (id, from, payload) = bob.delivery().await;
    assert_eq!(
        (from.as_str(), payload.as_slice()),
        ("alice", &b"hi bob"[..])
    );
    bob.send(ClientMessage::Ack {
        envelope_ids: vec![id],
    })
    .await;
    assert!(matches!(
        bob.send_to("alice", b"hi alice").await,
        ServerMessage::Ok { .. }
    ));
    let (_, from, payload) = alice.delivery().await;
    assert_eq!(
        (from.as_str(), payload.as_slice()),
        ("bob", &b"hi alice"[..])
    );

    // Presence crosses relays: alice (on A) watches carol, who comes and goes on B.
    assert_eq!(alice.watch(&["carol"]).await, Vec::<String>::new());
    let carol = b.user("carol", 2).await;
    assert_eq!(
        alice.recv().await,
        ServerMessage::Presence {
            username: "carol".into(),
            online: true
        }
    );
    drop(carol);
    loop {
        match alice.recv().await {
            ServerMessage::Presence { username, online } => {
                assert_eq!((username.as_str(), online), ("carol", false));
                break;
            }
            ServerMessage::Deliver { .. } => panic!("nothing more was sent to alice"),
            _ => continue,
        }
    }

    // Offline delivery through the stream: sent on A while carol is away, read on B.
    for i in 0..5u8 {
        assert!(matches!(
            alice.send_to("carol", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }
    let mut carol = b.user("carol", 2).await;
    let ids = take_and_ack(&mut carol, 5).await;
    drop(carol);
    // Acknowledged and removed (relay B gathers removals for up to 250 ms; a login on
    // another relay within them is given them again, as CLUSTER.md says, and the client
    // drops them by message id): not delivered again, on either relay.
    removed(&nats, &ids).await;
    let mut carol = a.user("carol", 2).await;
    carol.send(ClientMessage::Ping { nonce: 7 }).await;
    assert_eq!(carol.recv_reply().await, ServerMessage::Pong { nonce: 7 });

    // An account registered on A is taken on B for another key.
    let mut mallory = b.client().await;
    mallory.hello().await;
    match mallory.register("alice", common::key(3)).await {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::UsernameTaken),
        other => panic!("expected username_taken, got {other:?}"),
    }
    // ...and unknown recipients are refused by either relay.
    match bob.send_to("nobody", b"?").await {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::UnknownUser),
        other => panic!("expected unknown_user, got {other:?}"),
    }

    // Bob logging in on A while on B closes the session on B; the new one gets his mail.
    let mut bob_on_a = a.user("bob", 1).await;
    bob.expect_error(ErrorCode::SessionReplaced).await;
    bob.expect_closed().await;
    assert!(matches!(
        alice.send_to("bob", b"to the new one").await,
        ServerMessage::Ok { .. }
    ));
    let (_, _, payload) = bob_on_a.delivery().await;
    assert_eq!(payload, b"to the new one");
    // Without an offline flap for those who watch him.
    alice.until_online("bob", true).await;
}

/// Registers `to` (name, key), sends it `n` one-byte envelopes 0, 1, ... from alice (key
/// 0) while it is away, and logs it in again: (alice, `to` with its backlog waiting).
async fn backlog(relay: &TestServer, to: (&str, usize), n: u8) -> (Client, Client) {
    drop(relay.user(to.0, to.1).await);
    let mut alice = relay.user("alice", 0).await;
    for i in 0..n {
        let reply = alice.send_to(to.0, &[i]).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    (alice, user_when_serving(relay, to.0, to.1).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_leaves_nothing_acknowledged_in_the_mailbox() {
    let nats = Nats::single();
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let (alice, mut carol) = backlog(&relay, ("carol", 2), 5).await;
    let ids = take_and_ack(&mut carol, 5).await;
    // Stopped at once, with carol still connected: her session ends in the shutdown,
    // and the relay returns only once what she acknowledged is removed. Looked at
    // once, right after: no relay runs any more to remove it later.
    let persisted = relay.stop().await;
    assert!(
        held(&mailbox(&nats).await, &ids).await == 0,
        "acknowledged envelopes were left in the mailbox by a relay that stopped"
    );
    // And the next session is not given them again: the mailbox is read in order, so
    // her first delivery is the next message.
    drop(alice);
    let relay = TestServer::start_in(persisted, |c| c.backend = nats.backend(1)).await;
    let mut carol = user_when_serving(&relay, "carol", 2).await;
    let mut alice = relay.user("alice", 0).await;
    assert!(matches!(
        alice.send_to("carol", b"after").await,
        ServerMessage::Ok { .. }
    ));
    assert_eq!(carol.delivery().await.2, b"after");
}

/// A NATS operator's limit on pull requests (`max_request_batch`, copied into every
/// consumer) is honoured: the relay's mailbox readers ask for at most that many envelopes
/// at a time. Asking for more is refused on every pull, and the backlog was never
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_on_pull_batches_is_honoured_and_the_whole_backlog_arrives() {
    let nats =
        tokio::task::spawn_blocking(|| Nats::single_with("limits { max_request_batch: 10 }"))
            .await
            .unwrap();
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let (mut alice, mut bob) = backlog(&relay, ("bob", 1), 35).await;
    let mut got = Vec::new();
    for _ in 0..35 {
        let (id, _, payload) = bob.delivery().await;
        got.push(payload[0]);
        bob.send(ClientMessage::Ack {
            envelope_ids: vec![id],
        })
        .await;
    }
    assert_eq!(got, (0..35).collect::<Vec<u8>>());
    // And live ones after the backlog.
    assert!(matches!(
        alice.send_to("bob", b"live").await,
        ServerMessage::Ok { .. }
    ));
    assert_eq!(bob.delivery().await.2, b"live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_cluster_wide_and_nothing_is_lost() {
    let nats = Nats::single();
    let tweak = |c: &mut chat_server::Config| {
        c.backend = nats.backend(1);
        c.queue.max_envelopes_per_user = 3;
        c.queue.max_sender_share = 1.0;
    };
    let a = TestServer::start(tweak).await;
    let b = TestServer::start(tweak).await;
    drop(b.user("carol", 2).await);
    let mut alice = a.user("alice", 0).await;
    let mut bob = b.user("bob", 1).await;
    for i in 0..2u8 {
        assert!(matches!(
            alice.send_to("carol", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }
    assert!(matches!(
        bob.send_to("carol", &[2]).await,
        ServerMessage::Ok { .. }
    ));
    // The limit is per recipient across relays: the fourth is refused on either.
    for sender in [&mut alice, &mut bob] {
        match sender.send_to("carol", &[9]).await {
            ServerMessage::Error { code, .. } => {
                assert_eq!(code, ErrorCode::RecipientQueueFull)
            }
            other => panic!("expected recipient_queue_full, got {other:?}"),
        }
    }
    let mut carol = a.user("carol", 2).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(carol.delivery().await.2[0]);
    }
    assert_eq!(got, vec![0, 1, 2]);
}

/// The NATS node's disk fills up. JetStream (2.15) then answers no publish and keeps failing
/// that stream's writes until restarted, even once space is freed; the relay answers the
/// send `internal` after its retry window (the client keeps it and sends it again), never
/// `Ok` for what was not stored. Space freed and the node restarted: the relay serves again,
/// the message is sent, and the recipient gets exactly what was acknowledged, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_nats_fails_sends_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("natsfs"), "16m") else {
        return;
    };
    let store = disk.path.clone();
    let mut nats = tokio::task::spawn_blocking(move || Nats::single_storing_in(&store))
        .await
        .unwrap();
    let relay = TestServer::start(|c| c.backend = nats.backend(1)).await;
    drop(relay.user("bob", 1).await);
    let mut alice = relay.user("alice", 0).await;
    for i in 0..5u8 {
        assert!(matches!(
            alice.send_to("bob", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }

    // What still fits in the store's last pages is stored (and answered `Ok`); the first
    // envelope that does not fit is answered `internal` after the retry window.
    tokio::task::block_in_place(|| disk.fill());
    let mut sent = 5u8;
    loop {
        let id = alice.id();
        alice
            .send(ClientMessage::Send {
                id,
                to: "bob".into(),
                payload: vec![sent; 2000],
            })
            .await;
        let waited = tokio::time::Instant::now();
        let reply = alice
            .recv_reply_within(chat_server::cluster::RETRY_FOR + PATIENCE)
            .await
            .expect("an answer after the retry window");
        match reply {
            ServerMessage::Ok { id: got } => {
                assert_eq!(got, id);
                sent += 1;
                assert!(sent < 50, "JetStream stored 100 KB on a full disk");
            }
            ServerMessage::Error {
                code: ErrorCode::Internal,
                id: Some(got),
                message,
            } => {
                assert_eq!(got, id);
                assert!(message.contains("try again"), "{message}");
                assert!(waited.elapsed() >= chat_server::cluster::RETRY_FOR / 2);
                break;
            }
            other => panic!("expected internal, got {other:?}"),
        }
    }

    // Space freed, the node restarted: alice sends it again.
    disk.free();
    tokio::task::block_in_place(|| nats.nodes[0].restart());
    let mut alice = user_when_serving(&relay, "alice", 0).await;
    match alice.send_to("bob", &vec![sent; 2000]).await {
        ServerMessage::Ok { .. } => {}
        other => panic!("expected Ok after the restart, got {other:?}"),
    }
    // Bob gets each acknowledged envelope once, in order. The one answered `internal` may
    // have been stored after all (JetStream wrote it, then failed): then it comes twice,
    // once per send, and bob's client drops the copy by its message id.
    let mut bob = user_when_serving(&relay, "bob", 1).await;
    for i in 0..=sent {
        let payload = bob.delivery().await.2;
        assert_eq!(payload[0], i, "once each, in order");
    }
    bob.send(ClientMessage::Ping { nonce: 1 }).await;
    match bob.recv_reply().await {
        ServerMessage::Pong { nonce: 1 } => {}
        ServerMessage::Deliver { payload, .. } if payload[0] == sent => {
            assert_eq!(bob.recv_reply().await, ServerMessage::Pong { nonce: 1 });
        }
        other => panic!("expected nothing more, got {other:?}"),
    }
}

/// The limit on new accounts per address holds per cluster: an address that used its
/// burst on relay A is refused on relay B (which shares A's TLS identity, as the relays
/// of a cluster do), and logins of existing accounts are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_accounts_per_address_are_limited_cluster_wide() {
    let nats = Nats::single();
    let limit = chat_server::config::Registrations {
        per_hour: 1.0,
        burst: 2.0,
    };
    let a = TestServer::start(|c| {
        c.backend = nats.backend(1);
        c.registrations = limit;
    })
    .await;
    drop(a.user("alice", 0).await);
    drop(a.user("bob", 1).await);
    // B starts once A has made its TLS identity, and shares it.
    let data_a = a.dir.path().join("data");
    let b = TestServer::start(|c| {
        c.backend = nats.backend(1);
        c.registrations = limit;
        c.tls = Some(chat_server::config::TlsFiles {
            cert_chain: data_a.join(chat_server::tls::CERT_FILE),
            key: data_a.join(chat_server::tls::KEY_FILE),
        });
    })
    .await;
    let mut carol = b.client().await;
    carol.hello().await;
    match carol.register("carol", key(2)).await {
        ServerMessage::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(message.contains("try again in"), "{message}");
        }
        other => panic!("expected rate_limited on the other relay, got {other:?}"),
    }
    // Existing accounts still log in anywhere.
    drop(b.user("alice", 0).await);
    drop(a.user("bob", 1).await);
}

/// A relay started after `first` with `tweak`, sharing `first`'s TLS identity (as every
/// relay of a cluster does: the address names of shares and quotas are keyed with it).
async fn sharing_identity(
    first: &TestServer,
    tweak: impl FnOnce(&mut chat_server::Config),
) -> TestServer {
    // A TLS handshake with the first relay: its identity is on disk.
    drop(first.client().await);
    let data = first.dir.path().join("data");
    TestServer::start(|c| {
        tweak(c);
        c.tls = Some(chat_server::config::TlsFiles {
            cert_chain: data.join(chat_server::tls::CERT_FILE),
            key: data.join(chat_server::tls::KEY_FILE),
        });
    })
    .await
}

/// A user registered as `name` with test key `k`, connected from `source`.
async fn user_from(relay: &TestServer, name: &str, k: usize, source: Ipv4Addr) -> Client {
    let mut c = Client::connect_from(relay.addr, source).await;
    c.hello().await;
    match c.register(name, key(k)).await {
        ServerMessage::Welcome { .. } => c,
        other => panic!("login of {name} failed: {other:?}"),
    }
}

/// Sends `n` envelopes to `to` at once, then reads the answers; returns how many were
/// accepted (the others must be `recipient_queue_full`, or `server_busy` behind such a
/// refusal: none is accepted after one is refused).
async fn burst(c: &mut Client, to: &str, n: usize) -> usize {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = c.id();
        ids.push(id);
        c.send(ClientMessage::Send {
            id,
            to: to.into(),
            payload: b"burst".to_vec(),
        })
        .await;
    }
    let (mut accepted, mut refused) = (0, false);
    for id in ids {
        match c.recv_reply().await {
            ServerMessage::Ok { id: got } => {
                assert_eq!(got, id);
                assert!(!refused, "a send overtook a refused one");
                accepted += 1;
            }
            ServerMessage::Error {
                id: Some(got),
                code,
                ..
            } if code == ErrorCode::RecipientQueueFull
                || (code == ErrorCode::ServerBusy && refused) =>
            {
                assert_eq!(got, id);
                refused = true;
            }
            other => panic!("expected Ok or recipient_queue_full, got {other:?}"),
        }
    }
    accepted
}

/// Sends to `to` until refused; returns how many were accepted and the refusal.
async fn send_until_refused(c: &mut Client, to: &str, most: usize) -> (usize, ErrorCode) {
    for accepted in 0..=most {
        match c.send_to(to, b"x").await {
            ServerMessage::Ok { .. } => {}
            ServerMessage::Error { code, .. } => return (accepted, code),
            other => panic!("expected Ok or an error, got {other:?}"),
        }
    }
    panic!("{most} sends to {to} and none refused");
}

/// The shares of the hostile-user issue hold per cluster: one sender, or one address,
/// holds at most a quarter of a recipient's mailbox whichever relays it uses; the
/// recipient's total holds across relays; one sender racing through two relays at once
/// stores exactly its share (JetStream's per-subject cap); once the recipient reads, the
/// shares are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_of_a_mailbox_hold_cluster_wide() {
    let nats = Nats::single();
    let tweak = |c: &mut chat_server::Config| {
        c.backend = nats.backend(1);
        c.queue.max_envelopes_per_user = 40;
        c.queue.max_sender_share = 0.25;
    };
    let a = TestServer::start(tweak).await;
    let b = sharing_identity(&a, tweak).await;
    drop(a.user("vic", 0).await);
    let home = Ipv4Addr::new(127, 0, 0, 1);
    // One sender fills its share on relay A; relay B refuses it too.
    let mut stranger = user_from(&a, "stranger", 1, home).await;
    assert_eq!(
        send_until_refused(&mut stranger, "vic", 40).await,
        (10, ErrorCode::RecipientQueueFull)
    );
    let mut stranger = Client::connect_from(b.addr, home).await;
    stranger.hello().await;
    stranger.login("stranger", key(1)).await;
    assert_eq!(
        send_until_refused(&mut stranger, "vic", 40).await,
        (0, ErrorCode::RecipientQueueFull)
    );
    // A second account from the same address shares the address's quarter.
    let mut sybil = user_from(&b, "sybil", 1, home).await;
    assert_eq!(
        send_until_refused(&mut sybil, "vic", 40).await,
        (0, ErrorCode::RecipientQueueFull)
    );
    // One sender from another address hops between the relays, sending a pipelined
    // burst from each (its newer login closes the older session): exactly its share is
    // stored, however fresh each relay's tally is (JetStream's per-subject cap holds when
    // a tally is behind).
    let racer_home = Ipv4Addr::new(127, 0, 0, 4);
    drop(user_from(&a, "racer", 2, racer_home).await);
    let mut stored = 0;
    for relay in [&a, &b, &a, &b] {
        let mut racer = Client::connect_from(relay.addr, racer_home).await;
        racer.hello().await;
        racer.login("racer", key(2)).await;
        stored += burst(&mut racer, "vic", 6).await;
    }
    assert_eq!(stored, 10);
    // Two more addresses take their quarters; the mailbox (40) is then full for anyone,
    // on either relay.
    for (i, relay) in [(5u8, &a), (6, &b)] {
        let mut friend =
            user_from(relay, &format!("friend{i}"), 3, Ipv4Addr::new(127, 0, 0, i)).await;
        assert_eq!(
            send_until_refused(&mut friend, "vic", 40).await,
            (10, ErrorCode::RecipientQueueFull)
        );
    }
    let late_home = Ipv4Addr::new(127, 0, 0, 7);
    drop(user_from(&a, "late", 3, late_home).await);
    for relay in [&a, &b] {
        let mut late = Client::connect_from(relay.addr, late_home).await;
        late.hello().await;
        late.login("late", key(3)).await;
        match late.send_to("vic", b"late").await {
            ServerMessage::Error {
                code: ErrorCode::RecipientQueueFull,
                message,
                ..
            } => assert!(!message.contains("one sender"), "{message}"),
            other => panic!("a full mailbox accepted more: {other:?}"),
        }
    }
    // Vic reads all 40, in the order they were accepted, and acknowledges them.
    let mut vic = b.user("vic", 0).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(vic.delivery().await.0);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    vic.send(ClientMessage::Ack { envelope_ids: ids }).await;
    // The stranger's share is free again once the removal is done (every 250 ms).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match stranger.send_to("vic", b"again").await {
            ServerMessage::Ok { .. } => break,
            ServerMessage::Error {
                code: ErrorCode::RecipientQueueFull,
                ..
            } => assert!(
                tokio::time::Instant::now() < deadline,
                "the share stayed full after vic read everything"
            ),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, from, payload) = vic.delivery().await;
    assert_eq!(
        (from.as_str(), payload.as_slice()),
        ("stranger", &b"again"[..])
    );
}

/// Upgrading from the layout with one subject per recipient (`chat.inbox.<user>`): what
/// is stored there is delivered, in order, before newer mail, and removed on Ack; and the
/// lower per-subject limit of the new layout deletes none of it (JetStream trims every
/// subject over a lowered limit, so the relays never lower it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_of_the_earlier_layout_survive_an_upgrade() {
    let nats = Nats::single();
    let old = TestServer::start(|c| {
        c.backend = nats.backend(1);
        c.queue.max_envelopes_per_user = 100;
        c.queue.max_sender_share = 1.0;
    })
    .await;
    drop(old.user("vic", 0).await);
    drop(old.user("alice", 1).await);
    let client = async_nats::connect(nats.urls()[0].as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for i in 0..30u8 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Chat-From", "alice");
        js.publish_with_headers("chat.inbox.vic", headers, vec![i].into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let persisted = old.stop().await;
    // The new relay's share is 25 per subject: the old subject holds 30.
    let new = TestServer::start_in(persisted, |c| {
        c.backend = nats.backend(1);
        c.queue.max_envelopes_per_user = 100;
        c.queue.max_sender_share = 0.25;
    })
    .await;
    let mut stream = js.get_stream("chat_mailbox").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_messages_per_subject, 100);
    assert_eq!(info.state.messages, 30);
    let mut alice = new.user("alice", 1).await;
    assert!(matches!(
        alice.send_to("vic", &[30]).await,
        ServerMessage::Ok { .. }
    ));
    let mut vic = new.user("vic", 0).await;
    let mut ids = Vec::new();
    for i in 0..31u8 {
        let (id, from, payload) = vic.delivery().await;
        assert_eq!((from.as_str(), payload.as_slice()), ("alice", &[i][..]));
        ids.push(id);
    }
    vic.send(ClientMessage::Ack { envelope_ids: ids }).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while stream.info().await.unwrap().state.messages > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged envelopes stayed: {:?}",
            stream.info().await.unwrap().state
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
