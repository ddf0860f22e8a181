//! Mailbox readers without a consumer while there is nothing to read (real nats-server
//! processes on 127.0.0.1, real relays, raw protocol clients over TLS): logins make no
//! consumer, mail to a waiting session rings its bell (a core NATS subscription) at once,
//! a reader gives its consumer up after `reader_idle_secs` and is rung again, mail sent
//! while a waiting session's relay has lost its NATS node still arrives, and every envelope
//! is given once, in order, however often its reader turns between the two.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use chat_protocol::{ClientMessage, ServerMessage};
use chat_server::config::{Backend, Config};
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

/// Sessions that receive nothing make no consumer (each used to make one at login, through
/// the meta layer, at a few dozen a second: a burst of logins held mail up for minutes).
/// Mail rings a waiting session's bell and comes at once; the reader gives its consumer up
/// once idle, and the next mail rings again. The last sends come when the reader's
/// periodic check is at least 22.5 s away, so only the bell can bring them within 10 s.
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

    for round in 0..3u8 {
        // Past the check that follows the bell's subscription (1 s): the next is 22.5 s
        // or more away.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let reply = alice.send_to("bob", &[round]).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
        let sent = Instant::now();
        assert_eq!(bob.take_within(PATIENCE).await.1, [round]);
        eprintln!("round {round}: delivered {:?} after the Ok", sent.elapsed());
        // Reading through a consumer now; given up 3 s after the last delivery.
        assert_eq!(
            consumers(&js).await,
            Some(1),
            "bob's reader reads through a consumer"
        );
        until_consumers(&js, 0).await;
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
    const SENDS: u8 = 40;
    let gaps = [0, 50, 150, 190, 210, 250, 400];
    for i in 0..SENDS {
        tokio::time::sleep(Duration::from_millis(gaps[i as usize % gaps.len()])).await;
        let reply = alice.send_to("bob", &[i]).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    let mut last = 0;
    for i in 0..SENDS {
        let (id, payload) = bob.take_within(PATIENCE).await;
        assert_eq!(payload, [i], "in the order sent, none twice or missing");
        assert!(id > last, "envelope ids rise: {id} after {last}");
        last = id;
    }
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
    let reply = alice.send_to("bob", &[0]).await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    assert_eq!(bob.take_within(PATIENCE).await.1, [0]);
    // Bob's reader gives its consumer up (0.5 s) and waits on its bell.
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
    // is at least 22.5 s away. (The consumer count cannot say when: a making cut short by
    // the election may have left a consumer the server expires after 30 s.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reply = alice.send_to("bob", &[6]).await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    assert_eq!(bob.take_within(PATIENCE).await.1, [6]);
    nothing_more(&mut bob).await;
}
