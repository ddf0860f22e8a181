//! How many messages wait for the relay — the `connection` event's `queued` — kept in a
//! small table by triggers, in the transaction of each change.
//!
//! The figure is read after every answer from the relay. Counted with `COUNT(*)` it
//! walked the whole queue (1.7 ms at 20,000 queued texts), which made draining a long
//! outbox quadratic; the group count walked every copy ever sent to a member, history
//! included. A trigger adds or takes one at each insert, delete or change of `state`.
//!
//! The first open of a store from before the table counts its queues once (`INSERT OR
//! IGNORE`); an open that finds the rows writes nothing, so a client whose disk is full
//! still starts.

use rusqlite::{Connection, params};

use super::StoreError;

/// The 1:1 outbox's row: texts and control messages with `state = 'queued'`.
pub(super) const OUTBOX: &str = "outbox";
/// The group outbox's row: group messages with at least one member's copy queued.
pub(super) const GROUP_OUTBOX: &str = "group_outbox";

/// Creates the table and its triggers (both outboxes must exist) and counts what is
/// queued the first time.
pub(super) fn create(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS queued_counts (
             queue TEXT PRIMARY KEY NOT NULL,
             n     INTEGER NOT NULL
         );
         CREATE TRIGGER IF NOT EXISTS outbox_queued_added AFTER INSERT ON outbox
             WHEN NEW.state = 'queued'
             BEGIN UPDATE queued_counts SET n = n + 1 WHERE queue = 'outbox'; END;
         CREATE TRIGGER IF NOT EXISTS outbox_queued_removed AFTER DELETE ON outbox
             WHEN OLD.state = 'queued'
             BEGIN UPDATE queued_counts SET n = n - 1 WHERE queue = 'outbox'; END;
         CREATE TRIGGER IF NOT EXISTS outbox_queued_changed AFTER UPDATE OF state ON outbox
             WHEN (OLD.state = 'queued') <> (NEW.state = 'queued')
             BEGIN
                 UPDATE queued_counts SET n = n + (NEW.state = 'queued') - (OLD.state = 'queued')
                     WHERE queue = 'outbox';
             END;
         -- A group message counts while any member's copy is queued: it comes in with
         -- its first queued copy and goes with its last (the lookups use the key's id).
         CREATE TRIGGER IF NOT EXISTS group_outbox_queued_added AFTER INSERT ON group_outbox
             WHEN NEW.state = 'queued' AND NOT EXISTS (SELECT 1 FROM group_outbox
                 WHERE id = NEW.id AND member <> NEW.member AND state = 'queued')
             BEGIN UPDATE queued_counts SET n = n + 1 WHERE queue = 'group_outbox'; END;
         CREATE TRIGGER IF NOT EXISTS group_outbox_queued_removed AFTER DELETE ON group_outbox
             WHEN OLD.state = 'queued' AND NOT EXISTS (SELECT 1 FROM group_outbox
                 WHERE id = OLD.id AND state = 'queued')
             BEGIN UPDATE queued_counts SET n = n - 1 WHERE queue = 'group_outbox'; END;
         CREATE TRIGGER IF NOT EXISTS group_outbox_queued_left AFTER UPDATE OF state ON group_outbox
             WHEN OLD.state = 'queued' AND NEW.state <> 'queued' AND NOT EXISTS (SELECT 1
                 FROM group_outbox WHERE id = OLD.id AND state = 'queued')
             BEGIN UPDATE queued_counts SET n = n - 1 WHERE queue = 'group_outbox'; END;
         CREATE TRIGGER IF NOT EXISTS group_outbox_queued_again AFTER UPDATE OF state ON group_outbox
             WHEN NEW.state = 'queued' AND OLD.state <> 'queued' AND NOT EXISTS (SELECT 1
                 FROM group_outbox WHERE id = NEW.id AND member <> NEW.member AND state = 'queued')
             BEGIN UPDATE queued_counts SET n = n + 1 WHERE queue = 'group_outbox'; END;
         INSERT OR IGNORE INTO queued_counts (queue, n)
             VALUES ('outbox', (SELECT COUNT(*) FROM outbox WHERE state = 'queued'));
         INSERT OR IGNORE INTO queued_counts (queue, n)
             VALUES ('group_outbox',
                     (SELECT COUNT(DISTINCT id) FROM group_outbox WHERE state = 'queued'));",
    )?;
    Ok(())
}

/// The count of `queue` ([`OUTBOX`] or [`GROUP_OUTBOX`]).
///
/// # Errors
/// [`StoreError`] if the database cannot be read.
pub(super) fn read(conn: &Connection, queue: &str) -> Result<usize, StoreError> {
    let n: i64 = conn
        .prepare_cached("SELECT n FROM queued_counts WHERE queue = ?1")?
        .query_row(params![queue], |r| r.get(0))?;
    Ok(n.unsigned_abs() as usize)
}

#[cfg(test)]
mod tests {
    use super::super::messages::tests::item;
    use super::super::messages::{mark_delivered_in, requeue_in};
    use super::super::tests::open;
    use super::super::{GroupWrite, OutgoingGroupMessage, Store};

    const QUEUED: &str = "SELECT COUNT(*) FROM outbox WHERE state = 'queued'";
    const GROUP_QUEUED: &str = "SELECT COUNT(DISTINCT id) FROM group_outbox WHERE state = 'queued'";

    /// The store as a version from before the counts left it: no table, no triggers.
    fn forget_counts(store: &Store) {
        let triggers: Vec<String> = store
            .conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND sql LIKE '%queued_counts%'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(triggers.len(), 7);
        for trigger in triggers {
            store
                .conn
                .execute_batch(&format!("DROP TRIGGER {trigger};"))
                .unwrap();
        }
        store
            .conn
            .execute_batch("DROP TABLE queued_counts;")
            .unwrap();
    }

