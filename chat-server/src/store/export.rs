//! Reading a whole store out, for `admin migrate --to-nats` (the cluster backend's
//! migration reads accounts in pages and each recipient's queue in id order).

use chat_protocol::Username;
use rand::Rng;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

impl Store {
    /// This store's identity: 16 hex digits, random, made at the first call and kept in
    /// the file (so a migration can tell two relays' stores apart).
    pub fn store_id(&self) -> Result<String, StoreError> {
        self.transaction(|tx| {
            let existing: Option<i64> = tx
                .query_row(
                    "SELECT value FROM counters WHERE name = 'store_id'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let id = match existing {
                Some(id) => id,
                None => {
                    let id = (rand::rng().next_u64() >> 1) as i64;
                    tx.execute(
                        "INSERT INTO counters (name, value) VALUES ('store_id', ?1)",
                        params![id],
                    )?;
                    id
                }
            };
            Ok(format!("{id:016x}"))
        })
    }

    /// Up to `limit` accounts (name, public key) with names after `after`, in name order.
    /// Names in the file that are not valid usernames (none are written) are skipped.
    pub fn accounts_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(Username, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT username, public_key FROM accounts WHERE username > ?1 \
             ORDER BY username LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut accounts = Vec::new();
        for row in rows {
            let (name, key) = row?;
            if let Ok(user) = Username::parse(&name) {
                accounts.push((user, key));
            }
        }
        Ok(accounts)
    }

    /// How many envelopes are queued for `recipient` with ids above `after`.
    pub fn count_pending(&self, recipient: &Username, after: u64) -> Result<u64, StoreError> {
        let count: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM queue WHERE recipient = ?1 AND id > ?2",
            params![recipient.as_str(), after as i64],
            |r| r.get(0),
        )?;
        Ok(count.unsigned_abs())
    }
}
