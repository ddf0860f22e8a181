//! Durable state in a SQLite file in the data dir: account bindings (username → public
//! key) and the store-and-forward queue of envelopes not yet acknowledged by their
//! recipient. Only ciphertext is stored.
//!
//! Calls are blocking and short; the async shell runs them on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chat_protocol::Username;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA_VERSION: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "database schema version {found} is newer than this server understands ({SCHEMA_VERSION}); upgrade the server"
    )]
    SchemaTooNew { found: i64 },
    #[error("the database writer has stopped")]
    WriterGone,
}

pub(crate) fn enqueue_in(
    tx: &rusqlite::Transaction<'_>,
    id: Option<u64>,
    recipient: &Username,
    sender: &Username,
    payload: &[u8],
    now_secs: u64,
    limits: &QueueLimits,
) -> Result<Enqueued, StoreError> {
    let registered: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE username = ?1)")?
        .query_row(params![recipient.as_str()], |r| r.get(0))?;
    if !registered {
        return Ok(Enqueued::UnknownRecipient);
    }
    let (count, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue WHERE recipient = ?1",
        )?
        .query_row(params![recipient.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if count.unsigned_abs() >= limits.max_envelopes
        || bytes.unsigned_abs() + payload.len() as u64 > limits.max_bytes
    {
        return Ok(Enqueued::Full);
    }
    // NULL lets SQLite pick the id; the relay passes its own so it can deliver first.
    tx.prepare_cached(
        "INSERT INTO queue (id, recipient, sender, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        id.map(|id| id as i64),
        recipient.as_str(),
        sender.as_str(),
        payload,
        now_secs as i64
    ])?;
    Ok(Enqueued::Stored(tx.last_insert_rowid().unsigned_abs()))
}

/// Remembers that ids up to `id` were handed out, even those never written.
pub(crate) fn record_last_id(tx: &rusqlite::Transaction<'_>, id: u64) -> Result<(), StoreError> {
    let updated = tx
        .prepare_cached("UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'queue'")?
        .execute(params![id as i64])?;
    if updated == 0 {
        // No envelope was ever inserted, so SQLite has no row for the table yet.
        tx.prepare_cached("INSERT INTO sqlite_sequence (name, seq) VALUES ('queue', ?1)")?
            .execute(params![id as i64])?;
    }
    Ok(())
}

/// Binds `user` to `public_key` unless already bound (to it: `Existing`; else `Taken`).
pub(crate) fn bind_in(
    tx: &rusqlite::Transaction<'_>,
    user: &Username,
    public_key: &[u8],
) -> Result<Bind, StoreError> {
    let inserted = tx.execute(
        "INSERT INTO accounts (username, public_key, created_at)
         VALUES (?1, ?2, unixepoch()) ON CONFLICT (username) DO NOTHING",
        params![user.as_str(), public_key],
    )?;
    if inserted == 1 {
        return Ok(Bind::Created);
    }
    let existing: Vec<u8> = tx.query_row(
        "SELECT public_key FROM accounts WHERE username = ?1",
        params![user.as_str()],
        |r| r.get(0),
    )?;
    Ok(if existing == public_key {
        Bind::Existing
    } else {
        Bind::Taken
    })
}

pub(crate) fn ack_in(
    tx: &rusqlite::Transaction<'_>,
    recipient: &Username,
    ids: &[u64],
) -> Result<usize, StoreError> {
    let mut stmt = tx.prepare_cached("DELETE FROM queue WHERE recipient = ?1 AND id = ?2")?;
    let mut removed = 0;
    for id in ids {
        removed += stmt.execute(params![recipient.as_str(), *id as i64])?;
    }
    Ok(removed)
}

/// What `bind` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// A new account was created.
    Created,
    /// The name was already bound to this same key.
    Existing,
    /// The name is bound to another key; nothing changed.
    Taken,
}

