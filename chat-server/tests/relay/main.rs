//! The relay through real TCP on loopback: accounts, presence, relaying, and bad clients.
//! Every test runs against both backends: SQLite, and NATS JetStream (a real nats-server).

mod closing;
#[path = "../common/mod.rs"]
mod common;
mod full_queue;

use chat_protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage};
use common::{Backend, Nats, PATIENCE, Sqlite, TestServer, der, key};
use futures_util::StreamExt;
use rstest::rstest;

#[rstest]
#[tokio::test]
async fn register_then_login_with_the_same_key(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut c = server.client().await;
    c.hello().await;
    assert!(matches!(
        c.register("Alice", key(0)).await,
        ServerMessage::Welcome { ref username, registered: true, .. } if username == "alice"
    ));
    drop(c);

    let mut c = server.client().await;
    c.hello().await;
    assert!(matches!(
        c.login("alice", key(0)).await,
        ServerMessage::Welcome {
            registered: false,
            ..
        }
    ));

    let mut c = server.client().await;
    c.hello().await;
    assert!(matches!(
        c.register("ALICE", key(0)).await,
        ServerMessage::Welcome {
            registered: false,
            ..
        }
    ));
}

#[rstest]
#[tokio::test]
async fn a_taken_name_refuses_another_key_even_after_restart(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |_| {}).await;
    server.user("alice", 0).await;
    let dir = server.stop().await;

    let server = TestServer::start_in(dir, |_| {}).await;
    let mut c = server.client().await;
    c.hello().await;
    match c.register("alice", key(1)).await {
        ServerMessage::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::UsernameTaken);
            assert!(message.contains("another name"), "{message}");
        }
        other => panic!("expected username_taken, got {other:?}"),
    }
    // The rightful owner still gets in.
    assert!(matches!(
        c.login("alice", key(0)).await,
        ServerMessage::Welcome { .. }
    ));
}

#[rstest]
#[tokio::test]
async fn login_with_the_wrong_key_is_refused_and_closed(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    server.user("alice", 0).await;
    let mut mallory = server.client().await;
    mallory.hello().await;
    // Mallory asks to log in as alice and signs with her own key.
    match mallory.login("alice", key(3)).await {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::BadSignature),
        other => panic!("expected bad_signature, got {other:?}"),
    }
    mallory.expect_closed().await;
}

