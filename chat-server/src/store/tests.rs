use super::*;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

#[test]
fn bind_is_first_come_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.bind(&name("alice"), b"key-a").unwrap(), Bind::Created);
        assert_eq!(
            store.bind(&name("alice"), b"key-a").unwrap(),
            Bind::Existing
        );
        assert_eq!(store.bind(&name("ALICE"), b"key-b").unwrap(), Bind::Taken);
        assert_eq!(store.public_key(&name("bob")).unwrap(), None);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.public_key(&name("alice")).unwrap().as_deref(),
        Some(&b"key-a"[..])
    );
    assert_eq!(store.stats().unwrap().users, 1);
}

#[test]
fn queue_order_ack_limits_expiry_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (bob, alice) = (name("bob"), name("alice"));
    let limits = QueueLimits::per_recipient(3, 100);
    assert_eq!(
        store
            .enqueue(&bob, (&alice, 1), b"x", 1000, &limits)
            .unwrap(),
        Enqueued::UnknownRecipient
    );
    store.bind(&bob, b"k").unwrap();
    let ids: Vec<u64> = (0..3u8)
        .map(|i| {
            match store
                .enqueue(&bob, (&alice, 1), &[i; 10], 1000, &limits)
                .unwrap()
            {
                Enqueued::Stored(id) => id,
                other => panic!("not full yet: {other:?}"),
            }
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        store
            .enqueue(&bob, (&alice, 1), b"x", 1000, &limits)
            .unwrap(),
        Enqueued::Full
    );
    let big = QueueLimits::per_recipient(100, 100);
    assert_eq!(
        store
            .enqueue(&bob, (&alice, 1), &[0; 71], 1000, &big)
            .unwrap(),
        Enqueued::Full,
        "bytes bound"
    );

    let pending = store.pending(&bob, 0, 10).unwrap();
    assert_eq!(
        pending.iter().map(|q| q.payload[0]).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(store.pending(&bob, ids[0], 1).unwrap()[0].id, ids[1]);
    assert_eq!(
        store.ack(&alice, &ids).unwrap(),
        0,
        "only the recipient can ack"
    );
    assert_eq!(store.ack(&bob, &[ids[0], ids[0], 999_999]).unwrap(), 1);
    let stats = store.stats().unwrap();
    assert_eq!((stats.queued, stats.queued_bytes), (2, 20));

    assert_eq!(store.purge_expired(1000 + 50, 100).unwrap(), 0);
    assert_eq!(store.purge_expired(1000 + 101, 100).unwrap(), 2);
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.expired_total, stats.queued, stats.queued_bytes),
        (2, 0, 0)
    );

    store
        .enqueue(&bob, (&alice, 1), b"x", 2000, &limits)
        .unwrap();
    assert!(store.remove_user(&bob).unwrap());
    assert_eq!(store.public_key(&bob).unwrap(), None);
    assert_eq!(store.stats().unwrap().queued, 0);
    assert!(!store.remove_user(&bob).unwrap());
}

#[test]
fn one_sender_gets_a_share_and_the_server_a_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (bob, carol) = (name("bob"), name("carol"));
    store.bind(&bob, b"k").unwrap();
    store.bind(&carol, b"k").unwrap();
    let limits = QueueLimits {
        max_envelopes: 10,
        max_bytes: 1000,
        max_sender_envelopes: 3,
        max_sender_bytes: 250,
        max_total_bytes: 600,
        max_source_bytes: 260,
    };
    // Each sender from its own source address unless said otherwise.
    let source = |from: &str| i64::from(from.as_bytes().iter().map(|&b| u32::from(b)).sum::<u32>());
    let send_from = |to: &Username, from: &str, source: i64, len: usize| {
        store
            .enqueue(to, (&name(from), source), &vec![1; len], 1, &limits)
            .unwrap()
    };
    let send = |to: &Username, from: &str, len: usize| send_from(to, from, source(from), len);
    for _ in 0..3 {
        assert!(matches!(send(&bob, "mallory", 10), Enqueued::Stored(_)));
    }
    assert_eq!(send(&bob, "mallory", 10), Enqueued::SenderShareFull);
    assert_eq!(
        send(&bob, "mallory2", 251),
        Enqueued::SenderShareFull,
        "bytes share"
    );
    // A second account from mallory's address shares that address's share.
    assert_eq!(
        send_from(&bob, "mallory3", source("mallory"), 10),
        Enqueued::SenderShareFull,
        "one address, many accounts: one share"
    );
    // Others still have room in bob's queue.
    assert!(matches!(send(&bob, "alice", 200), Enqueued::Stored(_)));
    // One address's share of the whole server: mallory's address holds 30 bytes, so
    // 231 more (to someone else) would pass 260.
    assert_eq!(
        send_from(&carol, "mallory4", source("mallory"), 231),
        Enqueued::SourceFull
    );
    // The server's total: 230 queued, 371 more would pass 600.
    assert_eq!(send(&carol, "dave", 371), Enqueued::ServerFull);
    assert!(matches!(send(&carol, "dave", 170), Enqueued::Stored(_)));
    // The accounting survives a reopen and a rebuild.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let before = store.stats().unwrap();
    store.transaction(queue::rebuild_usage_in).unwrap();
    assert_eq!(store.stats().unwrap(), before);
    assert_eq!(
        (
            before.queued,
            before.queued_bytes,
            before.recipients_waiting
        ),
        (5, 400, 2)
    );
}

