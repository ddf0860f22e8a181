//! History and the outbox.
//!
//! An outgoing message is a history row (`messages`, outgoing) plus an outbox row until it
//! is receipted. Outbox states: `queued` (to be sealed and sent, in `seq` order per
//! contact) and `sent` (the server accepted it under `epoch`; waiting for the receipt).
//! A retry request for that epoch puts it back to `queued`.

use chat_protocol::e2e::{Body, MessageId};
use rusqlite::{OptionalExtension, params};

use super::{RowCipher, Store, StoreError, read_blob, read_text, write_blob, write_text};
use crate::api::{HistoryItem, LastMessage, Status, id_hex};

/// A message waiting in the outbox to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: MessageId,
    pub peer: String,
    /// A text (also in the history), or a group control message — a membership change
    /// or a sending key — that is sent, receipted and sent again like a text but never
    /// shown.
    pub body: Body,
    /// Our clock when written, ms since the Unix epoch (travels as the message's time).
    pub sent_at: u64,
}

/// A queued message's place in the outbox, its body left unread: what a flush walks
/// ([`Store::outbox_queued_after`]), opening only the bodies it sends
/// ([`Store::outbox_queued_item`]), so that a long outbox costs each flush the messages it
/// sends, not every message waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRef {
    /// Its position in the outbox: rises in the order messages were written.
    pub seq: i64,
    pub id: MessageId,
    pub peer: String,
}

/// One of our messages a receipt confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub id: MessageId,
    /// The server's acceptance had not been recorded yet (the receipt overtook it): a
    /// `sent` is due before the `delivered`.
    pub was_sending: bool,
}

/// A message the server accepted long ago and the recipient has not receipted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    pub id: MessageId,
    pub peer: String,
    /// Our clock when the server accepted it, ms since the Unix epoch.
    pub accepted_at: u64,
}

pub(super) fn body_place(peer: &str, id: &[u8], outgoing: bool) -> Vec<u8> {
    super::cipher::place(
        "messages",
        "body",
        &[peer.as_bytes(), id, &[outgoing as u8]],
    )
}

pub(super) fn outbox_place(id: &[u8]) -> Vec<u8> {
    super::cipher::place("outbox", "body", &[id])
}

/// Stores a received text unless its id is already stored. Returns whether it is new.
pub(super) fn insert_incoming(
    tx: &rusqlite::Transaction<'_>,
    cipher: &RowCipher,
    msg: &super::e2e::ReceivedText<'_>,
) -> Result<bool, StoreError> {
    let (peer, id) = (msg.peer, msg.id);
    let removed: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM removed_ids WHERE peer = ?1 AND id = ?2)")?
        .query_row(params![peer, &id[..]], |r| r.get(0))?;
    if removed {
        return Ok(false);
    }
    let body = write_text(cipher, &body_place(peer, id, false), msg.text);
    let inserted = tx
        .prepare_cached(
            "INSERT INTO messages (peer, id, outgoing, body, sent_at, status, stored_at)
             VALUES (?1, ?2, 0, ?3, ?4, 'delivered', ?5)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            peer,
            &id[..],
            body,
            msg.sent_at as i64,
            msg.stored_at as i64
        ])?;
    Ok(inserted > 0)
}

/// Writes an outbox row (and, for a text, its history row stored at `stored_at`).
pub(super) fn enqueue_in(
    tx: &rusqlite::Transaction<'_>,
    cipher: &RowCipher,
    item: &OutboxItem,
    stored_at: u64,
) -> Result<(), StoreError> {
    let place = outbox_place(&item.id);
    let (kind, body) = match &item.body {
        Body::Text(text) => ("text", write_text(cipher, &place, text)),
        control => {
            let plain = postcard::to_allocvec(control).expect("a body always encodes");
            (
                "control",
                rusqlite::types::Value::Blob(write_blob(cipher, &place, &plain)),
            )
        }
    };
    tx.prepare_cached(
        "INSERT INTO outbox (id, peer, body, sent_at, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        &item.id[..],
        item.peer,
        body,
        item.sent_at as i64,
        kind
    ])?;
    if let Body::Text(text) = &item.body {
        tx.prepare_cached(
            "INSERT INTO messages (peer, id, outgoing, body, sent_at, status, stored_at)
             VALUES (?1, ?2, 1, ?3, ?4, 'sending', ?5)",
        )?
        .execute(params![
            item.peer,
            &item.id[..],
            write_text(cipher, &body_place(&item.peer, &item.id, true), text),
            item.sent_at as i64,
            stored_at as i64
        ])?;
    }
    Ok(())
}

