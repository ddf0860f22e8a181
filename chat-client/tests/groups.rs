//! Groups end to end: real headless clients (`--headless` processes) through the real
//! relay binary — delivery to every member once and in each sender's order, the member
//! who was offline throughout, removal, and restarts mid-conversation.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::rogue::behind_tap;
use common::{Client, Relay};
use serde_json::Value;

/// `group` event of `change` (by anyone) for the group named `name`.
fn group_event(c: &mut Client, name: &str, change: &str) -> Value {
    c.expect(&format!("group {change}"), |e| {
        e["event"] == "group" && e["name"] == name && e["change"] == change
    })
}

/// The texts of the next `n` group messages from anyone, grouped by sender in arrival order.
fn group_texts(c: &mut Client, group: &str, n: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_sender: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..n {
        let m = c.expect("group message", |e| {
            e["event"] == "message" && e["group"] == group
        });
        by_sender
            .entry(m["from"].as_str().unwrap().to_owned())
            .or_default()
            .push(m["text"].as_str().unwrap().to_owned());
    }
    by_sender
}

fn texts(who: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{who} says #{i}")).collect()
}

#[test]
fn five_members_one_offline_throughout_everyone_gets_everything_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    // eve registers, then stays away until the end.
    assert_eq!(Client::ready(relay.addr, "eve", &home("eve")).quit(), 0);
    let names = ["alice", "bob", "carol", "dave"];
    let mut clients: Vec<Client> = names
        .iter()
        .map(|n| Client::ready(relay.addr, n, &home(n)))
        .collect();

    clients[0].send("/group-create \"The Team\" bob carol dave eve");
    let created = group_event(&mut clients[0], "The Team", "created");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["by"], "alice");
    assert_eq!(created["admins"], serde_json::json!(["alice"]));
    assert_eq!(
        created["members"],
        serde_json::json!(["alice", "bob", "carol", "dave", "eve"])
    );
    for c in &mut clients[1..] {
        let joined = group_event(c, "The Team", "created");
        assert_eq!(joined["id"], id.as_str());
    }

    // Everyone online writes 5, by name and by id.
    for (i, c) in clients.iter_mut().enumerate() {
        for text in texts(names[i], 5) {
            let group = if i % 2 == 0 {
                "\"The Team\""
            } else {
                id.as_str()
            };
            c.send(&format!("/gmsg {group} {text}"));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let got = group_texts(c, &id, 15);
        for (j, sender) in names.iter().enumerate() {
            if i != j {
                assert_eq!(got[*sender], texts(sender, 5), "{} from {sender}", names[i]);
            }
        }
        assert_eq!(got.len(), 3);
    }
    // Each sender sees its messages delivered to the 3 online members, of 4.
    for c in &mut clients {
        for _ in 0..5 {
            c.expect("sent", |e| {
                e["event"] == "sent" && e["group"] == id.as_str()
            });
        }
        for _ in 0..15 {
            let d = c.expect("delivered", |e| {
                e["event"] == "delivered" && e["group"] == id.as_str()
            });
            assert_eq!(d["recipients"], 4);
        }
    }

    // eve logs in: the group, then the backlog, each sender's order kept, once.
    let mut eve = Client::ready(relay.addr, "eve", &home("eve"));
    group_event(&mut eve, "The Team", "created");
    let got = group_texts(&mut eve, &id, 20);
    for sender in names {
        assert_eq!(got[sender], texts(sender, 5), "eve from {sender}");
    }
    for c in &mut clients {
        for _ in 0..5 {
            let d = c.expect("delivered to eve", |e| {
                e["event"] == "delivered" && e["group"] == id.as_str() && e["to"] == "eve"
            });
            assert_eq!(d["delivered_to"], 4);
        }
    }
    // Nothing twice, even across a restart.
    eve.assert_no_more_messages(Duration::from_millis(1500));
    assert_eq!(eve.quit(), 0);
    let mut eve = Client::ready(relay.addr, "eve", &home("eve"));
    // Fellow members are not contacts until a 1:1 text: not even alice, who told eve of
    // the group (a 100-member group must not fill the contact list).
    let contacts = eve.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(contacts["users"], serde_json::json!([]));
    eve.assert_no_more_messages(Duration::from_millis(1500));
    // The history holds the system line and the 20 texts.
    eve.send(&format!("/group-history {id}"));
    let history = eve.expect("group_history", |e| e["event"] == "group_history");
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 21, "{items:#?}");
    assert_eq!(items[0]["system"], true);
    assert_eq!(items[0]["text"], "alice created the group “The Team”");
}

