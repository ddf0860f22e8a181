//! A removal racing a message in flight, end to end (real headless clients, the real relay
//! binary, a [`common::rogue::Tap`] holding back what the relay sends one of them): a
//! member who sends in the moment before a removal reaches it seals for the old members,
//! as in any sender-keys group. The removed member's copy is opened and receipted like
//! everyone else's, and the sender's client neither withdraws a copy the relay already
//! has nor waits for ever for a receipt.

mod common;

use std::time::Duration;

use chat_protocol::ServerMessage;
use common::rogue::behind_tap;
use common::{Client, Relay, create_group};
use serde_json::Value;

/// `c`'s next group message in `group`.
fn group_message(c: &mut Client, group: &str) -> Value {
    c.expect("group message", |e| {
        e["event"] == "message" && e["group"] == group
    })
}

/// `sender`'s `delivered` event for its message `id` reaching `to`.
fn delivered(sender: &mut Client, id: &str, to: &str) -> Value {
    sender.expect(&format!("delivered to {to}"), |e| {
        e["event"] == "delivered" && e["id"] == id && e["to"] == to
    })
}

/// Carol's copy of bob's message reaches her only after she applied her removal (the tap
/// keeps bob's envelopes back meanwhile). She holds the sending key it is sealed under, so
/// she could read it anyway: her client shows it and receipts it, and bob's message ends
/// delivered to 2 of 2. It used to be held unopened, shown only if she was added back (as
/// if sent while she was out), and bob's message stayed at 1 of 2 for good. What bob seals
/// after he applied the removal is under a new key and never reaches her.
#[test]
fn a_copy_sealed_before_the_sender_knew_of_a_removal_reaches_the_removed_member() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    let (carol_tap, mut carol) = behind_tap(&relay, "carol", &home("carol"));
    let group = create_group("Team", &mut [&mut alice, &mut bob, &mut carol]);
    bob.send("/gmsg Team first");
    for c in [&mut alice, &mut carol] {
        assert_eq!(group_message(c, &group)["text"], "first");
    }

    carol_tap.keep_back(|m| matches!(m, ServerMessage::Deliver { from, .. } if from == "bob"));
    bob.send("/gmsg Team in flight");
    let queued = bob.expect("queued", |e| e["event"] == "queued" && e["group"] == group);
    assert_eq!(queued["recipients"], 2);
    let id = queued["id"].as_str().unwrap().to_owned();
    assert_eq!(group_message(&mut alice, &group)["text"], "in flight");
    assert_eq!(delivered(&mut bob, &id, "alice")["delivered_to"], 1);

    alice.send("/group-remove Team carol");
    for c in [&mut carol, &mut bob] {
        c.expect("removal", |e| {
            e["event"] == "group" && e["change"] == "removed"
        });
    }
    carol_tap.release();
    let late = group_message(&mut carol, &group);
    assert_eq!(
        (&late["from"], &late["text"]),
        (&"bob".into(), &"in flight".into())
    );
    let receipt = delivered(&mut bob, &id, "carol");
    assert_eq!(
        (
            receipt["delivered_to"].as_u64(),
            receipt["recipients"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert!(
        bob.seen_of("withdrawn").is_empty(),
        "{:?}",
        bob.seen_of("withdrawn")
    );

    bob.send("/gmsg Team after");
    assert_eq!(group_message(&mut alice, &group)["text"], "after");
    carol.assert_no_more_messages(Duration::from_secs(1));
}

/// Bob's copies are with the relay (taken and delivered, its answer held back by the tap)
/// when alice's removal of carol reaches him. The copy for carol is past withdrawing: it
/// used to be withdrawn all the same (a `withdrawn` event, "1 of 1") while carol read it
/// and receipted it. Now the relay's answer settles it: sent, and delivered to 2 of 2.
#[test]
fn a_copy_the_relay_already_has_is_not_withdrawn_at_a_removal() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    let (bob_tap, mut bob) = behind_tap(&relay, "bob", &home("bob"));
    let mut carol = Client::ready(relay.addr, "carol", &home("carol"));
    let group = create_group("Team", &mut [&mut alice, &mut bob, &mut carol]);

    bob_tap.keep_back(|m| matches!(m, ServerMessage::Outcomes { .. }));
    bob.send("/gmsg Team in flight");
    let queued = bob.expect("queued", |e| e["event"] == "queued" && e["group"] == group);
    let id = queued["id"].as_str().unwrap().to_owned();
    for c in [&mut alice, &mut carol] {
        assert_eq!(group_message(c, &group)["text"], "in flight");
    }
    alice.send("/group-remove Team carol");
    bob.expect("removal", |e| {
        e["event"] == "group" && e["change"] == "removed"
    });
    bob_tap.release();
    bob.expect("sent", |e| e["event"] == "sent" && e["id"] == id.as_str());
    let mut receipts = [
        delivered(&mut bob, &id, "alice"),
        delivered(&mut bob, &id, "carol"),
    ];
    receipts.sort_by_key(|r| r["delivered_to"].as_u64());
    assert_eq!(receipts[1]["delivered_to"], 2);
    assert_eq!(receipts[1]["recipients"], 2);
    assert!(
        bob.seen_of("withdrawn").is_empty(),
        "{:?}",
        bob.seen_of("withdrawn")
    );
}