/// Marks our messages to `peer` delivered and takes them out of the outbox.
pub(super) fn mark_delivered_in(
    tx: &rusqlite::Transaction<'_>,
    peer: &str,
    ids: &[MessageId],
) -> Result<Vec<Delivered>, StoreError> {
    let mut done = Vec::new();
    for id in ids {
        let status: Option<String> = tx
            .prepare_cached(
                "SELECT status FROM messages WHERE peer = ?1 AND id = ?2 AND outgoing = 1",
            )?
            .query_row(params![peer, &id[..]], |r| r.get(0))
            .optional()?;
        tx.prepare_cached("DELETE FROM outbox WHERE id = ?1 AND peer = ?2")?
            .execute(params![&id[..], peer])?;
        if let Some(status) = status.filter(|s| s == "sending" || s == "sent") {
            tx.prepare_cached(
                "UPDATE messages SET status = 'delivered', undelivered = 0
                 WHERE peer = ?1 AND id = ?2 AND outgoing = 1",
            )?
            .execute(params![peer, &id[..]])?;
            done.push(Delivered {
                id: *id,
                was_sending: status == "sending",
            });
        }
    }
    Ok(done)
}

/// Puts `peer`'s messages accepted under one of `epochs` back to `queued`. Returns their
/// ids, oldest first.
pub(super) fn requeue_in(
    tx: &rusqlite::Transaction<'_>,
    peer: &str,
    epochs: &[u32],
) -> Result<Vec<MessageId>, StoreError> {
    let mut ids = Vec::new();
    for epoch in epochs {
        let rows: Vec<(i64, Vec<u8>)> = tx
            .prepare_cached(
                "SELECT seq, id FROM outbox WHERE peer = ?1 AND state = 'sent' AND epoch = ?2",
            )?
            .query_map(params![peer, i64::from(*epoch)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (seq, id) in rows {
            tx.prepare_cached(
                "UPDATE outbox SET state = 'queued', epoch = NULL, accepted_at = NULL WHERE seq = ?1",
            )?
            .execute(params![seq])?;
            tx.prepare_cached(
                "UPDATE messages SET status = 'sending', undelivered = 0
                 WHERE peer = ?1 AND id = ?2 AND outgoing = 1 AND status = 'sent'",
            )?
            .execute(params![peer, &id])?;
            ids.push((seq, id.try_into().unwrap_or_default()));
        }
    }
    ids.sort_unstable();
    Ok(ids.into_iter().map(|(_, id)| id).collect())
}

impl Store {
    /// Puts a new outgoing message in the outbox and history, atomically.
    pub fn enqueue(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.enqueue_many(std::slice::from_ref(item))
    }

    /// Writes new messages to the outbox (and the history) in one transaction, in the
    /// order given: all of them or, on an error, none. One commit (one `fsync`) for a
    /// burst of texts instead of one each.
    pub fn enqueue_many(&mut self, items: &[OutboxItem]) -> Result<(), StoreError> {
        let stamps: Vec<u64> = items.iter().map(|i| self.stamp(i.sent_at)).collect();
        self.transaction(|tx, cipher| {
            for (item, stored_at) in items.iter().zip(stamps) {
                enqueue_in(tx, cipher, item, stored_at)?;
            }
            Ok(())
        })
    }

    /// A note to oneself: stored as delivered at once, never sent.
    pub fn store_note(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        let stored_at = self.stamp(item.sent_at);
        let Body::Text(text) = &item.body else {
            return Ok(());
        };
        self.transaction(|tx, cipher| {
            tx.execute(
                "INSERT INTO messages (peer, id, outgoing, body, sent_at, status, stored_at)
                 VALUES (?1, ?2, 1, ?3, ?4, 'delivered', ?5)",
                params![
                    item.peer,
                    &item.id[..],
                    write_text(cipher, &body_place(&item.peer, &item.id, true), text),
                    item.sent_at as i64,
                    stored_at as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Up to `limit` queued messages (to be sent now) written after outbox position
    /// `after` (0: from the first), in the order they were written; bodies are not read
    /// (one index range: the rows the relay accepted are not walked).
    pub fn outbox_queued_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<QueuedRef>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, id, peer FROM outbox WHERE state = 'queued' AND seq > ?1
             ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(QueuedRef {
                seq: r.get(0)?,
                id: r.get::<_, Vec<u8>>(1)?.try_into().unwrap_or_default(),
                peer: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queued message `id` with its body opened, or `None` if it is not queued (sent,
    /// failed or gone since it was listed).
    ///
    /// # Errors
    /// [`StoreError`] if the database fails or the body cannot be opened.
    pub fn outbox_queued_item(&self, id: &MessageId) -> Result<Option<OutboxItem>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT peer, body, sent_at, kind FROM outbox WHERE id = ?1 AND state = 'queued'",
            )?
            .query_row(params![&id[..]], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, rusqlite::types::Value>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .optional()?;
        let Some((peer, body, sent_at, kind)) = row else {
            return Ok(None);
        };
        let place = outbox_place(id);
        let body = if kind == "text" {
            Body::Text(read_text(&self.cipher, &place, body)?)
        } else {
            let rusqlite::types::Value::Blob(stored) = body else {
                return Err(super::cipher::Undecryptable.into());
            };
            let plain = read_blob(&self.cipher, &place, stored)?;
            postcard::from_bytes(&plain).map_err(|_| super::cipher::Undecryptable)?
        };
        Ok(Some(OutboxItem {
            body,
            id: *id,
            peer,
            sent_at: sent_at.unsigned_abs(),
        }))
    }

    /// Every queued message with its body, in the order written.
    #[cfg(test)]
    pub fn outbox_queued(&self) -> Result<Vec<OutboxItem>, StoreError> {
        self.outbox_queued_after(0, usize::MAX >> 1)?
            .iter()
            .filter_map(|r| self.outbox_queued_item(&r.id).transpose())
            .collect()
    }

    /// Messages not yet accepted by the server (what "waiting in the outbox" counts);
    /// O(1) however long the queue ([`super::queued_counts`]).
    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        super::queued_counts::read(&self.conn, super::queued_counts::OUTBOX)
    }

    /// Messages sent and not yet receipted.
    pub fn awaiting_receipt(&self) -> Result<usize, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = 'sent'",
            [],
            |r| r.get(0),
        )?;
        Ok(n.unsigned_abs() as usize)
    }

    /// The server accepted `id`, sealed under `epoch`, at our time `now`. Returns the peer
    /// if this is news to the user: a text that was queued and not yet receipted (control
    /// messages — group changes, sending keys — are not the user's messages).
    ///
    /// Committed without waiting for the disk: a power cut can undo it, and the text,
    /// queued again, is sent again and dropped by its recipient as a copy (by id).
    pub fn mark_sent(
        &mut self,
        id: &MessageId,
        epoch: u32,
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        self.transaction_unsynced(|tx, _| {
            let peer: Option<String> = tx
                .query_row(
                    "UPDATE outbox SET state = 'sent', epoch = ?2, accepted_at = ?3
                     WHERE id = ?1 AND state = 'queued' RETURNING peer, kind",
                    params![&id[..], i64::from(epoch), now as i64],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?
                .and_then(|(peer, kind)| (kind == "text").then_some(peer));
            if let Some(peer) = &peer {
                tx.execute(
                    "UPDATE messages SET status = 'sent'
                     WHERE peer = ?1 AND id = ?2 AND outgoing = 1 AND status = 'sending'",
                    params![peer, &id[..]],
                )?;
            }
            Ok(peer)
        })
    }

    /// `id` can never be delivered: it leaves the outbox as failed with `reason` (a code
    /// such as `unknown_user`). Returns the peer if it was there as a text (a control
    /// message just goes: nobody saw it).
    pub fn mark_failed(
        &mut self,
        id: &MessageId,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        self.transaction(|tx, _| {
            let peer: Option<String> = tx
                .query_row(
                    "DELETE FROM outbox WHERE id = ?1 RETURNING peer, kind",
                    params![&id[..]],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?
                .and_then(|(peer, kind)| (kind == "text").then_some(peer));
            if let Some(peer) = &peer {
                tx.execute(
                    "UPDATE messages SET status = 'failed', reason = ?3, undelivered = 0
                     WHERE peer = ?1 AND id = ?2 AND outgoing = 1 AND status != 'delivered'",
                    params![peer, &id[..], reason],
                )?;
            }
            Ok(peer)
        })
    }

    /// Outbox messages to `peer`, queued or sent (e.g. to fail them all).
    pub fn outbox_ids_for(&self, peer: &str) -> Result<Vec<MessageId>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM outbox WHERE peer = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![peer], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows
            .map(|r| r.map(|id| id.try_into().unwrap_or_default()))
            .collect::<Result<_, _>>()?)
    }

    /// Sent messages accepted before `before` (our clock, ms) and not yet flagged as late.
    /// They are flagged now; each is reported once.
    pub fn flag_undelivered(&mut self, before: u64) -> Result<Vec<Undelivered>, StoreError> {
        self.transaction(|tx, _| {
            let late: Vec<(Vec<u8>, String, i64)> = tx
                .prepare(
                    "SELECT o.id, o.peer, o.accepted_at FROM outbox o
                     JOIN messages m ON m.peer = o.peer AND m.id = o.id AND m.outgoing = 1
                     WHERE o.state = 'sent' AND o.accepted_at < ?1 AND m.undelivered = 0
                     ORDER BY o.seq",
                )?
                .query_map(params![before as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            for (id, peer, _) in &late {
                tx.execute(
                    "UPDATE messages SET undelivered = 1 WHERE peer = ?1 AND id = ?2 AND outgoing = 1",
                    params![peer, id],
                )?;
            }
            Ok(late
                .into_iter()
                .map(|(id, peer, at)| Undelivered {
                    id: id.try_into().unwrap_or_default(),
                    peer,
                    accepted_at: at.unsigned_abs(),
                })
                .collect())
        })
    }

    /// Sent messages accepted before `before` (our clock, ms): past the server's age limit,
    /// they can no longer arrive.
    pub fn expired(&self, before: u64) -> Result<Vec<Undelivered>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, peer, accepted_at FROM outbox
             WHERE state = 'sent' AND accepted_at < ?1 AND kind = 'text' ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![before as i64], |r| {
            Ok(Undelivered {
                id: r.get::<_, Vec<u8>>(0)?.try_into().unwrap_or_default(),
                peer: r.get(1)?,
                accepted_at: r.get::<_, i64>(2)?.unsigned_abs(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Group control messages (membership changes, sending keys) accepted before `before`
    /// (our clock, ms) and never receipted: the relay has deleted them by now, so they
    /// are queued again — a member offline that long must still get them. Returns how many.
    pub fn requeue_stale_control(&mut self, before: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE outbox SET state = 'queued', epoch = NULL, accepted_at = NULL
             WHERE kind = 'control' AND state = 'sent' AND accepted_at < ?1",
            params![before as i64],
        )?)
    }

    /// The last `limit` messages with `peer`, in the order this client stored them.
    /// The newest message of every conversation (first line, at most 80 characters), in
    /// one query: for the contact list at sign-in.
    pub fn last_messages(&self) -> Result<Vec<LastMessage>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT peer, id, outgoing, body, stored_at FROM (
                 SELECT peer, id, outgoing, body, stored_at, ROW_NUMBER() OVER (
                     PARTITION BY peer ORDER BY stored_at DESC, rowid DESC) AS newest
                 FROM messages)
             WHERE newest = 1",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, rusqlite::types::Value>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut last = Vec::new();
        for row in rows {
            let (peer, id, outgoing, body, stored_at) = row?;
            let text = read_text(&self.cipher, &body_place(&peer, &id, outgoing), body)?;
            last.push(LastMessage {
                user: peer,
                text: text.lines().next().unwrap_or("").chars().take(80).collect(),
                outgoing,
                stored_at: stored_at.unsigned_abs(),
            });
        }
        Ok(last)
    }

    pub fn history(&self, peer: &str, limit: usize) -> Result<Vec<HistoryItem>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, outgoing, body, sent_at, status, stored_at, undelivered, reason FROM (
                 SELECT rowid, * FROM messages WHERE peer = ?1
                 ORDER BY stored_at DESC, rowid DESC LIMIT ?2
             ) ORDER BY stored_at, rowid",
        )?;
        let rows = stmt.query_map(params![peer, limit as i64], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, rusqlite::types::Value>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut items = Vec::new();
        for row in rows {
            let (id, outgoing, body, sent_at, status, stored_at, undelivered, reason) = row?;
            items.push(HistoryItem {
                text: read_text(&self.cipher, &body_place(peer, &id, outgoing), body)?,
                id: id_hex(&id.try_into().unwrap_or_default()),
                outgoing,
                sent_at: sent_at.unsigned_abs(),
                stored_at: stored_at.unsigned_abs(),
                status: match status.as_str() {
                    "sending" => Status::Sending,
                    "sent" => Status::Sent,
                    "delivered" => Status::Delivered,
                    _ => Status::Failed,
                },
                undelivered,
                reason,
            });
        }
        Ok(items)
    }
}

#[cfg(test)]
pub(super) mod tests;
