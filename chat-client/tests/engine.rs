//! The client core driven directly (no processes) against an in-process relay.

mod common;

use std::time::Duration;

use chat_client::{Command, ConnectionState, Event};
use common::inproc::{Peer, start_relay_with};

/// A relay that queues at most 2 envelopes per recipient, and bob registered on it, then
/// offline.
fn relay_with_bob_offline(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> common::inproc::Relay {
    let relay = start_relay_with(rt, "127.0.0.1:0", &dir.join("relay"), |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
    });
    let bob = Peer::start(rt, relay.addr, "bob", &dir.join("bob"));
    bob.send(Command::Shutdown {
        flush_for: Duration::ZERO,
    });
    relay
}

#[test]
fn a_full_recipient_queue_keeps_messages_queued_and_retries() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_bob_offline(&rt, dir.path());
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

/// Messages to a contact who is offline with a full queue at the relay wait, and go as
/// soon as the contact is back online rather than after the pause: here the pause is an
/// hour, so only a sign that bob is online (the relay's presence notice, or bob's
/// receipts for the two it took, each of which suffices) can end it. Each arrives once,
/// in order, and the user is told once, not once per retry.
#[test]
fn messages_held_for_a_full_queue_go_when_the_recipient_is_back_online() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_bob_offline(&rt, dir.path());
    let mut alice = Peer::start_with(&rt, relay.addr, "alice", &dir.path().join("alice"), |c| {
        c.retry_later = Duration::from_secs(3600);
        c.queue_full_retry = Duration::from_secs(3600);
    });
    let text = |n: usize| format!("held {n}");
    for n in 0..8 {
        alice.send(Command::Send {
            to: "bob".into(),
            text: text(n),
        });
    }
    // Two of them are taken; the other six wait in alice's client.
    let mut sent = 0;
    loop {
        match alice.expect(|e| matches!(e, Event::Sent { .. } | Event::Error { .. })) {
            Event::Sent { .. } => sent += 1,
            Event::Error { code, message } => {
                assert_eq!(code, "recipient_queue_full");
                assert!(
                    message.contains("at once when bob comes online"),
                    "{message}"
                );
                break;
            }
            _ => unreachable!(),
        }
    }

    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut texts = Vec::new();
    while texts.len() < 8 {
        if let Event::Message { text, .. } = bob.expect(|e| matches!(e, Event::Message { .. })) {
            texts.push(text);
        }
    }
    assert_eq!(texts, (0..8).map(text).collect::<Vec<_>>());
    let mut told = 1;
    while sent < 8 {
        match alice.expect(|e| matches!(e, Event::Sent { .. } | Event::Error { .. })) {
            Event::Sent { .. } => sent += 1,
            Event::Error { code, .. } if code == "recipient_queue_full" => told += 1,
            _ => {}
        }
    }
    assert_eq!(told, 1, "the full queue was told once, not once per retry");
    assert!(
        !std::iter::from_fn(|| alice.handle.events.try_recv().ok())
            .any(|e| matches!(e, Event::Failed { .. })),
        "nothing was given up"
    );
}

