//! Headless clients against the real relay binary, over real sockets on loopback.

mod common;

use std::time::Duration;

use common::{Client, Proxy, Relay, all_file_bytes, contains};

fn homes(n: usize) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let homes = (0..n)
        .map(|i| dir.path().join(format!("home{i}")))
        .collect();
    (dir, homes)
}

#[test]
fn three_clients_chat_with_receipts_presence_and_user_list() {
    let (dir, h) = homes(3);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    // Presence comes only for users one follows: bob is not followed yet.
    alice.send("/watch Bob carol");
    for user in ["bob", "carol"] {
        alice.expect("offline at first", |e| {
            e["event"] == "presence" && e["user"] == user && e["online"] == false
        });
    }
    let mut bob = Client::ready(relay.addr, "bob", &h[1]);
    alice.expect("bob online", |e| {
        e["event"] == "presence" && e["user"] == "bob" && e["online"] == true
    });

    alice.send("/msg bob hello bob, how are you?");
    let got = bob.message_from("alice");
    assert_eq!(got["text"], "hello bob, how are you?");
    assert_eq!(got["id"].as_str().unwrap().len(), 32);
    assert!(got["sent_at"].as_u64().unwrap() > 1_600_000_000_000);
    let id = got["id"].clone();
    alice.expect("sent", |e| {
        e["event"] == "sent" && e["to"] == "bob" && e["id"] == id
    });
    alice.expect("delivered", |e| {
        e["event"] == "delivered" && e["to"] == "bob" && e["id"] == id
    });

    bob.send("/msg alice fine, thanks");
    assert_eq!(alice.message_from("bob")["text"], "fine, thanks");
    bob.expect("delivered", |e| {
        e["event"] == "delivered" && e["to"] == "alice"
    });

    // Bob follows alice without asking: they exchanged messages. Asked for her anyway,
    // /watch answers with her presence now, as for anyone (what came before the answer
    // to /users, the automatic follow's included, is set aside first).
    bob.send("/users");
    bob.expect("users", |e| e["event"] == "users");
    bob.drain(Duration::ZERO);
    bob.send("/watch alice");
    bob.expect("alice's presence, followed already", |e| {
        e["event"] == "presence" && e["user"] == "alice" && e["online"] == true
    });
    bob.send("/watch carol");
    bob.expect("carol offline", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == false
    });
    let mut carol = Client::ready(relay.addr, "carol", &h[2]);
    alice.expect("carol online", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == true
    });
    bob.expect("carol online", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == true
    });
    carol.send("/users");
    let users = carol.expect("users", |e| e["event"] == "users");
    assert_eq!(
        users["online"],
        serde_json::json!(["alice", "bob", "carol"])
    );
    carol.send("/msg alice hi from carol");
    carol.send("/msg bob hi from carol");
    assert_eq!(alice.message_from("carol")["text"], "hi from carol");
    assert_eq!(bob.message_from("carol")["text"], "hi from carol");

    drop(carol);
    alice.expect("carol offline", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == false
    });
    bob.expect("carol offline", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == false
    });
    assert_eq!(bob.quit(), 0);
    alice.expect("bob offline", |e| {
        e["event"] == "presence" && e["user"] == "bob" && e["online"] == false
    });
    assert_eq!(alice.quit(), 0);
}

#[test]
fn the_server_never_sees_plaintext() {
    let (dir, h) = homes(2);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let proxy = Proxy::start(relay.addr);
    let mut alice = Client::ready(proxy.addr, "alice", &h[0]);
    let mut bob = Client::ready(proxy.addr, "bob", &h[1]);
    let marker = "MARKER-7f3a9c-plaintext-must-not-leak";
    alice.send(&format!("/msg bob {marker}"));
    assert_eq!(bob.message_from("alice")["text"], marker);
    bob.send(&format!("/msg alice re: {marker}"));
    alice.message_from("bob");
    alice.expect("delivered", |e| e["event"] == "delivered");

    let up = proxy.upstream_bytes.lock().unwrap().clone();
    let down = proxy.downstream_bytes.lock().unwrap().clone();
    assert!(
        up.len() > 1000 && down.len() > 1000,
        "the proxy saw the traffic"
    );
    // A recording proxy on the path (TLS) sees no username and no public key either.
    for home in &h {
        let pem = std::fs::read_to_string(home.join("identity.pem")).unwrap();
        let identity = chat_protocol::identity::Identity::from_pem(&pem, None).unwrap();
        let key = identity.public().der();
        for (what, bytes) in [("up", &up), ("down", &down)] {
            assert!(!contains(bytes, key), "a public key in the {what} stream");
            assert!(
                !contains(bytes, &key[key.len() - 64..]),
                "part of a public key {what}"
            );
        }
    }
    // (Only the five-byte name: three random bytes match "bob" by chance too often.)
    assert!(!contains(&up, b"alice"), "alice in the client's bytes");
    assert!(!contains(&down, b"alice"), "alice in the relay's bytes");
    for (what, bytes) in [
        ("bytes the server received", up),
        ("bytes the server sent", down),
        ("the server's data dir", all_file_bytes(&relay.data_dir)),
        (
            "the server's trace log",
            relay.log.lock().unwrap().clone().into_bytes(),
        ),
    ] {
        assert!(
            !contains(&bytes, marker.as_bytes()),
            "plaintext found in {what}"
        );
    }
    // The marker really is stored on the clients, so the search above can find it.
    assert!(contains(&all_file_bytes(&h[1]), marker.as_bytes()));
}

