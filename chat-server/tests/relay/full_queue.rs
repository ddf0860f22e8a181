//! Full mailboxes: typed refusals, envelopes delivered live and written late, and the
//! order of a sender's messages kept through refusals (the fences of `crate::fence`).

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use rstest::rstest;

use crate::common::{Backend, Nats, PATIENCE, Sqlite, TestServer};
use crate::{deliveries, until_stored};

#[rstest]
#[tokio::test]
async fn a_full_queue_refuses_with_a_typed_error(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| {
        c.queue.max_envelopes_per_user = 3;
        c.queue.max_sender_share = 1.0;
    })
    .await;
    drop(server.user("carol", 2).await);
    let mut alice = server.user("alice", 0).await;
    for _ in 0..3 {
        assert!(matches!(
            alice.send_to("carol", b"x").await,
            ServerMessage::Ok { .. }
        ));
    }
    match alice.send_to("carol", b"x").await {
        ServerMessage::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::RecipientQueueFull);
            assert!(message.contains("later"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// An envelope delivered live whose `Ack` comes after the grace is written to the store;
/// carol has it already, so her mailbox's bound does not refuse it (the sender would be
/// told `recipient_queue_full` for a message carol is reading, and send it again). Once
/// she is offline the bound holds as before.
#[tokio::test]
async fn a_message_delivered_live_is_not_refused_for_a_full_mailbox_when_its_ack_is_late() {
    let server = TestServer::on(Sqlite, |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
        // Every live envelope is written at once, as if each Ack were late.
        c.queue.live_grace_secs = 0.0;
    })
    .await;
    drop(server.user("alice", 0).await);
    let mut carol = server.user("carol", 2).await;
    let mut alice = server.user("alice", 0).await;
    for n in 0..5u8 {
        let reply = alice.send_to("carol", &[n]).await;
        assert!(
            matches!(reply, ServerMessage::Ok { .. }),
            "send {n} to carol, who has it already: {reply:?}"
        );
    }
    let got: Vec<Vec<u8>> = deliveries(&mut carol, 5)
        .await
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(got, (0..5u8).map(|n| vec![n]).collect::<Vec<_>>());
    // Carol leaves without acknowledging: the five wait for her, and her bound holds.
    drop(carol);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match alice.send_to("carol", b"over").await {
            ServerMessage::Error {
                code: ErrorCode::RecipientQueueFull,
                ..
            } => break,
            // Carol's session may not be gone yet: delivered live, then written.
            ServerMessage::Ok { .. } => assert!(
                tokio::time::Instant::now() < deadline,
                "carol's bound never held once she was offline"
            ),
            other => panic!("expected recipient_queue_full, got {other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut carol = server.user("carol", 2).await;
    let again = deliveries(&mut carol, 5).await;
    assert_eq!(
        again
            .iter()
            .map(|d| d.1.clone())
            .take(5)
            .collect::<Vec<_>>(),
        (0..5u8).map(|n| vec![n]).collect::<Vec<_>>(),
        "what carol did not acknowledge is delivered again, in order"
    );
}

/// A recipient that reads but never acknowledges: what is delivered to it live and
/// written late may pass its mailbox's bound only by `send_queue_len`, so the mailbox it
/// leaves is a backlog its next session can take. (Unbounded, a stalled session left
/// more than a session may hold unacknowledged, and every later login was closed while
/// reading its backlog: nothing drained, and the recipient could not stay online.)
#[tokio::test]
async fn a_recipient_that_stalled_can_log_in_again_and_drain_its_mailbox() {
    let server = TestServer::on(Sqlite, |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
        c.queue.live_grace_secs = 0.0;
        c.send_queue_len = 8;
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
    })
    .await;
    drop(server.user("alice", 0).await);
    let mut carol = server.user("carol", 2).await;
    // Carol reads everything and acknowledges nothing, until the relay closes her.
    let stalled = tokio::spawn(async move { carol.expect_closed().await });
    let mut alice = server.user("alice", 0).await;
    // More than a session may hold unacknowledged, in windows under the pipeline's
    // bound: each is delivered to carol; past the bound and the slack they are refused
    // (recipient_queue_full, and server_busy for those behind that refusal).
    const N: u32 = 300;
    let mut stored = 0;
    for window in (0..N).collect::<Vec<_>>().chunks(50) {
        for &n in window {
            alice
                .send(ClientMessage::Send {
                    id: 10_000 + n,
                    to: "carol".into(),
                    payload: n.to_be_bytes().to_vec(),
                })
                .await;
        }
        for _ in window {
            match alice.recv_reply().await {
                ServerMessage::Ok { .. } => stored += 1,
                ServerMessage::Error {
                    code: ErrorCode::RecipientQueueFull | ErrorCode::ServerBusy,
                    ..
                } => {}
                other => panic!("unexpected answer: {other:?}"),
            }
        }
    }
    stalled
        .await
        .expect("carol was closed for not acknowledging");
    assert!(
        (2..=10).contains(&stored),
        "{stored} stored: the bound (2) plus at most send_queue_len (8)"
    );
    // Carol's next session takes the whole backlog, acknowledges it, and stays.
    let mut carol = server.user("carol", 2).await;
    let backlog = deliveries(&mut carol, stored).await;
    carol
        .send(ClientMessage::Ack {
            envelope_ids: backlog.iter().map(|d| d.0).collect(),
        })
        .await;
    let reply = alice.send_to_within("carol", b"after", PATIENCE).await;
    assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    let next = deliveries(&mut carol, 1).await;
    assert_eq!(next[0].1, b"after", "carol is online and served");
}

/// An envelope delivered live and refused when written late (the recipient's mailbox
/// past its slack) holds the same connection's later ones to that recipient, as any
/// refusal does: if the recipient's session ended before it stored the refused one, a
/// later one stored would reach it first.
#[tokio::test]
async fn a_live_envelope_refused_when_written_late_is_not_overtaken() {
    let server = TestServer::on(Sqlite, |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
        c.queue.live_grace_secs = 0.0;
        c.send_queue_len = 4;
    })
    .await;
    drop(server.user("alice", 0).await);
    let mut carol = server.user("carol", 2).await;
    let mut alice = server.user("alice", 0).await;
    // The bound (2) and the slack (4): six stored, the seventh refused.
    for n in 0..6u8 {
        let reply = alice.send_to("carol", &[n]).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{n}: {reply:?}");
    }
    let refused = alice.id();
    alice
        .send(ClientMessage::Send {
            id: refused,
            to: "carol".into(),
            payload: b"refused".to_vec(),
        })
        .await;
    match alice.recv().await {
        ServerMessage::Error {
            code: ErrorCode::RecipientQueueFull,
            id,
            ..
        } => assert_eq!(id, Some(refused)),
        other => panic!("expected recipient_queue_full, got {other:?}"),
    }
    // Carol reads and acknowledges all she has; room is back (dave's send is stored).
    let got = deliveries(&mut carol, 7).await;
    carol
        .send(ClientMessage::Ack {
            envelope_ids: got.iter().map(|d| d.0).collect(),
        })
        .await;
    until_stored(&mut server.user("dave", 3).await, "carol", b"dave").await;
    // Alice has not answered the Ping behind the refusal: her next one to carol, also
    // delivered live, is refused when written rather than stored after the refused one.
    let later = alice.id();
    alice
        .send(ClientMessage::Send {
            id: later,
            to: "carol".into(),
            payload: b"later".to_vec(),
        })
        .await;
    loop {
        match alice.recv().await {
            ServerMessage::Ping { .. } | ServerMessage::Presence { .. } => continue,
            ServerMessage::Error {
                code: ErrorCode::ServerBusy,
                id,
                message,
            } => {
                assert_eq!(id, Some(later));
                assert!(message.contains("earlier message to carol"), "{message}");
                break;
            }
            other => panic!("the later envelope was not held: {other:?}"),
        }
    }
}

#[rstest]
#[tokio::test]
async fn a_refused_send_is_not_overtaken_by_a_later_one_to_the_same_recipient(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    // Alice's "first" is refused: carol's mailbox is full. Carol then reads, and room is
    // back before alice (pipelining, she has not read the refusal) sends "second".
    // Stored, "second" would reach carol before "first" sent again.
    let server = TestServer::on(backend, |c| {
        c.queue.max_envelopes_per_user = 3;
        c.queue.max_sender_share = 1.0;
    })
    .await;
    drop(server.user("carol", 2).await);
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    for _ in 0..3 {
        let reply = alice.send_to("carol", b"old").await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    let send = |id, to: &str, payload: &[u8]| ClientMessage::Send {
        id,
        to: to.into(),
        payload: payload.to_vec(),
    };
    let first = alice.id();
    alice.send(send(first, "carol", b"first")).await;
    match alice.recv().await {
        ServerMessage::Error {
            code: ErrorCode::RecipientQueueFull,
            id,
            ..
        } => assert_eq!(id, Some(first)),
        other => panic!("expected recipient_queue_full, got {other:?}"),
    }
    assert!(matches!(alice.recv().await, ServerMessage::Ping { .. }));
    // Carol reads and acknowledges her three; dave's send shows the room is back.
    let mut carol = server.user("carol", 2).await;
    let envelope_ids = deliveries(&mut carol, 3)
        .await
        .iter()
        .map(|d| d.0)
        .collect();
    carol.send(ClientMessage::Ack { envelope_ids }).await;
    until_stored(&mut server.user("dave", 3).await, "carol", b"dave").await;
    // Alice has not answered the Ping: her next send to carol is held, not stored.
    let second = alice.id();
    alice.send(send(second, "carol", b"second")).await;
    match alice.recv().await {
        ServerMessage::Error {
            code: ErrorCode::ServerBusy,
            id,
            message,
        } => {
            assert_eq!(id, Some(second));
            assert!(message.contains("earlier message to carol"), "{message}");
        }
        other => panic!("the later send to carol was not held: {other:?}"),
    }
    let ServerMessage::Ping { nonce } = alice.recv().await else {
        panic!("no Ping behind the refusal");
    };
    // Nobody else is held by carol's refusal.
    let to_bob = alice.id();
    alice.send(send(to_bob, "bob", b"for bob")).await;
    assert!(matches!(alice.recv().await, ServerMessage::Ok { id } if id == to_bob));
    // Once the latest Ping is answered, alice sends both again, in order.
    alice.send(ClientMessage::Pong { nonce }).await;
    for payload in [&b"first"[..], b"second"] {
        let reply = alice.send_to("carol", payload).await;
        assert!(matches!(reply, ServerMessage::Ok { .. }), "{reply:?}");
    }
    let got: Vec<Vec<u8>> = deliveries(&mut carol, 3)
        .await
        .into_iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(got, [&b"dave"[..], b"first", b"second"]);
}

#[rstest]
#[tokio::test]
async fn pipelined_sends_to_a_full_and_a_free_recipient_are_each_answered_for_itself(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    // The cluster backend stores envelopes in batches that are all or nothing; a batch
    // holding one envelope for a full mailbox must still store the others, in order.
    let server = TestServer::on(backend, |c| {
        c.queue.max_envelopes_per_user = 30;
        c.queue.max_sender_share = 1.0;
    })
    .await;
    drop(server.user("carol", 2).await);
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    // Carol's mailbox has room for three more.
    for _ in 0..27 {
        assert!(matches!(
            alice.send_to("carol", &[200]).await,
            ServerMessage::Ok { .. }
        ));
    }
    let mut ids = Vec::new();
    for i in 0..40u8 {
        let id = alice.id();
        let to = if i % 2 == 0 { "carol" } else { "bob" };
        alice
            .send(ClientMessage::Send {
                id,
                to: to.into(),
                payload: vec![i],
            })
            .await;
        ids.push((id, to));
    }
    let (mut carol_stored, mut carol_refused) = (0, false);
    for (id, to) in ids {
        match alice.recv_reply().await {
            ServerMessage::Ok { id: got } => {
                assert_eq!(got, id);
                if to == "carol" {
                    assert!(!carol_refused, "a send to carol overtook a refused one");
                    carol_stored += 1;
                }
            }
            // The first refusal; the sends to carol behind it are held by it.
            ServerMessage::Error { id: got, code, .. }
                if code == ErrorCode::RecipientQueueFull
                    || (code == ErrorCode::ServerBusy && carol_refused) =>
            {
                assert_eq!(got, Some(id));
                assert_eq!(to, "carol", "bob's mailbox is never full");
                carol_refused = true;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(carol_stored, 3, "carol's mailbox had room for three");
    let got: Vec<u8> = deliveries(&mut bob, 20)
        .await
        .iter()
        .map(|(_, p)| p[0])
        .collect();
    assert_eq!(got, (0..40).filter(|i| i % 2 == 1).collect::<Vec<u8>>());
    let mut carol = server.user("carol", 2).await;
    let got: Vec<u8> = deliveries(&mut carol, 30)
        .await
        .iter()
        .map(|(_, p)| p[0])
        .collect();
    assert_eq!(got[27..], [0, 2, 4]);
}

/// Carol's session ends with envelopes still held for her Ack (delivered live, never
/// acknowledged), and alice's next ones take the store. The held ones are decided first:
/// the store then has a prefix of what alice sent, and what it refused comes after it.
/// (A helper's attack before: the later ones were stored at once and the held ones,
/// written at the end of their grace, no longer fitted; refused and sent again, they
/// reached carol after the later ones.)
#[tokio::test]
async fn envelopes_held_for_a_recipient_that_left_are_not_overtaken_by_later_ones() {
    let server = TestServer::on(Sqlite, |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
        // Long enough for alice's later sends to come first (were the held ones written at
        // its end, before those, the order would hold anyway), short of the test's patience.
        c.queue.live_grace_secs = 3.0;
        c.send_queue_len = 4;
    })
    .await;
    drop(server.user("alice", 0).await);
    let mut carol = server.user("carol", 2).await;
    let mut alice = server.user("alice", 0).await;
    let mut dave = server.user("dave", 3).await;
    // Six delivered live, one at a time (carol's queue holds 4): the bound (2) and the
    // slack (4) of envelopes written late.
    let mut sent = Vec::new();
    for n in 0..6u8 {
        let id = alice.id();
        alice
            .send(ClientMessage::Send {
                id,
                to: "carol".into(),
                payload: vec![n],
            })
            .await;
        sent.push((id, n));
        assert_eq!(deliveries(&mut carol, 1).await[0].1, [n]);
    }
    drop(carol);
    dave.until_online("carol", false).await;
    // Carol is offline: these go to the store, behind the six still held.
    for n in 6..8u8 {
        let id = alice.id();
        alice
            .send(ClientMessage::Send {
                id,
                to: "carol".into(),
                payload: vec![n],
            })
            .await;
        sent.push((id, n));
    }
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    while accepted.len() + refused.len() < sent.len() {
        match alice.recv().await {
            ServerMessage::Ok { id } => accepted.push(id),
            ServerMessage::Error { id: Some(id), .. } => refused.push(id),
            _ => {}
        }
    }
    // What was stored is what alice sent first; every refusal comes after it.
    let order: Vec<u32> = sent.iter().map(|(id, _)| *id).collect();
    assert_eq!(accepted, order[..accepted.len()], "refused: {refused:?}");
    assert_eq!(refused, order[accepted.len()..]);
    assert_eq!(accepted.len(), 6, "the six held ones fit the slack");
    let mut carol = server.user("carol", 2).await;
    let backlog: Vec<u8> = deliveries(&mut carol, 6)
        .await
        .iter()
        .map(|(_, p)| p[0])
        .collect();
    assert_eq!(backlog, [0, 1, 2, 3, 4, 5]);
}
