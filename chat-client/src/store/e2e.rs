//! End-to-end state: each contact's receiving epochs, the receipts and retry requests we
//! owe, and envelopes held while a contact's key change awaits the user's decision.
//!
//! Every delivery is one transaction: the message, the receipt it owes and the epoch
//! state it advanced are committed together, or nothing is (a full disk, a crash), so
//! a redelivered envelope is processed again from the same state.

use chat_protocol::e2e::{Inbound, MessageId};
use rusqlite::{OptionalExtension, params};

use super::messages::{Delivered, insert_incoming, mark_delivered_in, requeue_in};
use super::{RowCipher, Store, StoreError};

/// Envelopes held per contact while its key change is pending; more stay on the relay.
pub const MAX_HELD_PER_CONTACT: usize = 10_000;
/// Retry requests remembered per contact (each epoch is asked for once).
const RETRIES_REMEMBERED: i64 = 256;
/// Receipts remembered per contact after the relay accepted them, to send again if the
/// contact cannot open the epoch they went under.
const RECEIPTS_REMEMBERED: i64 = 10_000;

/// A received text, as committed by [`Store::commit_text`].
#[derive(Debug, Clone, Copy)]
pub struct ReceivedText<'a> {
    pub peer: &'a str,
    pub id: &'a MessageId,
    pub text: &'a str,
    /// The sender's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// Our clock now, ms since the Unix epoch (the message's place in the history).
    pub stored_at: u64,
}

/// An envelope kept while its sender's key change is pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub seq: i64,
    pub payload: Vec<u8>,
}

fn state_place(peer: &str) -> Vec<u8> {
    super::cipher::place("e2e_state", "inbound", &[peer.as_bytes()])
}

pub(super) fn save_state(
    tx: &rusqlite::Transaction<'_>,
    cipher: &RowCipher,
    peer: &str,
    state: &Inbound,
) -> Result<(), StoreError> {
    let stored = super::write_blob(cipher, &state_place(peer), &state.to_bytes());
    tx.prepare_cached(
        "INSERT INTO e2e_state (peer, inbound) VALUES (?1, ?2)
         ON CONFLICT (peer) DO UPDATE SET inbound = excluded.inbound",
    )?
    .execute(params![peer, stored])?;
    Ok(())
}

pub(super) fn unhold(tx: &rusqlite::Transaction<'_>, held: Option<i64>) -> Result<(), StoreError> {
    if let Some(seq) = held {
        tx.prepare_cached("DELETE FROM held WHERE seq = ?1")?
            .execute(params![seq])?;
    }
    Ok(())
}

impl Store {
    /// `peer`'s receiving state; a fresh one if none is stored. A damaged state is an
    /// error (the caller may [`Store::reset_state`] it: retry requests then recover).
    pub fn inbound_state(&self, peer: &str) -> Result<Inbound, StoreError> {
        let stored: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT inbound FROM e2e_state WHERE peer = ?1")?
            .query_row(params![peer], |r| r.get(0))
            .optional()?;
        let Some(stored) = stored else {
            return Ok(Inbound::default());
        };
        let plain = super::read_blob(&self.cipher, &state_place(peer), stored)?;
        Inbound::from_bytes(&plain).map_err(|_| super::cipher::Undecryptable.into())
    }

    /// Forgets `peer`'s receiving state (a damaged state, or their key changed).
    pub fn reset_state(&mut self, peer: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM e2e_state WHERE peer = ?1", params![peer])?;
        Ok(())
    }

    /// Commits a received text: stored (unless its id is already), a receipt owed, the
    /// epoch state advanced and the held envelope it came from (if any) released. Returns
    /// whether the text is new.
    pub fn commit_text(
        &mut self,
        msg: ReceivedText<'_>,
        state: &Inbound,
        held: Option<i64>,
    ) -> Result<bool, StoreError> {
        let msg = ReceivedText {
            stored_at: self.stamp(msg.stored_at),
            ..msg
        };
        self.transaction(|tx, cipher| {
            let new = insert_incoming(tx, cipher, &msg)?;
            tx.prepare_cached("INSERT OR IGNORE INTO receipts_due (peer, id) VALUES (?1, ?2)")?
                .execute(params![msg.peer, &msg.id[..]])?;
            save_state(tx, cipher, msg.peer, state)?;
            unhold(tx, held)?;
            Ok(new)
        })
    }

