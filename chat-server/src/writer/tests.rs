use super::*;
use crate::fence::RefusalFence;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn envelope(to: &str, payload: &[u8]) -> Envelope {
    Envelope {
        recipient: name(to),
        sender: name("alice"),
        source: 1,
        payload: tokio_util::bytes::Bytes::copy_from_slice(payload),
        now_secs: 1000,
        limits: QueueLimits::per_recipient(100, 1 << 20),
        fence: None,
    }
}

/// An envelope to `to` in a queue bounded at one, with its place (`serial`) among the
/// sends `fence` orders.
fn tagged(fence: &std::sync::Arc<RefusalFence>, to: &str, payload: &[u8], serial: u64) -> Envelope {
    Envelope {
        limits: QueueLimits::per_recipient(1, 1 << 20),
        fence: Some(fence.tag(name(to), serial)),
        ..envelope(to, payload)
    }
}

fn room(writer: &Writer) -> Room {
    writer
        .try_reserve(1000)
        .expect("room in the writer's queue")
}

fn setup(grace: Duration) -> (tempfile::TempDir, Store, Writer) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.bind(&name("bob"), b"k").unwrap();
    let writer = Writer::start(store.clone(), grace, 1 << 20);
    (dir, store, writer)
}

#[tokio::test]
async fn a_held_envelope_acknowledged_in_time_is_never_written() {
    // A grace far longer than the test: only the Ack can answer the ticket.
    let (_dir, store, writer) = setup(Duration::from_secs(3600));
    let mut ticket = writer.enqueue_held(room(&writer), 7, envelope("bob", b"hi"));
    assert_eq!(writer.held_count(), 1);
    // Someone else's ack for that id changes nothing.
    writer.ack(name("carol"), vec![7]);
    assert_eq!(writer.held_count(), 1);
    writer.ack(name("bob"), vec![7]);
    assert_eq!(ticket.enqueued().await.unwrap(), Enqueued::Stored(7));
    assert_eq!(writer.held_count(), 0);
    assert_eq!(store.stats().unwrap().queued, 0);
    assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
    // The id is still used up, written or not: the next commit records it.
    writer
        .bind(room(&writer), name("carol"), b"k".to_vec())
        .bound()
        .await
        .unwrap();
    assert_eq!(store.next_envelope_id().unwrap(), 8);
}

#[tokio::test]
async fn a_held_envelope_not_acknowledged_is_written_after_the_grace() {
    let (_dir, store, writer) = setup(Duration::from_millis(50));
    let started = Instant::now();
    let mut held = writer.enqueue_held(room(&writer), 3, envelope("bob", b"held"));
    // Writes behind it keep their order: the barrier passes only after it.
    let mut barrier = writer.barrier();
    barrier.passed().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(held.enqueued().await.unwrap(), Enqueued::Stored(3));
    let queued = store.pending(&name("bob"), 0, 10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].id, &queued[0].payload[..]), (3, &b"held"[..]));
    // A late ack now deletes it like any other.
    writer.ack(name("bob"), vec![3]);
    writer.barrier().passed().await.unwrap();
    assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
}

#[tokio::test]
async fn other_writes_do_not_wait_behind_a_held_envelope() {
    let (_dir, store, writer) = setup(Duration::from_secs(3600));
    store.bind(&name("carol"), b"k").unwrap();
    let _held = writer.enqueue_held(room(&writer), 1, envelope("bob", b"held"));
    let mut plain = writer.enqueue(room(&writer), 2, envelope("carol", b"plain"));
    let stored = tokio::time::timeout(Duration::from_secs(10), plain.enqueued()).await;
    assert_eq!(stored.unwrap().unwrap(), Enqueued::Stored(2));
    assert_eq!(store.pending(&name("carol"), 0, 10).unwrap().len(), 1);
    assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
    // A barrier still waits for the held one; its Ack lets it pass, unwritten.
    let mut barrier = writer.barrier();
    let early = tokio::time::timeout(Duration::from_millis(200), barrier.passed()).await;
    assert!(early.is_err(), "the barrier passed a held envelope");
    writer.ack(name("bob"), vec![1]);
    let passed = tokio::time::timeout(Duration::from_secs(10), barrier.passed()).await;
    passed.unwrap().unwrap();
    assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
}

/// The outcome of an enqueue, which must come without waiting for a held envelope's grace.
async fn within(t: &mut Ticket) -> Enqueued {
    tokio::time::timeout(Duration::from_secs(10), t.enqueued())
        .await
        .expect("decided without waiting for the grace")
        .unwrap()
}

/// A recipient whose session went away with envelopes still held for its Ack: the next
/// envelope for it goes to the store, and the held ones are decided first, whatever their
/// grace. One refused (its queue full) then holds the later one instead of being
/// overtaken by it (a helper's attack: m1040 refused when written after m1081 was stored).
#[tokio::test]
async fn a_later_envelope_has_the_earlier_ones_held_for_its_recipient_decided_first() {
    // A grace far longer than the test: only the later envelope can have them written.
    let (_dir, store, writer) = setup(Duration::from_secs(3600));
    store.bind(&name("carol"), b"k").unwrap();
    let fence = std::sync::Arc::new(RefusalFence::default());
    let tagged = |to, payload, serial| tagged(&fence, to, payload, serial);
    let mut one = writer.enqueue_held(room(&writer), 1, tagged("bob", b"1", 1));
    let mut two = writer.enqueue_held(room(&writer), 2, tagged("bob", b"2", 2));
    // Held for carol: not bob's, so not written early.
    let _for_carol = writer.enqueue_held(room(&writer), 3, tagged("carol", b"c", 3));
    let mut three = writer.enqueue(room(&writer), 4, tagged("bob", b"3", 4));
    assert_eq!(within(&mut three).await, Enqueued::Fenced);
    assert_eq!(within(&mut one).await, Enqueued::Stored(1));
    assert_eq!(within(&mut two).await, Enqueued::Full);
    let ids: Vec<u64> = store
        .pending(&name("bob"), 0, 10)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(ids, vec![1]);
    assert_eq!(writer.held_count(), 1, "carol's is still held");
    // The refused one's id is used up too (it was delivered): recorded in that commit.
    assert_eq!(store.next_envelope_id().unwrap(), 3);
}