/// Whether `home`'s store holds `member`'s sending key `key_id` (any group).
fn holds_key(home: &std::path::Path, member: &str, key_id: u32) -> bool {
    let db = rusqlite::Connection::open(home.join("client.sqlite3")).unwrap();
    let mut stmt = db
        .prepare("SELECT keys FROM group_member_keys WHERE member = ?1")
        .unwrap();
    let rows: Vec<Vec<u8>> = stmt
        .query_map([member], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.iter().any(|blob| {
        chat_protocol::group::MemberKeys::from_bytes(blob)
            .unwrap()
            .holds(key_id)
    })
}

#[test]
fn a_removed_member_opens_nothing_sent_after_even_when_the_relay_forwards_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let (alice_tap, mut alice) = behind_tap(&relay, "alice", &home("alice"));
    let (carol_tap, mut carol) = behind_tap(&relay, "carol", &home("carol"));
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    alice.send("/group-create Team bob carol");
    let id = group_event(&mut alice, "Team", "created")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    group_event(&mut bob, "Team", "created");
    group_event(&mut carol, "Team", "created");
    for i in 0..3 {
        alice.send(&format!("/gmsg Team before #{i}"));
    }
    for c in [&mut bob, &mut carol] {
        let got = group_texts(c, &id, 3);
        assert_eq!(got["alice"], ["before #0", "before #1", "before #2"]);
    }
    let before = alice_tap.group_uploads().len();
    assert_eq!(before, 6, "3 messages, one envelope per member");

    alice.send("/group-remove Team carol");
    let removed = group_event(&mut carol, "Team", "removed");
    assert_eq!(removed["users"], serde_json::json!(["carol"]));
    assert_eq!(removed["active"], false);
    group_event(&mut bob, "Team", "removed");
    let marker = "AFTER-REMOVAL-7f3a";
    for i in 0..5 {
        alice.send(&format!("/gmsg Team {marker} #{i}"));
    }
    assert_eq!(
        group_texts(&mut bob, &id, 5)["alice"],
        (0..5).map(|i| format!("{marker} #{i}")).collect::<Vec<_>>()
    );
    // alice's client sends carol nothing after the removal; the relay forwards her
    // everything alice uploaded anyway, before and after.
    let uploads = alice_tap.group_uploads();
    assert!(
        uploads[before..].iter().all(|(to, _)| to == "bob"),
        "{uploads:?}"
    );
    for (n, (_, payload)) in uploads.iter().enumerate() {
        carol_tap.deliver(1 << 40 | n as u64, "alice", payload.clone());
    }
    // The new envelopes are under a new sending key carol never got.
    let old_keys: std::collections::BTreeSet<u32> = uploads[..before]
        .iter()
        .map(|(_, p)| {
            chat_protocol::group::GroupEnvelope::decode(p)
                .unwrap()
                .key_id
        })
        .collect();
    for (_, p) in &uploads[before..] {
        let key_id = chat_protocol::group::GroupEnvelope::decode(p)
            .unwrap()
            .key_id;
        assert!(
            !old_keys.contains(&key_id),
            "the key was not replaced after the removal"
        );
        assert!(
            !holds_key(&home("carol"), "alice", key_id),
            "carol holds the new key"
        );
    }
    let events = carol.drain(Duration::from_secs(2));
    assert!(
        !events.iter().any(|e| e["event"] == "message"),
        "carol opened something: {events:#?}"
    );
    assert!(
        !common::contains(&common::all_file_bytes(&home("carol")), marker.as_bytes()),
        "a text sent after the removal is in carol's store"
    );
    // And carol can no longer write to the group.
    carol.send("/gmsg Team still here?");
    carol.expect("not a member", |e| {
        e["event"] == "error" && e["code"] == "not_a_member"
    });
    bob.assert_no_more_messages(Duration::from_millis(500));
    // Added again, carol joins from the state alice gives her and reads what comes next —
    // still nothing sent while she was out.
    alice.send("/group-add Team carol");
    let added = group_event(&mut carol, "Team", "added");
    assert_eq!(added["active"], true);
    group_event(&mut bob, "Team", "added");
    alice.send("/gmsg Team welcome back");
    let first = carol.expect("message", |e| e["event"] == "message");
    assert_eq!(first["text"], "welcome back");
    assert_eq!(first["group"], id.as_str());
    assert!(!common::contains(
        &common::all_file_bytes(&home("carol")),
        marker.as_bytes()
    ));
}