    /// Commits a receipt: our messages `ids` to `peer` are delivered and leave the outbox;
    /// so are `peer`'s copies of our group messages among them. Returns the 1:1 ones and
    /// the group ones as (group, id, the relay's acceptance not recorded yet).
    #[allow(clippy::type_complexity)]
    pub fn commit_receipt(
        &mut self,
        peer: &str,
        ids: &[MessageId],
        state: &Inbound,
        held: Option<i64>,
    ) -> Result<(Vec<Delivered>, Vec<([u8; 16], MessageId, bool)>), StoreError> {
        self.transaction(|tx, cipher| {
            let done = mark_delivered_in(tx, peer, ids)?;
            let group = super::group_outbox::mark_group_delivered_in(tx, peer, ids)?;
            save_state(tx, cipher, peer, state)?;
            unhold(tx, held)?;
            Ok((done, group))
        })
    }

    /// Commits `peer`'s retry request: what we sent under `epochs` goes out again —
    /// messages not receipted (queued again; their ids returned, oldest first), receipts
    /// and our own retry requests (owed again).
    pub fn commit_retry_request(
        &mut self,
        peer: &str,
        epochs: &[u32],
        state: &Inbound,
        held: Option<i64>,
    ) -> Result<Vec<MessageId>, StoreError> {
        self.transaction(|tx, cipher| {
            let ids = requeue_in(tx, peer, epochs)?;
            for epoch in epochs {
                let epoch = i64::from(*epoch);
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO receipts_due (peer, id)
                     SELECT peer, id FROM receipts_log WHERE peer = ?1 AND epoch = ?2",
                )?
                .execute(params![peer, epoch])?;
                tx.prepare_cached("DELETE FROM receipts_log WHERE peer = ?1 AND epoch = ?2")?
                    .execute(params![peer, epoch])?;
                tx.prepare_cached(
                    "UPDATE retries SET sent = 0, sent_epoch = NULL
                     WHERE peer = ?1 AND sent = 1 AND sent_epoch = ?2",
                )?
                .execute(params![peer, epoch])?;
            }
            save_state(tx, cipher, peer, state)?;
            unhold(tx, held)?;
            Ok(ids)
        })
    }

    /// Receipts owed, oldest first, grouped by peer.
    pub fn receipts_due(&self) -> Result<Vec<(String, Vec<MessageId>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT peer, id FROM receipts_due ORDER BY peer")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut grouped: Vec<(String, Vec<MessageId>)> = Vec::new();
        for row in rows {
            let (peer, id) = row?;
            let id: MessageId = id.try_into().unwrap_or_default();
            match grouped.last_mut() {
                Some((p, ids)) if *p == peer => ids.push(id),
                _ => grouped.push((peer, vec![id])),
            }
        }
        Ok(grouped)
    }

    /// The server accepted these receipts, sent under our `epoch` (or refused them for
    /// good: `None`). They are owed no more; accepted ones are remembered for a while.
    pub fn receipts_sent(
        &mut self,
        peer: &str,
        ids: &[MessageId],
        epoch: Option<u32>,
    ) -> Result<(), StoreError> {
        self.transaction(|tx, _| {
            for id in ids {
                tx.prepare_cached("DELETE FROM receipts_due WHERE peer = ?1 AND id = ?2")?
                    .execute(params![peer, &id[..]])?;
                if let Some(epoch) = epoch {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO receipts_log (peer, id, epoch) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![peer, &id[..], i64::from(epoch)])?;
                }
            }
            tx.prepare_cached(
                "DELETE FROM receipts_log WHERE peer = ?1 AND seq <= (
                     SELECT seq FROM receipts_log WHERE peer = ?1
                     ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![peer, RECEIPTS_REMEMBERED])?;
            Ok(())
        })
    }

    /// Asks `peer` (once per epoch, ever) to re-send what we could not open in `epoch`.
    /// Returns false if it was asked before.
    pub fn request_retry(&mut self, peer: &str, epoch: u32, now: u64) -> Result<bool, StoreError> {
        self.transaction(|tx, _| {
            let new = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO retries (peer, epoch, requested_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![peer, i64::from(epoch), now as i64])?
                > 0;
            // Remember a bounded number of epochs per contact.
            tx.prepare_cached(
                "DELETE FROM retries WHERE peer = ?1 AND sent = 1 AND epoch NOT IN (
                     SELECT epoch FROM retries WHERE peer = ?1 ORDER BY requested_at DESC LIMIT ?2)",
            )?
            .execute(params![peer, RETRIES_REMEMBERED])?;
            Ok(new)
        })
    }

    /// Retry requests not yet accepted by the server, grouped by peer.
    pub fn retries_due(&self) -> Result<Vec<(String, Vec<u32>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT peer, epoch FROM retries WHERE sent = 0 ORDER BY peer, requested_at",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut grouped: Vec<(String, Vec<u32>)> = Vec::new();
        for row in rows {
            let (peer, epoch) = row?;
            let epoch = epoch as u32;
            match grouped.last_mut() {
                Some((p, epochs)) if *p == peer => epochs.push(epoch),
                _ => grouped.push((peer, vec![epoch])),
            }
        }
        Ok(grouped)
    }

    /// The server accepted these retry requests, sent under our `sent_epoch` (or refused
    /// them for good: `None`).
    pub fn retries_sent(
        &mut self,
        peer: &str,
        epochs: &[u32],
        sent_epoch: Option<u32>,
    ) -> Result<(), StoreError> {
        self.transaction(|tx, _| {
            for epoch in epochs {
                tx.prepare_cached(
                    "UPDATE retries SET sent = 1, sent_epoch = ?3 WHERE peer = ?1 AND epoch = ?2",
                )?
                .execute(params![
                    peer,
                    i64::from(*epoch),
                    sent_epoch.map(i64::from)
                ])?;
            }
            Ok(())
        })
    }

    /// `peer`'s key changed and the new one was accepted: every message sent to them and
    /// not receipted goes out again, to the new key. Returns their ids, oldest first.
    pub fn requeue_unreceipted(&mut self, peer: &str) -> Result<Vec<MessageId>, StoreError> {
        self.transaction(|tx, _| {
            let epochs: Vec<i64> = tx
                .prepare("SELECT DISTINCT epoch FROM outbox WHERE peer = ?1 AND state = 'sent'")?
                .query_map(params![peer], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let epochs: Vec<u32> = epochs.into_iter().map(|e| e as u32).collect();
            requeue_in(tx, peer, &epochs)
        })
    }

    /// Keeps an envelope from `peer` until their pending key change is decided. Returns
    /// false (nothing stored) when `peer` already has [`MAX_HELD_PER_CONTACT`] held.
    pub fn hold(&mut self, peer: &str, payload: &[u8], now: u64) -> Result<bool, StoreError> {
        self.transaction(|tx, _| {
            let count: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM held WHERE peer = ?1")?
                .query_row(params![peer], |r| r.get(0))?;
            if count.unsigned_abs() as usize >= MAX_HELD_PER_CONTACT {
                return Ok(false);
            }
            tx.prepare_cached("INSERT INTO held (peer, payload, received_at) VALUES (?1, ?2, ?3)")?
                .execute(params![peer, payload, now as i64])?;
            Ok(true)
        })
    }

    /// `peer`'s held envelopes, in the order they arrived.
    pub fn held(&self, peer: &str) -> Result<Vec<Held>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, payload FROM held WHERE peer = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![peer], |r| {
            Ok(Held {
                seq: r.get(0)?,
                payload: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Releases one held envelope that was dealt with (opened, or refused for good).
    pub fn release_held(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM held WHERE seq = ?1", params![seq])?;
        Ok(())
    }

    /// Discards every envelope held for `peer`. Returns how many there were.
    pub fn discard_held(&mut self, peer: &str) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM held WHERE peer = ?1", params![peer])?)
    }

    /// Whether anything is held for `peer`.
    pub fn held_count(&self, peer: &str) -> Result<usize, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM held WHERE peer = ?1")?
            .query_row(params![peer], |r| r.get(0))?;
        Ok(n.unsigned_abs() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::open;
    use super::ReceivedText;

    #[test]
    fn receipts_and_retries_are_owed_until_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), true);
        let state = chat_protocol::e2e::Inbound::default();
        let text = |peer, id, stored_at| ReceivedText {
            peer,
            id,
            text: "hi",
            sent_at: 5,
            stored_at,
        };
        assert!(
            store
                .commit_text(text("bob", &[1; 16], 10), &state, None)
                .unwrap()
        );
        assert!(
            !store
                .commit_text(text("bob", &[1; 16], 11), &state, None)
                .unwrap()
        );
        store
            .commit_text(text("amy", &[2; 16], 12), &state, None)
            .unwrap();
        assert_eq!(
            store.receipts_due().unwrap(),
            vec![
                ("amy".to_string(), vec![[2; 16]]),
                ("bob".to_string(), vec![[1; 16]])
            ]
        );
        store.receipts_sent("bob", &[[1; 16]], Some(40)).unwrap();
        assert_eq!(store.receipts_due().unwrap().len(), 1);
        // Bob cannot open our epoch 40: the receipt is owed again.
        store
            .commit_retry_request("bob", &[40], &state, None)
            .unwrap();
        assert_eq!(store.receipts_due().unwrap().len(), 2);
        store.receipts_sent("bob", &[[1; 16]], Some(41)).unwrap();

        assert!(store.request_retry("bob", 7, 1).unwrap());
        assert!(
            !store.request_retry("bob", 7, 2).unwrap(),
            "each epoch once"
        );
        assert!(store.request_retry("bob", 8, 3).unwrap());
        assert_eq!(
            store.retries_due().unwrap(),
            vec![("bob".to_string(), vec![7, 8])]
        );
        store.retries_sent("bob", &[7, 8], Some(50)).unwrap();
        assert!(store.retries_due().unwrap().is_empty());
        assert!(
            !store.request_retry("bob", 7, 4).unwrap(),
            "still remembered"
        );
        // Bob cannot open our epoch 50, which carried the request: it is owed again.
        store
            .commit_retry_request("bob", &[50], &state, None)
            .unwrap();
        assert_eq!(
            store.retries_due().unwrap(),
            vec![("bob".to_string(), vec![7, 8])]
        );

        // The state survives a reopen (and is encrypted at rest).
        drop(store);
        let store = open(dir.path(), true);
        assert_eq!(store.inbound_state("bob").unwrap().epochs().count(), 0);
    }

    #[test]
    fn held_envelopes_in_order_then_released_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        assert!(store.hold("bob", b"one", 1).unwrap());
        assert!(store.hold("bob", b"two", 2).unwrap());
        assert!(store.hold("amy", b"x", 3).unwrap());
        let held = store.held("bob").unwrap();
        assert_eq!(
            held.iter()
                .map(|h| h.payload.as_slice())
                .collect::<Vec<_>>(),
            [b"one", b"two"]
        );
        store.release_held(held[0].seq).unwrap();
        assert_eq!(store.held_count("bob").unwrap(), 1);
        assert_eq!(store.discard_held("bob").unwrap(), 1);
        assert_eq!(store.held_count("amy").unwrap(), 1);
    }
}
