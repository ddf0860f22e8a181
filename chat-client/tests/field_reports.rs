//! Cases from public bug reports of other chat apps (issue "Field reports"), replayed
//! against the real relay binary and headless client processes on loopback. Each test is
//! named after the fault it rules out and asserts the right value.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Client, PATIENCE, Relay, dirs, history};

fn reconnects(client: &Client) -> usize {
    client
        .seen_of("connection")
        .iter()
        .filter(|e| e["state"] == "reconnecting")
        .count()
}

/// Item 1: a message larger than the relay's frame limit ends on its own with a clear
/// reason naming the limit; it never blocks what comes after it, and never makes the client
/// reconnect. A message that fits that relay's frames is delivered. (Texts are padded to
/// 256 B / 1 KiB / 4 KiB / 16 KiB buckets, so under a 16 KiB frame the largest is ~4 KB.)
#[test]
fn a_message_over_the_relays_frame_limit_fails_alone_and_blocks_nothing() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start_with_config("127.0.0.1:0", &relay_dir, "(max_frame_bytes: 16384)");
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let fits = "y".repeat(3_000);
    let too_big = "z".repeat(5_000);
    alice.send(&format!("/msg bob {fits}"));
    alice.send(&format!("/msg bob {too_big}"));
    alice.send("/msg bob short");
    let refused = alice.expect("the big one refused", |e| {
        (e["event"] == "error" || e["event"] == "failed") && e["message"].is_string()
    });
    let why = refused["message"].as_str().unwrap();
    assert!(why.contains("16384"), "names the relay's limit: {why}");
    assert!(why.contains("4072"), "says how long a text may be: {why}");
    // The window's composer learns the same limit from the connection event.
    let connected = alice
        .seen_of("connection")
        .into_iter()
        .find(|e| e["state"] == "connected")
        .unwrap();
    assert_eq!(connected["max_text_bytes"], 4072);
    assert_eq!(
        bob.texts_from("alice", 2),
        vec![fits.clone(), "short".to_owned()]
    );
    bob.assert_no_more_messages(Duration::from_millis(500));
    alice.expect("short delivered", |e| e["event"] == "delivered");
    alice.drain(Duration::from_millis(300));
    assert_eq!(
        reconnects(&alice),
        0,
        "a refused message never costs a reconnect"
    );
    let texts: Vec<String> = history(&mut alice, "bob")
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !texts.contains(&too_big),
        "nothing too big waits in the outbox"
    );
}

/// Item 2: a line that is not UTF-8 is an `invalid_command` error; the client keeps
/// running and the next line is sent.
#[test]
fn a_line_that_is_not_utf8_is_an_error_and_the_client_keeps_going() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send_bytes(b"/msg bob bad \xff\n/msg bob after\n");
    let err = alice.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "invalid_command");
    assert!(err["message"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(bob.message_from("alice")["text"], "after");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert!(alice.exited().is_none(), "still running");
    assert_eq!(alice.quit(), 0);
}

/// Item 4: a note to oneself is one history item, `delivered`, shown once.
#[test]
fn a_note_to_self_is_one_delivered_history_item() {
    let (_dir, relay_dir, a, _b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg alice remember the milk");
    let queued = alice.expect("queued", |e| e["event"] == "queued");
    alice.expect("delivered", |e| e["event"] == "delivered");
    alice.drain(Duration::from_millis(300));
    let items = history(&mut alice, "alice");
    assert_eq!(items.len(), 1, "one item: {items:#?}");
    assert_eq!(items[0]["id"], queued["id"]);
    assert_eq!(items[0]["status"], "delivered");
    assert_eq!(items[0]["text"], "remember the milk");
    assert!(
        alice.seen_of("message").is_empty(),
        "a note is not also a received message"
    );
}

/// Item 7: names that do not exist never become contacts nor take presence slots, across
/// a restart; the real conversation is followed (its presence arrives).
#[test]
fn failed_sends_never_become_contacts() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let zed_home = a.parent().unwrap().join("zed");
    let mut zed = Client::ready(relay.addr, "zed", &zed_home);
    const GHOSTS: usize = 40;
    for n in 0..GHOSTS {
        alice.send(&format!("/msg ghost{n:04} hello?"));
    }
    let deadline = Instant::now() + PATIENCE;
    while alice.seen_of("failed").len() < GHOSTS && Instant::now() < deadline {
        alice.drain(Duration::from_millis(100));
    }
    assert_eq!(alice.seen_of("failed").len(), GHOSTS);
    // Each name is also reported as not existing, by name.
    let missing = alice.seen_of("no_such_user");
    assert_eq!(missing.len(), GHOSTS, "{missing:?}");
    assert_eq!(missing[0]["user"], "ghost0000");
    assert!(
        alice
            .seen_of("failed")
            .iter()
            .all(|e| e["reason"] == "unknown_user")
    );
    alice.send("/msg zed hi zed");
    assert_eq!(zed.message_from("alice")["text"], "hi zed");
    assert_eq!(alice.quit(), 0);
    drop(zed);
    let _ = b;
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(contacts["users"], serde_json::json!(["zed"]));
    alice.expect("zed's presence", |e| {
        e["event"] == "presence" && e["user"] == "zed"
    });
    alice.drain(Duration::from_millis(300));
    assert!(
        alice.seen_of("error").is_empty(),
        "no watch_limit or other error: {:?}",
        alice.seen_of("error")
    );
}

/// Item 17: for every message the events come in the order queued → sent → delivered,
/// even with a recipient fast enough to receipt before the relay's `Ok` is read.
#[test]
fn every_message_is_queued_then_sent_then_delivered() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    const N: usize = 60;
    for n in 0..N {
        alice.send(&format!("/msg bob fast {n}"));
    }
    bob.texts_from("alice", N);
    let deadline = Instant::now() + PATIENCE;
    while alice.seen_of("delivered").len() < N && Instant::now() < deadline {
        alice.drain(Duration::from_millis(100));
    }
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for e in &alice.seen {
        let kind = e["event"].as_str().unwrap_or_default();
        if ["queued", "sent", "delivered"].contains(&kind) {
            order
                .entry(e["id"].as_str().unwrap().to_owned())
                .or_default()
                .push(kind.to_owned());
        }
    }
    assert_eq!(order.len(), N);
    for (id, kinds) in order {
        assert_eq!(kinds, ["queued", "sent", "delivered"], "message {id}");
    }
}