#[rstest]
#[tokio::test]
async fn bad_login_requests_get_typed_errors(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut c = server.client().await;
    c.hello().await;

    for name in ["", "a b", &"x".repeat(33), "_x"] {
        let id = c.id();
        c.send(ClientMessage::Register {
            id,
            username: name.into(),
            public_key: der(key(0)),
        })
        .await;
        assert_eq!(c.expect_error(ErrorCode::InvalidUsername).await, Some(id));
    }
    let id = c.id();
    c.send(ClientMessage::Register {
        id,
        username: "alice".into(),
        public_key: b"garbage".to_vec(),
    })
    .await;
    c.expect_error(ErrorCode::InvalidPublicKey).await;

    let id = c.id();
    c.send(ClientMessage::Prove {
        id,
        signature: vec![1, 2, 3],
    })
    .await;
    c.expect_error(ErrorCode::ProtocolViolation).await;

    // Requests that need a login are refused, and the connection stays usable.
    let id = c.id();
    c.send(ClientMessage::ListUsers { id }).await;
    c.expect_error(ErrorCode::ProtocolViolation).await;
    assert!(matches!(
        c.register(&"y".repeat(32), key(0)).await,
        ServerMessage::Welcome { .. }
    ));

    // A name nobody has: challenged like any other, refused only after the proof, in the
    // same words as a wrong key (no enumeration of accounts).
    let mut c = server.client().await;
    c.hello().await;
    match c.login("nobody", key(1)).await {
        ServerMessage::Error {
            code: ErrorCode::BadSignature,
            message,
            ..
        } => assert!(message.contains("no such account"), "{message}"),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
}

/// A relay impostor relays the real relay's challenge to its victim: the victim's proof is
/// bound to the victim's TLS session (with the impostor), so it fails in the impostor's
/// own session with the relay. The same signature bound to the right session works.
#[rstest]
#[tokio::test]
async fn a_login_proof_from_another_tls_session_fails(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    drop(server.user("alice", 0).await);
    let victim_session = server.client().await; // the victim's TLS session
    let mut impostor = server.client().await;
    impostor.hello().await;
    let id = impostor.id();
    impostor
        .send(ClientMessage::Login {
            id,
            username: "alice".into(),
        })
        .await;
    let ServerMessage::Challenge { nonce, .. } = impostor.recv_reply().await else {
        panic!("no challenge")
    };
    let alice = chat_protocol::Username::parse("alice").unwrap();
    let relayed = chat_protocol::auth::sign_login(
        key(0),
        &mut rand::rng(),
        &alice,
        &nonce,
        &victim_session.channel(),
    )
    .unwrap();
    let id = impostor.id();
    impostor
        .send(ClientMessage::Prove {
            id,
            signature: relayed,
        })
        .await;
    impostor.expect_error(ErrorCode::BadSignature).await;
    impostor.expect_closed().await;

    // Control: a proof bound to its own session logs in.
    let mut honest = server.client().await;
    honest.hello().await;
    assert!(matches!(
        honest.login("alice", key(0)).await,
        ServerMessage::Welcome { .. }
    ));
}

#[rstest]
#[tokio::test]
async fn unsupported_version_gets_a_clear_error(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut c = server.client().await;
    c.send(ClientMessage::Hello {
        version: PROTOCOL_VERSION + 1,
        software: "future".into(),
    })
    .await;
    match c.recv().await {
        ServerMessage::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("update"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
}

#[rstest]
#[tokio::test]
async fn first_message_must_be_hello(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut c = server.client().await;
    c.send(ClientMessage::ListUsers { id: 1 }).await;
    c.expect_error(ErrorCode::ProtocolViolation).await;
    c.expect_closed().await;
}

#[rstest]
#[tokio::test]
async fn presence_goes_only_to_watchers(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    // Invalid names are accepted and simply never online.
    assert!(alice.watch(&["bob", "not a name"]).await.is_empty());
    let mut bob = server.user("bob", 1).await;
    assert_eq!(
        alice.recv().await,
        ServerMessage::Presence {
            username: "bob".into(),
            online: true
        }
    );
    // Carol watches nobody and is watched by nobody: her coming and going tells no one,
    // and she hears of no one.
    let mut carol = server.user("carol", 2).await;
    for (n, c) in [&mut alice, &mut bob, &mut carol].into_iter().enumerate() {
        // The next message each gets is the answer to its ping: no presence came before.
        c.send(ClientMessage::Ping { nonce: n as u64 }).await;
        assert_eq!(c.recv().await, ServerMessage::Pong { nonce: n as u64 });
    }
    assert_eq!(alice.online().await, vec!["alice", "bob", "carol"]);
    assert_eq!(
        carol.watch(&["alice", "bob", "dave"]).await,
        vec!["alice", "bob"]
    );
    drop(bob);
    for watcher in [&mut alice, &mut carol] {
        assert_eq!(
            watcher.recv().await,
            ServerMessage::Presence {
                username: "bob".into(),
                online: false
            }
        );
    }
    assert_eq!(alice.online().await, vec!["alice", "carol"]);

    // Over the limit: a typed error, nothing added, and the session goes on.
    let id = carol.id();
    carol
        .send(ClientMessage::Watch {
            id,
            usernames: (0..=chat_protocol::message::MAX_WATCHED)
                .map(|i| format!("u{i}"))
                .collect(),
        })
        .await;
    assert_eq!(carol.expect_error(ErrorCode::WatchLimit).await, Some(id));
    assert_eq!(carol.online().await, vec!["alice", "carol"]);
}

#[rstest]
#[tokio::test]
async fn relay_stamps_the_authenticated_sender(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;

    assert!(matches!(
        alice.send_to("BOB", b"\x00opaque\xff").await,
        ServerMessage::Ok { .. }
    ));
    assert!(matches!(
        bob.recv_reply().await,
        ServerMessage::Deliver { ref from, ref payload, .. }
            if from == "alice" && payload == b"\x00opaque\xff"
    ));
    // A note to self works too. Delivered at once, it may arrive before the `Ok`.
    let id = bob.id();
    bob.send(ClientMessage::Send {
        id,
        to: "bob".into(),
        payload: b"memo".to_vec(),
    })
    .await;
    let mut got = [bob.recv_reply().await, bob.recv_reply().await];
    got.sort_by_key(|m| matches!(m, ServerMessage::Ok { .. }));
    assert!(
        matches!(&got[0], ServerMessage::Deliver { from, payload, .. } if from == "bob" && payload == b"memo"),
        "{got:?}"
    );
    assert_eq!(got[1], ServerMessage::Ok { id });
}

#[rstest]
#[tokio::test]
async fn a_forged_sender_never_reaches_anyone(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    let mut mallory = server.user("mallory", 2).await;
    let mut bob = server.user("bob", 1).await;
    // Send has no sender field, so Mallory tries the only thing left: writing a
    // server-style Deliver that claims to be from bob. It is not a client message.
    let forged = ServerMessage::Deliver {
        envelope_id: 1,
        from: "bob".into(),
        payload: b"forged".to_vec(),
    };
    mallory
        .raw(&chat_protocol::frame::encode(&forged, 1 << 20).unwrap())
        .await;
    // Those bytes happen to parse as a Send to "bob" — and are stamped as Mallory's.
    assert_eq!(mallory.recv_reply().await, ServerMessage::Ok { id: 1 });
    assert!(matches!(
        bob.recv_reply().await,
        ServerMessage::Deliver { ref from, .. } if from == "mallory"
    ));

    assert!(matches!(
        bob.send_to("alice", b"real").await,
        ServerMessage::Ok { .. }
    ));
    // Alice's first delivery is bob's real message, stamped by the server.
    assert!(matches!(
        alice.recv_reply().await,
        ServerMessage::Deliver { ref from, ref payload, .. } if from == "bob" && payload == b"real"
    ));
}

#[rstest]
#[tokio::test]
async fn unknown_recipients_are_refused(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    for to in ["nobody", "not a name"] {
        match alice.send_to(to, b"x").await {
            ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::UnknownUser),
            other => panic!("{other:?}"),
        }
    }
}

/// The envelopes delivered to `c` until it has `n`, as (id, payload).
/// Sends `payload` to `to` until it is stored (`Ok`): room came back in `to`'s mailbox.
pub(crate) async fn until_stored(sender: &mut common::Client, to: &str, payload: &[u8]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !matches!(sender.send_to(to, payload).await, ServerMessage::Ok { .. }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{to}'s room never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub(crate) async fn deliveries(c: &mut common::Client, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < n {
        if let ServerMessage::Deliver {
            envelope_id,
            payload,
            ..
        } = c.recv_reply().await
        {
            got.push((envelope_id, payload));
        }
    }
    got
}

#[rstest]
#[tokio::test]
async fn offline_recipients_get_their_mail_in_order_until_acknowledged(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |_| {}).await;
    drop(server.user("carol", 2).await);
    let mut alice = server.user("alice", 0).await;
    for i in 0..20u8 {
        assert!(matches!(
            alice.send_to("carol", &[i]).await,
            ServerMessage::Ok { .. }
        ));
    }
    // Carol logs in: all twenty, in order. She acknowledges the first ten but the sixth.
    let mut carol = server.user("carol", 2).await;
    let got = deliveries(&mut carol, 20).await;
    assert_eq!(
        got.iter().map(|(_, p)| p[0]).collect::<Vec<_>>(),
        (0..20).collect::<Vec<u8>>()
    );
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    carol
        .send(ClientMessage::Ack {
            envelope_ids: [&ids[..5], &ids[6..10]].concat(),
        })
        .await;
    // A live message while she is online arrives after the backlog.
    assert!(matches!(
        alice.send_to("carol", &[99]).await,
        ServerMessage::Ok { .. }
    ));
    assert_eq!(deliveries(&mut carol, 1).await[0].1, vec![99]);
    carol.online().await; // the Ack was processed before this reply
    drop(carol);

    // Unacknowledged ones come again at the next login, and only those.
    let mut carol = server.user("carol", 2).await;
    let again = deliveries(&mut carol, 12).await;
    let mut expected: Vec<u8> = vec![5];
    expected.extend(10..20);
    expected.push(99);
    assert_eq!(
        again.iter().map(|(_, p)| p[0]).collect::<Vec<_>>(),
        expected
    );
    let ids: Vec<u64> = again.iter().map(|(id, _)| *id).collect();
    carol.send(ClientMessage::Ack { envelope_ids: ids }).await;
    carol.online().await;
    drop(carol);
    let mut carol = server.user("carol", 2).await;
    carol.send(ClientMessage::Ping { nonce: 5 }).await;
    assert_eq!(
        carol.recv_reply().await,
        ServerMessage::Pong { nonce: 5 },
        "nothing left to deliver"
    );
}

#[rstest]
#[tokio::test]
async fn pipelined_sends_are_answered_in_order_and_all_delivered(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;
    // More than one connection may have in flight, with a failing one in the middle and
    // another kind of request at the end: replies must still come in request order.
    let mut ids = Vec::new();
    for i in 0..300u16 {
        let id = alice.id();
        let to = if i == 150 { "nobody" } else { "bob" };
        alice
            .send(ClientMessage::Send {
                id,
                to: to.into(),
                payload: i.to_be_bytes().to_vec(),
            })
            .await;
        ids.push(id);
    }
    let list = alice.id();
    alice.send(ClientMessage::ListUsers { id: list }).await;
    for (i, id) in ids.iter().enumerate() {
        match alice.recv_reply().await {
            ServerMessage::Ok { id: got } if i != 150 => assert_eq!(got, *id),
            ServerMessage::Error {
                id: got,
                code: ErrorCode::UnknownUser,
                ..
            } if i == 150 => assert_eq!(got, Some(*id)),
            other => panic!("reply {i}: {other:?}"),
        }
    }
    assert!(matches!(
        alice.recv_reply().await,
        ServerMessage::Users { id, .. } if id == list
    ));
    let got: Vec<u16> = deliveries(&mut bob, 299)
        .await
        .iter()
        .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    let expected: Vec<u16> = (0..300).filter(|&i| i != 150).collect();
    assert_eq!(got, expected);
}

#[rstest]
#[tokio::test]
async fn public_key_lookup(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    let id = alice.id();
    alice
        .send(ClientMessage::GetPublicKey {
            id,
            username: "Bob".into(),
        })
        .await;
    assert_eq!(
        alice.recv_reply().await,
        ServerMessage::PublicKey {
            id,
            username: "bob".into(),
            public_key: der(key(1))
        }
    );
    let id = alice.id();
    alice
        .send(ClientMessage::GetPublicKey {
            id,
            username: "nobody".into(),
        })
        .await;
    assert_eq!(alice.expect_error(ErrorCode::UnknownUser).await, Some(id));
}

#[rstest]
#[tokio::test]
async fn second_login_replaces_the_first_without_an_offline_flap(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut bob = server.user("bob", 1).await;
    bob.watch(&["alice"]).await;
    let mut alice1 = server.user("alice", 0).await;
    assert!(matches!(
        bob.recv().await,
        ServerMessage::Presence { online: true, .. }
    ));
    let mut alice2 = server.user("alice", 0).await;
    alice1.expect_error(ErrorCode::SessionReplaced).await;
    alice1.expect_closed().await;
    assert!(matches!(
        bob.send_to("alice", b"to the new one").await,
        ServerMessage::Ok { .. }
    ));
    assert!(matches!(
        alice2.recv_reply().await,
        ServerMessage::Deliver { .. }
    ));
    // Bob saw no offline/online flap: his next message is the reply to his own request.
    assert_eq!(bob.online().await, vec!["alice", "bob"]);
}

#[rstest]
#[tokio::test]
async fn ping_pong_both_ways_and_idle_timeout(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| {
        c.ping_interval_secs = 0.2;
        c.idle_timeout_secs = 0.6;
    })
    .await;
    let mut alice = server.user("alice", 0).await;
    alice.send(ClientMessage::Ping { nonce: 42 }).await;
    assert_eq!(alice.recv_reply().await, ServerMessage::Pong { nonce: 42 });
    // The server pings a quiet client; one that never answers is closed as idle.
    assert!(matches!(alice.recv().await, ServerMessage::Ping { .. }));
    alice.expect_error(ErrorCode::IdleTimeout).await;
    alice.expect_closed().await;
}

