//! Groups: each group's membership chain and our sending key, the keys the members gave
//! us, the group history (texts and system lines such as "alice added dave"), messages
//! put in the group outbox (`group_outbox` keeps its rows: queued → sent → delivered), and what
//! waits for something else (an envelope for a key not yet received, a change for a state
//! not yet reached).
//!
//! Everything one event changes is one [`GroupWrite`], committed in one transaction with
//! the 1:1 state of the envelope that carried it, so a crash or a full disk never leaves
//! a change half-applied or a counter used twice.

use chat_protocol::e2e::{Inbound, MessageId};
use chat_protocol::group::{GroupId, MemberKeys, Membership, SenderKey, SignedChange};
use rusqlite::{OptionalExtension, params};

use super::group_held::{MAX_HELD_CHANGES, MAX_HELD_CHANGES_PER_SENDER};
use super::messages::{OutboxItem, enqueue_in};
use super::{Store, StoreError, read_blob, read_text, write_blob, write_text};
use crate::api::{GroupHistoryItem, Status, id_hex};

pub(super) fn create_tables(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS groups (
             id         BLOB PRIMARY KEY NOT NULL,
             membership BLOB NOT NULL,  -- Membership::to_bytes (sealed)
             sender_key BLOB,           -- our SenderKey::to_bytes (sealed)
             unread     INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS group_member_keys (
             group_id BLOB NOT NULL,
             member   TEXT NOT NULL,
             keys     BLOB NOT NULL,    -- MemberKeys::to_bytes (sealed)
             PRIMARY KEY (group_id, member)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS group_messages (
             group_id  BLOB NOT NULL,
             sender    TEXT NOT NULL,
             id        BLOB NOT NULL,
             outgoing  INTEGER NOT NULL,
             system    INTEGER NOT NULL DEFAULT 0, -- a membership line, not a text
             body      NOT NULL,                   -- TEXT, or an encrypted BLOB
             sent_at   INTEGER NOT NULL,
             stored_at INTEGER NOT NULL,
             status    TEXT NOT NULL,              -- sending | sent | failed | delivered
             PRIMARY KEY (group_id, sender, id)
         );
         CREATE INDEX IF NOT EXISTS group_messages_by_arrival
             ON group_messages (group_id, stored_at);
         CREATE TABLE IF NOT EXISTS group_payloads (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             id       BLOB NOT NULL UNIQUE,
             group_id BLOB NOT NULL,
             payload  BLOB NOT NULL    -- the sealed group envelope, as sent
         );
         CREATE TABLE IF NOT EXISTS group_outbox (
             id          BLOB NOT NULL,
             member      TEXT NOT NULL,
             group_id    BLOB NOT NULL,
             state       TEXT NOT NULL DEFAULT 'queued', -- queued | sent | delivered | failed
             accepted_at INTEGER,
             PRIMARY KEY (id, member)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS group_held (
             seq         INTEGER PRIMARY KEY AUTOINCREMENT,
             group_id    BLOB NOT NULL,
             sender      TEXT NOT NULL,
             payload     BLOB NOT NULL,
             received_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS group_changes_held (
             seq         INTEGER PRIMARY KEY AUTOINCREMENT,
             group_id    BLOB NOT NULL,
             sender      TEXT NOT NULL,
             change      BLOB NOT NULL,  -- postcard SignedChange
             received_at INTEGER NOT NULL
         );",
    )?;
    Ok(())
}

/// A group as stored.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    pub membership: Membership,
    pub sender_key: Option<SenderKey>,
    /// Texts received since the user last opened the group.
    pub unread: u64,
}

/// A line of a group's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLine {
    pub group: GroupId,
    /// Who wrote it (for a system line: who made the change).
    pub sender: String,
    pub id: MessageId,
    pub outgoing: bool,
    /// A membership line ("alice added dave"), not a text.
    pub system: bool,
    pub text: String,
    /// The sender's clock, ms since the Unix epoch.
    pub sent_at: u64,
}

/// A group message to send: the sealed envelope, to each of `members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingGroupMessage {
    pub group: GroupId,
    pub id: MessageId,
    pub payload: Vec<u8>,
    pub members: Vec<String>,
}

/// A change kept until the state it names is reached (or its author's key arrives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldChange {
    pub seq: i64,
    /// Who passed it to us (over their 1:1 channel).
    pub from: String,
    pub change: SignedChange,
}

/// Everything one group event writes, in one transaction.
#[derive(Debug, Default)]
pub struct GroupWrite<'a> {
    /// The group's membership, saved (inserted or replaced).
    pub membership: Option<&'a Membership>,
    /// Our sending key in that group, saved.
    pub sender_key: Option<&'a SenderKey>,
    /// Our sending key in that group, erased (we left or were removed).
    pub clear_sender_key: bool,
    /// A member's keys (member, keys), saved.
    pub member_keys: Option<(&'a str, &'a MemberKeys)>,
    /// Lines for the history; a received text also counts as unread.
    pub lines: Vec<GroupLine>,
    /// 1:1 control messages to queue (membership changes, sending keys).
    pub control: Vec<OutboxItem>,
    /// A group message to send.
    pub outgoing: Option<OutgoingGroupMessage>,
    /// A receipt owed to (member, message id).
    pub receipt: Option<(&'a str, MessageId)>,
    /// The 1:1 receiving state the carrying envelope advanced (peer, state).
    pub inbound: Option<(&'a str, &'a Inbound)>,
    /// A 1:1 envelope held for a key change, now done with.
    pub held: Option<i64>,
    /// A held group envelope, now done with.
    pub group_held: Option<i64>,
    /// Held changes now done with.
    pub changes_done: Vec<i64>,
    /// A change to keep for later: (group, from, change).
    pub hold_change: Option<(GroupId, &'a str, &'a SignedChange)>,
}

