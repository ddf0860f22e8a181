//! A full pipeline (128 sends waiting for their `Ok`) through real TCP on loopback, with
//! `shed_when_full` off (the default: the connection is not read until the pipeline has
//! room) and on (reading goes on; sends over the pipeline are refused `server_busy`).
//! Either way every message arrives exactly once and in order; with shedding on, what the
//! client sends after a full pipeline is read at once, which is what keeps the Acks behind
//! it flowing under an open-loop overload (docs/PERFORMANCE.md, "Overload").

mod common;

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use common::TestServer;
use rstest::rstest;

/// Sends a client may have waiting for their `Ok` before the relay stops reading it (or,
/// with `shed_when_full`, refuses its sends): the relay's `MAX_PIPELINED`.
const PIPELINE: usize = 128;
/// Sends pipelined in one go: a full pipeline and then some.
const N: usize = 200;

/// A relay (with `tweak`) on which alice's sends to bob are held for his Ack for the whole
/// test, unrated, and alice and bob logged in, bob past his (empty) backlog: what comes
/// for him now is delivered live and held for his Ack, never stored, so alice's pipeline
/// stays full until he sends it.
async fn alice_and_live_bob(
    tweak: impl FnOnce(&mut chat_server::Config),
) -> (TestServer, common::Client, common::Client) {
    let server = TestServer::start(|c| {
        c.queue.live_grace_secs = 60.0;
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
        tweak(c);
    })
    .await;
    let alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;
    let sync = bob.id();
    bob.send(ClientMessage::Sync { id: sync }).await;
    assert_eq!(bob.recv_reply().await, ServerMessage::Ok { id: sync });
    (server, alice, bob)
}

#[rstest]
#[case::paced(false)]
#[case::shed(true)]
#[tokio::test]
async fn a_full_pipeline_is_paced_or_shed_and_nothing_is_lost(#[case] shed: bool) {
    let (_server, mut alice, mut bob) = alice_and_live_bob(|c| c.shed_when_full = shed).await;
    let mut ids = Vec::new();
    for i in 0..N as u16 {
        let id = alice.id();
        alice
            .send(ClientMessage::Send {
                id,
                to: "bob".into(),
                payload: i.to_be_bytes().to_vec(),
            })
            .await;
        ids.push(id);
    }
    alice.send(ClientMessage::Ping { nonce: 7 }).await;
    if shed {
        // Read past the full pipeline: the Ping is answered before any send is.
        assert_eq!(alice.recv_reply().await, ServerMessage::Pong { nonce: 7 });
    }

    // Bob gets the pipeline's worth live and acknowledges it in one Ack.
    let mut got = Vec::new();
    let mut envelope_ids = Vec::new();
    while got.len() < PIPELINE {
        let (envelope_id, _, payload) = bob.delivery().await;
        envelope_ids.push(envelope_id);
        got.push(u16::from_be_bytes([payload[0], payload[1]]));
    }
    bob.send(ClientMessage::Ack { envelope_ids }).await;

    // Alice hears, in request order: Ok for the pipeline; then either the rest refused
    // busy (shed) or, once reading resumed, her Ping answered (paced).
    for id in &ids[..PIPELINE] {
        assert_eq!(alice.recv_reply().await, ServerMessage::Ok { id: *id });
    }
    let mut refused = Vec::new();
    if shed {
        for id in &ids[PIPELINE..] {
            match alice.recv_reply().await {
                ServerMessage::Error {
                    id: Some(got),
                    code: ErrorCode::ServerBusy,
                    message,
                } => {
                    assert_eq!(got, *id);
                    // The first says the pipeline is full; the later ones, that the
                    // relay's Ping after it is to be answered first.
                    let why = if refused.is_empty() {
                        "already await their answer"
                    } else {
                        "answer the relay's Ping"
                    };
                    assert!(message.contains(why), "{message}");
                    refused.push(got);
                }
                other => panic!("expected server_busy for {id}, got {other:?}"),
            }
        }
        // The relay takes sends again once its Ping after the last refusal is answered
        // (it comes before the answer to this one; recv_reply answers it).
        alice.send(ClientMessage::Ping { nonce: 8 }).await;
        assert_eq!(alice.recv_reply().await, ServerMessage::Pong { nonce: 8 });
        // A client resends what was refused, in order.
        ids.truncate(PIPELINE);
        for i in PIPELINE..N {
            let id = alice.id();
            alice
                .send(ClientMessage::Send {
                    id,
                    to: "bob".into(),
                    payload: (i as u16).to_be_bytes().to_vec(),
                })
                .await;
            ids.push(id);
        }
    } else {
        assert_eq!(alice.recv_reply().await, ServerMessage::Pong { nonce: 7 });
    }

    // Bob gets the rest, acknowledging as he goes; whichever way, each message once, in
    // the order alice sent it.
    while got.len() < N {
        let (envelope_id, _, payload) = bob.delivery().await;
        bob.send(ClientMessage::Ack {
            envelope_ids: vec![envelope_id],
        })
        .await;
        got.push(u16::from_be_bytes([payload[0], payload[1]]));
    }
    assert_eq!(got, (0..N as u16).collect::<Vec<_>>());
    for id in &ids[PIPELINE..] {
        assert_eq!(alice.recv_reply().await, ServerMessage::Ok { id: *id });
    }
    assert_eq!(refused.len(), if shed { N - PIPELINE } else { 0 });
    // Nothing more for bob: no duplicate is on its way.
    bob.send(ClientMessage::Ping { nonce: 9 }).await;
    assert_eq!(bob.recv_reply().await, ServerMessage::Pong { nonce: 9 });
}