#[rstest]
#[tokio::test]
async fn a_client_that_answers_pings_stays_connected(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| {
        c.ping_interval_secs = 0.3;
        c.idle_timeout_secs = 1.5;
    })
    .await;
    let mut alice = server.user("alice", 0).await;
    // Answer eight pings: that spans well over the idle timeout.
    for _ in 0..8 {
        match alice.recv().await {
            ServerMessage::Ping { nonce } => alice.send(ClientMessage::Pong { nonce }).await,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(alice.online().await, vec!["alice"]);
}

#[rstest]
#[tokio::test]
async fn login_timeout_closes_lingering_connections(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| c.login_timeout_secs = 0.3).await;
    let mut lingering = server.client().await;
    lingering.hello().await;
    lingering.expect_error(ErrorCode::LoginTimeout).await;
    lingering.expect_closed().await;
    // A silent connection that never says Hello is closed too.
    let mut silent = server.client().await;
    silent.expect_error(ErrorCode::LoginTimeout).await;
}

#[rstest]
#[tokio::test]
async fn rate_limit_paces_a_flooding_client_without_dropping(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |c| {
        c.rate_limit.burst = 8.0;
        c.rate_limit.per_second = 10.0;
    })
    .await;
    // Hello, Register and Prove used three tokens; five are left.
    let mut alice = server.user("alice", 0).await;
    let started = tokio::time::Instant::now();
    let ids: Vec<u32> = (0..15).map(|_| alice.id()).collect();
    for &id in &ids {
        alice.send(ClientMessage::ListUsers { id }).await;
    }
    // Every request is answered, in order; the ten over the burst took at least 1 s.
    for &id in &ids {
        match alice.recv_reply().await {
            ServerMessage::Users { id: got, .. } => assert_eq!(got, id),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(950),
        "not paced: {:?}",
        started.elapsed()
    );
}

