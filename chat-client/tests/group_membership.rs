//! Group membership through the real relay and headless clients, where it can go wrong:
//! two admins adding different people at once (the member added by the change that loses
//! the race must end in the same group as everyone), two admins removing each other at
//! once (the loser is told, its history says so), a member back from offline with a
//! message queued before it learnt of a removal (the removed member gets nothing), and
//! adding people who do not exist (nothing changes, one error).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Client, Relay, create_group};
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
    // One command, one error: the failed lookup is not told again on its own.
    alice.send("/groups");
    alice.expect("groups", |e| e["event"] == "groups");
    let errors = alice.seen_of("error").len();
    assert_eq!(errors, 2, "one error per refused command");
    assert!(alice.seen_of("no_such_user").is_empty());
    // Past the size limit: refused before anyone is looked up, with one error.
    let many: Vec<String> = (0..300).map(|i| format!("ghost{i}")).collect();
    alice.send(&format!("/group-create Big {}", many.join(" ")));
    alice.expect("too many", |e| {
        e["event"] == "error"
            && e["code"] == "invalid_group_change"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("at most 256"))
    });
    alice.send("/groups");
    alice.expect("groups", |e| e["event"] == "groups");
    assert_eq!(
        alice.seen_of("error").len(),
        3,
        "still one error per command"
    );
    // A name that reads as a group id is refused (it would shadow that group).
    alice.send(&format!("/group-create {} bob", "ab".repeat(16)));
    alice.expect("hex name refused", |e| {
        e["event"] == "error" && e["code"] == "invalid_group_change"
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

/// Rows of `table` in a client's store, optionally only those whose `member` is `member`.
fn rows(home: &std::path::Path, table: &str, member: Option<&str>) -> i64 {
    let db = rusqlite::Connection::open(home.join("client.sqlite3")).unwrap();
    match member {
        Some(m) => db.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE member = ?1"),
            [m],
            |r| r.get(0),
        ),
        None => db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)),
    }
    .unwrap()
}

/// A relay and ready clients named `names`, each with its home under `dir`.
fn start(dir: &std::path::Path, names: [&str; 3]) -> (Relay, [Client; 3]) {
    let relay = Relay::start("127.0.0.1:0", &dir.join("relay"));
    let clients = names.map(|n| Client::ready(relay.addr, n, &dir.join(n)));
    (relay, clients)
}

#[test]
fn a_member_back_from_offline_applies_a_removal_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let home = |n: &str| dir.path().join(n);
    let (relay, [mut alice, mut bob, mut dave]) = start(dir.path(), ["alice", "bob", "dave"]);
    let id = create_group("Team", &mut [&mut alice, &mut bob, &mut dave]);
    assert_eq!(bob.quit(), 0);
    assert_eq!(dave.quit(), 0);
    alice.send("/group-remove Team dave");
    alice.expect("removed dave", |e| {
        e["event"] == "group" && e["change"] == "removed"
    });
    // The relay has the removal for bob once a text queued after it is accepted (the
    // outbox keeps each contact's order).
    alice.send("/msg bob the removal is on its way");
    alice.expect("sent", |e| e["event"] == "sent" && e["to"] == "bob");

    // Bob writes while the relay is away: queued for the members he knows, dave too.
    let (addr, data) = relay.kill();
    let mut bob = Client::start(addr, "bob", &home("bob"));
    bob.send(&format!("/gmsg {id} written before bob knew"));
    let queued = bob.expect("queued", |e| {
        e["event"] == "queued" && e["group"] == id.as_str()
    });
    assert_eq!(queued["recipients"], 2, "queued for alice and dave");
    let _relay = Relay::start(&addr.to_string(), &data);

    // Connected, bob reads the removal before anything goes out: dave's copy is
    // withdrawn, alice's delivered, and the message counts 1 of 1.
    bob.expect("the removal", |e| {
        e["event"] == "group" && e["change"] == "removed" && e["users"][0] == "dave"
    });
    let withdrawn = bob.expect("dave's copy withdrawn", |e| {
        e["event"] == "withdrawn" && e["member"] == "dave"
    });
    assert_eq!(withdrawn["recipients"], 1, "{withdrawn}");
    alice.expect("bob's message", |e| {
        e["event"] == "message" && e["text"] == "written before bob knew"
    });
    bob.expect("delivered to 1 of 1", |e| {
        e["event"] == "delivered" && e["delivered_to"] == 1 && e["recipients"] == 1
    });

    // Dave returns: he learns he was removed, and nothing of bob's reached him — no
    // envelope held, no sending key. (Alice's 1:1 text, sent after bob's message was
    // delivered, comes after anything bob could have sent him.)
    alice.send("/msg dave after everything");
    alice.expect("sent", |e| e["event"] == "sent");
    let mut dave = Client::start(addr, "dave", &home("dave"));
    dave.expect("removed", |e| {
        e["event"] == "group" && e["change"] == "removed" && e["active"] == false
    });
    dave.expect("alice's text", |e| {
        e["event"] == "message" && e["text"] == "after everything"
    });
    assert_eq!(dave.quit(), 0);
    assert_eq!(rows(&home("dave"), "group_held", None), 0, "nothing held");
    assert_eq!(
        rows(&home("dave"), "group_member_keys", Some("bob")),
        0,
        "dave holds no key of bob's"
    );
}

