//! The client's local store (SQLite in the home dir, `client.sqlite3`, mode 0600).
//!
//! - Pinned contact keys (trust on first use) — here.
//! - History and the outbox — `messages`. A message enters the outbox (and history, as
//!   *sending*) before it is sent and leaves it only when the recipient's receipt arrives
//!   (or it is given up with a reason), so nothing typed is lost to a crash, a restart, a
//!   dropped connection or a recipient that lost its keys.
//! - End-to-end state — `e2e`: each contact's receiving epochs, receipts and retry requests
//!   owed, envelopes held while a key change is pending. Every delivery is committed in
//!   one transaction with the state it changed, so a crash or a full disk never leaves a
//!   message half-processed.
//!
//! - How many messages wait for the relay — `queued_counts`: kept by triggers, so the
//!   `connection` event's figure costs the same with one message queued or 20,000.
//!
//! With a passphrase on the identity, message texts, epoch keys and group states and keys
//! are encrypted at rest (`cipher`; what was stored before in the clear is sealed at open,
//! `sealing`); names, times and delivery states are not.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

pub mod cipher;
mod contacts;
mod e2e;
mod group_held;
mod group_outbox;
mod groups;
mod messages;
mod queued_counts;
mod sealing;

pub use cipher::RowCipher;
pub use e2e::{Held, ReceivedText};
pub use group_outbox::{GroupQueued, Withdrawn};
pub use groups::{GroupLine, GroupRecord, GroupWrite, HeldChange, OutgoingGroupMessage};
pub use messages::{Delivered, OutboxItem, QueuedRef, Undelivered};

/// Schema version (`PRAGMA user_version`). 0: the first release (floors, outbox until the
/// server's answer); 1: outbox until receipted, persisted epochs, held envelopes; 2:
/// receipts and retry requests remember the epoch they were sent under; 3: contacts can be
/// archived or removed from the list (`contacts.listing`); 4: groups (`groups`), and the
/// outbox carries group control messages too (`outbox.kind`).
const SCHEMA_VERSION: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Undecryptable(#[from] cipher::Undecryptable),
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the local database was written by a newer version of chat-client (schema {found}); update chat-client"
    )]
    SchemaTooNew { found: i64 },
}

impl StoreError {
    /// The disk (or the database's quota) is full: the same write can succeed later.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DiskFull)
    }
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
    cipher: RowCipher,
    /// The newest `stored_at` given out: they only ever increase, so the history keeps
    /// its order even if the clock goes back.
    last_stored_at: u64,
}

impl Store {
    pub const FILE_NAME: &'static str = "client.sqlite3";