#[rstest]
#[tokio::test]
async fn connections_over_the_limit_are_told_busy(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| c.max_connections = 2).await;
    let _a = server.user("alice", 0).await;
    let _b = server.user("bob", 1).await;
    // Not logged in yet, a third connection holds only a pre-login slot; its login is
    // refused (after the proof) and closed.
    let mut third = server.client().await;
    third.hello().await;
    match third.register("carol", key(2)).await {
        ServerMessage::Error {
            code: ErrorCode::ServerBusy,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    third.expect_closed().await;
}

#[rstest]
#[tokio::test]
async fn oversized_frame_closes_only_that_connection(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| c.max_frame_bytes = 4096).await;
    let mut alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;
    let mut bad = server.user("mallory", 2).await;
    // One byte over the limit, announced in the prefix; the body never needs to arrive.
    bad.raw(&4097u32.to_be_bytes()).await;
    bad.expect_error(ErrorCode::FrameTooLarge).await;
    bad.expect_closed().await;
    // A declared 4 GiB frame is refused just the same.
    let mut huge = server.client().await;
    huge.raw(&u32::MAX.to_be_bytes()).await;
    huge.expect_error(ErrorCode::FrameTooLarge).await;

    assert!(matches!(
        alice.send_to("bob", b"still here").await,
        ServerMessage::Ok { .. }
    ));
    assert!(matches!(
        bob.recv_reply().await,
        ServerMessage::Deliver { .. }
    ));
}

