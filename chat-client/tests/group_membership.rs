//! Group membership through the real relay and headless clients, where it can go wrong:
//! two admins adding different people at once (the member added by the change that loses
//! the race must end in the same group as everyone), and adding people who do not exist
//! (nothing changes).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Client, Relay};
use serde_json::Value;

/// The members a `group` event lists.
fn members(e: &Value) -> BTreeSet<String> {
    e["members"]
        .as_array()
        .map(|m| m.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn members_added_by_two_admins_at_once_all_end_in_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = Relay::start("127.0.0.1:0", &data);
    let home = |n: &str| dir.path().join(n);
    let names = ["alice", "bob", "dave", "frank", "grace"];
    let mut c: Vec<Client> = names
        .iter()
        .map(|n| Client::ready(relay.addr, n, &home(n)))
        .collect();
    let [alice, bob, dave, _, _] = c.as_mut_slice() else {
        unreachable!()
    };

    alice.send("/group-create Team bob dave");
    let created = alice.expect("created", |e| {
        e["event"] == "group" && e["change"] == "created"
    });
    let id = created["id"].as_str().unwrap().to_owned();
    for m in [&mut *bob, &mut *dave] {
        m.expect("joined", |e| {
            e["event"] == "group" && e["id"] == id.as_str()
        });
    }
    alice.send("/group-promote Team dave");
    for m in [&mut *alice, &mut *bob, &mut *dave] {
        m.expect("promoted", |e| {
            e["event"] == "group" && e["change"] == "promoted"
        });
    }
    // Each admin knows the one it will add (keys pinned), then the relay goes away and
    // both add at once: two changes of the same state.
    alice.send("/safety frank");
    alice.expect("frank's key", |e| e["event"] == "safety");
    dave.send("/safety grace");
    dave.expect("grace's key", |e| e["event"] == "safety");
    let (addr, data) = relay.kill();
    alice.send("/group-add Team frank");
    dave.send("/group-add Team grace");
    alice.expect("added frank", |e| {
        e["event"] == "group" && e["change"] == "added"
    });
    dave.expect("added grace", |e| {
        e["event"] == "group" && e["change"] == "added"
    });
    let _relay = Relay::start(&addr.to_string(), &data);

    // One change wins everywhere; the loser's author makes it again on the winner, and
    // the member it added — who first joined on the losing branch — follows. Everyone
    // ends with all five, at the same version.
    let everyone: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let mut versions = BTreeSet::new();
    for m in c.iter_mut() {
        let last = m.expect("all five in the group", |e| {
            e["event"] == "group" && e["id"] == id.as_str() && members(e) == everyone
        });
        versions.insert(last["version"].as_u64().unwrap());
        assert!(last["active"].as_bool().unwrap(), "{} is in", m.name);
    }
    assert_eq!(versions.len(), 1, "one version everywhere: {versions:?}");

    // Both newcomers write; each message reaches the four others, once.
    let [alice, bob, dave, frank, grace] = c.as_mut_slice() else {
        unreachable!()
    };
    frank.send(&format!("/gmsg {id} hi from frank"));
    grace.send(&format!("/gmsg {id} hi from grace"));
    for (writer, text) in [(&mut *frank, "frank"), (&mut *grace, "grace")] {
        let queued = writer.expect("queued", |e| {
            e["event"] == "queued" && e["group"] == id.as_str()
        });
        assert_eq!(queued["recipients"], 4, "{text} writes to the four others");
    }
    for m in [alice, bob, dave] {
        let mut from = BTreeSet::new();
        for _ in 0..2 {
            let msg = m.expect("a newcomer's message", |e| {
                e["event"] == "message" && e["group"] == id.as_str()
            });
            from.insert(msg["from"].as_str().unwrap().to_owned());
        }
        assert_eq!(from, BTreeSet::from(["frank".into(), "grace".into()]));
        m.assert_no_more_messages(Duration::from_millis(500));
    }
    frank.expect("grace's message", |e| {
        e["event"] == "message" && e["from"] == "grace"
    });
    grace.expect("frank's message", |e| {
        e["event"] == "message" && e["from"] == "frank"
    });
}

#[test]
fn adding_people_who_do_not_exist_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    // (The list every client gets after ready: none yet.)
    alice.expect("groups at start", |e| e["event"] == "groups");

    // A new group with a member nobody registered: refused, no group made.
    alice.send("/group-create Ghosts bob nobody_here");
    let e = alice.expect("unknown user, nothing changed", |e| {
        e["event"] == "error"
            && e["code"] == "unknown_user"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("not changed"))
    });
    assert!(
        e["message"].as_str().unwrap().contains("nobody_here"),
        "{e}"
    );
    alice.send("/groups");
    let groups = alice.expect("groups", |e| e["event"] == "groups");
    assert_eq!(groups["items"], serde_json::json!([]), "no group was made");

    // An existing group: adding a stranger among real people changes nothing either.
    alice.send("/group-create Team bob");
    let created = alice.expect("created", |e| {
        e["event"] == "group" && e["change"] == "created"
    });
    bob.expect("joined", |e| {
        e["event"] == "group" && e["change"] == "created"
    });
    alice.send("/group-add Team nobody_here");
    alice.expect("unknown user", |e| {
        e["event"] == "error"
            && e["code"] == "unknown_user"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("not changed"))
    });
    alice.send("/groups");
    let groups = alice.expect("groups", |e| e["event"] == "groups");
    let team = &groups["items"][0];
    assert_eq!(team["version"], created["version"], "no change was made");
    assert_eq!(team["members"], serde_json::json!(["alice", "bob"]));
    // Nobody was told of a change: bob sees none, and no group event came to alice.
    assert!(
        bob.drain(Duration::from_millis(800))
            .iter()
            .all(|e| e["event"] != "group"),
        "bob was told of no change"
    );
    assert_eq!(
        alice
            .seen_of("group")
            .iter()
            .filter(|e| e["change"] == "added")
            .count(),
        0
    );
    // The group works as before: delivered to 1 of 1.
    alice.send("/gmsg Team still fine");
    bob.expect("message", |e| {
        e["event"] == "message" && e["text"] == "still fine"
    });
}