/// Hundreds of messages waiting for one contact (their queue at the relay is full) do not
/// hold up a message to another written after them: the flush walks the outbox page by
/// page past the held ones (here three pages). Once the first contact is back, all of
/// theirs arrive once, in order, across the pages.
#[test]
fn a_long_held_outbox_neither_blocks_others_nor_reorders_across_pages() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_bob_offline(&rt, dir.path());
    let mut carol = Peer::start(&rt, relay.addr, "carol", &dir.path().join("carol"));
    let mut alice = Peer::start_with(&rt, relay.addr, "alice", &dir.path().join("alice"), |c| {
        c.retry_later = Duration::from_secs(3600);
        c.queue_full_retry = Duration::from_secs(3600);
    });
    let held = 300;
    let text = |n: usize| format!("held {n}");
    for n in 0..held {
        alice.send(Command::Send {
            to: "bob".into(),
            text: text(n),
        });
    }
    // Two are taken; the rest wait in alice's client.
    let mut sent = 0;
    while let Event::Sent { .. } = alice.expect(|e| {
        matches!(e, Event::Sent { .. })
            || matches!(e, Event::Error { code, .. } if code == "recipient_queue_full")
    }) {
        sent += 1;
    }
    for n in 0..3 {
        alice.send(Command::Send {
            to: "carol".into(),
            text: format!("to carol {n}"),
        });
    }
    let mut to_carol = Vec::new();
    while to_carol.len() < 3 {
        if let Event::Message { text, .. } = carol.expect(|e| matches!(e, Event::Message { .. })) {
            to_carol.push(text);
        }
    }
    assert_eq!(to_carol, ["to carol 0", "to carol 1", "to carol 2"]);

    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut texts = Vec::new();
    while texts.len() < held {
        if let Event::Message { text, .. } = bob.expect(|e| matches!(e, Event::Message { .. })) {
            texts.push(text);
        }
    }
    assert_eq!(texts, (0..held).map(text).collect::<Vec<_>>());
    while sent < held + 3 {
        alice.expect(|e| matches!(e, Event::Sent { .. }));
        sent += 1;
    }
}

/// Texts sent at once are queued together (one commit), and the events keep the order of
/// the commands even when one of them in the middle is refused or is a note to oneself.
#[test]
fn a_burst_of_sends_keeps_the_order_of_its_commands_in_events_and_delivery() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = common::inproc::start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut alice = Peer::start(&rt, relay.addr, "alice", &dir.path().join("alice"));
    let send = |to: &str, text: &str| Command::Send {
        to: to.into(),
        text: text.into(),
    };
    let commands = [
        send("bob", "one"),
        send("bob", "two"),
        send("no such name!", "refused"),
        send("bob", "three"),
        send("bob", &"x".repeat(4 << 20)),
        send("alice", "a note"),
        send("bob", "four"),
    ];
    // All written before the core reads any of them.
    for command in commands {
        alice.send(command);
    }
    let mut seen = Vec::new();
    while seen.len() < 7 {
        match alice.expect(|e| matches!(e, Event::Queued { .. } | Event::Error { .. })) {
            Event::Queued { to, text, .. } => seen.push(format!("{to}: {text}")),
            Event::Error { code, .. } => seen.push(code),
            _ => unreachable!(),
        }
    }
    assert_eq!(
        seen,
        [
            "bob: one",
            "bob: two",
            "invalid_username",
            "bob: three",
            "message_too_long",
            "alice: a note",
            "bob: four"
        ]
    );
    let mut texts = Vec::new();
    while texts.len() < 4 {
        if let Event::Message { text, .. } = bob.expect(|e| matches!(e, Event::Message { .. })) {
            texts.push(text);
        }
    }
    assert_eq!(texts, ["one", "two", "three", "four"]);
}

/// A relay that sheds sends at 5 ms of scheduling delay, on a runtime of its own with one
/// worker thread (which a [`Hog`] can hold); the peers run apart.
fn shedding_relay(data: &std::path::Path) -> (tokio::runtime::Runtime, common::inproc::Relay) {
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let relay = start_relay_with(&relay_rt, "127.0.0.1:0", data, |c| {
        c.shed_delay_ms = 5.0;
    });
    (relay_rt, relay)
}

/// Holds a runtime's only worker 30 ms at a time until stopped: its relay is saturated
/// as a CPU-bound one is.
struct Hog {
    hogging: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Hog {
    fn start(relay_rt: &tokio::runtime::Runtime) -> Self {
        let hogging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = relay_rt.spawn({
            let hogging = hogging.clone();
            async move {
                while hogging.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(30));
                    tokio::task::yield_now().await;
                }
            }
        });
        Self { hogging, task }
    }

    fn stop(self, rt: &tokio::runtime::Runtime) {
        self.hogging
            .store(false, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(self.task).unwrap();
    }
}