/// The relay's own account, mallory, was a member and an admin; alice removed her. Over
/// real 1:1 channels she then sends every member an "add mallory", the replay of an old
/// removal she saw as a member, and a fork of the state in which she was still admin,
/// with an id ground below the removal's: each member refuses each, and nothing changes.
#[test]
fn members_refuse_an_injected_add_a_replayed_removal_and_a_fork() {
    use chat_protocol::e2e::Body;
    use chat_protocol::group::{ChangeKind, Membership};

    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let mut mallory = common::rogue::Mallory::connect(relay.addr, "mallory");
    let names = ["alice", "bob", "carol", "dave"];
    let mut clients: Vec<Client> = names
        .iter()
        .map(|n| Client::ready(relay.addr, n, &home(n)))
        .collect();
    let alice_key = mallory.key("alice");
    let next_change = |m: &mut common::rogue::Mallory| match m
        .body_where(|b| matches!(b, Body::GroupUpdate { .. }))
    {
        Body::GroupUpdate { change, .. } => *change,
        _ => unreachable!(),
    };

    clients[0].send("/group-create Team bob carol dave mallory");
    let create = next_change(&mut mallory);
    let mut mirror = Membership::from_create(create, &alice_key, 256).unwrap();
    let id = chat_client::api::id_hex(&mirror.current().id);
    for c in &mut clients {
        group_event(c, "Team", "created");
    }
    let mut changes = Vec::new();
    for (command, change) in [
        ("/group-promote Team mallory", "promoted"),
        ("/group-remove Team dave", "removed"),
        ("/group-add Team dave", "added"),
        ("/group-remove Team mallory", "removed"),
    ] {
        clients[0].send(command);
        let signed = next_change(&mut mallory);
        let key = alice_key.clone();
        assert!(matches!(
            mirror.receive(&signed, |_| Some(key.clone()), 256),
            chat_protocol::group::Received::Applied { .. }
        ));
        for c in &mut clients {
            group_event(c, "Team", change);
        }
        changes.push(signed);
    }
    let state = mirror.current().clone();
    assert!(!state.is_member(&mallory.name));
    let removal = changes[3].clone();

    // (1) "add mallory" on the current state, signed by mallory (no longer admin).
    let add = chat_protocol::group::Change {
        group: state.id,
        prev: mirror.head(),
        prev_version: state.version,
        author: mallory.name.clone(),
        created_ms: 1,
        kind: ChangeKind::Add {
            users: vec![mallory.name.clone()],
        },
    }
    .sign(&mut rand::rng(), &mallory.identity)
    .unwrap();
    // (2) the old removal of dave, replayed.
    let replay = changes[1].clone();
    // (3) a fork of the state before her removal, where she was admin, its id ground
    // below the removal's.
    let fork = (0..)
        .map(|t| {
            chat_protocol::group::Change {
                group: state.id,
                prev: removal.change.prev,
                prev_version: removal.change.prev_version,
                author: mallory.name.clone(),
                created_ms: t,
                kind: ChangeKind::Rename {
                    name: "pwned".into(),
                },
            }
            .sign(&mut rand::rng(), &mallory.identity)
            .unwrap()
        })
        .find(|f| f.id() < removal.id())
        .unwrap();
    for name in names {
        for change in [&add, &replay, &fork] {
            mallory.send_body(
                name,
                Body::GroupUpdate {
                    prior: None,
                    change: Box::new(change.clone()),
                },
            );
        }
    }
    for c in &mut clients {
        for reason in ["not_admin", "replayed", "forked"] {
            let refused = c.expect(reason, |e| e["event"] == "group_refused");
            assert_eq!(refused["reason"], reason, "{}", c.name);
            assert_eq!(refused["from"], "mallory");
            assert_eq!(refused["group"], id.as_str());
        }
        // Nothing changed: no group event came, and the group is as it was.
        let events = c.drain(Duration::from_millis(300));
        assert!(!events.iter().any(|e| e["event"] == "group"), "{events:#?}");
        c.send("/groups");
        let groups = c.expect("groups", |e| e["event"] == "groups");
        let g = &groups["items"][0];
        assert_eq!(g["name"], "Team", "{}", c.name);
        assert_eq!(g["version"], state.version);
        assert_eq!(
            g["members"],
            serde_json::json!(["alice", "bob", "carol", "dave"])
        );
        assert_eq!(g["admins"], serde_json::json!(["alice"]));
    }
}