#[test]
fn two_admins_removing_each_other_at_once_the_loser_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, [mut alice, mut bob, mut carol]) = start(dir.path(), ["alice", "bob", "carol"]);
    let id = create_group("Conc", &mut [&mut alice, &mut bob, &mut carol]);
    alice.send("/group-promote Conc bob");
    for m in [&mut alice, &mut bob, &mut carol] {
        m.expect("bob is admin", |e| {
            e["event"] == "group" && e["change"] == "promoted"
        });
    }
    let (addr, data) = relay.kill();
    alice.send("/group-remove Conc bob");
    bob.send("/group-remove Conc alice");
    for m in [&mut alice, &mut bob] {
        m.expect("own removal applied", |e| {
            e["event"] == "group" && e["change"] == "removed"
        });
    }
    let _relay = Relay::start(&addr.to_string(), &data);

    // Alice is the senior admin: her change counts first. Everyone ends with alice and
    // carol; bob, whose change was applied on his side first, is told it was undone.
    let final_members = BTreeSet::from(["alice".to_owned(), "carol".to_owned()]);
    for m in [&mut bob, &mut carol] {
        m.expect("alice and carol remain", |e| {
            e["event"] == "group" && e["id"] == id.as_str() && members(e) == final_members
        });
    }
    // Alice's own change stands: bob's arrives on top of it and is refused.
    alice.expect("bob's change refused", |e| {
        e["event"] == "group_refused" && e["by"] == "bob" && e["reason"] == "forked"
    });
    alice.send("/groups");
    let groups = alice.expect("groups", |e| {
        e["event"] == "groups" && e["items"][0]["id"] == id.as_str()
    });
    assert_eq!(members(&groups["items"][0]), final_members);
    bob.expect("bob's change undone", |e| {
        e["event"] == "group" && e["change"] == "undone" && e["by"] == "bob"
    });
    bob.send(&format!("/group-history {id}"));
    let history = bob.expect("history", |e| e["event"] == "group_history");
    let lines: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["text"].as_str().unwrap())
        .collect();
    let removed_alice = lines.iter().position(|l| *l == "bob removed alice");
    let undone = lines
        .iter()
        .position(|l| l.starts_with("undone: “bob removed alice”"));
    assert!(
        removed_alice.is_some() && undone > removed_alice,
        "bob's history tells what happened: {lines:?}"
    );
    assert!(lines.contains(&"alice removed bob"), "{lines:?}");
}

/// One member's queue at the relay is full: of each group message, the relay refuses only
/// that member's copy (`recipient_queue_full` in the `SendMany`'s outcomes). The others
/// get every message at once; the sender is told once that this member's copies wait;
/// once the member is back and has read its queue, the rest arrive: every message once,
/// in order, and the sender sees each delivered to both.
#[test]
fn a_member_whose_queue_is_full_gets_its_copies_later_and_the_others_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = Relay::start_with_config(
        "127.0.0.1:0",
        &data,
        "(queue: (max_envelopes_per_user: 5, max_sender_share: 1.0))",
    );
    let home = |n: &str| dir.path().join(n);
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    let mut carol = Client::ready(relay.addr, "carol", &home("carol"));
    alice.send("/group-create Queue bob carol");
    let created = alice.expect("created", |e| {
        e["event"] == "group" && e["change"] == "created"
    });
    let id = created["id"].as_str().unwrap().to_owned();
    for m in [&mut bob, &mut carol] {
        m.expect("joined", |e| {
            e["event"] == "group" && e["id"] == id.as_str()
        });
    }
    // The sending key reaches both before carol leaves.
    alice.send("/gmsg Queue first");
    for m in [&mut bob, &mut carol] {
        m.expect("first", |e| e["event"] == "message" && e["text"] == "first");
    }
    alice.expect("first delivered to carol", |e| {
        e["event"] == "delivered" && e["to"] == "carol"
    });
    assert_eq!(carol.quit(), 0);

    let texts: Vec<String> = (0..10).map(|i| format!("q #{i}")).collect();
    for t in &texts {
        alice.send(&format!("/gmsg Queue {t}"));
    }
    // Bob gets all ten at once, in order, while carol's queue fills.
    for t in &texts {
        let m = bob.expect("a text", |e| {
            e["event"] == "message" && e["group"] == id.as_str()
        });
        assert_eq!(m["text"], t.as_str());
    }
    let told = alice.expect("carol's copies wait", |e| {
        e["event"] == "error" && e["code"] == "recipient_queue_full"
    });
    let message = told["message"].as_str().unwrap();
    assert!(
        message.contains("carol") && message.contains("tried again"),
        "{message}"
    );

    // Carol comes back: what the relay held, then the rest, retried once she is online;
    // each once.
    let mut carol = Client::ready(relay.addr, "carol", &home("carol"));
    for t in &texts {
        let m = carol.expect_within("a text", Duration::from_secs(60), |e| {
            e["event"] == "message" && e["group"] == id.as_str()
        });
        assert_eq!(m["text"], t.as_str(), "in order, none twice");
    }
    carol.assert_no_more_messages(Duration::from_secs(2));
    for t in &texts {
        let queued = alice
            .seen_of("queued")
            .into_iter()
            .find(|e| e["group"] == id.as_str() && e["text"] == t.as_str())
            .expect("queued");
        let msg = queued["id"].as_str().unwrap().to_owned();
        alice.expect_within("delivered to carol", Duration::from_secs(60), |e| {
            e["event"] == "delivered" && e["to"] == "carol" && e["id"] == msg.as_str()
        });
    }
    assert_eq!(
        alice.seen_of("error").len(),
        1,
        "told once, not once per copy: {:#?}",
        alice.seen_of("error")
    );
}
