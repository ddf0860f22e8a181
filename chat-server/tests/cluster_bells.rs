//! Mailbox readers without a consumer while there is little to read (real nats-server
//! processes on 127.0.0.1, real relays, raw protocol clients over TLS): logins make no
//! consumer, mail to a waiting session rings its bell (a core NATS subscription) and is
//! given at once by gets, a sender in full flow or a client reading slowly moves the
//! reader to a consumer that it gives up after `reader_idle_secs`, mail sent while a
//! waiting session's relay has lost its NATS link (cut, or its node dead) arrives at the
//! reconnection, and every envelope is given once, in order, however often its reader
//! turns between the two.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use chat_server::config::{Backend, Config, NatsBackend};
use common::gate::Gate;
use common::nats::Nats;
use common::{Client, PATIENCE, TestServer};

/// The mailbox stream's consumers, as its server counts them (`None` if it did not
/// answer: a leader election after a node died).
async fn consumers(js: &jetstream::Context) -> Option<usize> {
    let mut stream = js.get_stream("chat_mailbox").await.ok()?;
    Some(stream.info().await.ok()?.state.consumer_count)
}

/// Waits (up to `PATIENCE`) until the mailbox stream has `want` consumers.
async fn until_consumers(js: &jetstream::Context, want: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let have = consumers(js).await;
        if have == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{have:?} consumers after {PATIENCE:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sets the relay's `reader_idle_secs`.
fn reader_idle(c: &mut Config, secs: f64) {
    let Backend::Nats(nats) = &mut c.backend else {
        panic!("not a cluster relay")
    };
    nats.reader_idle_secs = secs;
}

/// Nothing more comes to `c` (a ping is answered next).
async fn nothing_more(c: &mut Client) {
    c.send(ClientMessage::Ping { nonce: 7 }).await;
    let pong = c.recv_reply_within(PATIENCE).await;
    assert_eq!(pong, Some(ServerMessage::Pong { nonce: 7 }), "nothing more");
}

/// Sessions that receive nothing, or little, make no consumer (each used to make one at
/// login, through the meta layer, at a few dozen a second: a burst of logins held mail up
/// for minutes). Mail rings a waiting session's bell and is given at once by gets. These
/// sends come when the reader's periodic check is at least 90 s away, so only the bell
/// can bring them within 10 s. A sender in full flow (`BUSY_AFTER` envelopes within a
/// second) moves the reader to a consumer, which it gives up once idle (3 s here); the
/// next mail rings again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_hold_no_consumer_and_their_bell_brings_mail_at_once() {
    let nats = Nats::single();
    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let server = TestServer::start(|c| {
        c.backend = nats.backend(1);
        reader_idle(c, 3.0);
        common::welcome_crowds(c);
    })
    .await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    let mut crowd = Vec::new();
    for i in 0..40 {
        crowd.push(server.user(&format!("u{i}"), 2 + i % 2).await);
    }
    alice.until_online("bob", true).await;
    assert_eq!(consumers(&js).await, Some(0), "consumers made for logins");

    let burst = chat_server::cluster::BUSY_AFTER + 4;
    for round in 0..2u8 {
        for i in 0..3u8 {
            // Past the check that follows the first (1 s): the next is 90 s or more
            // away.
            tokio::time::sleep(Duration::from_secs(2)).await;
            alice.send_ok("bob", &[round, i]).await;
            let sent = Instant::now();
            assert_eq!(bob.take_within(PATIENCE).await.1, [round, i]);
            eprintln!(
                "round {round}.{i}: delivered {:?} after the Ok",
                sent.elapsed()
            );
            assert_eq!(consumers(&js).await, Some(0), "a few envelopes, by gets");
        }
        // In full flow: a consumer reads them, in order, and is given up once idle.
        let payloads: Vec<Vec<u8>> = (0..burst).map(|n| vec![round, 100, n as u8]).collect();
        alice.send_burst("bob", &payloads, PATIENCE).await;
        for payload in &payloads {
            assert_eq!(&bob.take_within(PATIENCE).await.1, payload);
        }
        until_consumers(&js, 1).await;
        until_consumers(&js, 0).await;
    }
    // Many waiting sessions woken at once (one fan-out), one envelope each: all by gets,
    // no consumer made while they are read.
    let many = alice.id();
    let to: Vec<String> = (0..crowd.len()).map(|i| format!("u{i}")).collect();
    alice
        .send(ClientMessage::SendMany {
            id: many,
            to,
            payload: b"all at once".to_vec(),
        })
        .await;
    let outcomes = alice.recv_reply_within(PATIENCE).await;
    assert_eq!(
        outcomes,
        Some(ServerMessage::Outcomes {
            id: many,
            outcomes: vec![None; crowd.len()],
        })
    );
    for c in &mut crowd {
        assert_eq!(c.take_within(PATIENCE).await.1, b"all at once");
        assert_eq!(consumers(&js).await, Some(0), "one envelope each, by gets");
    }
    nothing_more(&mut bob).await;
    for c in &mut crowd {
        nothing_more(c).await;
    }
}

/// A reader turns between its consumer and its bell many times while envelopes keep
/// coming, some inside the idle spell, some just past it: each is given once, in the order
/// stored, and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_across_many_turns_of_the_reader_come_once_and_in_order() {
    let nats = Nats::single();
    let server = TestServer::start(|c| {
        c.backend = nats.backend(1);
        reader_idle(c, 0.2);
    })
    .await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    alice.until_online("bob", true).await;
    // Single sends (given by gets) and bursts (through a consumer, given up 0.2 s after
    // its last envelope), with gaps inside and just past the idle spell.
    let gaps = [0, 50, 150, 190, 210, 250, 400];
    let mut sent: u16 = 0;
    for step in 0..40 {
        tokio::time::sleep(Duration::from_millis(gaps[step % gaps.len()])).await;
        let count = if step % 8 == 3 {
            chat_server::cluster::BUSY_AFTER as u16 + 1
        } else {
            1
        };
        let payloads: Vec<Vec<u8>> = (sent..sent + count)
            .map(|n| n.to_be_bytes().to_vec())
            .collect();
        alice.send_burst("bob", &payloads, PATIENCE).await;
        sent += count;
    }
    let mut last = 0;
    for n in 0..sent {
        let (id, payload) = bob.take_within(PATIENCE).await;
        assert_eq!(
            payload,
            n.to_be_bytes(),
            "in the order sent, none twice or missing"
        );
        assert!(id > last, "envelope ids rise: {id} after {last}");
        last = id;
    }
    nothing_more(&mut bob).await;
}