    /// Opens (creating, 0600) the store in `home`, upgrading an older schema in place. With
    /// `cipher.encrypt` set, plain texts left from before are encrypted now.
    pub fn open(home: &Path, cipher: RowCipher) -> Result<Self, StoreError> {
        let path = home.join(Self::FILE_NAME);
        crate::home::create_private_file(&path).map_err(|source| StoreError::File {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The log is folded into the database every 100 pages (~400 KB; SQLite's default
        // is 1000, ~4 MB) and cut back to 1 MiB after: on a nearly full disk the log
        // itself would otherwise take the space freed for what it holds, and each retry
        // would fill the disk again (found with a 3 MB disk and a 150-message backlog).
        conn.pragma_update(None, "wal_autocheckpoint", 100)?;
        conn.pragma_update(None, "journal_size_limit", 1 << 20)?;
        // Deleted texts and keys are overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // SQLite gives the -wal and -shm files the main file's mode; older files may not
        // have been private yet.
        for suffix in ["", "-wal", "-shm"] {
            let file = home.join(format!("{}{suffix}", Self::FILE_NAME));
            crate::home::make_private(&file).map_err(|source| StoreError::File {
                path: file.clone(),
                source,
            })?;
        }
        let mut store = Self {
            conn,
            cipher,
            last_stored_at: 0,
        };
        store.migrate()?;
        store.last_stored_at = store
            .conn
            .query_row(
                "SELECT COALESCE(MAX(stored_at), 0) FROM messages",
                [],
                |r| r.get::<_, i64>(0),
            )?
            .unsigned_abs();
        if store.cipher.encrypt {
            store.encrypt_plain_values()?;
        }
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: version });
        }
        let existing: bool = self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'messages'",
            [],
            |r| r.get(0),
        )?;
        let tx = self.conn.transaction()?;
        if existing && version == 0 {
            // Schema 0 → 1. Outbox rows of schema 0 had not been accepted by the server.
            tx.execute_batch(
                "ALTER TABLE messages ADD COLUMN stored_at INTEGER NOT NULL DEFAULT 0;
                 UPDATE messages SET stored_at = sent_at;
                 ALTER TABLE messages ADD COLUMN undelivered INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE messages ADD COLUMN reason TEXT;
                 ALTER TABLE outbox ADD COLUMN state TEXT NOT NULL DEFAULT 'queued';
                 ALTER TABLE outbox ADD COLUMN epoch INTEGER;
                 ALTER TABLE outbox ADD COLUMN accepted_at INTEGER;",
            )?;
        }
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS contacts (
                 username       TEXT PRIMARY KEY NOT NULL,
                 pinned_key     BLOB NOT NULL,
                 verified       INTEGER NOT NULL DEFAULT 0,
                 pending_key    BLOB,
                 out_created_ms INTEGER NOT NULL DEFAULT 0, -- schema 0, unused
                 in_offer_ms    INTEGER NOT NULL DEFAULT 0, -- schema 0, unused
                 listing        TEXT NOT NULL DEFAULT 'shown' -- shown | archived | removed
             );
             CREATE TABLE IF NOT EXISTS messages (
                 peer        TEXT NOT NULL,
                 id          BLOB NOT NULL,
                 outgoing    INTEGER NOT NULL,
                 body        NOT NULL,      -- TEXT, or an encrypted BLOB
                 sent_at     INTEGER NOT NULL, -- the sender's clock: shown, not ordered by
                 status      TEXT NOT NULL,
                 stored_at   INTEGER NOT NULL DEFAULT 0, -- our clock: the order
                 undelivered INTEGER NOT NULL DEFAULT 0, -- sent long ago, no receipt yet
                 reason      TEXT,          -- why it failed
                 PRIMARY KEY (peer, id, outgoing)
             );
             CREATE INDEX IF NOT EXISTS messages_by_arrival ON messages (peer, stored_at);
             CREATE TABLE IF NOT EXISTS outbox (
                 seq         INTEGER PRIMARY KEY AUTOINCREMENT,
                 id          BLOB NOT NULL UNIQUE,
                 peer        TEXT NOT NULL,
                 body        NOT NULL,
                 sent_at     INTEGER NOT NULL,
                 state       TEXT NOT NULL DEFAULT 'queued', -- queued | sent
                 epoch       INTEGER,       -- the epoch it was accepted under
                 accepted_at INTEGER,       -- our clock when the server accepted it
                 kind        TEXT NOT NULL DEFAULT 'text' -- text | control (groups)
             );
             CREATE TABLE IF NOT EXISTS e2e_state (
                 peer    TEXT PRIMARY KEY NOT NULL,
                 inbound BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS receipts_due (
                 peer TEXT NOT NULL,
                 id   BLOB NOT NULL,
                 PRIMARY KEY (peer, id)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS retries (
                 peer         TEXT NOT NULL,
                 epoch        INTEGER NOT NULL, -- theirs, that we cannot open
                 requested_at INTEGER NOT NULL,
                 sent         INTEGER NOT NULL DEFAULT 0,
                 sent_epoch   INTEGER,          -- ours, that the request went under
                 PRIMARY KEY (peer, epoch)
             ) WITHOUT ROWID;
             -- Receipts the relay accepted, by the epoch they went under: sent again if the
             -- peer cannot open that epoch.
             CREATE TABLE IF NOT EXISTS receipts_log (
                 seq   INTEGER PRIMARY KEY AUTOINCREMENT,
                 peer  TEXT NOT NULL,
                 id    BLOB NOT NULL,
                 epoch INTEGER NOT NULL,
                 UNIQUE (peer, id)
             );
             CREATE TABLE IF NOT EXISTS held (
                 seq         INTEGER PRIMARY KEY AUTOINCREMENT,
                 peer        TEXT NOT NULL,
                 payload     BLOB NOT NULL,
                 received_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (
                 name  TEXT PRIMARY KEY NOT NULL,
                 value INTEGER NOT NULL
             );",
        )?;
        if existing && version == 1 {
            tx.execute_batch("ALTER TABLE retries ADD COLUMN sent_epoch INTEGER;")?;
        }
        if existing && version < 3 {
            tx.execute_batch(
                "ALTER TABLE contacts ADD COLUMN listing TEXT NOT NULL DEFAULT 'shown';",
            )?;
        }
        if existing && version < 4 {
            tx.execute_batch("ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'text';")?;
        }
        groups::create_tables(&tx)?;
        // Ids of received messages whose conversation the user deleted: a copy sent again
        // is a duplicate, not a new message.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS removed_ids (
                 peer TEXT NOT NULL,
                 id   BLOB NOT NULL,
                 PRIMARY KEY (peer, id)
             ) WITHOUT ROWID;
             -- What a flush walks: the queued messages in the order written, without
             -- the rows the relay already accepted (kept until their receipt).
             CREATE INDEX IF NOT EXISTS outbox_queued ON outbox (seq) WHERE state = 'queued';",
        )?;
        queued_counts::create(&tx)?;
        // A new message in either direction brings an archived or removed contact back
        // to the list (as Signal does), whichever code path stored it.
        tx.execute_batch(
            "CREATE TRIGGER IF NOT EXISTS relist_on_message AFTER INSERT ON messages
             BEGIN
                 UPDATE contacts SET listing = 'shown'
                 WHERE username = NEW.peer AND listing != 'shown';
             END;",
        )?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    /// Seals every value stored in the clear (before a passphrase was set, or by schema 0):
    /// texts, queued messages, epoch keys, group states, keys and texts (`sealing`).
    fn encrypt_plain_values(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let sealed = sealing::seal_plain_values(&tx, &self.cipher)?;
        tx.commit()?;
        if sealed > 0 {
            // The sealed pages replace the plain ones in the database file now, not at the
            // next automatic checkpoint, and the log holding them is emptied.
            self.fold_log()?;
        }
        Ok(())
    }

