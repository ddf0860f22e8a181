//! Store-and-forward through the real relay binary and its real SQLite file.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Client, Options, Relay, all_file_bytes, contains, history};

#[test]
fn offline_delivery_across_a_recipient_restart_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let bob_home = dir.path().join("bob");
    // Bob registers once, then goes away.
    assert_eq!(Client::ready(relay.addr, "bob", &bob_home).quit(), 0);

    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    let marker = "OFFLINE-MARKER-51c2e";
    for n in 0..30 {
        alice.send(&format!("/msg bob {marker} #{n}"));
    }
    for _ in 0..30 {
        alice.expect("sent", |e| e["event"] == "sent");
    }
    // Stored on the server: ciphertext only.
    assert!(
        !contains(&all_file_bytes(&relay.data_dir), marker.as_bytes()),
        "plaintext in the server's database"
    );

    let mut bob = Client::ready(relay.addr, "bob", &bob_home);
    let texts = bob.texts_from("alice", 30);
    assert_eq!(
        texts,
        (0..30)
            .map(|n| format!("{marker} #{n}"))
            .collect::<Vec<_>>()
    );
    for _ in 0..30 {
        alice.expect("delivered", |e| e["event"] == "delivered");
    }
    // Acknowledged: a restart of bob brings nothing again.
    assert_eq!(bob.quit(), 0);
    let mut bob = Client::ready(relay.addr, "bob", &bob_home);
    bob.assert_no_more_messages(Duration::from_millis(1500));
}

#[test]
fn killed_relay_delivers_every_accepted_message_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let bob_home = dir.path().join("bob");
    assert_eq!(Client::ready(relay.addr, "bob", &bob_home).quit(), 0);
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    // Bob's key is pinned before the stream starts, so sends flow at full speed.
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");

    // A stream of sends, and SIGKILL in the middle of it.
    for n in 0..200 {
        alice.send(&format!("/msg bob stream {n}"));
    }
    let first = alice.expect("some accepted", |e| e["event"] == "sent");
    let (addr, data) = relay.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut accepted: HashSet<String> = HashSet::from([first["id"].as_str().unwrap().to_owned()]);
    while Instant::now() < deadline {
        for e in alice.drain(Duration::from_millis(200)) {
            if e["event"] == "sent" {
                accepted.insert(e["id"].as_str().unwrap().to_owned());
            }
        }
        if alice
            .seen
            .iter()
            .any(|e| e["event"] == "connection" && e["state"] == "reconnecting")
        {
            break;
        }
    }
    let _relay = Relay::start(&addr.to_string(), &data);
    // Everything still in alice's outbox goes out after the restart.
    let total_deadline = Instant::now() + Duration::from_secs(60);
    while accepted.len() < 200 {
        assert!(
            Instant::now() < total_deadline,
            "only {} of 200 accepted",
            accepted.len()
        );
        let e = alice.expect("sent", |e| e["event"] == "sent");
        accepted.insert(e["id"].as_str().unwrap().to_owned());
    }

    let mut bob = Client::ready(addr, "bob", &bob_home);
    let texts = bob.texts_from("alice", 200);
    assert_eq!(
        texts,
        (0..200).map(|n| format!("stream {n}")).collect::<Vec<_>>(),
        "all, in order"
    );
    bob.assert_no_more_messages(Duration::from_millis(1500));
}

#[test]
fn a_burst_over_the_rate_limit_arrives_complete_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_config(
        "127.0.0.1:0",
        &dir.path().join("relay"),
        "(rate_limit: (per_second: 20.0, burst: 10.0))",
    );
    let mut bob = Client::ready(relay.addr, "bob", &dir.path().join("bob"));
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    for n in 0..40 {
        alice.send(&format!("/msg bob burst {n}"));
    }
    let texts = bob.texts_from("alice", 40);
    assert_eq!(
        texts,
        (0..40).map(|n| format!("burst {n}")).collect::<Vec<_>>()
    );
    bob.assert_no_more_messages(Duration::from_millis(1000));
}

