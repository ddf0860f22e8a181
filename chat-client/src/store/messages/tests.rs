use super::super::tests::open;
use super::*;

/// Text `m{n}` to `peer`, with id `[n; 16]`.
pub(in crate::store) fn item(n: u8, peer: &str) -> OutboxItem {
    OutboxItem {
        id: [n; 16],
        peer: peer.into(),
        body: Body::Text(format!("m{n}")),
        sent_at: 1000 + u64::from(n),
    }
}

#[test]
fn a_flush_pages_through_queued_messages_and_opens_only_the_one_asked_for() {
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), encrypt);
        for n in 1..=5 {
            store
                .enqueue(&item(n, if n % 2 == 0 { "carol" } else { "bob" }))
                .unwrap();
        }
        // Accepted by the relay: still in the outbox (until the receipt), not queued.
        store.mark_sent(&[2; 16], 9, 5000).unwrap();

        let page = store.outbox_queued_after(0, 2).unwrap();
        let ids: Vec<u8> = page.iter().map(|r| r.id[0]).collect();
        assert_eq!(ids, [1, 3], "in the order written, sent ones left out");
        assert_eq!(page[1].peer, "bob");
        let rest = store.outbox_queued_after(page[1].seq, 10).unwrap();
        let ids: Vec<u8> = rest.iter().map(|r| r.id[0]).collect();
        assert_eq!(ids, [4, 5]);
        assert_eq!(rest[0].peer, "carol");
        assert!(
            store
                .outbox_queued_after(rest[1].seq, 10)
                .unwrap()
                .is_empty()
        );

        assert_eq!(
            store.outbox_queued_item(&[4; 16]).unwrap(),
            Some(item(4, "carol"))
        );
        assert_eq!(store.outbox_queued_item(&[2; 16]).unwrap(), None, "sent");
        assert_eq!(store.outbox_queued_item(&[7; 16]).unwrap(), None, "unknown");
    }
}

#[test]
fn outbox_keeps_a_message_until_its_receipt() {
    for encrypt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open(dir.path(), encrypt);
            for n in [3, 1, 2] {
                store.enqueue(&item(n, "bob")).unwrap();
            }
        }
        let mut store = open(dir.path(), encrypt);
        let ids: Vec<u8> = store
            .outbox_queued()
            .unwrap()
            .iter()
            .map(|i| i.id[0])
            .collect();
        assert_eq!(ids, vec![3, 1, 2]);
        assert_eq!(
            store.mark_sent(&[1; 16], 9, 5000).unwrap().as_deref(),
            Some("bob")
        );
        assert_eq!(
            store.mark_sent(&[1; 16], 9, 5000).unwrap(),
            None,
            "only once"
        );
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(store.awaiting_receipt().unwrap(), 1);
        let history = store.history("bob", 10).unwrap();
        // In the order written, whatever the clock said.
        let texts: Vec<&str> = history.iter().map(|h| h.text.as_str()).collect();
        assert_eq!(texts, ["m3", "m1", "m2"]);
        assert_eq!(history[1].status, Status::Sent);

        // The recipient lost epoch 9: the message is queued again, once.
        let tx = store.conn.transaction().unwrap();
        assert_eq!(requeue_in(&tx, "bob", &[9]).unwrap(), vec![[1; 16]]);
        assert!(requeue_in(&tx, "bob", &[9]).unwrap().is_empty());
        tx.commit().unwrap();
        assert_eq!(store.outbox_len().unwrap(), 3);
        assert_eq!(store.history("bob", 10).unwrap()[1].status, Status::Sending);

        store.mark_sent(&[1; 16], 10, 6000).unwrap();
        let tx = store.conn.transaction().unwrap();
        let done = mark_delivered_in(&tx, "bob", &[[1; 16], [2; 16]]).unwrap();
        tx.commit().unwrap();
        assert_eq!(
            done,
            vec![
                Delivered {
                    id: [1; 16],
                    was_sending: false
                },
                Delivered {
                    id: [2; 16],
                    was_sending: true
                }
            ]
        );
        assert_eq!(store.outbox_len().unwrap(), 1);
        assert_eq!(store.awaiting_receipt().unwrap(), 0);
        let tx = store.conn.transaction().unwrap();
        assert!(
            mark_delivered_in(&tx, "bob", &[[1; 16]])
                .unwrap()
                .is_empty(),
            "once"
        );
        assert!(
            mark_delivered_in(&tx, "carol", &[[3; 16]])
                .unwrap()
                .is_empty(),
            "not carol's"
        );
        tx.commit().unwrap();
    }
}