#[tokio::test]
async fn a_refused_envelope_is_not_overtaken_when_room_comes_back_before_the_next() {
    let (_dir, store, writer) = setup(Duration::ZERO);
    store.bind(&name("carol"), b"k").unwrap();
    let fence = std::sync::Arc::new(RefusalFence::default());
    let tagged = |to, payload, serial| tagged(&fence, to, payload, serial);
    // Bob's queue holds one; the second is refused. Bob's Ack frees the room, written
    // between it and the third, which still must not overtake the second.
    let mut one = writer.enqueue(room(&writer), 1, tagged("bob", b"1", 1));
    let mut two = writer.enqueue(room(&writer), 2, tagged("bob", b"2", 2));
    writer.ack(name("bob"), vec![1]);
    let mut three = writer.enqueue(room(&writer), 3, tagged("bob", b"3", 3));
    let mut to_carol = writer.enqueue(room(&writer), 4, tagged("carol", b"c", 4));
    assert_eq!(one.enqueued().await.unwrap(), Enqueued::Stored(1));
    assert_eq!(two.enqueued().await.unwrap(), Enqueued::Full);
    assert_eq!(three.enqueued().await.unwrap(), Enqueued::Fenced);
    assert_eq!(to_carol.enqueued().await.unwrap(), Enqueued::Stored(4));
    assert!(store.pending(&name("bob"), 0, 10).unwrap().is_empty());
    // Once the client has been told of both refusals and answered the Ping behind them,
    // bob's room is there for what it sends next.
    for serial in 1..=4 {
        fence
            .tag(name(if serial == 4 { "carol" } else { "bob" }), serial)
            .answered();
    }
    fence.lift_answered(5);
    let mut retried = writer.enqueue(room(&writer), 5, tagged("bob", b"2", 5));
    assert_eq!(retried.enqueued().await.unwrap(), Enqueued::Stored(5));
}

#[tokio::test]
async fn ordinary_writes_are_group_committed_in_order() {
    let (_dir, store, writer) = setup(Duration::ZERO);
    let mut tickets: Vec<Ticket> = (1..=50)
        .map(|i| writer.enqueue(room(&writer), i, envelope("bob", &[i as u8])))
        .collect();
    let mut unknown = writer.enqueue(room(&writer), 51, envelope("nobody", b"?"));
    for (i, t) in tickets.iter_mut().enumerate() {
        assert_eq!(t.enqueued().await.unwrap(), Enqueued::Stored(i as u64 + 1));
    }
    assert_eq!(
        unknown.enqueued().await.unwrap(),
        Enqueued::UnknownRecipient
    );
    let ids: Vec<u64> = store
        .pending(&name("bob"), 0, 100)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(ids, (1..=50).collect::<Vec<_>>());
    assert_eq!(
        writer
            .bind(room(&writer), name("bob"), b"other".to_vec())
            .bound()
            .await
            .unwrap(),
        Bind::Taken
    );
}

#[tokio::test]
async fn a_full_queue_has_no_room_until_writes_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.bind(&name("bob"), b"k").unwrap();
    store.bind(&name("carol"), b"k").unwrap();
    // Room for two envelopes of 100 bytes, and a grace far longer than the test.
    let writer = Writer::start(
        store.clone(),
        Duration::from_secs(3600),
        2 * cost::envelope(100),
    );
    let first = writer.try_reserve(cost::envelope(100)).unwrap();
    let second = writer.try_reserve(cost::envelope(100)).unwrap();
    assert!(writer.try_reserve(cost::envelope(100)).is_none(), "full");
    assert!(writer.try_reserve(1).is_none());
    // A held envelope keeps its room until acknowledged...
    let mut held = writer.enqueue_held(first, 1, envelope("bob", &[0; 100]));
    // ...a written one (for someone else: one for bob would have his held one written
    // first) until committed.
    let mut plain = writer.enqueue(second, 2, envelope("carol", &[0; 100]));
    plain.enqueued().await.unwrap();
    let room = tokio::time::timeout(Duration::from_secs(10), writer.reserve(cost::envelope(100)))
        .await
        .expect("room came back after the commit");
    assert!(writer.try_reserve(cost::envelope(100)).is_none());
    // An ack needs no room, even with none left.
    assert!(writer.try_reserve(1).is_none());
    writer.ack(name("bob"), vec![1]);
    held.enqueued().await.unwrap();
    drop(room);
    // The plain write's room, and (once the writer passes it) the held envelope's,
    // come back.
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        writer.reserve(2 * cost::envelope(100)),
    )
    .await;
    assert!(waited.is_ok(), "all the room came back");
    // A cost larger than the whole budget is clamped to it, so it can still be met.
    drop(waited);
    assert!(writer.try_reserve(usize::MAX).is_some());
}