    /// What `outbox_len` says is what a count of the queue says, after every kind of change
    /// to the outbox (queued, sent, queued again, failed, delivered, a contact removed, a
    /// burst, a reopen), and on a store from before the count was kept.
    #[test]
    fn the_queued_count_follows_every_change_to_the_outbox() {
        fn counted(store: &Store) -> usize {
            let n: i64 = store.conn.query_row(QUEUED, [], |r| r.get(0)).unwrap();
            n as usize
        }
        fn check(store: &Store, step: &str, expected: usize) {
            assert_eq!(counted(store), expected, "{step}: the queue");
            assert_eq!(store.outbox_len().unwrap(), expected, "{step}: the count");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        check(&store, "empty", 0);
        store
            .enqueue_many(&(1..=4).map(|n| item(n, "bob")).collect::<Vec<_>>())
            .unwrap();
        store.enqueue(&item(5, "carol")).unwrap();
        store.enqueue(&item(6, "dave")).unwrap();
        check(&store, "six queued", 6);
        store.mark_sent(&[1; 16], 9, 5000).unwrap();
        store.mark_sent(&[2; 16], 9, 5000).unwrap();
        store.mark_sent(&[2; 16], 9, 5000).unwrap();
        check(&store, "two sent, one of them twice", 4);
        let tx = store.conn.transaction().unwrap();
        requeue_in(&tx, "bob", &[9]).unwrap();
        tx.commit().unwrap();
        check(&store, "both queued again", 6);
        store.mark_sent(&[1; 16], 10, 6000).unwrap();
        let tx = store.conn.transaction().unwrap();
        mark_delivered_in(&tx, "bob", &[[1; 16], [3; 16]]).unwrap();
        tx.commit().unwrap();
        check(
            &store,
            "one delivered after sent, one straight from queued",
            4,
        );
        store.mark_failed(&[4; 16], "unknown_user").unwrap();
        store.mark_failed(&[4; 16], "unknown_user").unwrap();
        check(&store, "one failed (twice)", 3);
        store.mark_sent(&[6; 16], 1, 1000).unwrap();
        store.remove_contact("carol").unwrap();
        store.remove_contact("dave").unwrap();
        check(
            &store,
            "a queued and a sent one removed with their contacts",
            1,
        );
        drop(store);
        let mut store = open(dir.path(), false);
        check(&store, "reopened", 1);

        // A store from before the count: its queue is counted when it is first opened.
        forget_counts(&store);
        store
            .enqueue_many(&[item(7, "bob"), item(8, "bob")])
            .unwrap();
        drop(store);
        let mut store = open(dir.path(), false);
        check(&store, "first open with the count", 3);
        store.mark_sent(&[7; 16], 11, 7000).unwrap();
        check(&store, "and kept after", 2);
    }

    /// The same for group messages: one counts while any member's copy waits, through
    /// every change a copy goes through, and on a store from before the count.
    #[test]
    fn the_group_count_follows_every_copy_of_a_message() {
        fn check(store: &Store, step: &str, expected: usize) {
            let counted: i64 = store
                .conn
                .query_row(GROUP_QUEUED, [], |r| r.get(0))
                .unwrap();
            assert_eq!(counted as usize, expected, "{step}: the queue");
            assert_eq!(
                store.group_sends_len().unwrap(),
                expected,
                "{step}: the count"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        let group = [9; 16];
        let send = |store: &mut Store, n: u8, members: &[&str]| {
            let outgoing = OutgoingGroupMessage {
                group,
                id: [n; 16],
                payload: vec![n; 10],
                members: members.iter().map(|m| m.to_string()).collect(),
            };
            let write = GroupWrite {
                outgoing: Some(outgoing),
                ..Default::default()
            };
            store.commit_group(&group, write, 1000).unwrap();
        };
        check(&store, "empty", 0);
        for n in 1..=5 {
            send(&mut store, n, &["bob", "carol", "dave"]);
        }
        send(&mut store, 6, &[]);
        check(&store, "five with copies, one with nobody to send to", 5);
        store.group_send_done(&[1; 16], "bob", Some(5)).unwrap();
        store.group_send_done(&[1; 16], "carol", None).unwrap();
        check(&store, "one copy sent, one failed, one waits", 5);
        store.group_send_done(&[1; 16], "dave", Some(5)).unwrap();
        store.group_send_done(&[1; 16], "dave", Some(5)).unwrap();
        check(&store, "the last copy sent (twice)", 4);
        let tx = store.conn.transaction().unwrap();
        super::super::group_outbox::mark_group_delivered_in(&tx, "bob", &[[2; 16]]).unwrap();
        super::super::group_outbox::mark_group_delivered_in(&tx, "carol", &[[2; 16]]).unwrap();
        super::super::group_outbox::mark_group_delivered_in(&tx, "dave", &[[2; 16]]).unwrap();
        tx.commit().unwrap();
        check(&store, "delivered before the relay's answers", 3);
        for member in ["bob", "carol"] {
            store.withdraw_group_send(&[3; 16], member).unwrap();
        }
        check(&store, "two copies withdrawn", 3);
        store.withdraw_group_send(&[3; 16], "dave").unwrap();
        check(&store, "the last withdrawn", 2);
        drop(store);
        let mut store = open(dir.path(), false);
        check(&store, "reopened", 2);
        forget_counts(&store);
        send(&mut store, 7, &["bob"]);
        drop(store);
        let mut store = open(dir.path(), false);
        check(&store, "first open with the count", 3);
        store.group_send_done(&[7; 16], "bob", Some(6)).unwrap();
        check(&store, "and kept after", 2);
    }
}