/// Item 7, the limit: with more contacts than a session may follow, the real conversation
/// is followed first and the user is told who is not followed (by name and count).
#[test]
fn past_the_watch_limit_real_conversations_are_followed_and_the_rest_named() {
    let (_dir, relay_dir, a, _b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let zed_home = a.parent().unwrap().join("zed");
    let mut zed = Client::ready(relay.addr, "zed", &zed_home);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg zed hi zed");
    assert_eq!(zed.message_from("alice")["text"], "hi zed");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(alice.quit(), 0);
    // 1,030 more contacts, all sorting before "zed" and none with a conversation.
    let extra = chat_protocol::message::MAX_WATCHED + 6;
    {
        let db = rusqlite::Connection::open(a.join("client.sqlite3")).unwrap();
        let mut insert = db
            .prepare("INSERT INTO contacts (username, pinned_key) VALUES (?1, x'00')")
            .unwrap();
        for n in 0..extra {
            insert.execute([format!("a{n:04}")]).unwrap();
        }
    }
    let mut alice = Client::start(relay.addr, "alice", &a);
    let warning = alice.expect("watch_limit", |e| {
        e["event"] == "warning" && e["code"] == "watch_limit"
    });
    let text = warning["message"].as_str().unwrap();
    assert!(text.contains("(7 in all)"), "{text}");
    assert!(text.contains("a1029") && !text.contains("zed"), "{text}");
    let presence = alice.expect("zed's presence", |e| {
        e["event"] == "presence" && e["user"] == "zed"
    });
    assert_eq!(presence["online"], true);
    alice.drain(Duration::from_millis(300));
    assert!(
        alice.seen_of("error").is_empty(),
        "{:?}",
        alice.seen_of("error")
    );
}

/// Item 6: a damaged `settings.ron` (empty, truncated) is a warning, never a reason not to
/// start; the command line's options are used, and the file is rewritten only when
/// something changes.
#[test]
fn a_damaged_settings_file_is_a_warning_and_the_client_starts() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let alice = Client::ready(relay.addr, "alice", &a);
    assert_eq!(alice.quit(), 0);
    for damaged in ["", "(server: \"127.0.0.1:1\", user"] {
        std::fs::write(a.join("settings.ron"), damaged).unwrap();
        let mut alice = Client::start(relay.addr, "alice", &a);
        let warning = alice.expect("warning", |e| e["event"] == "warning");
        assert_eq!(warning["code"], "settings_unreadable");
        assert!(
            warning["message"]
                .as_str()
                .unwrap()
                .contains("settings.ron")
        );
        alice.expect("ready", |e| e["event"] == "ready");
        alice.send("/msg bob still here");
        assert_eq!(bob.message_from("alice")["text"], "still here");
        assert_eq!(alice.quit(), 0);
    }
}