/// A saturated relay refuses a share of sends with `server_busy`; the client keeps them,
/// retries, and every message arrives once, in order, once the load is gone.
#[test]
fn an_overloaded_relay_sheds_sends_and_they_arrive_later_exactly_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (relay_rt, relay) = shedding_relay(&dir.path().join("relay"));
    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut alice = Peer::start(&rt, relay.addr, "alice", &dir.path().join("alice"));
    let text = |n: usize| format!("message {n}");
    let next_text = |bob: &mut Peer| match bob.expect(|e| matches!(e, Event::Message { .. })) {
        Event::Message { text, .. } => text,
        _ => unreachable!(),
    };
    alice.send(Command::Send {
        to: "bob".into(),
        text: text(0),
    });
    assert_eq!(next_text(&mut bob), text(0));

    let hog = Hog::start(&relay_rt);
    // Alice writes on, a few at a time (so several are in flight when one is refused),
    // until the relay has refused one of her sends as busy.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let mut sent = 1;
    'busy: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "a saturated relay never refused a send ({sent} sent)"
        );
        for _ in 0..5 {
            alice.send(Command::Send {
                to: "bob".into(),
                text: text(sent),
            });
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
        while let Ok(event) = alice.handle.events.try_recv() {
            match event {
                Event::Error { code, message } if code == "server_busy" => {
                    assert!(message.contains("stay queued"), "{message}");
                    break 'busy;
                }
                Event::Failed { .. } => panic!("a shed message was given up: {event:?}"),
                _ => {}
            }
        }
    }
    hog.stop(&rt);

    // Everything arrives, in order, once: the marker sent last comes right after.
    alice.send(Command::Send {
        to: "bob".into(),
        text: "last".into(),
    });
    let got: Vec<String> = (1..=sent).map(|_| next_text(&mut bob)).collect();
    let mut want: Vec<String> = (1..sent).map(text).collect();
    want.push("last".into());
    assert_eq!(got, want);
    assert!(
        !std::iter::from_fn(|| alice.handle.events.try_recv().ok())
            .any(|e| matches!(e, Event::Failed { .. })),
        "nothing was given up"
    );
    common::inproc::stop_relay(&relay_rt, relay);
}

