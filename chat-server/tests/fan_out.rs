//! `SendMany` (protocol 7) through real TCP on loopback, on both backends: one payload
//! fanned out to several recipients, each copy answered for itself, in request order, and
//! a malformed fan-out refused whole without harming the connection.

mod common;

use chat_protocol::message::MAX_FANOUT;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use common::{Backend, Nats, Sqlite, TestServer};
use rstest::rstest;

/// Pipelined between two `Send`s, a `SendMany` to an online, an offline, a full, an unknown
/// and an invalid recipient, and a second one right behind it: the four replies come in
/// request order, the `Outcomes` name
/// each recipient's fate in `to` order, and every accepted copy arrives exactly once, in
/// order with the sender's other envelopes (the offline recipient's at its next login).
#[rstest]
#[tokio::test]
async fn each_copy_is_answered_for_itself_and_delivered_once_in_order(
    #[values(Sqlite, Nats)] backend: Backend,
) {
    let server = TestServer::on(backend, |c| {
        c.queue.max_envelopes_per_user = 5;
        c.queue.max_sender_share = 1.0;
    })
    .await;
    drop(server.user("carol", 2).await);
    drop(server.user("dave", 3).await);
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    for _ in 0..5 {
        let answer = alice.send_to("dave", b"filler").await;
        assert!(matches!(answer, ServerMessage::Ok { .. }), "{answer:?}");
    }

    let (first, many, again, last) = (alice.id(), alice.id(), alice.id(), alice.id());
    let to = ["bob", "Carol", "nobody", "dave", "not a name"];
    alice
        .send(ClientMessage::Send {
            id: first,
            to: "bob".into(),
            payload: b"a".to_vec(),
        })
        .await;
    alice
        .send(ClientMessage::SendMany {
            id: many,
            to: to.iter().map(|s| s.to_string()).collect(),
            payload: b"b".to_vec(),
        })
        .await;
    // A second fan-out right behind the first: its outcomes are its own.
    alice
        .send(ClientMessage::SendMany {
            id: again,
            to: vec!["nobody".into(), "bob".into()],
            payload: b"b2".to_vec(),
        })
        .await;
    alice
        .send(ClientMessage::Send {
            id: last,
            to: "bob".into(),
            payload: b"c".to_vec(),
        })
        .await;
    assert_eq!(alice.recv_reply().await, ServerMessage::Ok { id: first });
    assert_eq!(
        alice.recv_reply().await,
        ServerMessage::Outcomes {
            id: many,
            outcomes: vec![
                None,
                None,
                Some(ErrorCode::UnknownUser),
                Some(ErrorCode::RecipientQueueFull),
                Some(ErrorCode::UnknownUser),
            ],
        }
    );
    assert_eq!(
        alice.recv_reply().await,
        ServerMessage::Outcomes {
            id: again,
            outcomes: vec![Some(ErrorCode::UnknownUser), None],
        }
    );
    assert_eq!(alice.recv_reply().await, ServerMessage::Ok { id: last });

    let mut got = Vec::new();
    for _ in 0..4 {
        let (envelope_id, from, payload) = bob.delivery().await;
        assert_eq!(from, "alice");
        got.push(payload);
        bob.send(ClientMessage::Ack {
            envelope_ids: vec![envelope_id],
        })
        .await;
    }
    assert_eq!(
        got,
        [&b"a"[..], b"b", b"b2", b"c"],
        "once each, in the order sent"
    );
    let mut carol = server.user("carol", 2).await;
    let (_, from, payload) = carol.delivery().await;
    assert_eq!((from.as_str(), payload.as_slice()), ("alice", &b"b"[..]));
    // Nothing else for either: a ping is answered next, with no second copy before it.
    for c in [&mut bob, &mut carol] {
        c.send(ClientMessage::Ping { nonce: 9 }).await;
        assert_eq!(c.recv_reply().await, ServerMessage::Pong { nonce: 9 });
    }
}

/// A `SendMany` naming nobody, more than `MAX_FANOUT` recipients, or someone twice (in
/// any spelling) is refused whole with `protocol_violation` and a sentence saying why;
/// nothing of it is delivered and the connection goes on serving.
#[rstest]
#[tokio::test]
async fn a_malformed_fan_out_is_refused_whole(#[values(Sqlite, Nats)] backend: Backend) {
    let server = TestServer::on(backend, |_| {}).await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    let too_many: Vec<String> = (0..=MAX_FANOUT).map(|i| format!("u{i}")).collect();
    let cases = [
        (vec![], "1 to 255 recipients, not 0"),
        (too_many, "not 256"),
        (
            vec!["bob".to_string(), "carol".into(), "BOB".into()],
            "names \"BOB\" twice",
        ),
        (
            vec!["not a name".to_string(), "NOT A NAME".into()],
            "names \"NOT A NAME\" twice",
        ),
    ];
    for (to, why) in cases {
        let id = alice.id();
        alice
            .send(ClientMessage::SendMany {
                id,
                to,
                payload: b"refused".to_vec(),
            })
            .await;
        match alice.recv_reply().await {
            ServerMessage::Error {
                id: got,
                code: ErrorCode::ProtocolViolation,
                message,
            } => {
                assert_eq!(got, Some(id));
                assert!(message.contains(why), "{message}");
                assert!(message.contains("nothing was sent"), "{message}");
            }
            other => panic!("expected protocol_violation: {other:?}"),
        }
    }
    let answer = alice.send_to("bob", b"after").await;
    assert!(matches!(answer, ServerMessage::Ok { .. }), "{answer:?}");
    assert_eq!(
        bob.delivery().await.2,
        b"after",
        "nothing refused got through"
    );
}