    /// Folds the write-ahead log into the database and cuts the log to zero bytes
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`, <https://sqlite.org/pragma.html#pragma_wal_checkpoint>).
    fn fold_log(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// After a disk-full error: folds the write-ahead log into the database and cuts it to
    /// nothing, giving its space back if the database has room for what it holds. Errors
    /// are ignored (the disk may still be full; the next write says so).
    pub fn reclaim_log(&self) {
        let _ = self.fold_log();
    }

    /// A `stored_at` for something stored now (our clock, `now` ms): never before the last
    /// one, so history order never depends on the clock.
    fn stamp(&mut self, now: u64) -> u64 {
        self.last_stored_at = now.max(self.last_stored_at + 1);
        self.last_stored_at
    }

    /// A small persisted number (`meta` table), e.g. the relay's queue age limit.
    pub fn meta(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE name = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(i64::unsigned_abs))
    }

    pub fn set_meta(&self, name: &str, value: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params![name, value as i64],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction, committed if it succeeds.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &RowCipher) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let result = f(&tx, &self.cipher)?;
        tx.commit()?;
        Ok(result)
    }

    /// As [`Store::transaction`], committed without waiting for the disk: `synchronous =
    /// NORMAL` for this one commit (in WAL mode it survives a crash of the process, and
    /// the next ordinary commit, which syncs the log, makes it durable too; a power cut
    /// before that can roll it back). Only for records whose loss makes us repeat
    /// something the other side takes once: a text marked sent goes out again and its
    /// recipient drops the copy by id.
    fn transaction_unsynced<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &RowCipher) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let result = self.transaction(f);
        // Back to waiting for the disk before anything else is committed.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        result
    }
}

/// Reads a text column that may be encrypted.
fn read_text(
    cipher: &RowCipher,
    place: &[u8],
    value: rusqlite::types::Value,
) -> Result<String, StoreError> {
    use rusqlite::types::Value;
    match value {
        Value::Text(text) => Ok(text),
        Value::Blob(blob) if RowCipher::is_sealed(&blob) => {
            let plain = cipher.open(place, &blob)?;
            String::from_utf8(plain.to_vec()).map_err(|_| cipher::Undecryptable.into())
        }
        _ => Err(cipher::Undecryptable.into()),
    }
}

/// What to store for bytes: sealed, or as they are.
fn write_blob(cipher: &RowCipher, place: &[u8], plain: &[u8]) -> Vec<u8> {
    cipher.seal(place, plain).unwrap_or_else(|| plain.to_vec())
}

/// Reads bytes that may be sealed.
fn read_blob(
    cipher: &RowCipher,
    place: &[u8],
    stored: Vec<u8>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
    if RowCipher::is_sealed(&stored) {
        Ok(cipher.open(place, &stored)?)
    } else {
        Ok(zeroize::Zeroizing::new(stored))
    }
}

/// What to store for a text: the sealed bytes, or the text itself.
fn write_text(cipher: &RowCipher, place: &[u8], text: &str) -> rusqlite::types::Value {
    match cipher.seal(place, text.as_bytes()) {
        Some(sealed) => rusqlite::types::Value::Blob(sealed),
        None => rusqlite::types::Value::Text(text.to_owned()),
    }
}

#[cfg(test)]
pub(crate) mod tests;
