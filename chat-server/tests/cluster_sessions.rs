//! The cluster backend's sessions bucket going wrong under connected relays (real
//! nats-server processes on 127.0.0.1, real relays, raw protocol clients over TLS): its
//! history lost, and a live session swept by a relay that took its owner for dead.

mod common;

use async_nats::jetstream::kv::Operation;
use chat_protocol::{ErrorCode, ServerMessage};
use common::TestServer;
use common::nats::Nats;

/// The sessions bucket lives in memory on the NATS nodes: restarting each node in turn
/// can leave it empty, its revisions starting again from 1, while the relays stay
/// connected (found by killing the nodes of a 3-node cluster one after another under
/// load). Here its stream is made again, empty, under the relays' feet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_bucket_that_lost_its_history_replaces_no_new_login_and_hides_no_one() {
    let nats = Nats::single();
    let a = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;
    // Revisions go up as logins come and go; bob and carol stay on A.
    for _ in 0..5 {
        let mut dave = a.user("dave", 3).await;
        dave.online().await;
    }
    let mut bob = a.user("bob", 1).await;
    let _carol = a.user("carol", 2).await;
    let mut alice = b.user("alice", 0).await;
    alice.until_online("bob", true).await;
    alice.until_online("carol", true).await;

    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let name = "KV_chat_sessions";
    let config = js
        .get_stream(name)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    js.delete_stream(name).await.unwrap();
    js.create_stream(config).await.unwrap();

    // Bob logs in again, on B: the new session is the one served (it used to be refused
    // as replaced by the old one's remembered, higher revision), the old one is closed.
    let mut bob_on_b = b.user("bob", 1).await;
    bob.expect_error(ErrorCode::SessionReplaced).await;
    bob.expect_closed().await;
    assert!(matches!(
        alice.send_to("bob", b"after the loss").await,
        ServerMessage::Ok { .. }
    ));
    let (_, _, payload) = bob_on_b.delivery().await;
    assert_eq!(payload, b"after the loss");

    // Carol, on A throughout, is online for a relay that starts after the loss (A wrote
    // her session again; it used to be gone until she logged in anew).
    let c = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let mut dave = c.user("dave", 3).await;
    dave.until_online("carol", true).await;
    dave.until_online("bob", true).await;
}

/// A relay whose heartbeats came late (a long NATS stall) may be taken for dead by
/// another, which then deletes its sessions: the owner writes a live one again at its next
/// heartbeat, so its user does not stay hidden from everyone else while connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_swept_by_another_relay_is_written_again() {
    let nats = Nats::single();
    let a = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let b = TestServer::start(|c| c.backend = nats.backend(1)).await;
    let mut carol = a.user("carol", 2).await;
    let mut alice = b.user("alice", 0).await;
    alice.until_online("carol", true).await;

    // What a sweep does: delete carol's session key (compare-and-delete on its revision).
    let js = async_nats::jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let sessions = js.get_key_value("chat_sessions").await.unwrap();
    let entry = sessions
        .entry("carol")
        .await
        .unwrap()
        .expect("carol's session");
    sessions
        .delete_expect_revision("carol", Some(entry.revision))
        .await
        .unwrap();
    // Gone for a moment (at most a heartbeat), then written again: the same session.
    let back = tokio::time::Instant::now() + 2 * common::PATIENCE;
    let written = loop {
        match sessions.entry("carol").await.unwrap() {
            Some(e) if e.operation == Operation::Put && e.revision > entry.revision => break e,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < back,
            "carol's session was never written again: she stays hidden"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(written.value, entry.value, "the same session");
    alice.until_online("carol", true).await;
    assert!(matches!(
        alice.send_to("carol", b"still here?").await,
        ServerMessage::Ok { .. }
    ));
    assert_eq!(carol.delivery().await.2, b"still here?");
}