fn group_place(id: &GroupId, column: &str) -> Vec<u8> {
    super::cipher::place("groups", column, &[id])
}

fn keys_place(id: &GroupId, member: &str) -> Vec<u8> {
    super::cipher::place("group_member_keys", "keys", &[id, member.as_bytes()])
}

/// A held change's place: its group and sender (a held change has no other lasting name;
/// its `seq` is a row number).
pub(super) fn held_change_place(id: &GroupId, sender: &str) -> Vec<u8> {
    super::cipher::place("group_changes_held", "change", &[id, sender.as_bytes()])
}

fn line_place(id: &GroupId, sender: &str, msg: &MessageId) -> Vec<u8> {
    super::cipher::place("group_messages", "body", &[id, sender.as_bytes(), msg])
}

impl Store {
    /// Every group we are or were in.
    pub fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, membership, sender_key, unread FROM groups")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, membership, sender_key, unread) = row?;
            let id: GroupId = id.try_into().unwrap_or_default();
            let plain = read_blob(&self.cipher, &group_place(&id, "membership"), membership)?;
            let membership =
                Membership::from_bytes(&plain).map_err(|_| super::cipher::Undecryptable)?;
            let sender_key = match sender_key {
                Some(stored) => {
                    let plain = read_blob(&self.cipher, &group_place(&id, "sender_key"), stored)?;
                    Some(SenderKey::from_bytes(&plain).map_err(|_| super::cipher::Undecryptable)?)
                }
                None => None,
            };
            out.push(GroupRecord {
                membership,
                sender_key,
                unread: unread.unsigned_abs(),
            });
        }
        Ok(out)
    }

    /// The keys `member` gave us for `group` (none yet: empty).
    pub fn member_keys(&self, group: &GroupId, member: &str) -> Result<MemberKeys, StoreError> {
        let stored: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT keys FROM group_member_keys WHERE group_id = ?1 AND member = ?2",
            )?
            .query_row(params![&group[..], member], |r| r.get(0))
            .optional()?;
        let Some(stored) = stored else {
            return Ok(MemberKeys::default());
        };
        let plain = read_blob(&self.cipher, &keys_place(group, member), stored)?;
        Ok(MemberKeys::from_bytes(&plain).map_err(|_| super::cipher::Undecryptable)?)
    }

    /// Commits one group event at our time `now` (ms). Returns whether a line was new (a
    /// received text that was already stored is a duplicate).
    pub fn commit_group(
        &mut self,
        group: &GroupId,
        w: GroupWrite<'_>,
        now: u64,
    ) -> Result<bool, StoreError> {
        let stamps: Vec<u64> = w.lines.iter().map(|_| self.stamp(now)).collect();
        self.transaction(|tx, cipher| {
            if let Some(membership) = w.membership {
                let stored = write_blob(cipher, &group_place(group, "membership"), &membership.to_bytes());
                tx.prepare_cached(
                    "INSERT INTO groups (id, membership) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET membership = excluded.membership",
                )?
                .execute(params![&group[..], stored])?;
            }
            if let Some(key) = w.sender_key {
                let stored = write_blob(cipher, &group_place(group, "sender_key"), &key.to_bytes());
                tx.prepare_cached("UPDATE groups SET sender_key = ?2 WHERE id = ?1")?
                    .execute(params![&group[..], stored])?;
            }
            if w.clear_sender_key {
                tx.prepare_cached("UPDATE groups SET sender_key = NULL WHERE id = ?1")?
                    .execute(params![&group[..]])?;
            }
            if let Some((member, keys)) = w.member_keys {
                let stored = write_blob(cipher, &keys_place(group, member), &keys.to_bytes());
                tx.prepare_cached(
                    "INSERT INTO group_member_keys (group_id, member, keys) VALUES (?1, ?2, ?3)
                     ON CONFLICT (group_id, member) DO UPDATE SET keys = excluded.keys",
                )?
                .execute(params![&group[..], member, stored])?;
            }
            let mut new = false;
            for (line, stored_at) in w.lines.iter().zip(stamps) {
                let body = write_text(cipher, &line_place(group, &line.sender, &line.id), &line.text);
                let status = if line.outgoing && !line.system { "sending" } else { "delivered" };
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO group_messages
                             (group_id, sender, id, outgoing, system, body, sent_at, stored_at, status)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![
                        &group[..],
                        line.sender,
                        &line.id[..],
                        line.outgoing,
                        line.system,
                        body,
                        line.sent_at as i64,
                        stored_at as i64,
                        status
                    ])?;
                if inserted > 0 && !line.outgoing && !line.system {
                    tx.prepare_cached("UPDATE groups SET unread = unread + 1 WHERE id = ?1")?
                        .execute(params![&group[..]])?;
                }
                new |= inserted > 0;
            }
            for item in &w.control {
                enqueue_in(tx, cipher, item, now)?;
            }
            if let Some(out) = &w.outgoing {
                tx.prepare_cached(
                    "INSERT INTO group_payloads (id, group_id, payload) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![&out.id[..], &group[..], out.payload])?;
                for member in &out.members {
                    tx.prepare_cached(
                        "INSERT INTO group_outbox (id, member, group_id) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![&out.id[..], member, &group[..]])?;
                }
                if out.members.is_empty() {
                    super::group_outbox::settle_message(tx, &out.id)?;
                }
            }
            if let Some((peer, id)) = w.receipt {
                tx.prepare_cached("INSERT OR IGNORE INTO receipts_due (peer, id) VALUES (?1, ?2)")?
                    .execute(params![peer, &id[..]])?;
            }
            if let Some((peer, state)) = w.inbound {
                super::e2e::save_state(tx, cipher, peer, state)?;
            }
            super::e2e::unhold(tx, w.held)?;
            if let Some(seq) = w.group_held {
                tx.prepare_cached("DELETE FROM group_held WHERE seq = ?1")?
                    .execute(params![seq])?;
            }
            for seq in &w.changes_done {
                tx.prepare_cached("DELETE FROM group_changes_held WHERE seq = ?1")?
                    .execute(params![seq])?;
            }
            if let Some((id, from, change)) = w.hold_change {
                let held: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM group_changes_held WHERE group_id = ?1")?
                    .query_row(params![&id[..]], |r| r.get(0))?;
                if held.unsigned_abs() as usize >= MAX_HELD_CHANGES {
                    // The oldest goes: changes that never apply must not pile up.
                    tx.prepare_cached(
                        "DELETE FROM group_changes_held WHERE seq =
                             (SELECT MIN(seq) FROM group_changes_held WHERE group_id = ?1)",
                    )?
                    .execute(params![&id[..]])?;
                }
                let from_sender: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM group_changes_held WHERE sender = ?1")?
                    .query_row(params![from], |r| r.get(0))?;
                if from_sender.unsigned_abs() as usize >= MAX_HELD_CHANGES_PER_SENDER {
                    // Nor across groups a sender makes up: its oldest goes.
                    tx.prepare_cached(
                        "DELETE FROM group_changes_held WHERE seq =
                             (SELECT MIN(seq) FROM group_changes_held WHERE sender = ?1)",
                    )?
                    .execute(params![from])?;
                }
                tx.prepare_cached(
                    "INSERT INTO group_changes_held (group_id, sender, change, received_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    &id[..],
                    from,
                    write_blob(
                        cipher,
                        &held_change_place(&id, from),
                        &postcard::to_allocvec(change).expect("a change always encodes")
                    ),
                    now as i64
                ])?;
            }
            Ok(new)
        })
    }

    /// The user opened the group: nothing unread.
    pub fn mark_group_read(&self, group: &GroupId) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE groups SET unread = 0 WHERE id = ?1",
            params![&group[..]],
        )?;
        Ok(())
    }

    /// The last `limit` lines of `group`, in the order this client stored them.
    pub fn group_history(
        &self,
        group: &GroupId,
        limit: usize,
    ) -> Result<Vec<GroupHistoryItem>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT sender, id, outgoing, system, body, sent_at, stored_at, status,
                    (SELECT COUNT(*) FROM group_outbox o WHERE o.id = m.id AND o.state = 'delivered'),
                    (SELECT COUNT(*) FROM group_outbox o WHERE o.id = m.id)
             FROM (SELECT rowid, * FROM group_messages WHERE group_id = ?1
                   ORDER BY stored_at DESC, rowid DESC LIMIT ?2) m
             ORDER BY stored_at, rowid",
        )?;
        let rows = stmt.query_map(params![&group[..], limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, rusqlite::types::Value>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })?;
        let mut items = Vec::new();
        for row in rows {
            let (from, id, outgoing, system, body, sent_at, stored_at, status, delivered, all) =
                row?;
            let id: MessageId = id.try_into().unwrap_or_default();
            // Ours is "delivered" once every member it went to stored it.
            let status = match status.as_str() {
                "sending" => Status::Sending,
                "sent" if all > 0 && delivered == all => Status::Delivered,
                "sent" => Status::Sent,
                "failed" => Status::Failed,
                _ => Status::Delivered,
            };
            items.push(GroupHistoryItem {
                text: read_text(&self.cipher, &line_place(group, &from, &id), body)?,
                id: id_hex(&id),
                from,
                outgoing,
                system,
                sent_at: sent_at.unsigned_abs(),
                stored_at: stored_at.unsigned_abs(),
                status,
                delivered_to: delivered.unsigned_abs() as usize,
                recipients: all.unsigned_abs() as usize,
            });
        }
        Ok(items)
    }
}
