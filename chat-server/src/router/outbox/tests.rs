use std::time::Duration;

use chat_protocol::ServerMessage;

use super::*;

fn pong(nonce: u64) -> Routed {
    Routed::Message(ServerMessage::Pong { nonce })
}

/// An envelope `id` with a payload of `len` bytes.
fn deliver(id: u64, len: usize) -> Routed {
    Routed::Deliver(chat_protocol::deliver::SharedDeliver {
        envelope_id: id,
        from: chat_protocol::Username::parse("alice").unwrap(),
        payload: tokio_util::bytes::Bytes::from(vec![0; len]),
    })
}

fn full(pushed: Result<(), PushError>) -> bool {
    matches!(pushed, Err(PushError::Full(_)))
}

#[test]
fn the_byte_bound_counts_what_is_queued_and_taken_and_a_large_message_passes_alone() {
    let one = deliver(0, 1000).weight();
    let (outbox, mut inbox) = outbox(OutboxBound {
        messages: 100,
        bytes: 3 * one,
    });
    for id in 1..=3 {
        outbox.push(deliver(id, 1000)).unwrap();
    }
    assert!(full(outbox.push(deliver(4, 1000))));
    // A batch taken: the first is returned, the other two still count.
    assert_eq!(inbox.try_next().unwrap().envelope_id(), Some(1));
    outbox.push(deliver(4, 1000)).unwrap();
    assert!(full(outbox.push(deliver(5, 1000))));
    // Smaller ones fit where a larger one does not; presence counts too.
    assert_eq!(inbox.try_next().unwrap().envelope_id(), Some(2));
    outbox.push(deliver(5, 500)).unwrap();
    assert!(full(outbox.push(deliver(6, 1000))));
    let ids: Vec<_> = std::iter::from_fn(|| inbox.try_next())
        .map(|m| m.envelope_id())
        .collect();
    assert_eq!(ids, [Some(3), Some(4), Some(5)]);
    // Empty: a message over the whole bound is queued alone, and nothing beside it.
    outbox.push(deliver(7, 10 * 1000)).unwrap();
    assert!(full(outbox.push(deliver(8, 10))));
    assert_eq!(inbox.try_next().unwrap().envelope_id(), Some(7));
    outbox.push(deliver(8, 10)).unwrap();
    outbox.push(pong(1)).unwrap();
    assert_eq!(inbox.try_next().unwrap().envelope_id(), Some(8));
    assert_eq!(inbox.try_next(), Some(pong(1)));
}

/// `fut` must finish well within a test's patience; a lost wake-up would hang it.
async fn soon<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("woken")
}

#[tokio::test]
async fn messages_come_out_in_order_and_a_full_queue_refuses() {
    let (outbox, mut inbox) = outbox(OutboxBound::messages(3));
    assert_eq!(inbox.try_next(), None);
    for n in 0..3 {
        outbox.push(pong(n)).unwrap();
    }
    assert_eq!(outbox.push(pong(3)), Err(PushError::Full(pong(3))));
    assert_eq!(soon(inbox.next()).await, Inbound::Routed(pong(0)));
    // Taken in one batch, but what is not yet returned still counts: room for one.
    outbox.push(pong(3)).unwrap();
    assert_eq!(outbox.push(pong(4)), Err(PushError::Full(pong(4))));
    assert_eq!(inbox.try_next(), Some(pong(1)));
    outbox.push(pong(4)).unwrap();
    assert_eq!(outbox.push(pong(5)), Err(PushError::Full(pong(5))));
    let got: Vec<Routed> = std::iter::from_fn(|| inbox.try_next()).collect();
    assert_eq!(got, (2..5).map(pong).collect::<Vec<_>>());
    assert_eq!(inbox.try_next(), None);
    // Empty: the whole capacity again.
    for n in 5..8 {
        outbox.push(pong(n)).unwrap();
    }
    assert_eq!(outbox.push(pong(8)), Err(PushError::Full(pong(8))));
}

#[tokio::test]
async fn a_kick_comes_before_what_is_queued() {
    let (outbox, mut inbox) = outbox(OutboxBound::messages(8));
    outbox.push(pong(1)).unwrap();
    assert_eq!(inbox.kicked(), None);
    outbox.kick(ErrorCode::SlowConsumer);
    assert_eq!(inbox.kicked(), Some(ErrorCode::SlowConsumer));
    assert_eq!(
        soon(inbox.next()).await,
        Inbound::Kicked(ErrorCode::SlowConsumer)
    );
    // A later kick replaces the code.
    outbox.kick(ErrorCode::SessionReplaced);
    assert_eq!(
        soon(inbox.next()).await,
        Inbound::Kicked(ErrorCode::SessionReplaced)
    );
}

