//! Nothing sent is ever lost: restarts and crashes of either client, a full disk, a clock
//! that jumps, lost end-to-end state, a relay that plays with retry requests. Real relay
//! binary, real headless client processes, real SQLite files, loopback only. The crash
//! cases run on both backends: one SQLite relay, and two relays on a real `nats-server`
//! (alice on one, bob on the other).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::disk::SmallDisk;
use common::{Backend, Client, Options, PATIENCE, Relay, Relays, create_group, dirs, history};
use rstest::rstest;
use serde_json::Value;

/// Texts of every `message` event from `from`, in order, across `runs`.
fn texts(runs: &[&Client], from: &str) -> Vec<String> {
    runs.iter()
        .flat_map(|c| c.seen_of("message"))
        .filter(|e| e["from"] == from)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `client` has seen `n` events of kind `event` (in all), or panics.
fn await_count(client: &mut Client, event: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while client.seen_of(event).len() < n {
        assert!(
            Instant::now() < deadline,
            "{}: {} of {n} {event} events; last events {:#?}",
            client.name,
            client.seen_of(event).len(),
            client.seen.iter().rev().take(10).collect::<Vec<_>>()
        );
        client.drain(Duration::from_millis(100));
    }
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::nats(Backend::Nats)]
fn bob_restarts_while_alice_stays_online_and_nothing_is_lost(#[case] backend: Backend) {
    let (_dir, relay_dir, a, b) = dirs();
    let relays = Relays::start(backend, &relay_dir);
    let mut alice = Client::ready(relays.alice, "alice", &a);
    let mut bob = Client::ready(relays.bob, "bob", &b);
    alice.send("/msg bob one");
    assert_eq!(bob.message_from("alice")["text"], "one");
    alice.expect("delivered one", |e| e["event"] == "delivered");

    assert_eq!(bob.quit(), 0);
    let mut bob = Client::ready(relays.bob, "bob", &b);
    alice.send("/msg bob two");
    alice.send("/msg bob three");
    assert_eq!(bob.texts_from("alice", 2), ["two", "three"]);
    await_count(&mut alice, "delivered", 3, PATIENCE);
    bob.assert_no_more_messages(Duration::from_millis(1000));
    assert!(
        bob.seen_of("error").is_empty(),
        "no error at bob: {:#?}",
        bob.seen_of("error")
    );
    let items = history(&mut bob, "alice");
    let shown: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    assert_eq!(shown, ["one", "two", "three"]);
    let items = history(&mut alice, "bob");
    assert!(
        items.iter().all(|i| i["status"] == "delivered"),
        "{items:#?}"
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::nats(Backend::Nats)]
fn bob_killed_again_and_again_while_alice_streams_loses_nothing(#[case] backend: Backend) {
    let (_dir, relay_dir, a, b) = dirs();
    let relays = Relays::start(backend, &relay_dir);
    let mut bob = Client::ready(relays.bob, "bob", &b);
    let mut alice = Client::ready(relays.alice, "alice", &a);
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    const N: usize = 200;
    const ROUNDS: usize = 12;
    let mut next = 0;
    let mut send_batch = |alice: &mut Client, upto: usize| {
        while next < upto {
            alice.send(&format!("/msg bob stream {next}"));
            next += 1;
        }
    };
    // Kill bob 12 times while alice streams: every other time right between storing a
    // message and acknowledging it (the test hook), otherwise at a random moment.
    let mut runs: Vec<Client> = Vec::new();
    let mut rng_state = 0x9e37_79b9_u64;
    for round in 0..ROUNDS {
        let upto = N * (round + 1) / (ROUNDS + 1);
        if round % 2 == 0 {
            bob.kill();
            runs.push(bob);
            // Bob is down: this batch waits on the relay, and the next bob stores three
            // of them, then dies before acknowledging the third.
            send_batch(&mut alice, upto);
            await_count(&mut alice, "sent", upto, PATIENCE);
            bob = Client::start_opts(
                relays.bob,
                "bob",
                &b,
                &Options {
                    env: vec![("CHAT_TEST_ABORT_AFTER_STORES".into(), "3".into())],
                    ..Options::default()
                },
            );
            let deadline = Instant::now() + PATIENCE;
            while bob.exited().is_none() && Instant::now() < deadline {
                bob.drain(Duration::from_millis(50));
            }
            assert!(bob.exited().is_some(), "the crash hook fired");
            bob.drain(Duration::from_millis(50));
        } else {
            send_batch(&mut alice, upto);
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            bob.drain(Duration::from_millis(50 + rng_state % 400));
            bob.kill();
        }
        runs.push(bob);
        bob = Client::start(relays.bob, "bob", &b);
    }
    send_batch(&mut alice, N);
    runs.push(bob);
    let mut bob = runs.pop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while history(&mut bob, "alice").len() < N && Instant::now() < deadline {
        bob.drain(Duration::from_millis(500));
    }
    // What the last history request passed over (messages shown for the first time just
    // before its answer; all showings are counted below) is not "more": only what comes
    // after every message is stored would be.
    bob.drain(Duration::ZERO);
    bob.assert_no_more_messages(Duration::from_millis(1500));
    let expected: Vec<String> = (0..N).map(|n| format!("stream {n}")).collect();
    // What bob has: all of them, once, in order.
    let items = history(&mut bob, "alice");
    let stored: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    assert_eq!(stored, expected, "all {N}, exactly once, in order");
    // What bob was shown, across all his runs: never anything twice, in order. (A run
    // killed right after storing may die before its events reach stdout — on a loaded
    // machine several of them; the messages are in the history all the same, which is what
    // the headless contract tells scripts to reconcile with after a crash.)
    let all: Vec<&Client> = runs.iter().chain(std::iter::once(&bob)).collect();
    let shown = texts(&all, "alice");
    let distinct: HashSet<&String> = shown.iter().collect();
    assert_eq!(distinct.len(), shown.len(), "something was shown twice");
    let mut in_order = expected.iter();
    assert!(
        shown.iter().all(|t| in_order.any(|e| e == t)),
        "shown out of order: {shown:?}"
    );
    assert!(shown.len() >= N / 2, "only {} shown", shown.len());
    await_count(&mut alice, "delivered", N, Duration::from_secs(60));
    let delivered: HashSet<Value> = alice
        .seen_of("delivered")
        .into_iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(delivered.len(), N, "a receipt for each");
    // A run that is not killed shows every message it stores.
    for n in 0..10 {
        alice.send(&format!("/msg bob tail {n}"));
    }
    let tail: Vec<String> = (0..10).map(|n| format!("tail {n}")).collect();
    let deadline = Instant::now() + PATIENCE;
    while texts(&[&bob], "alice")
        .iter()
        .filter(|t| t.starts_with("tail"))
        .count()
        < 10
        && Instant::now() < deadline
    {
        bob.drain(Duration::from_millis(100));
    }
    let shown_tail: Vec<String> = texts(&[&bob], "alice")
        .into_iter()
        .filter(|t| t.starts_with("tail"))
        .collect();
    assert_eq!(
        shown_tail, tail,
        "a live client shows each message once, in order"
    );
    alice.send("/quit");
    let last = alice.expect("offline", |e| {
        e["event"] == "connection" && e["state"] == "offline"
    });
    assert_eq!(last["queued"], 0, "alice's outbox is empty");
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::nats(Backend::Nats)]
fn alice_killed_mid_stream_loses_and_duplicates_nothing(#[case] backend: Backend) {
    let (_dir, relay_dir, a, b) = dirs();
    let relays = Relays::start(backend, &relay_dir);
    let mut bob = Client::ready(relays.bob, "bob", &b);
    let mut alice = Client::ready(relays.alice, "alice", &a);
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    for n in 0..100 {
        alice.send(&format!("/msg bob m{n}"));
    }
    alice.expect("some sent", |e| e["event"] == "sent");
    alice.drain(Duration::from_millis(20));
    // Every `queued` seen so far is in alice's outbox; more may be queued between the last
    // event read and the kill, so the outbox found after the restart is the full truth.
    let queued: Vec<String> = alice
        .seen_of("queued")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    alice.kill();
    drop(alice);
    assert!(!queued.is_empty());
    let mut alice = Client::ready(relays.alice, "alice", &a);
    let outbox: Vec<String> = history(&mut alice, "bob")
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_owned())
        .collect();
    let prefix: Vec<String> = (0..outbox.len()).map(|n| format!("m{n}")).collect();
    assert_eq!(outbox, prefix, "alice kept what she queued, in order");
    assert!(
        outbox.len() >= queued.len(),
        "every message reported queued survived the kill: {} < {}",
        outbox.len(),
        queued.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while texts(&[&bob], "alice").len() < outbox.len() && Instant::now() < deadline {
        bob.drain(Duration::from_millis(200));
    }
    bob.assert_no_more_messages(Duration::from_millis(1500));
    assert_eq!(
        texts(&[&bob], "alice"),
        outbox,
        "each queued message once, in order"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = history(&mut alice, "bob");
        if items.iter().all(|i| i["status"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {items:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_clock_that_jumps_back_days_does_not_silence_the_next_message() {
    let Some(two_days_ahead) = common::clock_shifted("+2d") else {
        return;
    };
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let ahead = Options {
        env: two_days_ahead,
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &a, &ahead);
    alice.expect("ready", |e| e["event"] == "ready");
    alice.send("/msg bob from two days ahead");
    assert_eq!(bob.message_from("alice")["text"], "from two days ahead");
    let sent_at = bob.seen_of("message")[0]["sent_at"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(sent_at > now + 86_400_000, "the clock really was ahead");
    assert_eq!(alice.quit(), 0);
    // The right clock again, and a fresh database (same identity key).
    for f in ["client.sqlite3", "client.sqlite3-wal", "client.sqlite3-shm"] {
        let _ = std::fs::remove_file(a.join(f));
    }
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg bob back to the right time");
    assert_eq!(bob.message_from("alice")["text"], "back to the right time");
    alice.expect("delivered", |e| e["event"] == "delivered");
}

/// Deletes bob's end-to-end state rows, as a lost device state would (same identity).
fn forget_e2e_state(home: &Path) {
    let conn = rusqlite::Connection::open(home.join("client.sqlite3")).unwrap();
    let n = conn.execute("DELETE FROM e2e_state", []).unwrap();
    assert!(n > 0, "there was state to lose");
}

#[test]
fn lost_end_to_end_state_is_recovered_by_retry_requests() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    alice.send("/msg bob before");
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(bob.quit(), 0);
    // Alice's epoch is acknowledged: her next messages carry no key offer.
    alice.send("/msg bob lost 1");
    alice.send("/msg bob lost 2");
    await_count(&mut alice, "sent", 3, PATIENCE);
    forget_e2e_state(&b);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    assert_eq!(bob.texts_from("alice", 2), ["lost 1", "lost 2"]);
    await_count(&mut alice, "delivered", 3, PATIENCE);
    let requeued: Vec<Value> = alice.seen_of("requeued");
    assert_eq!(
        requeued.len(),
        2,
        "each lost message sent again once: {requeued:#?}"
    );
    bob.assert_no_more_messages(Duration::from_millis(1500));
    assert!(
        bob.seen_of("error").is_empty(),
        "{:#?}",
        bob.seen_of("error")
    );
}

#[test]
fn a_relay_replaying_dropping_or_reordering_retry_requests_causes_no_extra_resend() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    alice.send("/msg bob hello");
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(bob.quit(), 0);
    for n in 0..3 {
        alice.send(&format!("/msg bob lost {n}"));
    }
    await_count(&mut alice, "sent", 4, PATIENCE);
    forget_e2e_state(&b);

    // Between bob and the relay: every envelope bob sends is sent 3 times (replays), the
    // first one is held back and sent after the second (reordering), and bob's first
    // connection is cut right after its first send (a drop: bob must send it again).
    let tamper = common::TamperProxy::start(relay.addr, &b);
    let mut bob = Client::ready(tamper.addr, "bob", &b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while texts(&[&bob], "alice").len() < 3 && Instant::now() < deadline {
        bob.drain(Duration::from_millis(200));
    }
    assert_eq!(texts(&[&bob], "alice"), ["lost 0", "lost 1", "lost 2"]);
    // Let the replays play out, then count.
    bob.assert_no_more_messages(Duration::from_millis(3000));
    alice.drain(Duration::from_millis(500));
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for e in alice.seen_of("requeued") {
        *per_id
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), 3, "the three lost messages: {per_id:?}");
    assert!(
        per_id.values().all(|&n| n == 1),
        "once per real loss: {per_id:?}"
    );
    assert!(
        tamper.replayed() >= 2,
        "the proxy really replayed ({})",
        tamper.replayed()
    );
}

#[test]
fn a_reinstalled_contact_is_shown_after_the_key_is_accepted() {
    let (dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    bob.send("/msg alice hi from the old install");
    alice.message_from("bob");
    assert_eq!(bob.quit(), 0);
    // The operator frees bob's name; bob reinstalls (a new key).
    common::admin(&relay_dir, &["remove-user", "bob"]);
    let mut bob = Client::ready(relay.addr, "bob", &dir.path().join("bob-new"));
    bob.send("/msg alice hi, I reinstalled");
    bob.expect("sent", |e| e["event"] == "sent");
    let changed = alice.expect("key_changed", |e| e["event"] == "key_changed");
    assert_eq!(changed["was_verified"], false);
    alice.send("/safety bob");
    let safety = alice.expect("safety", |e| {
        e["event"] == "safety" && e["key_changed"] == true
    });
    assert_eq!(safety["fingerprint"], changed["fingerprint"]);
    assert_eq!(alice.seen_of("message").len(), 1, "held until accepted");
    alice.send(&format!(
        "/accept-key bob {}",
        safety["fingerprint"].as_str().unwrap()
    ));
    assert_eq!(alice.message_from("bob")["text"], "hi, I reinstalled");
    bob.expect("delivered", |e| e["event"] == "delivered");
}

#[test]
fn held_messages_are_opened_on_accept_discarded_on_reject_and_a_wrong_fingerprint_is_refused() {
    let (dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    bob.send("/msg alice hi");
    alice.message_from("bob");
    alice.send("/verify bob");
    alice.expect("verified", |e| {
        e["event"] == "safety" && e["verified"] == true
    });
    assert_eq!(bob.quit(), 0);

    // Round 1: new key; messages held; a wrong fingerprint is refused; reject discards.
    common::admin(&relay_dir, &["remove-user", "bob"]);
    let mut bob2 = Client::ready(relay.addr, "bob", &dir.path().join("bob2"));
    bob2.send("/msg alice one under the new key");
    bob2.send("/msg alice two under the new key");
    await_count(&mut bob2, "sent", 2, PATIENCE);
    let changed = alice.expect("key_changed", |e| e["event"] == "key_changed");
    assert_eq!(
        changed["was_verified"], true,
        "a verified contact's change is flagged"
    );
    alice.drain(Duration::from_millis(500));
    alice.send(&format!("/accept-key bob {}", "00".repeat(32)));
    let err = alice.expect("refused", |e| {
        e["event"] == "error" && e["code"] == "fingerprint_mismatch"
    });
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("nothing was accepted"),
        "{err}"
    );
    alice.send("/reject-key bob");
    let discarded = alice.expect("discarded", |e| e["event"] == "discarded");
    assert_eq!(discarded["count"], 2);
    assert_eq!(discarded["reason"], "key_rejected");
    assert_eq!(
        alice.seen_of("message").len(),
        1,
        "nothing under the rejected key shown"
    );
    assert_eq!(bob2.quit(), 0);

    // Round 2: another new key; accepted with the right fingerprint: held ones open.
    common::admin(&relay_dir, &["remove-user", "bob"]);
    let mut bob3 = Client::ready(relay.addr, "bob", &dir.path().join("bob3"));
    bob3.send("/msg alice three");
    bob3.send("/msg alice four");
    await_count(&mut bob3, "sent", 2, PATIENCE);
    let changed = alice.expect("key_changed", |e| e["event"] == "key_changed");
    alice.drain(Duration::from_millis(500));
    alice.send(&format!(
        "/accept-key bob {}",
        changed["fingerprint"].as_str().unwrap()
    ));
    assert_eq!(alice.texts_from("bob", 2), ["three", "four"]);
    await_count(&mut bob3, "delivered", 2, PATIENCE);
}

#[test]
fn a_fresh_home_is_private_and_logs_never_hold_message_text() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let traced = Options {
        log: Some("trace".into()),
        stderr: true,
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &a, &traced);
    alice.expect("ready", |e| e["event"] == "ready");
    let mut bob = Client::start_opts(relay.addr, "bob", &b, &traced);
    bob.expect("ready", |e| e["event"] == "ready");
    let marker = "LOGMARKER-4b1d-secret-text";
    alice.send(&format!("/msg bob {marker}"));
    bob.message_from("alice");
    bob.send(&format!("/msg alice re {marker}"));
    alice.message_from("bob");
    alice.expect("delivered", |e| e["event"] == "delivered");
    let logs = format!(
        "{}{}",
        alice.stderr.lock().unwrap(),
        bob.stderr.lock().unwrap()
    );
    assert!(logs.len() > 1000, "trace logs were captured");
    assert!(!logs.contains(marker), "message text in the logs");
    assert_eq!(alice.quit(), 0);
    assert_eq!(bob.quit(), 0);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for home in [&a, &b] {
            let mode = std::fs::metadata(home).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", home.display());
            for entry in std::fs::read_dir(home).unwrap() {
                let path = entry.unwrap().path();
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
    }
}

#[test]
fn a_full_disk_at_the_recipient_loses_nothing_whichever_side_restarts() {
    let (dir, relay_dir, a, _) = dirs();
    let Some(disk) = SmallDisk::mount(&dir.path().join("bobfs"), "3m") else {
        return;
    };
    let b = disk.path.join("bob");
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    alice.send("/msg bob before the disk filled");
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");

    // 1. Full disk, then freed, then the relay restarts while bob keeps running.
    disk.fill();
    alice.send("/msg bob while full 1");
    let err = bob.expect("store error", |e| {
        e["event"] == "error" && e["code"] == "store_error"
    });
    assert!(
        err["message"].as_str().unwrap().contains("disk is full"),
        "{err}"
    );
    assert_eq!(
        bob.seen_of("message").len(),
        1,
        "not shown while it cannot be stored"
    );
    disk.free();
    let (addr, data) = relay.kill();
    let relay = Relay::start(&addr.to_string(), &data);
    assert_eq!(bob.message_from("alice")["text"], "while full 1");
    await_count(&mut alice, "delivered", 2, PATIENCE);

    // 2. Full again, freed, and this time bob restarts.
    disk.fill();
    alice.send("/msg bob while full 2");
    bob.expect("store error", |e| {
        e["event"] == "error" && e["code"] == "store_error"
    });
    bob.kill();
    disk.free();
    let mut bob2 = Client::ready(relay.addr, "bob", &b);
    assert_eq!(bob2.message_from("alice")["text"], "while full 2");
    await_count(&mut alice, "delivered", 3, PATIENCE);
    bob2.assert_no_more_messages(Duration::from_millis(1500));
    let stored: Vec<String> = history(&mut bob2, "alice")
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        stored,
        ["before the disk filled", "while full 1", "while full 2"]
    );
    assert_eq!(bob2.quit(), 0);
    drop(bob);
    drop(relay);
}

/// A recipient whose disk filled while a long backlog came in gets all of it once space
/// is freed: the write-ahead log is folded back often enough that it does not take the
/// freed space for itself. (A chaos run found it did: with SQLite's default of folding
/// every ~4 MB, a 3 MB disk took 139 of 150 and the log filled it again at every retry.)
#[test]
fn a_long_backlog_arrives_whole_once_a_full_disk_has_room_again() {
    let (dir, relay_dir, a, _) = dirs();
    let backlog: Vec<String> = (0..150).map(|n| format!("backlog {n:03}")).collect();
    let Some((disk, _relay, mut alice, mut bob)) =
        while_bobs_disk_is_full(dir.path(), &relay_dir, &a, &backlog)
    else {
        return;
    };
    disk.free();
    assert_eq!(bob.texts_from("alice", backlog.len()), backlog);
    await_count(&mut alice, "delivered", 1 + backlog.len(), PATIENCE);
    bob.assert_no_more_messages(Duration::from_millis(1000));
    assert_eq!(bob.quit(), 0);
    assert_eq!(alice.quit(), 0);
}

#[test]
fn a_message_waiting_long_is_flagged_and_one_past_the_relays_age_limit_fails() {
    let Some(alice_ahead) = common::clock_shifted("+31d") else {
        return;
    };
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    assert_eq!(Client::ready(relay.addr, "bob", &b).quit(), 0);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg bob are you there?");
    let sent = alice.expect("sent", |e| e["event"] == "sent");
    assert_eq!(alice.quit(), 0);
    // Alice's own clock running ahead changes nothing: ages are the relay's.
    let ahead = Options {
        env: alice_ahead,
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &a, &ahead);
    alice.expect("ready", |e| e["event"] == "ready");
    alice.connected();
    alice.drain(Duration::from_millis(500));
    assert!(alice.seen_of("undelivered").is_empty() && alice.seen_of("failed").is_empty());
    assert_eq!(alice.quit(), 0);
    let (addr, data) = relay.kill();
    let relay_at = |shift: &str| {
        let env = common::clock_shifted(shift).unwrap();
        Relay::start_under(&addr.to_string(), &data, "()", &env)
    };
    // Two days on (by the relay's clock), still no receipt: flagged once, and shown as
    // such in the history.
    let relay = relay_at("+2d");
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let late = alice.expect("undelivered", |e| e["event"] == "undelivered");
    assert_eq!(late["id"], sent["id"]);
    assert_eq!(late["to"], "bob");
    assert!(late["since"].as_u64().unwrap() > 1_600_000_000_000);
    let items = history(&mut alice, "bob");
    assert_eq!(items[0]["status"], "sent");
    assert_eq!(items[0]["undelivered"], true);
    assert_eq!(alice.quit(), 0);
    drop(relay);
    let relay = relay_at("+3d");
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.drain(Duration::from_millis(500));
    assert!(alice.seen_of("undelivered").is_empty(), "reported once");
    assert_eq!(alice.quit(), 0);
    drop(relay);
    // Past the relay's 30 days the relay has deleted it: the user is told plainly.
    let relay = relay_at("+31d");
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let failed = alice.expect("failed", |e| e["event"] == "failed");
    assert_eq!(failed["id"], sent["id"]);
    assert_eq!(failed["reason"], "expired");
    assert!(
        failed["message"].as_str().unwrap().contains("30 days"),
        "{failed}"
    );
    let items = history(&mut alice, "bob");
    assert_eq!(items[0]["status"], "failed");
    assert_eq!(items[0]["reason"], "expired");
}

/// A relay, alice, and bob with his home on a 3 MB tmpfs, after one message from alice
/// reached him; then bob's disk is filled and alice sends `texts` until bob says he cannot
/// store. `None` where a tmpfs cannot be mounted (outside CI: the test is skipped).
fn while_bobs_disk_is_full(
    dir: &Path,
    relay_dir: &Path,
    a: &Path,
    texts: &[String],
) -> Option<(SmallDisk, Relay, Client, Client)> {
    let disk = SmallDisk::mount(&dir.join("bobfs"), "3m")?;
    let relay = Relay::start("127.0.0.1:0", relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", a);
    let mut bob = Client::ready(relay.addr, "bob", &disk.path.join("bob"));
    alice.send("/msg bob warm up");
    bob.message_from("alice");
    disk.fill();
    for text in texts {
        alice.send(&format!("/msg bob {text}"));
    }
    bob.expect("store error", |e| {
        e["event"] == "error" && e["code"] == "store_error"
    });
    Some((disk, relay, alice, bob))
}

#[test]
fn a_brief_full_disk_neither_loses_nor_reorders_what_comes_after() {
    let (dir, relay_dir, a, _) = dirs();
    // Five cannot be stored; then, space freed, eighty more (more than the replay window)
    // in the same epoch. Each must arrive once, in order.
    let stalled: Vec<String> = (0..5).map(|n| format!("stalled {n}")).collect();
    let Some((disk, _relay, mut alice, mut bob)) =
        while_bobs_disk_is_full(dir.path(), &relay_dir, &a, &stalled)
    else {
        return;
    };
    disk.free();
    for n in 0..80 {
        alice.send(&format!("/msg bob after {n}"));
    }
    let expected: Vec<String> = (0..5)
        .map(|n| format!("stalled {n}"))
        .chain((0..80).map(|n| format!("after {n}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while texts(&[&bob], "alice").len() < 86 && Instant::now() < deadline {
        bob.drain(Duration::from_millis(200));
    }
    let shown = texts(&[&bob], "alice");
    assert_eq!(shown[1..], expected[..], "lost or reordered");
    await_count(&mut alice, "delivered", 86, PATIENCE);
    assert_eq!(bob.quit(), 0);
}

/// A sender whose disk fills while the relay accepts its queued texts cannot record them
/// as sent: it says so once, not once per text; they stay queued, and once the disk has
/// room they go again and arrive once each, in order (the relay's second copies are
/// dropped by the recipient).
#[test]
fn a_full_disk_at_the_sender_is_told_once_and_loses_nothing() {
    let (dir, relay_dir, _, b) = dirs();
    let Some(disk) = SmallDisk::mount(&dir.path().join("alicefs"), "3m") else {
        return;
    };
    let a = disk.path.join("alice");
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg bob warm up");
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");
    // A group too, its sender key already handed out: group copies are accepted the
    // same way.
    let group = create_group("team", &mut [&mut alice, &mut bob]);
    alice.send("/gmsg team warm up");
    bob.expect("group warm-up", |e| e["group"] == group.as_str());
    await_count(&mut alice, "sent", 2, PATIENCE);
    assert_eq!(bob.quit(), 0);
    // Queued while the relay is away, so that all of them are accepted at once later.
    let (addr, data) = relay.kill();
    let texts: Vec<String> = (0..60)
        .map(|n| format!("queued while away {n:02}"))
        .collect();
    let group_texts: Vec<String> = (0..20).map(|n| format!("to the group {n:02}")).collect();
    // And three to a name the relay does not know: their failure cannot be recorded
    // either (that used to look the name up again and again).
    for n in 0..3 {
        alice.send(&format!("/msg nobody-here typo {n}"));
    }
    for (n, text) in texts.iter().enumerate() {
        alice.send(&format!("/msg bob {text}"));
        if let Some(group_text) = group_texts.get(n) {
            alice.send(&format!("/gmsg team {group_text}"));
        }
    }
    await_count(
        &mut alice,
        "queued",
        5 + texts.len() + group_texts.len(),
        PATIENCE,
    );
    disk.fill();
    let relay = Relay::start(&addr.to_string(), &data);
    let told = alice.expect("store error", |e| {
        e["event"] == "error" && e["code"] == "store_error"
    });
    assert!(
        told["message"].as_str().unwrap().contains("disk is full"),
        "{told}"
    );
    // Every one of the 80, and the unknown name's lookup, is answered by now.
    alice.drain(Duration::from_millis(1500));
    // Told once, not per text or group copy, even though records get through between
    // failures (the log given back after one makes room for a few).
    let store_errors = alice
        .seen
        .iter()
        .filter(|e| e["event"] == "error" && e["code"] == "store_error")
        .count();
    assert_eq!(store_errors, 1, "{:#?}", alice.seen);
    // What the relay accepted was not sent again while it could not be recorded (that
    // went round as fast as the relay answered, a copy stored for bob each time, until
    // the relay refused more): one envelope each for bob.
    let stats = common::admin(&data, &["stats"]);
    let queued = stats
        .lines()
        .find_map(|l| l.strip_prefix("queued envelopes:"))
        .map(|n| n.trim().parse::<usize>().unwrap());
    assert_eq!(queued, Some(texts.len() + group_texts.len()), "{stats}");
    disk.free();
    alice.send("/msg bob after the disk had room");
    await_count(
        &mut alice,
        "sent",
        3 + texts.len() + group_texts.len(),
        PATIENCE,
    );
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let expected: Vec<String> = texts
        .iter()
        .cloned()
        .chain(["after the disk had room".to_owned()])
        .collect();
    let (mut direct, mut in_group) = (Vec::new(), Vec::new());
    while direct.len() < expected.len() || in_group.len() < group_texts.len() {
        let m = bob.message_from("alice");
        let text = m["text"].as_str().unwrap().to_owned();
        match m.get("group") {
            Some(_) => in_group.push(text),
            None => direct.push(text),
        }
    }
    assert_eq!(direct, expected);
    assert_eq!(in_group, group_texts);
    bob.assert_no_more_messages(Duration::from_millis(1000));
    let all = 3 + texts.len() + group_texts.len();
    await_count(&mut alice, "delivered", all, PATIENCE);
    alice.drain(Duration::from_millis(500));
    assert_eq!(alice.seen_of("sent").len(), all, "each told sent once");
    assert_eq!(
        alice.seen_of("delivered").len(),
        all,
        "each told delivered once"
    );
    // The unknown name was looked up once, and each of its texts failed once.
    let unknown: Vec<&Value> = alice
        .seen
        .iter()
        .filter(|e| e["event"] == "error" && e["code"] == "unknown_user")
        .collect();
    assert_eq!(unknown.len(), 1, "{unknown:#?}");
    let failed: HashSet<String> = alice
        .seen_of("failed")
        .iter()
        .map(|e| {
            assert_eq!(e["to"], "nobody-here", "{e}");
            e["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(failed.len(), 3);
    assert_eq!(alice.seen_of("failed").len(), 3, "each failed once");
    assert_eq!(alice.quit(), 0);
    assert_eq!(bob.quit(), 0);
}

#[test]
fn a_sender_that_lost_its_state_still_gets_its_receipts() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    // A conversation both ways: each side's epoch is acknowledged by the other.
    alice.send("/msg bob hi");
    bob.message_from("alice");
    bob.send("/msg alice hello");
    alice.message_from("bob");
    alice.expect("delivered", |e| e["event"] == "delivered");
    bob.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(alice.quit(), 0);
    forget_e2e_state(&a);
    // Bob's receipts come in his acknowledged epoch, which alice no longer holds.
    let mut alice = Client::ready(relay.addr, "alice", &a);
    for n in 0..3 {
        alice.send(&format!("/msg bob after the loss {n}"));
    }
    assert_eq!(bob.texts_from("alice", 3).len(), 3);
    await_count(&mut alice, "delivered", 3, PATIENCE);
    let items = history(&mut alice, "bob");
    assert!(
        items.iter().all(|i| i["status"] == "delivered"),
        "{items:#?}"
    );
}

#[test]
fn messages_the_old_key_never_got_go_to_the_accepted_new_key() {
    let (dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    assert_eq!(Client::ready(relay.addr, "bob", &b).quit(), 0);
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    alice.send("/msg bob before the reinstall 1");
    alice.send("/msg bob before the reinstall 2");
    await_count(&mut alice, "sent", 2, PATIENCE);
    // The operator frees the name (the relay's copies go); bob reinstalls.
    common::admin(&relay_dir, &["remove-user", "bob"]);
    let mut bob = Client::ready(relay.addr, "bob", &dir.path().join("bob-new"));
    bob.send("/msg alice new install here");
    let changed = alice.expect("key_changed", |e| e["event"] == "key_changed");
    alice.send(&format!(
        "/accept-key bob {}",
        changed["fingerprint"].as_str().unwrap()
    ));
    assert_eq!(alice.seen_of("requeued").len(), 0);
    await_count(&mut alice, "requeued", 2, PATIENCE);
    assert_eq!(
        bob.texts_from("alice", 2),
        ["before the reinstall 1", "before the reinstall 2"]
    );
    await_count(&mut alice, "delivered", 2, PATIENCE);
}

#[test]
fn a_relay_with_small_frames_gets_receipts_that_fit() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start_with_config(
        "127.0.0.1:0",
        &relay_dir,
        "(max_frame_bytes: 16384, queue: (max_sender_share: 1.0))",
    );
    assert_eq!(Client::ready(relay.addr, "bob", &b).quit(), 0);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    for n in 0..600 {
        alice.send(&format!("/msg bob n{n}"));
    }
    await_count(&mut alice, "sent", 600, Duration::from_secs(60));
    assert_eq!(alice.quit(), 0);
    // Bob reads 600 at once and owes 600 receipts: they go in envelopes that fit.
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while texts(&[&bob], "alice").len() < 600 && Instant::now() < deadline {
        bob.drain(Duration::from_millis(200));
    }
    assert_eq!(texts(&[&bob], "alice").len(), 600);
    bob.drain(Duration::from_millis(1000));
    assert!(
        bob.seen_of("connection")
            .iter()
            .all(|e| e["state"] != "reconnecting"),
        "bob's connection was dropped: {:#?}",
        bob.seen_of("connection")
    );
    let mut alice = Client::ready(relay.addr, "alice", &a);
    await_count(&mut alice, "delivered", 600, Duration::from_secs(60));
}

#[test]
fn history_keeps_its_order_when_the_clock_goes_back() {
    let Some(two_days_ahead) = common::clock_shifted("+2d") else {
        return;
    };
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let ahead = Options {
        env: two_days_ahead,
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &a, &ahead);
    alice.expect("ready", |e| e["event"] == "ready");
    alice.send("/msg bob written while my clock was ahead");
    bob.message_from("alice");
    assert_eq!(alice.quit(), 0);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    alice.send("/msg bob written after it was set right");
    bob.message_from("alice");
    let texts: Vec<String> = history(&mut alice, "bob")
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        texts,
        [
            "written while my clock was ahead",
            "written after it was set right"
        ]
    );
}

#[test]
fn a_client_whose_stderr_cannot_be_written_keeps_working() {
    let (_dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let full = Options {
        stderr_to: Some("/dev/full".into()),
        log: Some("debug".into()),
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &a, &full);
    alice.expect("ready", |e| e["event"] == "ready");
    alice.send("/msg bob logs or no logs");
    assert_eq!(bob.message_from("alice")["text"], "logs or no logs");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(alice.quit(), 0);
}

/// Reconnecting does not start a new epoch: over three relay restarts alice keeps one
/// sending key towards bob, so bob unwraps one key offer, not one per reconnect (a flaky
/// link would otherwise meet his offer throttle, 20 and then one per 30 s, and delay
/// alice's messages).
#[test]
fn reconnects_keep_the_sending_epoch() {
    let (_dir, relay_dir, a, b) = dirs();
    let mut relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let held_epochs = || {
        let db = rusqlite::Connection::open(b.join("client.sqlite3")).unwrap();
        let state: Vec<u8> = db
            .query_row(
                "SELECT inbound FROM e2e_state WHERE peer = 'alice'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        chat_protocol::e2e::Inbound::from_bytes(&state)
            .unwrap()
            .epochs()
            .count()
    };
    for round in 0..4 {
        let text = format!("round {round}");
        alice.send(&format!("/msg bob {text}"));
        assert_eq!(bob.message_from("alice")["text"], text.as_str());
        alice.expect("delivered", |e| e["event"] == "delivered");
        if round < 3 {
            let (addr, data) = relay.kill();
            relay = Relay::start(&addr.to_string(), &data);
            for c in [&mut alice, &mut bob] {
                c.expect("reconnecting", |e| {
                    e["event"] == "connection" && e["state"] == "reconnecting"
                });
                c.connected();
            }
        }
    }
    assert_eq!(held_epochs(), 1, "a new epoch per reconnect");
}

/// Everything alice's store held in the clear is sealed once she has a passphrase: 1:1
/// and group texts are gone from the files, and what she reads, opens and sends next
/// proves each kind of sealed value reads back (history, the epoch keys bob's messages
/// are under, the group's membership, bob's group keys and her own sending key).
#[test]
fn a_passphrase_given_later_protects_the_key_file_and_the_history() {
    let (dir, relay_dir, a, b) = dirs();
    let relay = Relay::start("127.0.0.1:0", &relay_dir);
    let mut bob = Client::ready(relay.addr, "bob", &b);
    let mut alice = Client::ready(relay.addr, "alice", &a);
    let marker = "PASSMARKER-before-the-passphrase";
    alice.send(&format!("/msg bob {marker}"));
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");
    bob.send("/msg alice PLAIN-from-bob");
    alice.message_from("bob");
    let created = |c: &mut Client| {
        c.expect("group created", |e| {
            e["event"] == "group" && e["change"] == "created"
        })["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    alice.send("/group-create Pair bob");
    let group = created(&mut alice);
    created(&mut bob);
    let group_message = |c: &mut Client, from: &str| {
        c.expect("group message", |e| {
            e["event"] == "message" && e["group"] == group.as_str() && e["from"] == from
        })["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    alice.send("/gmsg Pair PLAIN-group-from-alice");
    assert_eq!(group_message(&mut bob, "alice"), "PLAIN-group-from-alice");
    bob.send("/gmsg Pair PLAIN-group-from-bob");
    assert_eq!(group_message(&mut alice, "bob"), "PLAIN-group-from-bob");
    assert_eq!(alice.quit(), 0);
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, "a good passphrase\n").unwrap();
    let mut alice = Client::start_with(
        relay.addr,
        "alice",
        &a,
        &["--passphrase-file", pass.to_str().unwrap()],
    );
    let warning = alice.expect("warning", |e| e["event"] == "warning");
    assert_eq!(warning["code"], "passphrase_added");
    alice.expect("ready", |e| e["event"] == "ready");
    let items = history(&mut alice, "bob");
    assert_eq!(items[0]["text"], marker);
    assert_eq!(items[1]["text"], "PLAIN-from-bob");
    alice.send(&format!("/group-history {group}"));
    let items = alice.expect("group history", |e| e["event"] == "group_history")["items"].clone();
    let texts: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["system"] != true)
        .map(|i| i["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["PLAIN-group-from-alice", "PLAIN-group-from-bob"]);
    // Bob is still under the epochs and group key alice held before: she opens both
    // from her sealed store; and her own group sending key still serves.
    bob.send("/msg alice after the passphrase");
    assert_eq!(alice.message_from("bob")["text"], "after the passphrase");
    bob.send("/gmsg Pair group after the passphrase");
    assert_eq!(
        group_message(&mut alice, "bob"),
        "group after the passphrase"
    );
    alice.send("/gmsg Pair alice's group key still serves");
    assert_eq!(
        group_message(&mut bob, "alice"),
        "alice's group key still serves"
    );
    let db: Vec<u8> = ["client.sqlite3", "client.sqlite3-wal"]
        .iter()
        .flat_map(|f| std::fs::read(a.join(f)).unwrap_or_default())
        .collect();
    for plain in [
        marker,
        "PLAIN-from-bob",
        "PLAIN-group-from-alice",
        "PLAIN-group-from-bob",
    ] {
        assert!(
            !common::contains(&db, plain.as_bytes()),
            "{plain} is still in the clear while alice runs"
        );
    }
    assert_eq!(alice.quit(), 0);
    let pem = std::fs::read_to_string(a.join("identity.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    // And without the passphrase now: a clear error, nothing opened.
    let mut none = Client::start(relay.addr, "alice", &a);
    assert_eq!(
        none.expect("error", |e| e["event"] == "error")["code"],
        "passphrase_required"
    );
}