/// Item 14: a key marked verified is known as verified from the start of the next run
/// (the `contacts` event says so), not only once the safety number is asked for again.
#[test]
fn the_verified_mark_survives_a_restart() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let _bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    alice.send("/verify bob");
    alice.send("/safety bob");
    let safety = alice.expect("verified", |e| {
        e["event"] == "safety" && e["verified"] == true
    });
    assert_eq!(safety["user"], "bob");
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(contacts["users"], serde_json::json!(["bob"]));
    assert_eq!(contacts["verified"], serde_json::json!(["bob"]));
}

/// Item 12: contacts can be archived (kept, listed apart, back with a new message) and
/// removed (conversation deleted, off the list across restarts, key still pinned, back
/// when they write again); a name that is not a contact is refused.
#[test]
fn contacts_can_be_archived_and_removed() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg bob one");
    assert_eq!(bob.message_from("alice")["text"], "one");
    alice.expect("delivered", |e| e["event"] == "delivered");

    alice.send("/archive bob");
    let done = alice.expect("archived", |e| e["event"] == "contact_listing");
    assert_eq!(
        (&done["user"], &done["listing"]),
        (&"bob".into(), &"archived".into())
    );
    alice.send("/archive nobody");
    let refused = alice.expect("refused", |e| e["event"] == "error");
    assert_eq!(refused["code"], "not_a_contact");
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(
        contacts["users"],
        serde_json::json!(["bob"]),
        "still a contact"
    );
    assert_eq!(contacts["archived"], serde_json::json!(["bob"]));
    alice.connected();
    // A new message brings bob back to the list.
    bob.send("/msg alice two");
    assert_eq!(alice.message_from("bob")["text"], "two");
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(contacts["archived"], serde_json::json!([]));
    alice.connected();

    alice.send("/remove bob");
    let done = alice.expect("removed", |e| e["event"] == "contact_listing");
    assert_eq!(done["listing"], "removed");
    assert!(
        history(&mut alice, "bob").is_empty(),
        "the conversation is deleted"
    );
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(
        contacts["users"],
        serde_json::json!([]),
        "off the list after a restart"
    );
    alice.connected();
    // bob writes again: the message arrives under the key still pinned (no key change
    // to accept), and bob is a contact again.
    bob.send("/msg alice three");
    assert_eq!(alice.message_from("bob")["text"], "three");
    assert!(alice.seen_of("key_changed").is_empty());
    let items = history(&mut alice, "bob");
    assert_eq!(
        items.len(),
        1,
        "only what came after the removal: {items:?}"
    );
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::start(relay.addr, "alice", &a);
    let contacts = alice.expect("contacts", |e| e["event"] == "contacts");
    assert_eq!(contacts["users"], serde_json::json!(["bob"]));
}

/// Item 19: a relay address without a host, and a port where something else answers,
/// fail at once with what to do, instead of being retried forever.
#[test]
fn a_wrong_server_address_or_port_fails_clearly() {
    let (_dir, _relay_dir, a, _b) = dirs();
    let exe = env!("CARGO_BIN_EXE_chat-client");
    let out = std::process::Command::new(exe)
        .args([
            "--headless",
            "--server",
            "65432",
            "--user",
            "alice",
            "--home",
        ])
        .arg(&a)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HOST:PORT") && err.contains("127.0.0.1:65432"),
        "{err}"
    );
    // Something that is not a relay: it answers with text, like an HTTP server.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::Write;
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let mut alice = Client::start(addr, "alice", &a);
    let err = alice.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "not_a_relay");
    assert!(err["message"].as_str().unwrap().contains("65432"), "{err}");
    alice.drain(Duration::from_millis(200));
    assert_eq!(reconnects(&alice), 0);
    assert_eq!(
        alice.wait_exit(),
        1,
        "no retrying a port that is not a relay"
    );
}

/// Item 19 (found by a helper): a server that waits for its client to speak first (an
/// HTTP server, say) never answers the Hello; after two silent connections the client
/// says it is not a relay and stops, instead of retrying forever.
#[test]
fn a_port_that_stays_silent_is_not_a_relay() {
    let (_dir, _relay_dir, a, _b) = dirs();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // open, silent
        }
    });
    let mut alice = Client::start(addr, "alice", &a);
    let deadline = Instant::now() + Duration::from_secs(60);
    while alice.seen_of("error").is_empty() && Instant::now() < deadline {
        alice.drain(Duration::from_millis(500));
    }
    let errors = alice.seen_of("error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["code"], "not_a_relay");
    assert_eq!(reconnects(&alice), 1, "one retry, then it stops");
    assert_eq!(alice.wait_exit(), 1);
}

/// Item 19: the window without a display says to use --headless.
#[test]
fn no_display_says_to_use_headless() {
    let (_dir, _relay_dir, a, _b) = dirs();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-client"))
        .args(["--user", "alice", "--home"])
        .arg(&a)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no display") && err.contains("--headless"),
        "{err}"
    );
}