#[rstest]
#[tokio::test]
async fn garbage_closes_only_that_connection(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;
    let mut bad = server.client().await;
    bad.raw(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]).await;
    bad.expect_error(ErrorCode::MalformedFrame).await;
    bad.expect_closed().await;
    // Abrupt disconnect mid-frame.
    let mut cut = server.user("carol", 2).await;
    cut.raw(&[0, 0, 1, 0, 1, 2]).await;
    drop(cut);

    assert!(matches!(
        alice.send_to("bob", b"ok").await,
        ServerMessage::Ok { .. }
    ));
    assert!(matches!(
        bob.recv_reply().await,
        ServerMessage::Deliver { .. }
    ));
}

#[rstest]
#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_loses_nothing(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |c| {
        c.send_queue_len = 4;
        c.write_timeout_secs = 0.5;
        c.rate_limit.burst = 100_000.0;
        c.rate_limit.per_second = 100_000.0;
        // On a loaded machine many sends land before the write timeout fires; this test is
        // about the slow reader, not about one sender's share of a queue.
        c.queue.max_sender_share = 1.0;
        c.queue.max_bytes_per_user = 1 << 30;
        c.queue.max_source_share = 1.0;
    })
    .await;
    let mut alice = server.user("alice", 0).await;
    let sleepy = server.user("sleepy", 1).await; // never reads
    let payload = vec![0x5a; 60_000];
    let started = tokio::time::Instant::now();
    let mut sent = 0usize;
    // Keep sending until the server has dropped sleepy; every send is still accepted.
    while alice.online().await.contains(&"sleepy".to_string()) {
        assert!(
            started.elapsed() < 3 * PATIENCE,
            "sleepy was never disconnected"
        );
        let reply = alice.send_to("sleepy", &payload).await;
        assert!(
            matches!(reply, ServerMessage::Ok { .. }),
            "send {sent} refused: {reply:?}"
        );
        sent += 1;
    }
    drop(sleepy);
    // Back and reading: every accepted message is there, in order.
    let mut awake = server.user("sleepy", 1).await;
    let got = deliveries(&mut awake, sent).await;
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(got.iter().all(|(_, p)| *p == payload));
}