/// An outbox far past the relay's pipeline (300 messages queued while the relay was down)
/// goes out after the restart through a relay that refuses sends over a full pipeline
/// (`shed_when_full`, the default): the client keeps at most its send window in flight, so
/// none is refused, and all arrive once, in order.
#[test]
fn a_big_outbox_goes_out_within_the_send_window_and_is_never_refused() {
    const N: usize = 300;
    let config = "(shed_when_full: true, rate_limit: (per_second: 100000.0, burst: 100000.0))";
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_config("127.0.0.1:0", &dir.path().join("relay"), config);
    let mut bob = Client::ready(relay.addr, "bob", &dir.path().join("bob"));
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    alice.send("/safety bob");
    alice.expect("safety", |e| e["event"] == "safety");
    let (addr, data) = relay.kill();
    alice.expect("reconnecting", |e| {
        e["event"] == "connection" && e["state"] == "reconnecting"
    });
    for n in 0..N {
        alice.send(&format!("/msg bob queued {n}"));
    }
    let _relay = Relay::start_with_config(&addr.to_string(), &data, config);
    let texts = bob.texts_from("alice", N);
    assert_eq!(
        texts,
        (0..N).map(|n| format!("queued {n}")).collect::<Vec<_>>(),
        "all, in order"
    );
    bob.assert_no_more_messages(Duration::from_millis(1000));
    let busy: Vec<_> = alice
        .drain(Duration::from_millis(200))
        .into_iter()
        .chain(alice.seen_of("error"))
        .filter(|e| e["event"] == "error" && e["code"] == "server_busy")
        .collect();
    assert!(busy.is_empty(), "refused for a full pipeline: {busy:?}");
}

/// Envelopes the client cannot keep in memory (waiting for the sender's key, or behind
/// its key offer) are left to the relay, and with them every later one from that sender,
/// so none overtakes them; the client then renews its connection and is given them again.
/// The field report: a recipient that left envelopes behind went on opening later ones
/// (out of order), and once the replay window (64 messages) had moved past the left
/// ones, they were taken for duplicates when delivered again: lost for good.
#[test]
fn envelopes_left_to_the_relay_come_back_in_order_and_none_is_lost() {
    const BACKLOG: usize = 150;
    const LIVE: usize = 150;
    let config = "(rate_limit: (per_second: 100000.0, burst: 100000.0))";
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_config("127.0.0.1:0", &dir.path().join("relay"), config);
    let bob_home = dir.path().join("bob");
    Client::ready(relay.addr, "bob", &bob_home).quit();
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    // A backlog for bob, who has never heard from alice: his client must fetch her key
    // and unwrap her key offer before it can open any of it.
    for n in 0..BACKLOG {
        alice.send(&format!("/msg bob m{n}"));
    }
    for _ in 0..BACKLOG {
        alice.expect("sent", |e| e["event"] == "sent");
    }
    // Bob keeps at most 2 envelopes per sender in memory while they wait.
    let options = Options {
        env: vec![("CHAT_TEST_MAX_WAITING".into(), "2".into())],
        stderr: true,
        ..Options::default()
    };
    let mut bob = Client::start_opts(relay.addr, "bob", &bob_home, &options);
    // More arrive live while he works through the backlog.
    for n in BACKLOG..BACKLOG + LIVE {
        alice.send(&format!("/msg bob m{n}"));
    }
    let expected: Vec<String> = (0..BACKLOG + LIVE).map(|n| format!("m{n}")).collect();
    let shown = bob.texts_from("alice", BACKLOG + LIVE);
    assert_eq!(shown, expected, "shown: all, once, in order");
    bob.assert_no_more_messages(Duration::from_millis(1000));
    let log = bob.stderr.lock().unwrap().clone();
    assert!(
        log.contains("left to the relay") && log.contains("catching up"),
        "the test did not reach the limit (or the client did not renew its connection)"
    );
    // Nothing is still on the relay for him, and nothing is stored twice.
    bob.quit();
    let mut bob = Client::ready(relay.addr, "bob", &bob_home);
    bob.assert_no_more_messages(Duration::from_millis(1500));
    let stored: Vec<String> = history(&mut bob, "alice")
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stored, expected, "stored: all, once, in order");
}