#[test]
fn restarting_the_sender_and_a_recipient_mid_conversation_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let home = |n: &str| dir.path().join(n);
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    let mut carol = Client::ready(relay.addr, "carol", &home("carol"));
    alice.send("/group-create Team bob carol");
    let id = group_event(&mut alice, "Team", "created")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    group_event(&mut bob, "Team", "created");
    group_event(&mut carol, "Team", "created");
    let all: Vec<String> = (0..40).map(|i| format!("stream #{i}")).collect();
    for text in &all[..20] {
        alice.send(&format!("/gmsg Team {text}"));
    }
    // bob is killed after a few arrive; alice is killed once all 20 are queued, before
    // all are sent.
    let mut bob_got: Vec<String> = group_texts(&mut bob, &id, 3).remove("alice").unwrap();
    bob.kill();
    for _ in 0..20 {
        alice.expect("queued", |e| {
            e["event"] == "queued" && e["group"] == id.as_str()
        });
    }
    alice.kill();
    let mut alice = Client::ready(relay.addr, "alice", &home("alice"));
    for text in &all[20..] {
        alice.send(&format!("/gmsg Team {text}"));
    }
    let mut bob = Client::ready(relay.addr, "bob", &home("bob"));
    bob_got.extend(group_texts(&mut bob, &id, 37).remove("alice").unwrap());
    assert_eq!(bob_got, all, "bob: each once, in order");
    assert_eq!(group_texts(&mut carol, &id, 40)["alice"], all, "carol");
    bob.assert_no_more_messages(Duration::from_millis(1000));
    carol.assert_no_more_messages(Duration::from_millis(300));
    // alice's history: the 40, in order, each delivered to both (the receipts that came
    // while she was down included).
    loop {
        alice.send(&format!("/group-history {id}"));
        let history = alice.expect("history", |e| e["event"] == "group_history");
        let ours: Vec<&Value> = history["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["outgoing"] == true && i["system"] != true)
            .collect();
        let texts: Vec<&str> = ours.iter().map(|i| i["text"].as_str().unwrap()).collect();
        assert_eq!(texts, all.iter().map(String::as_str).collect::<Vec<_>>());
        if ours
            .iter()
            .all(|i| i["delivered_to"] == 2 && i["recipients"] == 2)
        {
            break;
        }
        // Not all receipted yet: wait for the next one.
        alice.expect("delivered", |e| {
            e["event"] == "delivered" && e["group"] == id.as_str()
        });
    }
}

