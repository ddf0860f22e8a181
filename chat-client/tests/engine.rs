//! The client core driven directly (no processes) against an in-process relay.

mod common;

use std::time::Duration;

use chat_client::{Command, ConnectionState, Event};
use common::inproc::{Peer, start_relay_with};

#[test]
fn a_full_recipient_queue_keeps_messages_queued_and_retries() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay_with(&rt, "127.0.0.1:0", &dir.path().join("relay"), |c| {
        c.queue.max_envelopes_per_user = 2;
        c.queue.max_sender_share = 1.0;
    });
    // Bob registers, then goes offline.
    let bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    bob.send(Command::Shutdown {
        flush_for: Duration::ZERO,
    });
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

/// A saturated relay refuses a share of sends with `server_busy`; the client keeps them,
/// retries, and every message arrives once, in order, once the load is gone.
#[test]
fn an_overloaded_relay_sheds_sends_and_they_arrive_later_exactly_once() {
    // The relay on a runtime of its own with one worker thread, which a task then holds
    // 30 ms at a time: the relay is saturated as a CPU-bound one is. The peers run apart.
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay_with(&relay_rt, "127.0.0.1:0", &dir.path().join("relay"), |c| {
        c.shed_delay_ms = 5.0;
    });
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

    let hogging = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hog = relay_rt.spawn({
        let hogging = hogging.clone();
        async move {
            while hogging.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(30));
                tokio::task::yield_now().await;
            }
        }
    });
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
    hogging.store(false, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(hog).unwrap();

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