/// Handle to the account database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    // std Mutex: every critical section is one short synchronous SQLite call, never held
    // across an `.await`.
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    pub const FILE_NAME: &'static str = "chat-server.sqlite3";

    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let conn = Connection::open(data_dir.join(Self::FILE_NAME))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: version });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS accounts (
                 username   TEXT PRIMARY KEY NOT NULL,
                 public_key BLOB NOT NULL,
                 created_at INTEGER NOT NULL
             );
             -- AUTOINCREMENT: ids are never reused, so a late Ack can't hit a newer envelope.
             CREATE TABLE IF NOT EXISTS queue (
                 id         INTEGER PRIMARY KEY AUTOINCREMENT,
                 recipient  TEXT NOT NULL,
                 sender     TEXT NOT NULL,
                 payload    BLOB NOT NULL,
                 created_at INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS queue_by_recipient ON queue (recipient, id);
             CREATE TABLE IF NOT EXISTS counters (
                 name  TEXT PRIMARY KEY NOT NULL,
                 value INTEGER NOT NULL
             );",
        )?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (it is
        // transactional), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The public key bound to `user`, if registered.
    pub fn public_key(&self, user: &Username) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT public_key FROM accounts WHERE username = ?1",
                params![user.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Binds `user` to `public_key` unless it is bound already.
    pub fn bind(&self, user: &Username, public_key: &[u8]) -> Result<Bind, StoreError> {
        self.transaction(|tx| bind_in(tx, user, public_key))
    }

    /// Runs `f` in one transaction, committed if it succeeds.
    pub(crate) fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let result = f(&tx)?;
        tx.commit()?;
        Ok(result)
    }

    /// Queues `payload` for a registered `recipient` unless that would pass `limits`.
    /// Returns the envelope id once the insert is committed.
    pub fn enqueue(
        &self,
        recipient: &Username,
        sender: &Username,
        payload: &[u8],
        now_secs: u64,
        limits: &QueueLimits,
    ) -> Result<Enqueued, StoreError> {
        self.transaction(|tx| enqueue_in(tx, None, recipient, sender, payload, now_secs, limits))
    }

    /// Up to `limit` queued envelopes for `recipient` with ids above `after`, oldest first.
    pub fn pending(
        &self,
        recipient: &Username,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, sender, payload FROM queue WHERE recipient = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![recipient.as_str(), after as i64, limit as i64],
            |r| {
                Ok(Queued {
                    id: r.get::<_, i64>(0)?.unsigned_abs(),
                    sender: r.get(1)?,
                    payload: r.get(2)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets envelopes `recipient` has processed. Ids of other recipients are ignored.
    pub fn ack(&self, recipient: &Username, ids: &[u64]) -> Result<usize, StoreError> {
        self.transaction(|tx| ack_in(tx, recipient, ids))
    }

    /// The next envelope id never used: above every id queued or ever handed out.
    pub fn next_envelope_id(&self) -> Result<u64, StoreError> {
        let last: i64 = self.conn().query_row(
            "SELECT MAX(
                 COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'queue'), 0),
                 COALESCE((SELECT MAX(id) FROM queue), 0))",
            [],
            |r| r.get(0),
        )?;
        Ok(last.unsigned_abs() + 1)
    }

    /// Deletes envelopes older than `max_age_secs` and counts them. Returns how many.
    pub fn purge_expired(&self, now_secs: u64, max_age_secs: u64) -> Result<usize, StoreError> {
        self.transaction(|tx| {
            let cutoff = now_secs.saturating_sub(max_age_secs) as i64;
            let removed = tx.execute("DELETE FROM queue WHERE created_at < ?1", params![cutoff])?;
            if removed > 0 {
                tx.execute(
                    "INSERT INTO counters (name, value) VALUES ('expired', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    params![removed as i64],
                )?;
            }
            Ok(removed)
        })
    }

    /// Removes an account and its queue, freeing the name. Returns whether it existed.
    pub fn remove_user(&self, user: &Username) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let existed = tx.execute(
                "DELETE FROM accounts WHERE username = ?1",
                params![user.as_str()],
            )? > 0;
            tx.execute(
                "DELETE FROM queue WHERE recipient = ?1",
                params![user.as_str()],
            )?;
            Ok(existed)
        })
    }

    /// Totals for operators.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let conn = self.conn();
        let users: i64 = conn.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?;
        let (queued, bytes): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let expired: Option<i64> = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'expired'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(Stats {
            users: users.unsigned_abs(),
            queued: queued.unsigned_abs(),
            queued_bytes: bytes.unsigned_abs(),
            expired_total: expired.unwrap_or(0).unsigned_abs(),
        })
    }
}

/// Per-recipient bounds of the offline queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_envelopes: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Stored(u64),
    Full,
    UnknownRecipient,
}

/// One queued envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub sender: String,
    pub payload: Vec<u8>,
}

/// What `chat-server admin stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub users: u64,
    pub queued: u64,
    pub queued_bytes: u64,
    pub expired_total: u64,
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

#[cfg(test)]
mod tests {
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
        let limits = QueueLimits {
            max_envelopes: 3,
            max_bytes: 100,
        };
        assert_eq!(
            store.enqueue(&bob, &alice, b"x", 1000, &limits).unwrap(),
            Enqueued::UnknownRecipient
        );
        store.bind(&bob, b"k").unwrap();
        let ids: Vec<u64> = (0..3u8)
            .map(|i| {
                match store
                    .enqueue(&bob, &alice, &[i; 10], 1000, &limits)
                    .unwrap()
                {
                    Enqueued::Stored(id) => id,
                    other => panic!("not full yet: {other:?}"),
                }
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            store.enqueue(&bob, &alice, b"x", 1000, &limits).unwrap(),
            Enqueued::Full
        );
        let big = QueueLimits {
            max_envelopes: 100,
            ..limits
        };
        assert_eq!(
            store.enqueue(&bob, &alice, &[0; 71], 1000, &big).unwrap(),
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
        assert_eq!(store.ack(&bob, &ids[..1]).unwrap(), 1);
        assert_eq!(store.stats().unwrap().queued, 2);

        assert_eq!(store.purge_expired(1000 + 50, 100).unwrap(), 0);
        assert_eq!(store.purge_expired(1000 + 101, 100).unwrap(), 2);
        assert_eq!(store.stats().unwrap().expired_total, 2);

        store.enqueue(&bob, &alice, b"x", 2000, &limits).unwrap();
        assert!(store.remove_user(&bob).unwrap());
        assert_eq!(store.public_key(&bob).unwrap(), None);
        assert_eq!(store.stats().unwrap().queued, 0);
        assert!(!store.remove_user(&bob).unwrap());
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
}
