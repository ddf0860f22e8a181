//! What waits in the store for something else: group envelopes whose sender's key or the
//! change adding us is on its way, and membership changes held until the state they
//! build on is reached. Both are bounded per sender; past the bound they stay on the relay.

use chat_protocol::group::GroupId;
use rusqlite::params;

use super::groups::{HeldChange, held_change_place};
use super::{Store, StoreError, read_blob};

/// Group envelopes held per sender (all groups together, so inventing group ids gains a
/// sender nothing) while the sender's key or the change adding us is on its way; more
/// stay on the relay.
pub const MAX_HELD_PER_SENDER: usize = 1000;
/// Changes held per group while an earlier one is on its way.
pub const MAX_HELD_CHANGES: usize = 64;
/// Changes held from one sender, all groups together.
pub const MAX_HELD_CHANGES_PER_SENDER: usize = 256;

impl Store {
    /// Changes held for `group`, oldest first.
    pub fn held_changes(&self, group: &GroupId) -> Result<Vec<HeldChange>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, change FROM group_changes_held WHERE group_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![&group[..]], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, from, stored) = row?;
            let change = read_blob(&self.cipher, &held_change_place(group, &from), stored)?;
            match postcard::from_bytes(&change) {
                Ok(change) => out.push(HeldChange { seq, from, change }),
                Err(_) => self.drop_held_change(seq)?,
            }
        }
        Ok(out)
    }

    pub fn drop_held_change(&self, seq: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "DELETE FROM group_changes_held WHERE seq = ?1",
            params![seq],
        )?;
        Ok(())
    }

    /// Keeps a group envelope from `sender` until what it needs arrives. Returns false
    /// (nothing kept) past [`MAX_HELD_PER_SENDER`].
    pub fn hold_group_envelope(
        &mut self,
        group: &GroupId,
        sender: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        let held: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM group_held WHERE sender = ?1")?
            .query_row(params![sender], |r| r.get(0))?;
        if held.unsigned_abs() as usize >= MAX_HELD_PER_SENDER {
            return Ok(false);
        }
        self.conn.execute(
            "INSERT INTO group_held (group_id, sender, payload, received_at) VALUES (?1, ?2, ?3, ?4)",
            params![&group[..], sender, payload, now as i64],
        )?;
        Ok(true)
    }

    /// Group envelopes held for `group` (from `sender`, or from anyone), oldest first:
    /// (seq, sender, payload).
    pub fn held_group_envelopes(
        &self,
        group: &GroupId,
        sender: Option<&str>,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, payload FROM group_held
             WHERE group_id = ?1 AND (?2 IS NULL OR sender = ?2) ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![&group[..], sender], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn drop_group_held(&self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM group_held WHERE seq = ?1", params![seq])?;
        Ok(())
    }
}