/// A session whose client reads slowly while mail trickles in (about 8 a second, under
/// `BUSY_AFTER` a second, so its reader stays on gets: carol, reading promptly at that
/// pace, never gets a consumer): once what was handed to bob's session and not yet written
/// fills its read-ahead (1 MiB), his reader moves to a consumer, whose pulls are bounded
/// in bytes, instead of holding envelopes (and rings) itself. Bob then reads a third,
/// drops his connection with the rest unread, and logs in again: every envelope he had not
/// read comes, once, in order; of those he read (and acknowledged), some may come again
/// (their removal may not have been applied yet), in order and under the ids they first
/// had; later mail comes after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_gets_moves_to_a_consumer_and_loses_nothing() {
    let nats = Nats::single();
    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let server = TestServer::start(|c| {
        c.backend = nats.backend(1);
        reader_idle(c, 1.0);
        // Bob reads nothing for a while: not a reason to close him here.
        c.write_timeout_secs = 300.0;
        c.idle_timeout_secs = 300.0;
        c.queue.max_bytes_per_user = 1 << 30;
        // A 60 KB send costs about 60 tokens: alice's pace is the test's, not the limit's.
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
    })
    .await;
    let mut bob = server.user("bob", 1).await;
    let mut carol = server.user("carol", 2).await;
    let mut alice = server.user("alice", 0).await;
    alice.until_online("bob", true).await;
    alice.until_online("carol", true).await;
    assert_eq!(consumers(&js).await, Some(0));

    // Each envelope is near the largest frame, so the socket's buffers and the read-ahead
    // fill after a few dozen unread.
    let payload = |n: u16| {
        let mut p = vec![n as u8; 60_000];
        p[..2].copy_from_slice(&n.to_be_bytes());
        p
    };
    let pace = Duration::from_millis(120);
    // Carol reads at once: at this pace her reader stays on gets.
    for n in 0..40 {
        alice.send_ok("carol", &payload(n)).await;
        assert!(
            carol.take_within(PATIENCE).await.1 == payload(n),
            "carol's {n}"
        );
        assert_eq!(
            consumers(&js).await,
            Some(0),
            "a prompt reader at this pace"
        );
        tokio::time::sleep(pace).await;
    }
    // Bob reads nothing from here.
    let mut sent: u16 = 0;
    let began = Instant::now();
    while consumers(&js).await != Some(1) {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no consumer after {sent} envelopes unread"
        );
        alice.send_ok("bob", &payload(sent)).await;
        sent += 1;
        tokio::time::sleep(pace).await;
    }
    eprintln!("the reader took a consumer after {sent} envelopes unread");
    // More while he still reads nothing: the consumer holds them back.
    for _ in 0..10 {
        alice.send_ok("bob", &payload(sent)).await;
        sent += 1;
    }

    // He reads a third, then his connection drops with the rest unread.
    let mut ids = Vec::new();
    for n in 0..sent / 3 {
        let (id, got) = bob.take_within(PATIENCE).await;
        assert!(got == payload(n), "envelope {n} first, in order");
        ids.push(id);
    }
    drop(bob);
    let mut bob = server.user("bob", 1).await;
    let read = sent / 3;
    let (mut again, mut next, mut last) = (0, read, None);
    while next < sent {
        let (id, got) = bob.take_within(PATIENCE).await;
        let n = u16::from_be_bytes([got[0], got[1]]);
        assert!(got == payload(n), "envelope {n} whole");
        assert!(
            last < Some(n),
            "envelope {n} after {last:?}: in order, once"
        );
        last = Some(n);
        if n < read {
            assert_eq!(
                id, ids[n as usize],
                "an envelope delivered again keeps its id"
            );
            again += 1;
        } else {
            assert_eq!(n, next, "every envelope not read, in order");
            next += 1;
        }
    }
    eprintln!("after the drop: {again} of the {read} read came again");
    // (The dropped session's consumer outlives it by up to 30 s, the server's inactivity
    // threshold: the count cannot say when this reader gives up its own.)
    alice.send_ok("bob", b"later").await;
    assert_eq!(bob.take_within(PATIENCE).await.1, b"later");
    nothing_more(&mut bob).await;
}