/// A client that answers every Ping at once but keeps sending while shed (each send
/// written before its answer to the Ping after the previous refusal, as an eager client
/// with other recipients does) is refused each time, since each refusal puts up a newer
/// Ping, but is not closed: it used to be closed `protocol_violation` ("the server's Ping
/// after a refused send was never answered") one idle timeout after the first refusal
/// (found with a 200-member group whose admin's pipeline filled during a NATS election).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_client_that_answers_pings_but_keeps_sending_is_not_closed() {
    let (_server, mut alice, mut bob) = alice_and_live_bob(|c| {
        c.shed_when_full = true;
        c.ping_interval_secs = 0.5;
        c.idle_timeout_secs = 1.5;
    })
    .await;
    // Bob acknowledges alice's first pipeline's worth together, then anything else at
    // once (nothing more comes: every later send of hers is refused).
    let reading = tokio::spawn(async move {
        let mut envelope_ids = Vec::new();
        while envelope_ids.len() < PIPELINE {
            envelope_ids.push(bob.delivery().await.0);
        }
        bob.send(ClientMessage::Ack { envelope_ids }).await;
        loop {
            let (id, ..) = bob.delivery().await;
            let envelope_ids = vec![id];
            bob.send(ClientMessage::Ack { envelope_ids }).await;
        }
    });
    let send = |alice: &mut common::Client| {
        let id = alice.id();
        let msg = ClientMessage::Send {
            id,
            to: "bob".into(),
            payload: vec![0; 16],
        };
        (id, msg)
    };
    // A full pipeline and one more: refused, behind the Ping that puts the fence up.
    for _ in 0..=PIPELINE {
        let (_, msg) = send(&mut alice);
        alice.send(msg).await;
    }
    // Three idle timeouts of: one more send, then the Pong to the last Ping read.
    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(4.5);
    let mut pong = None;
    let mut refusals = 0;
    while std::time::Instant::now() < until {
        let (_, msg) = send(&mut alice);
        alice.send(msg).await;
        if let Some(nonce) = pong.take() {
            alice.send(ClientMessage::Pong { nonce }).await;
        }
        loop {
            match alice.recv().await {
                ServerMessage::Error {
                    code: ErrorCode::ServerBusy,
                    ..
                } => refusals += 1,
                ServerMessage::Ping { nonce } => {
                    pong = Some(nonce);
                    break;
                }
                ServerMessage::Error { code, message, .. } => {
                    panic!("closed after {refusals} refusals: {code}: {message}")
                }
                _ => {}
            }
        }
    }
    assert!(refusals > 10, "{refusals} refusals");
    reading.abort();
}