/// A byte flipped on the path is caught by TLS: the connection drops, the client
/// reconnects, and the message comes again, intact and once. (Tampering by the relay
/// itself, inside TLS, is end-to-end's to catch: see `reliability.rs` and the E2E tests.)
#[test]
fn a_flipped_byte_on_the_path_is_caught_and_nothing_is_lost() {
    let (dir, h) = homes(2);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let proxy = Proxy::start(relay.addr);
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    let mut bob = Client::ready(proxy.addr, "bob", &h[1]);
    alice.send("/msg bob first, before tampering");
    assert_eq!(bob.message_from("alice")["text"], "first, before tampering");

    proxy.corrupt_next_deliveries(1);
    alice.send("/msg bob second, tampered on the way");
    bob.expect("reconnecting after the bad record", |e| {
        e["event"] == "connection" && e["state"] == "reconnecting"
    });
    assert_eq!(
        bob.message_from("alice")["text"],
        "second, tampered on the way"
    );
    alice.send("/msg bob third, clean");
    assert_eq!(bob.message_from("alice")["text"], "third, clean");
    bob.assert_no_more_messages(Duration::from_millis(500));
    let shown: Vec<_> = bob
        .seen
        .iter()
        .filter(|e| e["event"] == "message")
        .collect();
    assert_eq!(shown.len(), 3, "each message once: {shown:#?}");
    assert!(
        bob.seen_of("error").is_empty(),
        "{:?}",
        bob.seen_of("error")
    );
}

#[test]
fn server_restart_loses_nothing_and_duplicates_nothing() {
    let (dir, h) = homes(2);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    let mut bob = Client::ready(relay.addr, "bob", &h[1]);
    alice.send("/msg bob before the crash");
    bob.message_from("alice");

    let (addr, data) = relay.kill();
    alice.expect("reconnecting", |e| {
        e["event"] == "connection" && e["state"] == "reconnecting"
    });
    bob.expect("reconnecting", |e| {
        e["event"] == "connection" && e["state"] == "reconnecting"
    });
    for n in 1..=5 {
        alice.send(&format!("/msg bob while down {n}"));
    }
    alice.expect("queued", |e| {
        e["event"] == "queued" && e["sent_at"].is_u64()
    });

    let _relay = Relay::start(&addr.to_string(), &data);
    alice.connected();
    bob.connected();
    let texts = bob.texts_from("alice", 5);
    assert_eq!(
        texts,
        (1..=5)
            .map(|n| format!("while down {n}"))
            .collect::<Vec<_>>()
    );
    // Exactly once: nothing more arrives.
    bob.assert_no_more_messages(Duration::from_millis(1500));
    for _ in 1..=5 {
        alice.expect("delivered", |e| e["event"] == "delivered");
    }
}