/// A version 3 database (no `source` column, no `source_usage`) with mail waiting is
/// upgraded in place: its envelopes are kept, delivered and accounted.
#[test]
fn a_version_3_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(Store::FILE_NAME)).unwrap();
        conn.execute_batch(
            "CREATE TABLE accounts (username TEXT PRIMARY KEY NOT NULL,
                 public_key BLOB NOT NULL, created_at INTEGER NOT NULL);
             CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT,
                 recipient TEXT NOT NULL, sender TEXT NOT NULL, payload BLOB NOT NULL,
                 created_at INTEGER NOT NULL);
             CREATE TABLE usage (recipient TEXT NOT NULL, sender TEXT NOT NULL,
                 envelopes INTEGER NOT NULL, bytes INTEGER NOT NULL,
                 PRIMARY KEY (recipient, sender)) WITHOUT ROWID;
             CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
             INSERT INTO accounts VALUES ('bob', x'00', 1);
             INSERT INTO queue (recipient, sender, payload, created_at)
                 VALUES ('bob', 'alice', x'010203', 5), ('bob', 'alice', x'0405', 6);
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.queued, stats.queued_bytes), (2, 5));
    let bob = name("bob");
    let waiting = store.pending(&bob, 0, 10).unwrap();
    assert_eq!(waiting.len(), 2);
    assert_eq!(waiting[0].payload, [1, 2, 3]);
    let limits = QueueLimits::per_recipient(10, 100);
    assert!(matches!(
        store
            .enqueue(&bob, (&name("carol"), 7), b"new", 10, &limits)
            .unwrap(),
        Enqueued::Stored(_)
    ));
    let ids: Vec<u64> = store
        .pending(&bob, 0, 10)
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(store.ack(&bob, &ids).unwrap(), 3);
    let conn = Connection::open(dir.path().join(Store::FILE_NAME)).unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM source_usage", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "every source's usage went back to nothing");
}

#[test]
fn refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(Store::FILE_NAME)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::SchemaTooNew { found: 99 })
    ));
}

/// The database and its log are the owner's alone, like the directory and the TLS key;
/// one left readable by others by an older relay is tightened.
#[cfg(unix)]
#[test]
fn the_database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode = |file: &str| {
        std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let store = Store::open(dir.path()).unwrap();
    store.bind(&name("alice"), b"key-a").unwrap();
    for file in [
        "chat-server.sqlite3",
        "chat-server.sqlite3-wal",
        "chat-server.sqlite3-shm",
    ] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    // Left readable by others (by an older relay, with a log left by a crash): tightened
    // at the next open, log included.
    let wal = dir.path().join("chat-server.sqlite3-wal");
    for file in [dir.path().join(Store::FILE_NAME), wal.clone()] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(mode("chat-server.sqlite3"), 0o600);
    assert_eq!(mode("chat-server.sqlite3-wal"), 0o600);
    drop((store, again));
}

#[cfg(unix)]
#[test]
fn a_data_directory_readable_by_others_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    // Made by the user (say `mkdir` under a 022 umask) before the relay first ran.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    drop(store);
}
