//! The client's local store (SQLite in the home dir): pinned contact keys, history and the
//! outbox. A message enters the outbox (and history, as *sending*) before it is sent and
//! leaves the outbox only when the server accepted it, so nothing typed is lost to a crash,
//! a restart or a dropped connection.

use std::path::Path;

use chat_protocol::e2e::MessageId;
use chat_protocol::trust::Pin;
use rusqlite::{Connection, OptionalExtension, params};

use crate::api::{HistoryItem, Status, id_hex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// A message waiting to be accepted by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: MessageId,
    pub peer: String,
    pub text: String,
    pub sent_at: u64,
}

/// Per-contact floors that keep E2E state monotonic across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floors {
    /// Creation time of our newest key offer to them.
    pub out_created_ms: u64,
    /// Creation time of their newest key offer we accepted.
    pub in_offer_ms: u64,
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    pub const FILE_NAME: &'static str = "client.sqlite3";

    pub fn open(home: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(home.join(Self::FILE_NAME))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS contacts (
                 username       TEXT PRIMARY KEY NOT NULL,
                 pinned_key     BLOB NOT NULL,
                 verified       INTEGER NOT NULL DEFAULT 0,
                 pending_key    BLOB,
                 out_created_ms INTEGER NOT NULL DEFAULT 0,
                 in_offer_ms    INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS messages (
                 peer     TEXT NOT NULL,
                 id       BLOB NOT NULL,
                 outgoing INTEGER NOT NULL,
                 body     TEXT NOT NULL,
                 sent_at  INTEGER NOT NULL,
                 status   TEXT NOT NULL,
                 PRIMARY KEY (peer, id, outgoing)
             );
             CREATE INDEX IF NOT EXISTS messages_by_time ON messages (peer, sent_at);
             CREATE TABLE IF NOT EXISTS outbox (
                 seq     INTEGER PRIMARY KEY AUTOINCREMENT,
                 id      BLOB NOT NULL UNIQUE,
                 peer    TEXT NOT NULL,
                 body    TEXT NOT NULL,
                 sent_at INTEGER NOT NULL
             );",
        )?;
        Ok(Self { conn })
    }

    pub fn pin(&self, user: &str) -> Result<Option<Pin>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT pinned_key, verified, pending_key FROM contacts WHERE username = ?1",
                params![user],
                |r| {
                    Ok(Pin {
                        key: r.get(0)?,
                        verified: r.get(1)?,
                        pending: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn save_pin(&self, user: &str, pin: &Pin) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO contacts (username, pinned_key, verified, pending_key)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (username) DO UPDATE SET
                 pinned_key = excluded.pinned_key,
                 verified = excluded.verified,
                 pending_key = excluded.pending_key",
            params![user, pin.key, pin.verified, pin.pending],
        )?;
        Ok(())
    }

    pub fn floors(&self, user: &str) -> Result<Floors, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT out_created_ms, in_offer_ms FROM contacts WHERE username = ?1",
                params![user],
                |r| {
                    Ok(Floors {
                        out_created_ms: r.get::<_, i64>(0)?.unsigned_abs(),
                        in_offer_ms: r.get::<_, i64>(1)?.unsigned_abs(),
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    pub fn save_floors(&self, user: &str, floors: Floors) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE contacts SET out_created_ms = ?2, in_offer_ms = ?3 WHERE username = ?1",
            params![
                user,
                floors.out_created_ms as i64,
                floors.in_offer_ms as i64
            ],
        )?;
        Ok(())
    }

    /// Puts a new outgoing message in the outbox and history, atomically.
    pub fn enqueue(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO outbox (id, peer, body, sent_at) VALUES (?1, ?2, ?3, ?4)",
            params![&item.id[..], item.peer, item.text, item.sent_at as i64],
        )?;
        tx.execute(
            "INSERT INTO messages (peer, id, outgoing, body, sent_at, status)
             VALUES (?1, ?2, 1, ?3, ?4, 'sending')",
            params![item.peer, &item.id[..], item.text, item.sent_at as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The outbox in the order messages were written.
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, peer, body, sent_at FROM outbox ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok(OutboxItem {
                id: id.try_into().unwrap_or_default(),
                peer: r.get(1)?,
                text: r.get(2)?,
                sent_at: r.get::<_, i64>(3)?.unsigned_abs(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok(n.unsigned_abs() as usize)
    }

    /// The server accepted `id`: it leaves the outbox. Returns the peer if it was there.
    pub fn mark_sent(&mut self, id: &MessageId) -> Result<Option<String>, StoreError> {
        self.leave_outbox(id, "sent")
    }

    /// `id` can never be sent (e.g. unknown user): it leaves the outbox as failed.
    pub fn mark_failed(&mut self, id: &MessageId) -> Result<Option<String>, StoreError> {
        self.leave_outbox(id, "failed")
    }

    fn leave_outbox(&mut self, id: &MessageId, status: &str) -> Result<Option<String>, StoreError> {
        let tx = self.conn.transaction()?;
        let peer: Option<String> = tx
            .query_row(
                "DELETE FROM outbox WHERE id = ?1 RETURNING peer",
                params![&id[..]],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(peer) = &peer {
            // A receipt may have overtaken the server's answer: never downgrade.
            tx.execute(
                "UPDATE messages SET status = ?3
                 WHERE peer = ?1 AND id = ?2 AND outgoing = 1 AND status = 'sending'",
                params![peer, &id[..], status],
            )?;
        }
        tx.commit()?;
        Ok(peer)
    }

    /// `peer` confirmed receipt of our `id`. Returns whether this is news.
    pub fn mark_delivered(&self, peer: &str, id: &MessageId) -> Result<bool, StoreError> {
        let changed = self.conn.execute(
            "UPDATE messages SET status = 'delivered'
             WHERE peer = ?1 AND id = ?2 AND outgoing = 1 AND status != 'delivered'",
            params![peer, &id[..]],
        )?;
        Ok(changed > 0)
    }

    /// Stores a received message. Returns false if it was already stored (a resend).
    pub fn store_incoming(
        &self,
        peer: &str,
        id: &MessageId,
        text: &str,
        sent_at: u64,
    ) -> Result<bool, StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO messages (peer, id, outgoing, body, sent_at, status)
             VALUES (?1, ?2, 0, ?3, ?4, 'delivered')
             ON CONFLICT DO NOTHING",
            params![peer, &id[..], text, sent_at as i64],
        )?;
        Ok(inserted > 0)
    }

    /// The last `limit` messages with `peer`, oldest first.
    pub fn history(&self, peer: &str, limit: usize) -> Result<Vec<HistoryItem>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, outgoing, body, sent_at, status FROM (
                 SELECT rowid, * FROM messages WHERE peer = ?1
                 ORDER BY sent_at DESC, rowid DESC LIMIT ?2
             ) ORDER BY sent_at, rowid",
        )?;
        let rows = stmt.query_map(params![peer, limit as i64], |r| {
            let id: Vec<u8> = r.get(0)?;
            let status: String = r.get(4)?;
            Ok(HistoryItem {
                id: id_hex(&id.try_into().unwrap_or_default()),
                outgoing: r.get(1)?,
                text: r.get(2)?,
                sent_at: r.get::<_, i64>(3)?.unsigned_abs(),
                status: match status.as_str() {
                    "sending" => Status::Sending,
                    "sent" => Status::Sent,
                    "delivered" => Status::Delivered,
                    _ => Status::Failed,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Everyone we have a pin or history with, for contact lists.
    pub fn contacts(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT username FROM contacts UNION SELECT DISTINCT peer FROM messages ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u8, peer: &str) -> OutboxItem {
        OutboxItem {
            id: [n; 16],
            peer: peer.into(),
            text: format!("m{n}"),
            sent_at: 1000 + u64::from(n),
        }
    }

    #[test]
    fn outbox_survives_reopen_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            for n in [3, 1, 2] {
                store.enqueue(&item(n, "bob")).unwrap();
            }
        }
        let mut store = Store::open(dir.path()).unwrap();
        let ids: Vec<u8> = store.outbox().unwrap().iter().map(|i| i.id[0]).collect();
        assert_eq!(ids, vec![3, 1, 2]);
        assert_eq!(store.mark_sent(&[1; 16]).unwrap().as_deref(), Some("bob"));
        assert_eq!(store.mark_sent(&[1; 16]).unwrap(), None, "only once");
        assert_eq!(store.outbox_len().unwrap(), 2);
        let history = store.history("bob", 10).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[0].status, Status::Sent);
        assert_eq!(history[1].status, Status::Sending);
    }

    #[test]
    fn delivered_is_never_downgraded_and_incoming_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.enqueue(&item(1, "bob")).unwrap();
        assert!(store.mark_delivered("bob", &[1; 16]).unwrap());
        assert!(!store.mark_delivered("bob", &[1; 16]).unwrap());
        assert!(
            !store.mark_delivered("carol", &[1; 16]).unwrap(),
            "not carol's message"
        );
        store.mark_sent(&[1; 16]).unwrap();
        assert_eq!(
            store.history("bob", 10).unwrap()[0].status,
            Status::Delivered
        );

        assert!(store.store_incoming("bob", &[7; 16], "hi", 5).unwrap());
        assert!(!store.store_incoming("bob", &[7; 16], "hi", 5).unwrap());
        assert_eq!(store.history("bob", 10).unwrap().len(), 2);
        assert_eq!(store.contacts().unwrap(), vec!["bob"]);
    }

    #[test]
    fn pins_and_floors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.pin("bob").unwrap(), None);
        let pin = Pin {
            key: vec![1, 2],
            verified: false,
            pending: Some(vec![3]),
        };
        store.save_pin("bob", &pin).unwrap();
        assert_eq!(store.pin("bob").unwrap(), Some(pin));
        let floors = Floors {
            out_created_ms: 5,
            in_offer_ms: 9,
        };
        store.save_floors("bob", floors).unwrap();
        assert_eq!(store.floors("bob").unwrap(), floors);
        assert_eq!(store.floors("nobody").unwrap(), Floors::default());
    }
}
