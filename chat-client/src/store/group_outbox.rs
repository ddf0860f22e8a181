//! The group outbox: one sealed envelope per group message (`group_payloads`) and one row
//! per member's copy (`group_outbox`: queued → sent → delivered, or failed). A message is
//! `sent` once no copy waits for the relay (its envelope is then dropped), and shown
//! delivered once every member it went to stored it.

use chat_protocol::e2e::MessageId;
use chat_protocol::group::GroupId;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

/// One member's copy of a group message, waiting to be handed to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSend {
    pub group: GroupId,
    pub id: MessageId,
    pub member: String,
    pub payload: Vec<u8>,
}

/// What withdrawing one member's copy made of a group message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// Other copies still wait for the relay.
    Waiting,
    /// That was the last copy waiting: the message is now `sent`.
    NowSent,
    /// No copy is left at all: the message is `failed` (nobody to send it to).
    NoneLeft,
}

/// Marks `member`'s copies of our group messages `ids` delivered. Returns (group, id,
/// whether the whole message just became `sent`: this receipt overtook the relay's last
/// answer) for each that is news.
pub(super) fn mark_group_delivered_in(
    tx: &rusqlite::Transaction<'_>,
    member: &str,
    ids: &[MessageId],
) -> Result<Vec<(GroupId, MessageId, bool)>, StoreError> {
    let mut done = Vec::new();
    for id in ids {
        let row: Option<(Vec<u8>, String)> = tx
            .prepare_cached(
                "SELECT group_id, state FROM group_outbox WHERE id = ?1 AND member = ?2",
            )?
            .query_row(params![&id[..], member], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((group, _)) = row.filter(|(_, s)| s == "queued" || s == "sent") {
            tx.prepare_cached(
                "UPDATE group_outbox SET state = 'delivered' WHERE id = ?1 AND member = ?2",
            )?
            .execute(params![&id[..], member])?;
            let sent_now = settle_message(tx, id)?;
            done.push((group.try_into().unwrap_or_default(), *id, sent_now));
        }
    }
    Ok(done)
}

/// Once no member's copy waits for the relay, the message is `sent` and its envelope
/// is no longer needed. Returns whether that happened now.
pub(super) fn settle_message(
    tx: &rusqlite::Transaction<'_>,
    id: &MessageId,
) -> Result<bool, StoreError> {
    let waiting: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM group_outbox WHERE id = ?1 AND state = 'queued')",
        )?
        .query_row(params![&id[..]], |r| r.get(0))?;
    if waiting {
        return Ok(false);
    }
    tx.prepare_cached("DELETE FROM group_payloads WHERE id = ?1")?
        .execute(params![&id[..]])?;
    let changed = tx
        .prepare_cached(
            "UPDATE group_messages SET status = 'sent'
             WHERE id = ?1 AND outgoing = 1 AND status = 'sending'",
        )?
        .execute(params![&id[..]])?;
    Ok(changed > 0)
}

impl Store {
    /// Members' copies of group messages waiting for the relay, oldest message first.
    pub fn group_sends_queued(&self) -> Result<Vec<GroupSend>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.group_id, o.id, o.member, p.payload FROM group_outbox o
             JOIN group_payloads p ON p.id = o.id
             WHERE o.state = 'queued' ORDER BY p.seq, o.member",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (group, id, member, payload) = row?;
            out.push(GroupSend {
                group: group.try_into().unwrap_or_default(),
                id: id.try_into().unwrap_or_default(),
                member,
                payload,
            });
        }
        Ok(out)
    }

    /// Copies waiting for the relay (for the `queued` count).
    pub fn group_sends_len(&self) -> Result<usize, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(DISTINCT id) FROM group_outbox WHERE state = 'queued'",
            [],
            |r| r.get(0),
        )?;
        Ok(n.unsigned_abs() as usize)
    }

    /// The relay accepted (or, `failed`, refused for good) `member`'s copy of `id`.
    /// Returns whether the whole message is now handed to the relay (`sent`).
    pub fn group_send_done(
        &mut self,
        id: &MessageId,
        member: &str,
        accepted_at: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.transaction(|tx, _| {
            let state = if accepted_at.is_some() {
                "sent"
            } else {
                "failed"
            };
            let changed = tx
                .prepare_cached(
                    "UPDATE group_outbox SET state = ?3, accepted_at = ?4
                     WHERE id = ?1 AND member = ?2 AND state = 'queued'",
                )?
                .execute(params![
                    &id[..],
                    member,
                    state,
                    accepted_at.map(|t| t as i64)
                ])?;
            if changed == 0 {
                return Ok(false);
            }
            settle_message(tx, id)
        })
    }

    /// `member`'s copy of our group message `id` will not be sent: they left the group
    /// before it went out (or we did). Returns what that made of the whole message, or
    /// `None` if that copy was no longer waiting.
    pub fn withdraw_group_send(
        &mut self,
        id: &MessageId,
        member: &str,
    ) -> Result<Option<Withdrawn>, StoreError> {
        self.transaction(|tx, _| {
            let removed = tx
                .prepare_cached(
                    "DELETE FROM group_outbox WHERE id = ?1 AND member = ?2 AND state = 'queued'",
                )?
                .execute(params![&id[..], member])?;
            if removed == 0 {
                return Ok(None);
            }
            let left: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM group_outbox WHERE id = ?1")?
                .query_row(params![&id[..]], |r| r.get(0))?;
            if left > 0 {
                return Ok(Some(if settle_message(tx, id)? {
                    Withdrawn::NowSent
                } else {
                    Withdrawn::Waiting
                }));
            }
            tx.prepare_cached("DELETE FROM group_payloads WHERE id = ?1")?
                .execute(params![&id[..]])?;
            tx.prepare_cached(
                "UPDATE group_messages SET status = 'failed'
                 WHERE id = ?1 AND outgoing = 1 AND status = 'sending'",
            )?
            .execute(params![&id[..]])?;
            Ok(Some(Withdrawn::NoneLeft))
        })
    }

    /// (members delivered to, members sent to) of our group message `id`.
    pub fn group_delivery(&self, id: &MessageId) -> Result<(usize, usize), StoreError> {
        let (delivered, all): (i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FILTER (WHERE state = 'delivered'), COUNT(*)
                 FROM group_outbox WHERE id = ?1",
            )?
            .query_row(params![&id[..]], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((
            delivered.unsigned_abs() as usize,
            all.unsigned_abs() as usize,
        ))
    }
}