#[rstest]
#[tokio::test]
async fn shutdown_tells_clients_and_returns(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut alice = server.user("alice", 0).await;
    let mut fresh = server.client().await;
    fresh.hello().await; // accepted, not yet logged in
    server.stop().await;
    alice.expect_error(ErrorCode::ShuttingDown).await;
    alice.expect_closed().await;
    fresh.expect_error(ErrorCode::ShuttingDown).await;
}

#[rstest]
#[tokio::test]
async fn expired_envelopes_are_purged_and_counted(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| {
        c.queue.max_age_secs = 1.0;
        c.queue.purge_interval_secs = 0.2;
    })
    .await;
    drop(server.user("carol", 2).await);
    let mut alice = server.user("alice", 0).await;
    assert!(matches!(
        alice.send_to("carol", b"too late").await,
        ServerMessage::Ok { .. }
    ));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.queued().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if backend == Sqlite {
        // The SQLite backend purges by itself, and counts what it purged.
        let store = chat_server::store::Store::open(&server.dir.path().join("data")).unwrap();
        assert_eq!(store.stats().unwrap().expired_total, 1);
    }
    let mut carol = server.user("carol", 2).await;
    carol.send(ClientMessage::Ping { nonce: 1 }).await;
    assert_eq!(
        carol.recv_reply().await,
        ServerMessage::Pong { nonce: 1 },
        "nothing delivered"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_changing_sessions_under_load_loses_nothing_and_keeps_order(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    // Envelopes go to carol live (held for her Ack), through the store while she is
    // offline or reading her backlog, and across sessions replaced mid-stream. Whatever
    // the path, each session sees every sender's envelopes in order and never twice, and
    // together the sessions see everything.
    const N: u16 = 300;
    let server = TestServer::on(backend, |c| {
        c.queue.live_grace_secs = 0.05;
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
    })
    .await;
    drop(server.user("carol", 2).await);
    let mut senders = tokio::task::JoinSet::new();
    for (i, (name, k)) in [("alice", 0), ("bob", 1), ("dave", 3)]
        .into_iter()
        .enumerate()
    {
        let mut c = server.user(name, k).await;
        senders.spawn(async move {
            // Windows of ten, so the stream overlaps carol's logins.
            for chunk in (0..N).collect::<Vec<_>>().chunks(10) {
                for &seq in chunk {
                    let [hi, lo] = seq.to_be_bytes();
                    c.send(ClientMessage::Send {
                        id: 1000 + u32::from(seq),
                        to: "carol".into(),
                        payload: vec![i as u8, hi, lo],
                    })
                    .await;
                }
                for &seq in chunk {
                    assert_eq!(
                        c.recv_reply().await,
                        ServerMessage::Ok {
                            id: 1000 + u32::from(seq)
                        }
                    );
                }
            }
        });
    }

    let total = 3 * usize::from(N);
    let mut seen = std::collections::HashSet::new();
    let mut previous = None;
    let mut sessions = 0;
    while seen.len() < total {
        // Every other session follows a disconnect; the others replace a live session.
        if sessions % 2 == 1 {
            drop(previous.take());
        }
        let mut carol = server.user("carol", 2).await;
        drop(previous.take());
        sessions += 1;
        let mut last: [Option<u16>; 3] = [None; 3];
        let mut this_session = std::collections::HashSet::new();
        while this_session.len() < 120 && seen.len() < total {
            let ServerMessage::Deliver {
                envelope_id,
                payload,
                ..
            } = carol.recv_reply().await
            else {
                panic!("expected deliveries");
            };
            let (sender, seq) = (
                usize::from(payload[0]),
                u16::from_be_bytes([payload[1], payload[2]]),
            );
            assert!(
                this_session.insert((sender, seq)),
                "twice in one session: {sender}/{seq}"
            );
            assert!(
                last[sender].is_none_or(|l| seq > l),
                "sender {sender}: {seq} after {:?}",
                last[sender]
            );
            last[sender] = Some(seq);
            seen.insert((sender, seq));
            carol
                .send(ClientMessage::Ack {
                    envelope_ids: vec![envelope_id],
                })
                .await;
        }
        previous = Some(carol);
    }
    assert!(sessions >= 3, "the stream spanned several sessions");
    while let Some(done) = senders.join_next().await {
        done.unwrap();
    }
}

#[rstest]
#[tokio::test]
async fn a_session_that_never_acknowledges_is_closed(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |c| {
        c.queue.max_envelopes_per_user = 20;
        c.queue.max_sender_share = 1.0;
        c.send_queue_len = 8;
        if backend == Nats {
            // Closed for its silence: soon.
            c.ping_interval_secs = 0.5;
            c.idle_timeout_secs = 2.0;
        }
    })
    .await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    // Alice keeps sending, whatever the answers (bob's queue fills); bob reads and never
    // acknowledges: once he holds far more than his queue allows, he is closed.
    let sending = tokio::spawn(async move {
        for i in 0..400u16 {
            alice.send_to("bob", &i.to_be_bytes()).await;
        }
    });
    let mut delivered = 0;
    let closed_with = loop {
        match bob.framed.next().await {
            Some(Ok(ServerMessage::Deliver { .. })) => delivered += 1,
            Some(Ok(ServerMessage::Error { id: None, code, .. })) => break Some(code),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    match backend {
        // Live delivery goes ahead of the queue: unacknowledged envelopes pile up until
        // the relay closes the session.
        Sqlite => {
            assert_eq!(
                closed_with,
                Some(ErrorCode::SlowConsumer),
                "after {delivered}"
            );
            assert!(delivered > 20, "{delivered}");
        }
        // Every envelope is stored in the mailbox first, which holds 20: the session never
        // holds more (alice is refused), and only its silence (no Pong) closes it.
        Nats => {
            assert_eq!(closed_with, Some(ErrorCode::IdleTimeout));
            assert_eq!(delivered, 20);
        }
    }
    sending.abort();
}

/// `Sync` is answered only once every envelope stored for the user before the session
/// began has been written: a backlog longer than one read batch (150 envelopes) comes
/// whole, in order, before the `Ok`; once caught up, a second `Sync` is answered at once.
#[rstest]
#[tokio::test]
async fn sync_is_answered_after_the_whole_backlog(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    let sent: Vec<Vec<u8>> = (0..150u32).map(|i| i.to_be_bytes().to_vec()).collect();
    for payload in &sent {
        let answer = alice.send_to("bob", payload).await;
        assert!(matches!(answer, ServerMessage::Ok { .. }), "{answer:?}");
    }

    let mut bob = server.client().await;
    bob.hello().await;
    assert!(matches!(
        bob.login("bob", key(1)).await,
        ServerMessage::Welcome { .. }
    ));
    let sync = bob.id();
    bob.send(ClientMessage::Sync { id: sync }).await;
    let mut got = Vec::new();
    loop {
        match bob.recv_reply().await {
            ServerMessage::Deliver { payload, .. } => got.push(payload),
            ServerMessage::Ok { id } if id == sync => break,
            other => panic!("expected the backlog, then Ok: {other:?}"),
        }
    }
    assert_eq!(got, sent, "the whole backlog, in order, before the answer");

    let again = bob.id();
    bob.send(ClientMessage::Sync { id: again }).await;
    assert_eq!(bob.recv_reply().await, ServerMessage::Ok { id: again });
    // Live envelopes still come after it.
    assert!(matches!(
        alice.send_to("bob", b"live").await,
        ServerMessage::Ok { .. }
    ));
    assert_eq!(bob.delivery().await.2, b"live");
}

/// A registration that makes no account gives its address's token back: here two keys
/// prove the same new name at once, one gets the account and the other `username_taken`.
/// With a burst of 2 the address may still make one more account (before, the loser's
/// token was spent: a storage failure during a NATS election spent one per attempt and
/// locked everyone behind the address out for an hour).
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_makes_no_account_gives_its_token_back(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |c| {
        c.registrations = chat_server::config::Registrations {
            per_hour: 1.0,
            burst: 2.0,
        };
    })
    .await;
    let user = chat_protocol::Username::parse("dave").unwrap();
    let mut racers = Vec::new();
    for k in [0, 1] {
        let mut c = server.client().await;
        c.hello().await;
        let id = c.id();
        let (username, public_key) = ("dave".to_owned(), der(key(k)));
        c.send(ClientMessage::Register {
            id,
            username,
            public_key,
        })
        .await;
        let nonce = match c.recv_reply().await {
            ServerMessage::Challenge { nonce, .. } => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        };
        let signature =
            chat_protocol::auth::sign_login(key(k), &mut rand::rng(), &user, &nonce, &c.channel())
                .unwrap();
        racers.push((c, signature));
    }
    for (c, signature) in &mut racers {
        let (id, signature) = (c.id(), signature.clone());
        c.send(ClientMessage::Prove { id, signature }).await;
    }
    let mut answers = Vec::new();
    for (c, _) in &mut racers {
        answers.push(match c.recv_reply().await {
            ServerMessage::Welcome { registered, .. } => Ok(registered),
            ServerMessage::Error { code, .. } => Err(code),
            other => panic!("expected a welcome or an error, got {other:?}"),
        });
    }
    answers.sort_by_key(|a| a.is_err());
    assert_eq!(answers, [Ok(true), Err(ErrorCode::UsernameTaken)]);
    // One account made from the address's 2 tokens: one more may be made, not two.
    let mut erin = server.client().await;
    erin.hello().await;
    match erin.register("erin", key(2)).await {
        ServerMessage::Welcome { registered, .. } => assert!(registered),
        other => panic!("the address's second token was spent: {other:?}"),
    }
    let mut fay = server.client().await;
    fay.hello().await;
    match fay.register("fay", key(3)).await {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::RateLimited),
        other => panic!("expected rate_limited past the burst, got {other:?}"),
    }
}

