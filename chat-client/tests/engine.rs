//! The client core driven directly (no processes) against an in-process relay.

mod common;

use std::time::Duration;

use chat_client::{Command, Event};
use common::inproc::{Peer, start_relay_with};

#[test]
fn a_full_recipient_queue_keeps_messages_queued_and_retries() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay_with(&rt, "127.0.0.1:0", &dir.path().join("relay"), |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
    });
    // Bob registers, then goes offline.
    let bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    bob.send(Command::Shutdown {
        flush_for: Duration::ZERO,
    });
    let mut alice = Peer::start_with(&rt, relay.addr, "alice", &dir.path().join("alice"), |c| {
        c.retry_later = Duration::from_millis(300);
    });
    for n in 0..4 {
        alice.send(Command::Send {
            to: "bob".into(),
            text: format!("queued {n}"),
        });
    }
    let Event::Error { code, message } = alice.expect(|e| matches!(e, Event::Error { .. })) else {
        unreachable!()
    };
    assert_eq!(code, "recipient_queue_full");
    assert!(message.contains("stay queued"), "{message}");

    // Bob comes back and reads; alice's retries get the rest through, in order.
    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut texts = Vec::new();
    while texts.len() < 4 {
        if let Event::Message { text, .. } = bob.expect(|e| matches!(e, Event::Message { .. })) {
            texts.push(text);
        }
    }
    assert_eq!(
        texts,
        (0..4).map(|n| format!("queued {n}")).collect::<Vec<_>>()
    );
    assert!(
        !std::iter::from_fn(|| alice.handle.events.try_recv().ok())
            .any(|e| matches!(e, Event::Failed { .. })),
        "nothing was given up"
    );
}
