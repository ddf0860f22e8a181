//! Durable state in a SQLite file in the data dir: account bindings (username → public
//! key), the store-and-forward queue of envelopes not yet acknowledged by their recipient
//! (`queue`), and operator counters. Only ciphertext is stored.
//!
//! Calls are blocking and short; the async shell runs them on the blocking pool, and the
//! writer thread (`crate::writer`) batches the writes.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chat_protocol::Username;
use rusqlite::{Connection, OptionalExtension, params};

mod export;
mod queue;

pub use queue::{Enqueued, QueueLimits, Queued};
pub(crate) use queue::{ack_in, add_counter, enqueue_in, record_last_id};

/// 2: the queue; 3: per-(recipient, sender) usage and totals for the quotas.
const SCHEMA_VERSION: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the database {path}: {source}")]
    CreateFile {
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
    /// The cluster backend (NATS JetStream) failed or is unreachable.
    #[error("cluster backend: {0}")]
    Cluster(String),
}

impl StoreError {
    /// The disk (or SQLite's size limit) is full: nothing more can be queued for now.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DiskFull)
    }
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

    /// Opens (creating if needed, and upgrading an older schema) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        make_dir_private(data_dir);
        let path = data_dir.join(Self::FILE_NAME);
        // The owner's alone, like the directory and the TLS key: SQLite gives the -wal and
        // -shm files the database's mode.
        create_private_file(&path).map_err(|source| StoreError::CreateFile {
            path: path.clone(),
            source,
        })?;
        let mut conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        rusqlite::vtab::array::load_module(&conn)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: version });
        }
        if version == SCHEMA_VERSION {
            // Up to date: open without writing (an admin command beside a running relay).
            return Ok(Self {
                conn: Arc::new(Mutex::new(conn)),
            });
        }
        // IMMEDIATE: take the write lock first (waiting for a running relay's writer),
        // rather than fail when a read turns into a write.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
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
                 created_at INTEGER NOT NULL,
                 -- The sender's address group, as a keyed hash (0: from before version 4).
                 source     INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS queue_by_recipient ON queue (recipient, id);
             CREATE INDEX IF NOT EXISTS queue_by_age ON queue (created_at);
             CREATE TABLE IF NOT EXISTS usage (
                 recipient TEXT NOT NULL,
                 sender    TEXT NOT NULL,
                 envelopes INTEGER NOT NULL,
                 bytes     INTEGER NOT NULL,
                 PRIMARY KEY (recipient, sender)
             ) WITHOUT ROWID;
             -- recipient '' holds a source's usage over all recipients.
             CREATE TABLE IF NOT EXISTS source_usage (
                 recipient TEXT NOT NULL,
                 source    INTEGER NOT NULL,
                 envelopes INTEGER NOT NULL,
                 bytes     INTEGER NOT NULL,
                 PRIMARY KEY (recipient, source)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS counters (
                 name  TEXT PRIMARY KEY NOT NULL,
                 value INTEGER NOT NULL
             );",
        )?;
        let has_source: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('queue') WHERE name = 'source')",
            [],
            |r| r.get(0),
        )?;
        if !has_source {
            tx.execute_batch("ALTER TABLE queue ADD COLUMN source INTEGER NOT NULL DEFAULT 0")?;
        }
        if version < 4 {
            queue::rebuild_usage_in(&tx)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
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
            .prepare_cached("SELECT public_key FROM accounts WHERE username = ?1")?
            .query_row(params![user.as_str()], |r| r.get(0))
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

    /// Queues `payload` for a registered `recipient` from `sender` at `source` (a keyed
    /// hash of its address group, `limits::Sources`) unless that would pass `limits`.
    /// Returns the envelope id once the insert is committed.
    pub fn enqueue(
        &self,
        recipient: &Username,
        (sender, source): (&Username, i64),
        payload: &[u8],
        now_secs: u64,
        limits: &QueueLimits,
    ) -> Result<Enqueued, StoreError> {
        self.transaction(|tx| {
            enqueue_in(
                tx, None, recipient, sender, source, payload, now_secs, limits,
            )
        })
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
        self.transaction(|tx| queue::purge_in(tx, now_secs, max_age_secs))
    }

    /// Removes an account and its queue, freeing the name. Returns whether it existed.
    pub fn remove_user(&self, user: &Username) -> Result<bool, StoreError> {
        self.transaction(|tx| {
            let existed = tx.execute(
                "DELETE FROM accounts WHERE username = ?1",
                params![user.as_str()],
            )? > 0;
            queue::drop_queue_in(tx, user)?;
            Ok(existed)
        })
    }

    /// Adds to operator counters (kept across restarts; see [`Stats::counters`]).
    pub fn add_counters(&self, deltas: &[(&str, u64)]) -> Result<(), StoreError> {
        self.transaction(|tx| {
            for (name, delta) in deltas {
                add_counter(tx, name, *delta as i64)?;
            }
            Ok(())
        })
    }

    /// Totals for operators.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let conn = self.conn();
        let users: i64 = conn.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?;
        let recipients: i64 =
            conn.query_row("SELECT COUNT(DISTINCT recipient) FROM usage", [], |r| {
                r.get(0)
            })?;
        let mut counters = std::collections::BTreeMap::new();
        let mut stmt = conn.prepare("SELECT name, value FROM counters ORDER BY name")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, value) = row?;
            counters.insert(name, value.unsigned_abs());
        }
        Ok(Stats {
            users: users.unsigned_abs(),
            queued: counters.get("queued_envelopes").copied().unwrap_or(0),
            queued_bytes: counters.get("queued_bytes").copied().unwrap_or(0),
            recipients_waiting: recipients.unsigned_abs(),
            expired_total: counters.get("expired").copied().unwrap_or(0),
            counters,
        })
    }
}

/// What `chat-server admin stats` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub users: u64,
    pub queued: u64,
    pub queued_bytes: u64,
    /// Users with something queued.
    pub recipients_waiting: u64,
    pub expired_total: u64,
    /// Every counter by name: the above, and what the running server refused or ignored
    /// (`acks_ignored`, `refused_server_full`, `refused_sender_share`, …).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Creates `path` readable and writable by its owner only (0600) if it is missing. One
/// that exists, and its `-wal` and `-shm` files, are made so where we may (they may be
/// another user's: an admin command run beside the relay only reads them).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(path).is_ok() {
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.as_os_str().to_owned();
                file.push(suffix);
                if let Ok(meta) = std::fs::metadata(&file) {
                    let mode = meta.permissions().mode();
                    if mode & 0o077 != 0 {
                        let private = std::fs::Permissions::from_mode(mode & 0o700);
                        let _ = std::fs::set_permissions(&file, private);
                    }
                }
            }
            return Ok(());
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let _ = path;
    Ok(())
}

/// Makes an existing directory that others may read or enter (one the user made before
/// the relay first ran) the owner's alone, saying so: the files in it are private, but
/// their names, sizes and times would show when the relay stores and delivers. Where we
/// may not (another user's directory: an admin command run beside the relay), it only
/// warns.
fn make_dir_private(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 == 0 {
            return;
        }
        let shown = path.display();
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)) {
            Ok(()) => tracing::warn!(
                "the data directory {shown} was open to others (mode {mode:o}); made private \
                 ({:o})",
                mode & 0o700
            ),
            Err(e) => tracing::warn!(
                "the data directory {shown} is open to others (mode {mode:o}) and could not be \
                 made private ({e}); run: chmod 700 {shown}"
            ),
        }
    }
    let _ = path;
}

pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

#[cfg(test)]
mod tests;