/// One connection may begin at most 4 logins: a client that keeps trying on the same
/// connection (registrations refused past its address's quota, each with a proof and so a
/// signature check; names that are taken, each a key lookup) is closed `rate_limited` at
/// the fifth, instead of looping until its login timeout. The next connection is served.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_beginning_logins_is_closed_at_the_fifth(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |c| {
        c.registrations = chat_server::config::Registrations {
            per_hour: 1.0,
            burst: 1.0,
        };
    })
    .await;
    // Alice's account takes the address's only token.
    drop(server.user("alice", 0).await);
    let mut c = server.client().await;
    c.hello().await;
    let mut answers = Vec::new();
    for i in 0..4 {
        let answer = if i % 2 == 0 {
            c.register(&format!("new{i}"), key(1)).await
        } else {
            c.register("alice", key(1)).await
        };
        answers.push(match answer {
            ServerMessage::Error { code, .. } => code,
            other => panic!("attempt {i}: expected an error, got {other:?}"),
        });
    }
    use ErrorCode::{RateLimited, UsernameTaken};
    assert_eq!(
        answers,
        [RateLimited, UsernameTaken, RateLimited, UsernameTaken]
    );
    let id = c.id();
    c.send(ClientMessage::Login {
        id,
        username: "alice".into(),
    })
    .await;
    assert_eq!(
        c.expect_error(RateLimited).await,
        None,
        "closed, with no id"
    );
    c.expect_closed().await;

    let mut again = server.client().await;
    again.hello().await;
    let welcome = again.login("alice", key(0)).await;
    assert!(
        matches!(welcome, ServerMessage::Welcome { .. }),
        "{welcome:?}"
    );
}