#[tokio::test]
async fn a_waiting_connection_is_woken_by_a_push_a_kick_or_the_router_leaving() {
    let (outbox, mut inbox) = outbox(OutboxBound::messages(8));
    let waiting = tokio::spawn(async move {
        let first = inbox.next().await;
        (first, inbox)
    });
    tokio::task::yield_now().await;
    outbox.push(pong(7)).unwrap();
    let (first, mut inbox) = soon(waiting).await.unwrap();
    assert_eq!(first, Inbound::Routed(pong(7)));

    let waiting = tokio::spawn(async move { (inbox.next().await, inbox) });
    tokio::task::yield_now().await;
    outbox.kick(ErrorCode::IdleTimeout);
    let (kicked, inbox) = soon(waiting).await.unwrap();
    assert_eq!(kicked, Inbound::Kicked(ErrorCode::IdleTimeout));

    let (outbox, mut inbox2) = super::outbox(OutboxBound::messages(8));
    drop(inbox);
    let waiting = tokio::spawn(async move { inbox2.next().await });
    tokio::task::yield_now().await;
    drop(outbox);
    assert_eq!(
        soon(waiting).await.unwrap(),
        Inbound::Kicked(ErrorCode::SessionReplaced)
    );
}

#[test]
fn room_is_kept_while_busy_and_given_back_when_quiet() {
    let (outbox, mut inbox) = outbox(OutboxBound::messages(8));
    assert!(!inbox.holds_room(), "nothing allocated before use");
    for n in 0..5 {
        outbox.push(pong(n)).unwrap();
    }
    assert_eq!(inbox.try_next(), Some(pong(0)));
    assert!(inbox.holds_room());
    inbox.trim();
    assert!(inbox.holds_room(), "four still taken: kept");
    let rest: Vec<Routed> = std::iter::from_fn(|| inbox.try_next()).collect();
    assert_eq!(rest, (1..5).map(pong).collect::<Vec<_>>());
    outbox.push(pong(5)).unwrap();
    inbox.trim();
    assert!(
        inbox.holds_room(),
        "a message queued meanwhile keeps its room"
    );
    assert_eq!(inbox.try_next(), Some(pong(5)));
    inbox.trim();
    assert!(!inbox.holds_room(), "all given back");
    // And it works on as before.
    outbox.push(pong(6)).unwrap();
    assert_eq!(inbox.try_next(), Some(pong(6)));
}

#[tokio::test]
async fn pushing_to_an_ended_connection_is_refused() {
    let (outbox, inbox) = outbox(OutboxBound::messages(8));
    outbox.push(pong(1)).unwrap();
    drop(inbox);
    assert_eq!(outbox.push(pong(2)), Err(PushError::Closed));
}

#[tokio::test]
async fn the_kick_watch_sees_kicks_and_not_messages() {
    let (outbox, inbox) = outbox(OutboxBound::messages(8));
    let watch = inbox.kick_watch();
    let waiting = tokio::spawn(watch.clone().kicked());
    tokio::task::yield_now().await;
    outbox.push(pong(1)).unwrap();
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "a message is not a kick");
    outbox.kick(ErrorCode::SlowConsumer);
    assert_eq!(soon(waiting).await.unwrap(), ErrorCode::SlowConsumer);
    // Already kicked: answers at once.
    assert_eq!(soon(watch.kicked()).await, ErrorCode::SlowConsumer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_reordered_between_threads() {
    const N: u64 = 100_000;
    let (outbox, mut inbox) = outbox(OutboxBound::messages(64));
    let producer = std::thread::spawn(move || {
        let mut n = 0;
        while n < N {
            match outbox.push(pong(n)) {
                Ok(()) => n += 1,
                Err(PushError::Full(_)) => std::thread::yield_now(),
                Err(PushError::Closed) => panic!("closed"),
            }
        }
        // Dropped at the end: the consumer sees the router leave after the last one.
    });
    let mut next = 0;
    loop {
        match soon(inbox.next()).await {
            Inbound::Routed(msg) => {
                assert_eq!(msg, pong(next));
                next += 1;
            }
            Inbound::Kicked(code) => {
                assert_eq!(code, ErrorCode::SessionReplaced);
                break;
            }
        }
    }
    producer.join().unwrap();
    // A detach is seen before what is still queued, like a kick.
    while let Some(msg) = inbox.try_next() {
        assert_eq!(msg, pong(next));
        next += 1;
    }
    assert_eq!(next, N);
}