/// Waits (up to `PATIENCE`) until `relay` refuses new connections for having lost its NATS
/// link.
async fn until_refusing(relay: &TestServer) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut c = relay.client().await;
        c.send(ClientMessage::Hello {
            version: chat_protocol::PROTOCOL_VERSION,
            software: "test".into(),
        })
        .await;
        match c.recv().await {
            ServerMessage::Error {
                code: ErrorCode::ServerBusy,
                message,
                ..
            } if message.contains("lost its cluster backend") => return,
            ServerMessage::Hello { .. } => {}
            other => panic!("expected Hello or server_busy, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "still serving after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bob's session waits for mail (no consumer) on a relay whose only NATS link is cut while
/// the node lives on (no election, nothing else moves). What alice sends meanwhile through
/// another relay is stored where no bell of bob's can hear it; once the link is mended the
/// relay reconnects, and its readers check their mailboxes at that disturbance. The mail
/// comes before the periodic check could have brought it (90 s at the earliest after the
/// check 1 s past login), once and in order; later mail rings the bell made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_stored_while_a_relays_link_is_cut_comes_at_the_reconnection() {
    let nats = Nats::single();
    let gate = Gate::to(([127, 0, 0, 1], nats.nodes[0].port).into()).await;
    let a = TestServer::start(|c| {
        c.backend = Backend::Nats(NatsBackend {
            urls: vec![format!("nats://{}", gate.addr)],
            stream_replicas: 1,
            ..Default::default()
        });
    })
    .await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let logged_in = Instant::now();
    let mut bob = a.user("bob", 1).await;
    let mut alice = b.user("alice", 0).await;
    alice.until_online("bob", true).await;
    // Past the check that follows the first (1 s after it): the next is 90 s or more
    // after that.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut = Instant::now();
    gate.cut();
    until_refusing(&a).await;
    for i in 0..5u8 {
        alice.send_ok("bob", &[i]).await;
    }
    gate.mend();
    // The relay keeps its sessions through an outage of up to 8 s (LINK_GRACE), and its
    // NATS client waits up to as long again as it has been cut before trying again.
    assert!(
        cut.elapsed() < Duration::from_secs(3),
        "the link was cut for {:?}: too long for this test",
        cut.elapsed()
    );
    // Before the periodic check: only the check at the reconnection can bring them.
    let deadline = logged_in + Duration::from_secs(22);
    for i in 0..5u8 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "envelope {i} not delivered 22 s after login: only the periodic check would \
             bring it now"
        );
        let (_, got) = bob.take_within(left).await;
        assert_eq!(got, [i], "once, in order, at the reconnection");
    }
    eprintln!("delivered {:?} after login", logged_in.elapsed());
    // The bell, made again on reconnecting, rings: past the check 1 s after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    alice.send_ok("bob", b"rung").await;
    assert_eq!(bob.take_within(PATIENCE).await.1, b"rung");
    nothing_more(&mut bob).await;
}