#[test]
fn late_messages_are_flagged_once_and_failures_keep_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), false);
    store.enqueue(&item(1, "bob")).unwrap();
    store.enqueue(&item(2, "bob")).unwrap();
    store.mark_sent(&[1; 16], 1, 1_000).unwrap();
    store.mark_sent(&[2; 16], 1, 50_000).unwrap();
    let late = store.flag_undelivered(10_000).unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!((late[0].id, late[0].accepted_at), ([1; 16], 1_000));
    assert!(
        store.flag_undelivered(10_000).unwrap().is_empty(),
        "reported once"
    );
    assert!(store.history("bob", 10).unwrap()[0].undelivered);
    assert_eq!(store.expired(2_000).unwrap().len(), 1);
    store.mark_failed(&[1; 16], "expired").unwrap();
    let failed = &store.history("bob", 10).unwrap()[0];
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.reason.as_deref(), Some("expired"));
    assert!(!failed.undelivered);
}

#[test]
fn history_is_in_arrival_order_not_sender_clock_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), false);
    let tx = store.conn.transaction().unwrap();
    // A sender an hour ahead asks first; the answer has an earlier sender time.
    let cipher = RowCipher::new(zeroize::Zeroizing::new([3; 32]), false);
    let question = |stored_at| super::super::e2e::ReceivedText {
        peer: "bob",
        id: &[1; 16],
        text: "question?",
        sent_at: 5_000_000,
        stored_at,
    };
    insert_incoming(&tx, &cipher, &question(100)).unwrap();
    assert!(!insert_incoming(&tx, &cipher, &question(150)).unwrap());
    tx.commit().unwrap();
    store
        .enqueue(&OutboxItem {
            id: [2; 16],
            peer: "bob".into(),
            body: Body::Text("answer".into()),
            sent_at: 200,
        })
        .unwrap();
    let texts: Vec<String> = store
        .history("bob", 10)
        .unwrap()
        .into_iter()
        .map(|h| h.text)
        .collect();
    assert_eq!(texts, ["question?", "answer"]);
    assert_eq!(store.contacts().unwrap(), ["bob"]);
}

#[test]
fn a_burst_is_written_in_one_transaction_in_order_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), true);
    // The third repeats the first's id: the whole burst is refused, none left half-written.
    let err = store
        .enqueue_many(&[item(1, "bob"), item(2, "carol"), item(1, "bob")])
        .unwrap_err();
    assert!(matches!(err, StoreError::Sqlite(_)), "{err}");
    assert!(store.outbox_queued_after(0, 10).unwrap().is_empty());

    store
        .enqueue_many(&[item(3, "bob"), item(1, "carol"), item(2, "bob")])
        .unwrap();
    let ids: Vec<u8> = store
        .outbox_queued_after(0, 10)
        .unwrap()
        .iter()
        .map(|r| r.id[0])
        .collect();
    assert_eq!(ids, [3, 1, 2], "in the order given, not by id");
}

#[test]
fn an_unsynced_commit_leaves_every_later_commit_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), false);
    let synchronous = |store: &Store| -> i64 {
        store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    };
    const FULL: i64 = 2;
    assert_eq!(synchronous(&store), FULL);
    store.enqueue(&item(1, "bob")).unwrap();
    assert_eq!(
        store.mark_sent(&[1; 16], 1, 5000).unwrap().as_deref(),
        Some("bob")
    );
    assert_eq!(synchronous(&store), FULL, "after an unsynced commit");
    // A failed one too.
    let failed: Result<(), StoreError> =
        store.transaction_unsynced(|_, _| Err(rusqlite::Error::InvalidQuery.into()));
    assert!(failed.is_err());
    assert_eq!(
        synchronous(&store),
        FULL,
        "after a failed unsynced transaction"
    );
}
