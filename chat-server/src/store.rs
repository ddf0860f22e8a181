//! Durable account bindings (username → public key) in a SQLite file in the data dir.
//!
//! Calls are blocking and short; the async shell runs them on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chat_protocol::Username;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA_VERSION: i64 = 1;

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
        let conn = self.conn();
        let inserted = conn.execute(
            "INSERT INTO accounts (username, public_key, created_at)
             VALUES (?1, ?2, unixepoch()) ON CONFLICT (username) DO NOTHING",
            params![user.as_str(), public_key],
        )?;
        if inserted == 1 {
            return Ok(Bind::Created);
        }
        let existing: Vec<u8> = conn.query_row(
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

    /// Number of registered accounts.
    pub fn account_count(&self) -> Result<u64, StoreError> {
        let count: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?;
        Ok(count.unsigned_abs())
    }
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
        assert_eq!(store.account_count().unwrap(), 1);
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