#[test]
fn a_changed_key_blocks_traffic_until_accepted() {
    let (dir, h) = homes(3);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    let bob = Client::ready(relay.addr, "bob", &h[1]);
    alice.send("/safety bob");
    let before = alice.expect("safety", |e| e["event"] == "safety");
    alice.send("/verify bob");
    alice.expect("verified", |e| {
        e["event"] == "safety" && e["verified"] == true
    });
    drop(bob);

    // A fresh server (the same relay key, its accounts wiped); "bob" registers there
    // with a brand-new key (new home).
    let (addr, data) = relay.kill();
    common::copy_relay_identity(&data, &dir.path().join("relay2"));
    let _fresh = Relay::start(&addr.to_string(), &dir.path().join("relay2"));
    alice.connected();
    let mut new_bob = Client::ready(addr, "bob", &h[2]);

    alice.send("/msg bob are you really bob?");
    alice.expect("key_changed", |e| {
        e["event"] == "key_changed" && e["user"] == "bob"
    });
    alice.send("/msg bob another");
    let err = alice.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "key_changed");
    assert!(err["message"].as_str().unwrap().contains("accept"), "{err}");
    new_bob.drain(Duration::from_millis(1000));
    assert!(
        new_bob.seen.iter().all(|e| e["event"] != "message"),
        "nothing got through"
    );

    alice.send("/safety bob");
    let after = alice.expect("safety", |e| e["event"] == "safety");
    assert_ne!(before["number"], after["number"]);
    assert_eq!(after["verified"], false);
    alice.send("/accept-key bob");
    assert_eq!(new_bob.message_from("alice")["text"], "are you really bob?");
}

#[test]
fn client_restart_keeps_identity_history_and_outbox() {
    let (dir, h) = homes(2);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    let fingerprint =
        alice.seen.iter().find(|e| e["event"] == "ready").unwrap()["fingerprint"].clone();
    let mut bob = Client::ready(relay.addr, "bob", &h[1]);
    alice.send("/msg bob remember me");
    bob.message_from("alice");
    alice.expect("delivered", |e| e["event"] == "delivered");
    assert_eq!(alice.quit(), 0);

    let mut alice = Client::start(relay.addr, "alice", &h[0]);
    let ready = alice.expect("ready", |e| e["event"] == "ready");
    assert_eq!(ready["fingerprint"], fingerprint);
    alice.send("/history bob");
    let history = alice.expect("history", |e| e["event"] == "history");
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["text"], "remember me");
    assert_eq!(items[0]["status"], "delivered");
    // bob's history holds the incoming message too.
    assert_eq!(bob.quit(), 0);
    let mut bob = Client::ready(relay.addr, "bob", &h[1]);
    bob.send("/history alice");
    let history = bob.expect("history", |e| e["event"] == "history");
    assert_eq!(history["items"][0]["outgoing"], false);
}