/// 100 members (client cores in this process, the real relay binary): one message to
/// all. Prints the time to the last delivery and the bytes the sender uploaded (TLS
/// records, counted by a proxy in front of the relay).
#[test]
fn a_hundred_members_get_one_message_and_the_figures_are_printed() {
    use chat_client::{Command, ConnectionState, Event};
    use std::time::Instant;

    const MEMBERS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    // 100 accounts from one address at once: the relay's per-address limits on new
    // accounts and connections are opened up (the per-connection rate limit stays).
    let relay = Relay::start_with_config(
        "127.0.0.1:0",
        &dir.path().join("relay"),
        "(registrations: (per_hour: 100000, burst: 1000), \
          connect_rate: (per_second: 1000, burst: 1000), \
          pre_login: (max_per_address: 1024))",
    );
    let proxy = common::Proxy::start(relay.addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i:03}")).collect();
    // Started together: their identities are made in parallel.
    let mut peers: Vec<chat_client::ClientHandle> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let home = chat_client::home::Home::resolve(Some(dir.path().join(name))).unwrap();
            let server = if i == 0 { proxy.addr } else { relay.addr };
            let mut config = chat_client::ClientConfig::new(
                home,
                server.to_string(),
                chat_protocol::Username::parse(name).unwrap(),
            );
            config.identity_bits = 2048;
            let _guard = rt.enter();
            chat_client::spawn(config, || {})
        })
        .collect();
    let wait_all = |peers: &mut [chat_client::ClientHandle],
                    what: &str,
                    pred: &dyn Fn(&Event) -> bool|
     -> Instant {
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut done = vec![false; peers.len()];
        let mut last = Instant::now();
        while !done.iter().all(|d| *d) {
            assert!(
                Instant::now() < deadline,
                "not every member saw {what}: {done:?}"
            );
            let mut idle = true;
            for (p, d) in peers.iter_mut().zip(done.iter_mut()) {
                while let Ok(e) = p.events.try_recv() {
                    idle = false;
                    if !*d && pred(&e) {
                        *d = true;
                        last = Instant::now();
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        last
    };
    wait_all(&mut peers, "connected", &|e| {
        matches!(
            e,
            Event::Connection {
                state: ConnectionState::Connected,
                ..
            }
        )
    });
    peers[0]
        .commands
        .send(Command::GroupCreate {
            name: "Hundred".into(),
            members: names[1..].to_vec(),
        })
        .unwrap();
    wait_all(
        &mut peers,
        "the group",
        &|e| matches!(e, Event::Group(g) if g.name == "Hundred" && g.members.len() == MEMBERS),
    );
    let send = |peers: &[chat_client::ClientHandle], text: &str| {
        peers[0]
            .commands
            .send(Command::GroupSend {
                group: "Hundred".into(),
                text: text.into(),
            })
            .unwrap()
    };
    // A first message hands out the sending key; the second is the one measured.
    let got = |text: &'static str| move |e: &Event| matches!(e, Event::GroupMessage { text: t, .. } if t == text);
    send(&peers, "warm-up");
    wait_all(&mut peers[1..], "the warm-up", &got("warm-up"));
    // As after a pause: the sender's rate-limit bucket at the relay is full again.
    std::thread::sleep(Duration::from_secs(2));
    while peers[0].events.try_recv().is_ok() {}
    let uploaded_before = proxy.upstream_bytes.lock().unwrap().len();
    let start = Instant::now();
    send(&peers, "measured");
    // Whichever comes first: the relay accepting every copy, or the last delivery.
    let (mut sent_at, mut last) = (None, None);
    let (sender, members) = peers.split_at_mut(1);
    let mut waiting: Vec<bool> = vec![true; members.len()];
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent_at.is_none() || last.is_none() {
        assert!(
            Instant::now() < deadline,
            "not delivered to all: {waiting:?}"
        );
        while let Ok(e) = sender[0].events.try_recv() {
            if matches!(e, Event::GroupSent { .. }) {
                sent_at = Some(Instant::now());
            }
        }
        for (p, w) in members.iter_mut().zip(waiting.iter_mut()) {
            while let Ok(e) = p.events.try_recv() {
                if got("measured")(&e) {
                    assert!(*w, "a member got it twice");
                    *w = false;
                }
            }
        }
        if last.is_none() && waiting.iter().all(|w| !w) {
            last = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let uploaded = proxy.upstream_bytes.lock().unwrap().len() - uploaded_before;
    println!(
        "{MEMBERS}-member group, one message: the relay accepted every copy after {} ms, the \
         last member had it after {} ms; the sender uploaded {uploaded} bytes ({} per member)",
        sent_at.unwrap().duration_since(start).as_millis(),
        last.unwrap().duration_since(start).as_millis(),
        uploaded / (MEMBERS - 1)
    );
    // The envelope went up once, not once per member: one SendMany of a ~0.5 KB envelope
    // and 99 names, plus the sender's Acks of receipts coming back meanwhile, stays far
    // under what a Send per member took (about 58 KB).
    assert!(
        uploaded < 20_000,
        "{uploaded} bytes uploaded for one message"
    );
    // Each once.
    std::thread::sleep(Duration::from_millis(500));
    for p in &mut peers[1..] {
        while let Ok(e) = p.events.try_recv() {
            assert!(!got("measured")(&e), "a member got it twice");
        }
    }

    // Six written at once (594 copies, more than the relay keeps awaiting their answer on
    // one connection before it sheds, 512; the sender keeps fewer than 256 copies plus
    // one message in flight): none is refused, and every member has all six, in order.
    const BURST: usize = 6;
    for n in 0..BURST {
        send(&peers, &format!("burst {n}"));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); MEMBERS - 1];
    while seen.iter().any(|s| s.len() < BURST) {
        assert!(
            Instant::now() < deadline,
            "the burst did not arrive: {seen:?}"
        );
        while let Ok(e) = peers[0].events.try_recv() {
            if let Event::Error { code, message } = &e {
                assert_ne!(code, "server_busy", "a group send was shed: {message}");
            }
        }
        for (p, s) in peers[1..].iter_mut().zip(seen.iter_mut()) {
            while let Ok(e) = p.events.try_recv() {
                if let Event::GroupMessage { text, .. } = e
                    && text.starts_with("burst")
                {
                    s.push(text);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let want: Vec<String> = (0..BURST).map(|n| format!("burst {n}")).collect();
    assert!(seen.iter().all(|s| *s == want), "{seen:?}");
}
