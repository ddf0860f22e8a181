use super::*;
use chat_protocol::trust::Pin;
use zeroize::Zeroizing;

pub(crate) fn open(dir: &Path, encrypt: bool) -> Store {
    Store::open(dir, RowCipher::new(Zeroizing::new([3; 32]), encrypt)).unwrap()
}

#[test]
fn pins() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    assert_eq!(store.pin("bob").unwrap(), None);
    let pin = Pin {
        key: vec![1, 2],
        verified: false,
        pending: Some(vec![3]),
    };
    store.save_pin("bob", &pin).unwrap();
    assert_eq!(store.pin("bob").unwrap(), Some(pin));
    store.set_meta("x", 5).unwrap();
    assert_eq!(store.meta("x").unwrap(), Some(5));
    assert_eq!(store.meta("y").unwrap(), None);
}

#[cfg(unix)]
#[test]
fn the_database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(Store::FILE_NAME);
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = open(dir.path(), false);
    store.set_meta("x", 1).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("{}{suffix}", Store::FILE_NAME));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
}

/// A schema-0 database (texts in the clear) in `dir`: one received message, and with
/// `queued` one sent message still in the outbox.
fn schema_zero(dir: &Path, queued: bool) {
    let conn = Connection::open(dir.join(Store::FILE_NAME)).unwrap();
    conn.execute_batch(
        "CREATE TABLE contacts (username TEXT PRIMARY KEY NOT NULL, pinned_key BLOB NOT NULL,
                 verified INTEGER NOT NULL DEFAULT 0, pending_key BLOB,
                 out_created_ms INTEGER NOT NULL DEFAULT 0, in_offer_ms INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE messages (peer TEXT NOT NULL, id BLOB NOT NULL, outgoing INTEGER NOT NULL,
                 body TEXT NOT NULL, sent_at INTEGER NOT NULL, status TEXT NOT NULL,
                 PRIMARY KEY (peer, id, outgoing));
             CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,
                 peer TEXT NOT NULL, body TEXT NOT NULL, sent_at INTEGER NOT NULL);
             INSERT INTO messages VALUES ('bob', x'01010101010101010101010101010101', 0, 'old hello', 5, 'delivered');",
    )
    .unwrap();
    if queued {
        conn.execute_batch(
            "INSERT INTO messages VALUES ('bob', x'02020202020202020202020202020202', 1, 'queued text', 6, 'sending');
             INSERT INTO outbox (id, peer, body, sent_at) VALUES (x'02020202020202020202020202020202', 'bob', 'queued text', 6);",
        )
        .unwrap();
    }
}

/// Whether `text` is anywhere in the database or its write-ahead log as they are on disk.
pub(crate) fn on_disk(dir: &Path, text: &[u8]) -> bool {
    ["", "-wal"].iter().any(|suffix| {
        let bytes =
            std::fs::read(dir.join(format!("{}{suffix}", Store::FILE_NAME))).unwrap_or_default();
        bytes.windows(text.len()).any(|w| w == text)
    })
}

#[test]
fn schema_zero_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    schema_zero(dir.path(), true);
    // Upgraded with a passphrase: the old texts are encrypted in place.
    let store = open(dir.path(), true);
    let history = store.history("bob", 10).unwrap();
    assert_eq!(
        history.iter().map(|h| h.text.as_str()).collect::<Vec<_>>(),
        ["old hello", "queued text"]
    );
    assert_eq!(
        store.outbox_queued().unwrap()[0].body,
        chat_protocol::e2e::Body::Text("queued text".into())
    );
    drop(store);
    for text in [&b"old hello"[..], b"queued text"] {
        assert!(
            !on_disk(dir.path(), text),
            "{} left in the clear",
            String::from_utf8_lossy(text)
        );
    }
}

/// The plain pages leave the disk when the texts are sealed, not when the store closes
/// (a client runs for days), whether or not the outbox held anything.
#[test]
fn sealed_texts_leave_no_plain_copy_while_the_store_is_open() {
    for queued in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        schema_zero(dir.path(), queued);
        assert!(on_disk(dir.path(), b"old hello"));
        let store = open(dir.path(), true);
        assert!(
            !on_disk(dir.path(), b"old hello"),
            "left in the clear (outbox used: {queued})"
        );
        assert_eq!(store.history("bob", 10).unwrap()[0].text, "old hello");
    }
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), false));
    let conn = Connection::open(dir.path().join(Store::FILE_NAME)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(dir.path(), RowCipher::new(Zeroizing::new([3; 32]), false)).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99 }),
        "{err}"
    );
}