#[test]
fn bad_input_is_an_error_event_and_the_client_keeps_going() {
    let (dir, h) = homes(1);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let mut alice = Client::ready(relay.addr, "alice", &h[0]);
    for line in [
        "hello there",
        "/frobnicate",
        "/msg",
        "/msg nobody-here hi",
        "/safety",
    ] {
        alice.send(line);
        let err = alice.expect("error", |e| e["event"] == "error");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    // The message to a name nobody has left the outbox as failed.
    alice.expect("failed", |e| {
        e["event"] == "failed" && e["to"] == "nobody-here"
    });
    alice.send("/msg x!y hi");
    assert_eq!(
        alice.expect("error", |e| e["event"] == "error")["code"],
        "invalid_username"
    );
    // A pasted paragraph as the name: the error quotes its start, not all of it.
    alice.send(&format!("/msg {} hi", "n".repeat(1000)));
    let err = alice.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "invalid_username");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.len() < 200 && message.contains("1000 characters"),
        "{message}"
    );
    alice.send("/users");
    alice.expect("users", |e| e["event"] == "users");

    // A script that writes everything at once gets each answer in the place of its line:
    // a refused line's `error` neither overtakes the `queued` of the lines before it nor
    // falls behind those after it, whatever refused it (the parser, the UTF-8 check, the
    // line length limit).
    let refusals: [&[u8]; 4] = [
        b"/msg bob \n",
        b"/frobnicate\n",
        b"/msg bob not \xff UTF-8\n",
        &[b'x'; 256 * 1024 + 1],
    ];
    let mut script = Vec::new();
    let mut expected = Vec::new();
    for n in 0..200 {
        script.extend_from_slice(format!("/msg bob text {n:03}\n").as_bytes());
        expected.push(format!("text {n:03}"));
        if n % 50 == 49 {
            let refused = refusals[n / 50];
            script.extend_from_slice(refused);
            if !refused.ends_with(b"\n") {
                script.push(b'\n');
            }
            expected.push("refused".to_owned());
        }
    }
    let before = alice.seen.len();
    alice.send_bytes(&script);
    // The line too long is the last one.
    alice.expect("the last refusal", |e| {
        e["code"] == "invalid_command" && e["message"].as_str().unwrap().contains("longer")
    });
    let answers: Vec<String> = alice.seen[before..]
        .iter()
        .filter_map(|e| match e["event"].as_str() {
            Some("queued") => Some(e["text"].as_str().unwrap().to_owned()),
            Some("error") if e["code"] == "invalid_command" => Some("refused".to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(answers, expected, "answers out of the order of their lines");
    assert_eq!(alice.quit(), 0);
}

#[test]
fn a_taken_username_is_a_clear_fatal_error() {
    let (dir, h) = homes(2);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let _alice = Client::ready(relay.addr, "alice", &h[0]);
    let mut imposter = Client::start(relay.addr, "alice", &h[1]);
    let err = imposter.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "username_taken");
    let offline = imposter.expect("offline", |e| {
        e["event"] == "connection" && e["state"] == "offline"
    });
    assert_eq!(offline["reason"], err["message"]);
    assert_eq!(imposter.wait_exit(), 1);
    // Fed by a script whose input has already ended (`printf '/msg bob hi\n' | …`): the
    // end of input asked to quit, but the client stopped on its own first: still 1.
    let mut piped = Client::start(relay.addr, "alice", &h[1]);
    piped.send("/msg bob hi");
    assert_eq!(piped.quit(), 1);
}

#[test]
fn a_passphrase_protects_the_key_file_and_a_wrong_one_is_a_clear_error() {
    let (dir, h) = homes(1);
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let good = dir.path().join("good.txt");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&good, "correct horse battery staple\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();

    let mut alice = Client::start_with(
        relay.addr,
        "alice",
        &h[0],
        &["--passphrase-file", good.to_str().unwrap()],
    );
    let ready = alice.expect("ready", |e| e["event"] == "ready");
    assert_eq!(alice.quit(), 0);
    let pem = std::fs::read_to_string(h[0].join("identity.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));

    let mut wrong = Client::start_with(
        relay.addr,
        "alice",
        &h[0],
        &["--passphrase-file", bad.to_str().unwrap()],
    );
    // Lines read while the key file is still being opened (scrypt takes a while) are
    // answered too, in order, after the stop that makes the exit code 1: refused ones as
    // refused, commands as not done (a text is not queued, so it is never sent).
    wrong.send("/frobnicate");
    wrong.send("/msg bob hello");
    wrong.send("/msg");
    wrong.send("/users");
    let err = wrong.expect("error", |e| e["event"] == "error");
    assert_eq!(err["code"], "wrong_passphrase");
    wrong.expect("offline", |e| {
        e["event"] == "connection" && e["state"] == "offline"
    });
    let answers: Vec<(String, String)> = (0..4)
        .map(|_| {
            let answer = wrong.expect("answer", |e| e["event"] == "error");
            let message = answer["message"].as_str().unwrap();
            let first = message.split(':').next().unwrap();
            (
                answer["code"].as_str().unwrap().to_owned(),
                first.to_owned(),
            )
        })
        .collect();
    let answers: Vec<(&str, &str)> = answers
        .iter()
        .map(|(c, m)| (c.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        answers,
        [
            ("invalid_command", "unknown command /frobnicate"),
            ("not_running", "the message to bob was not queued"),
            ("invalid_command", "usage"),
            ("not_running", "the online users were not listed"),
        ]
    );
    assert!(
        !wrong.seen.iter().any(|e| e["event"] == "queued"),
        "{:#?}",
        wrong.seen
    );
    let stop_at = wrong.seen.iter().position(|e| e["event"] == "connection");
    let answer_at = wrong
        .seen
        .iter()
        .position(|e| e["code"] == "invalid_command");
    assert!(stop_at < answer_at, "{:#?}", wrong.seen);
    assert_eq!(wrong.wait_exit(), 1);
    let mut none = Client::start(relay.addr, "alice", &h[0]);
    assert_eq!(
        none.expect("error", |e| e["event"] == "error")["code"],
        "passphrase_required"
    );
    assert_eq!(none.wait_exit(), 1);
    // The key file was left alone: the right passphrase still opens the same identity.
    assert_eq!(
        std::fs::read_to_string(h[0].join("identity.pem")).unwrap(),
        pem
    );
    let mut again = Client::start_with(
        relay.addr,
        "alice",
        &h[0],
        &["--passphrase-file", good.to_str().unwrap()],
    );
    let again_ready = again.expect("ready", |e| e["event"] == "ready");
    assert_eq!(again_ready["fingerprint"], ready["fingerprint"]);
}
