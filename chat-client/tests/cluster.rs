//! The cluster backend as users meet it: real relay processes on a real NATS JetStream
//! cluster (three `nats-server` processes on 127.0.0.1), headless clients given the list of
//! relays. Relays and NATS nodes are SIGKILLed while messages flow.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::nats::Nats;
use common::{Client, Options, Relay, copy_relay_identity};

/// A relay on the NATS nodes of `nats`, three replicas.
fn relay(nats: &Nats, data_dir: &Path, addr: &str) -> Relay {
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    Relay::start_with_config(
        addr,
        data_dir,
        &format!(
            "(backend: Nats(urls: [{}], stream_replicas: 3), \
             rate_limit: (per_second: 100000.0, burst: 100000.0))",
            urls.join(", ")
        ),
    )
}

/// The name of the NATS node leading the mailbox stream.
fn stream_leader(nats: &Nats) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addrs: Vec<async_nats::ServerAddr> =
            nats.urls().iter().map(|u| u.parse().unwrap()).collect();
        let client = async_nats::connect(addrs.as_slice()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let info = js
            .get_stream("chat_mailbox")
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        info.cluster
            .and_then(|c| c.leader)
            .expect("the stream has a leader")
    })
}

/// Sends `texts` from `alice` to bob and waits until each is `sent` (acknowledged by a
/// relay); calls `midway` once half are. Returns the texts in the order sent.
fn stream(alice: &mut Client, texts: &[String], midway: impl FnOnce()) {
    for text in texts {
        alice.send(&format!("/msg bob {text}"));
    }
    let mut midway = Some(midway);
    for n in 0..texts.len() {
        alice.expect("sent", |e| e["event"] == "sent" && e["to"] == "bob");
        if n == texts.len() / 2
            && let Some(f) = midway.take()
        {
            f();
        }
    }
}

/// Bob's next `n` messages from alice: each exactly once, in the order sent.
fn assert_arrive_once_in_order(bob: &mut Client, texts: &[String]) {
    let got = bob.texts_from("alice", texts.len());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &got {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 1), "shown twice: {counts:?}");
    assert_eq!(got, texts, "in order, none missing");
    bob.assert_no_more_messages(std::time::Duration::from_millis(500));
}

#[test]
fn killing_a_relay_or_the_stream_leader_mid_stream_loses_nothing() {
    let nats = Nats::cluster();
    let dir = tempfile::tempdir().unwrap();
    let relay_a = relay(&nats, &dir.path().join("a"), "127.0.0.1:0");
    // Relay B shares A's TLS identity: one fingerprint pins both.
    copy_relay_identity(&dir.path().join("a"), &dir.path().join("b"));
    let relay_b = relay(&nats, &dir.path().join("b"), "127.0.0.1:0");
    assert_eq!(relay_a.fingerprint, relay_b.fingerprint);
    let list = format!("{},{}", relay_a.addr, relay_b.addr);

    let mut bob = Client::ready(relay_b.addr, "bob", &dir.path().join("bob"));
    // Carol knows only relay A: when it dies she is offline, though it could not say so.
    let _carol = Client::ready(relay_a.addr, "carol", &dir.path().join("carol"));
    bob.send("/watch carol");
    bob.expect("carol online", |e| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == true
    });
    let options = Options {
        server: Some(list.clone()),
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay_a.addr, "alice", &dir.path().join("alice"), &options);
    alice.expect("ready", |e| e["event"] == "ready");
    alice.connected();

    // Relay A (alice's) is SIGKILLed halfway through 200 messages: alice moves to B by
    // herself, and bob gets every message once, in order.
    let texts: Vec<String> = (0..200).map(|i| format!("m{i:03}")).collect();
    let addr_a = relay_a.addr.to_string();
    let mut relay_a = Some(relay_a);
    stream(&mut alice, &texts, || drop(relay_a.take().unwrap().kill()));
    assert_arrive_once_in_order(&mut bob, &texts);
    // Her connection events name the relay of the list she is on: A, then B.
    let on: Vec<String> = alice
        .seen_of("connection")
        .into_iter()
        .filter(|e| e["state"] == "connected")
        .map(|e| e["server"].as_str().unwrap_or("(none)").to_owned())
        .collect();
    assert_eq!(on.first(), Some(&addr_a), "{on:?}");
    assert_eq!(on.last(), Some(&relay_b.addr.to_string()), "{on:?}");
    // Relay B removes the sessions of the relay whose heartbeat stopped (within its TTL).
    let carol_offline = |e: &serde_json::Value| {
        e["event"] == "presence" && e["user"] == "carol" && e["online"] == false
    };
    if !bob.seen_of("presence").iter().any(carol_offline) {
        bob.expect("carol offline", carol_offline);
    }

    // The NATS node leading the mailbox stream is SIGKILLed halfway through 100 more.
    let leader = stream_leader(&nats);
    let texts: Vec<String> = (200..300).map(|i| format!("m{i:03}")).collect();
    let mut nats = nats;
    stream(&mut alice, &texts, || {
        let node = nats.nodes.iter_mut().find(|n| n.name == leader).unwrap();
        node.kill();
    });
    assert_arrive_once_in_order(&mut bob, &texts);

    // Bob goes away; 20 more wait for him; then everything restarts: the backlog is intact.
    assert_eq!(bob.quit(), 0);
    let texts: Vec<String> = (300..320).map(|i| format!("m{i:03}")).collect();
    stream(&mut alice, &texts, || {});
    assert_eq!(alice.quit(), 0);
    let (addr_b, dir_b) = relay_b.kill();
    for node in &mut nats.nodes {
        node.kill();
    }
    for node in &mut nats.nodes {
        node.restart();
    }
    let relay_b = relay(&nats, &dir_b, &addr_b.to_string());
    let mut bob = Client::ready(relay_b.addr, "bob", &dir.path().join("bob"));
    assert_arrive_once_in_order(&mut bob, &texts);
}