/// Bob's session waits for mail (no consumer) on a relay given only NATS node 0, which
/// dies. What alice sends meanwhile through another relay and node is stored while bob's
/// relay has no connection, so no bell of his hears it: the relay reconnects to another
/// node and its readers check their mailboxes at that disturbance. Everything comes once,
/// in order, and later mail rings the bell made again on the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_sent_while_a_waiting_readers_node_is_dead_still_comes_once() {
    let mut nats = Nats::cluster();
    let on = |node: &common::nats::NatsNode| {
        let url = node.url();
        move |c: &mut Config| {
            c.backend = Backend::Nats(chat_server::config::NatsBackend {
                urls: vec![url],
                stream_replicas: 3,
                ..Default::default()
            });
            reader_idle(c, 0.5);
        }
    };
    let a = TestServer::start(on(&nats.nodes[0])).await;
    let b = TestServer::start(on(&nats.nodes[1])).await;
    let mut bob = a.user("bob", 1).await;
    let mut alice = b.user("alice", 0).await;
    alice.until_online("bob", true).await;
    alice.send_ok("bob", &[0]).await;
    assert_eq!(bob.take_within(PATIENCE).await.1, [0]);
    // Bob's reader holds no consumer: it waits on its bell.
    let js = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    until_consumers(&js, 0).await;

    tokio::task::block_in_place(|| nats.nodes[0].kill());
    for i in 1..=5u8 {
        let reply = alice.send_to_within("bob", &[i], 6 * PATIENCE).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    for i in 1..=5u8 {
        assert_eq!(bob.take_within(6 * PATIENCE).await.1, [i]);
    }
    // Once bob's reader waits again (0.5 s idle), on its bell on another node, past the
    // check 1 s after subscribing: only the bell brings mail within 10 s, the next check
    // is at least 90 s away. (The consumer count cannot say when: a making cut short by
    // the election may have left a consumer the server expires after 30 s.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    alice.send_ok("bob", &[6]).await;
    assert_eq!(bob.take_within(PATIENCE).await.1, [6]);
    nothing_more(&mut bob).await;
}

/// On three nodes, where a get may be answered by a replica a moment behind its leader,
/// `Sync` is still answered only after the whole backlog the session began with: a small
/// one given by gets from the leader, a large one through a consumer; then live mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_on_three_nodes_is_answered_after_the_whole_backlog() {
    let nats = Nats::cluster();
    let server = TestServer::start(|c| c.backend = nats.backend(3)).await;
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    for count in [3, chat_server::cluster::BUSY_AFTER + 5] {
        let sent: Vec<Vec<u8>> = (0..count).map(|i| vec![count as u8, i as u8]).collect();
        alice.send_burst("bob", &sent, PATIENCE).await;
        let mut bob = server.client().await;
        bob.hello().await;
        let welcome = bob.login("bob", common::key(1)).await;
        assert!(
            matches!(welcome, ServerMessage::Welcome { .. }),
            "{welcome:?}"
        );
        let sync = bob.id();
        bob.send(ClientMessage::Sync { id: sync }).await;
        let (mut got, mut ids) = (Vec::new(), Vec::new());
        loop {
            match bob.recv_reply().await {
                ServerMessage::Deliver {
                    envelope_id,
                    payload,
                    ..
                } => {
                    got.push(payload);
                    ids.push(envelope_id);
                }
                ServerMessage::Ok { id } if id == sync => break,
                other => panic!("expected the backlog, then Ok: {other:?}"),
            }
        }
        assert_eq!(got, sent, "the whole backlog, in order, before the answer");
        alice.send_ok("bob", b"live").await;
        let (id, payload) = bob.take_within(PATIENCE).await;
        assert_eq!(payload, b"live");
        ids.push(id);
        bob.send(ClientMessage::Ack { envelope_ids: ids }).await;
        nothing_more(&mut bob).await;
    }
}
