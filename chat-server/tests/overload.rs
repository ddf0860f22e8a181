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

#[rstest]
#[case::paced(false)]
#[case::shed(true)]
#[tokio::test]
async fn a_full_pipeline_is_paced_or_shed_and_nothing_is_lost(#[case] shed: bool) {
    let server = TestServer::start(|c| {
        c.shed_when_full = shed;
        // Envelopes delivered live wait for bob's Ack for the whole test, so alice's
        // pipeline stays full until he sends it.
        c.queue.live_grace_secs = 60.0;
        c.rate_limit.per_second = 1e6;
        c.rate_limit.burst = 1e6;
    })
    .await;
    let mut alice = server.user("alice", 0).await;
    let mut bob = server.user("bob", 1).await;
    // Once his Sync is answered, bob is past his (empty) backlog: what comes for him now
    // is delivered live and held for his Ack, never stored.
    let sync = bob.id();
    bob.send(ClientMessage::Sync { id: sync }).await;
    assert_eq!(bob.recv_reply().await, ServerMessage::Ok { id: sync });
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
