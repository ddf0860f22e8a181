//! The group outbox: one sealed envelope per group message (`group_payloads`) and one row
//! per member's copy (`group_outbox`: queued → sent → delivered, or failed). A message is
//! `sent` once no copy waits for the relay (its envelope is then dropped), and shown
//! delivered once every member it went to stored it.

use chat_protocol::e2e::MessageId;
use chat_protocol::group::GroupId;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

/// A group message some of whose members' copies wait for the relay, its envelope left
/// unread: what a flush walks ([`Store::group_sends_queued_after`]), reading the members
/// ([`Store::group_send_members_queued`]) and the envelope ([`Store::group_payload`]) of
/// only the messages it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupQueued {
    /// Its position among the group messages written: rises in the order written.
    pub seq: i64,
    pub group: GroupId,
    pub id: MessageId,
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
    /// Up to `limit` group messages with copies waiting for the relay, written after
    /// position `after` (0: from the first), oldest first. A message keeps its envelope
    /// only while a copy waits (`settle_message`), so this walks no message already sent.
    pub fn group_sends_queued_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<GroupQueued>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, group_id, id FROM group_payloads WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(GroupQueued {
                seq: r.get(0)?,
                group: r.get::<_, Vec<u8>>(1)?.try_into().unwrap_or_default(),
                id: r.get::<_, Vec<u8>>(2)?.try_into().unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The members whose copy of group message `id` waits for the relay, by name.
    pub fn group_send_members_queued(&self, id: &MessageId) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT member FROM group_outbox WHERE id = ?1 AND state = 'queued' ORDER BY member",
        )?;
        let rows = stmt.query_map(params![&id[..]], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sealed envelope of group message `id`, as sent to every member; `None` once no
    /// copy waits for the relay.
    pub fn group_payload(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT payload FROM group_payloads WHERE id = ?1")?
            .query_row(params![&id[..]], |r| r.get(0))
            .optional()?)
    }

    /// Group messages with a copy waiting for the relay (for the `queued` count); O(1)
    /// however long the queue or the history ([`super::queued_counts`]).
    pub fn group_sends_len(&self) -> Result<usize, StoreError> {
        super::queued_counts::read(&self.conn, super::queued_counts::GROUP_OUTBOX)
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

#[cfg(test)]
mod tests {
    use super::super::tests::open;
    use super::super::{GroupWrite, OutgoingGroupMessage};

    #[test]
    fn a_flush_walks_only_messages_with_copies_waiting_in_the_order_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), true);
        let group = [9; 16];
        for n in 1..=4u8 {
            let outgoing = OutgoingGroupMessage {
                group,
                id: [n; 16],
                payload: vec![n; 10],
                members: vec!["carol".into(), "bob".into()],
            };
            let write = GroupWrite {
                outgoing: Some(outgoing),
                ..Default::default()
            };
            store.commit_group(&group, write, 1000).unwrap();
        }
        // Message 1 is handed over whole, message 2 half, message 3 withdrawn whole.
        for member in ["bob", "carol"] {
            store.group_send_done(&[1; 16], member, Some(5)).unwrap();
            store.withdraw_group_send(&[3; 16], member).unwrap();
        }
        store.group_send_done(&[2; 16], "bob", Some(5)).unwrap();

        let all = store.group_sends_queued_after(0, 10).unwrap();
        let ids: Vec<u8> = all.iter().map(|m| m.id[0]).collect();
        assert_eq!(
            ids,
            [2, 4],
            "only messages with a copy waiting, oldest first"
        );
        assert!(all.iter().all(|m| m.group == group));
        // Paged: the rest comes after the last position seen.
        let first = store.group_sends_queued_after(0, 1).unwrap();
        assert_eq!(first.len(), 1);
        let rest = store.group_sends_queued_after(first[0].seq, 10).unwrap();
        assert_eq!(rest.iter().map(|m| m.id[0]).collect::<Vec<_>>(), [4]);

        assert_eq!(
            store.group_send_members_queued(&[2; 16]).unwrap(),
            ["carol"]
        );
        assert_eq!(
            store.group_send_members_queued(&[4; 16]).unwrap(),
            ["bob", "carol"],
            "by name"
        );
        assert_eq!(store.group_payload(&[4; 16]).unwrap(), Some(vec![4; 10]));
        assert_eq!(store.group_payload(&[1; 16]).unwrap(), None, "sent: gone");
    }
}