/// A relay that sheds a send refuses every later one until the client answers the `Ping`
/// written right after the refusal. Our client used to answer one such ping while the
/// refusals of the sends behind it (and their pings) were still on their way, and send to
/// other contacts in between: each of those was refused in turn, and so on while anything
/// was queued (a 200-member group's sender stayed refused for minutes). Now it sends
/// nothing new until every send in flight is answered and the ping after the last refusal
/// answered. Messages queued to 8 contacts go through a saturated relay: a probe between
/// client and relay sees sends refused but none written before the newest fence ping was
/// answered, and every message is taken once.
#[test]
fn after_a_shed_send_nothing_new_goes_out_before_the_relays_fence_is_answered() {
    const CONTACTS: usize = 8;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (relay_rt, relay) = shedding_relay(&dir.path().join("relay"));
    let contacts: Vec<String> = (0..CONTACTS).map(|i| format!("contact{i}")).collect();
    for name in &contacts {
        drop(common::rogue::Mallory::connect(relay.addr, name));
    }
    // Alice's identity is made against the relay; then she goes through the probe.
    let home = dir.path().join("alice");
    let alice = Peer::start(&rt, relay.addr, "alice", &home);
    alice.send(Command::Shutdown {
        flush_for: Duration::ZERO,
    });
    rt.block_on(alice.handle.task).unwrap();
    let probe = common::fence_probe::FenceProbe::start(relay.addr, &home);
    let mut alice = Peer::start(&rt, probe.addr, "alice", &home);

    let hog = Hog::start(&relay_rt);
    // Two messages to each contact at a time until the relay has shed a few.
    let deadline = std::time::Instant::now() + 3 * common::PATIENCE;
    let mut queued = 0;
    while probe.refusals() < 10 && std::time::Instant::now() < deadline {
        for to in &contacts {
            for _ in 0..2 {
                let (to, text) = (to.clone(), format!("message {queued}"));
                alice.send(Command::Send { to, text });
                queued += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    hog.stop(&rt);
    assert!(probe.refusals() > 0, "the relay never shed a send");

    // Every message is taken by the relay, once.
    let mut sent = std::collections::HashSet::new();
    while sent.len() < queued {
        match alice.expect(|e| matches!(e, Event::Sent { .. } | Event::Failed { .. })) {
            Event::Sent { id, .. } => assert!(sent.insert(id), "sent twice"),
            other => panic!("a message was given up: {other:?}"),
        }
    }
    eprintln!(
        "{queued} messages, {} refusals, {} sends written before the fence was answered",
        probe.refusals(),
        probe.early_sends()
    );
    assert_eq!(
        probe.early_sends(),
        0,
        "sends written into the relay's fence"
    );
    common::inproc::stop_relay(&relay_rt, relay);
}

/// `Reconnect` (the window's "Retry now", headless `/reconnect`) tries at once instead of
/// at the end of the reconnect delay, which here is minutes long: a try while the relay is
/// still down fails and waits as long as the next delay would have (the delays do not
/// start over), and once the relay is back a try connects and what was written meanwhile
/// goes out. Asked while connected, it leaves the connection as it is.
#[test]
fn reconnect_tries_at_once_and_keeps_the_delays() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = common::inproc::start_relay(&rt, "127.0.0.1:0", &data);
    let addr = relay.addr;
    let mut bob = Peer::start(&rt, addr, "bob", &dir.path().join("bob"));
    // First delay 150-300 s, then 300-600 s (jitter in [d/2, d]).
    let mut alice = Peer::start_with(&rt, addr, "alice", &dir.path().join("alice"), |c| {
        c.backoff_min = Duration::from_secs(300);
        c.backoff_max = Duration::from_secs(600);
    });
    let state_is = |want: ConnectionState| move |e: &Event| matches!(e, Event::Connection { state, .. } if *state == want);
    alice.expect(state_is(ConnectionState::Connected));
    let next_text = |peer: &mut Peer| match peer.expect(|e| matches!(e, Event::Message { .. })) {
        Event::Message { text, .. } => text,
        _ => unreachable!(),
    };

    // Connected: nothing changes, the next message goes straight through.
    alice.send(Command::Reconnect);
    alice.send(Command::Send {
        to: "bob".into(),
        text: "while connected".into(),
    });
    assert_eq!(next_text(&mut bob), "while connected");
    let leftover: Vec<Event> = std::iter::from_fn(|| alice.handle.events.try_recv().ok()).collect();
    assert!(
        !leftover.iter().any(
            |e| matches!(e, Event::Connection { state, .. } if *state != ConnectionState::Connected)
        ),
        "a reconnect while connected disturbed the connection: {leftover:?}"
    );

    let retry_in = |e: Event| match e {
        Event::Connection { retry_in_ms, .. } => retry_in_ms.expect("a reconnect delay"),
        _ => unreachable!(),
    };
    common::inproc::stop_relay(&rt, relay);
    let first = retry_in(alice.expect(state_is(ConnectionState::Reconnecting)));
    assert!(
        (150_000..=300_000).contains(&first),
        "first delay {first} ms"
    );

    // Still down: the try fails, and the next delay is the second one, not the first again.
    alice.send(Command::Reconnect);
    alice.expect(state_is(ConnectionState::Connecting));
    let second = retry_in(alice.expect(state_is(ConnectionState::Reconnecting)));
    assert!(
        (300_000..=600_000).contains(&second),
        "second delay {second} ms"
    );

    // Written while away, then the relay comes back: one try connects, minutes early.
    alice.send(Command::Send {
        to: "bob".into(),
        text: "while away".into(),
    });
    let relay = common::inproc::start_relay(&rt, &addr.to_string(), &data);
    alice.send(Command::Reconnect);
    alice.expect(state_is(ConnectionState::Connected));
    assert_eq!(next_text(&mut bob), "while away");
    common::inproc::stop_relay(&rt, relay);
}
