//! The contact list: pinned keys, who is listed, archived or removed.

use chat_protocol::trust::Pin;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

impl Store {
    pub fn pin(&self, user: &str) -> Result<Option<Pin>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT pinned_key, verified, pending_key FROM contacts WHERE username = ?1",
            )?
            .query_row(params![user], |r| {
                Ok(Pin {
                    key: r.get(0)?,
                    verified: r.get(1)?,
                    pending: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// Pins `user`'s key; a new contact is listed.
    pub fn save_pin(&self, user: &str, pin: &Pin) -> Result<(), StoreError> {
        self.insert_pin(user, pin, "shown")
    }

    /// Pins a *new* key for someone the user did not ask about (e.g. a fellow group member
    /// who sent a sending key): off the contact list (`removed`) until a 1:1 text in either
    /// direction lists them. An existing contact's listing is left as it is.
    pub fn save_pin_unlisted(&self, user: &str, pin: &Pin) -> Result<(), StoreError> {
        self.insert_pin(user, pin, "removed")
    }

    /// Saves a pin; `listing` is a new contact's (an existing one's is kept).
    fn insert_pin(&self, user: &str, pin: &Pin, listing: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO contacts (username, pinned_key, verified, pending_key, listing)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (username) DO UPDATE SET
                 pinned_key = excluded.pinned_key,
                 verified = excluded.verified,
                 pending_key = excluded.pending_key",
            params![user, pin.key, pin.verified, pin.pending, listing],
        )?;
        Ok(())
    }

    /// Everyone we have a pinned key for or received from, for contact lists: a name
    /// that only ever failed (e.g. no such user) is not a contact. Alphabetical.
    /// Contacts removed from the list are left out (archived ones are in).
    pub fn contacts(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT username FROM contacts WHERE listing != 'removed'
             UNION SELECT DISTINCT peer FROM messages WHERE outgoing = 0
             ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Contacts the user archived (hidden from the main list until a new message), by name.
    pub fn archived_contacts(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT username FROM contacts WHERE listing = 'archived' ORDER BY 1")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Archives or un-archives `user`. Returns false if `user` is not a contact.
    pub fn set_archived(&mut self, user: &str, archived: bool) -> Result<bool, StoreError> {
        let listing = if archived { "archived" } else { "shown" };
        let changed = self.conn.execute(
            "UPDATE contacts SET listing = ?2 WHERE username = ?1 AND listing != 'removed'",
            params![user, listing],
        )?;
        Ok(changed > 0)
    }

    /// Removes `user` from the contact list and deletes the conversation with them from this
    /// device: history, and messages not yet handed to the relay (those it accepted are
    /// still delivered: they cannot be recalled). The ids of deleted messages are kept, so
    /// a message sent again is not shown a second time. Their key stays pinned, so a key
    /// change is still flagged if they write again (which lists them again). Returns false
    /// if there was nothing to remove.
    pub fn remove_contact(&mut self, user: &str) -> Result<bool, StoreError> {
        self.transaction(|tx, _| {
            let listed = tx.execute(
                "UPDATE contacts SET listing = 'removed' WHERE username = ?1 AND listing != 'removed'",
                params![user],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO removed_ids (peer, id)
                 SELECT peer, id FROM messages WHERE peer = ?1 AND outgoing = 0",
                params![user],
            )?;
            let messages = tx.execute("DELETE FROM messages WHERE peer = ?1", params![user])?;
            tx.execute("DELETE FROM outbox WHERE peer = ?1", params![user])?;
            Ok(listed + messages > 0)
        })
    }

    /// Contacts whose pinned key is marked verified, by name.
    pub fn verified_contacts(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT username FROM contacts WHERE verified != 0 AND listing != 'removed'
                 ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The same people as [`Store::contacts`], most recent conversation first (then by
    /// name): the order in which presence is followed when there are more contacts than
    /// a session may watch.
    pub fn contacts_by_recency(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name FROM (
                 SELECT username AS name FROM contacts WHERE listing != 'removed'
                 UNION SELECT DISTINCT peer FROM messages WHERE outgoing = 0)
             ORDER BY (SELECT MAX(stored_at) FROM messages WHERE peer = name) DESC NULLS LAST,
                      name",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether we have a conversation with `peer` or a text to them in the outbox.
    pub fn has_text_for(&self, peer: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE peer = ?1)
                     OR EXISTS (SELECT 1 FROM outbox WHERE peer = ?1 AND kind = 'text')",
            )?
            .query_row(params![peer], |r| r.get(0))?)
    }

    /// Whether we have exchanged any message with `peer` (a contact, not a stranger).
    pub fn has_conversation(&self, peer: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM messages WHERE peer = ?1)")?
            .query_row(params![peer], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::messages;
    use crate::store::tests::open;

    fn outgoing(n: u8, peer: &str) -> messages::OutboxItem {
        messages::OutboxItem {
            id: [n; 16],
            peer: peer.into(),
            body: chat_protocol::e2e::Body::Text("hi".into()),
            sent_at: 0,
        }
    }

    fn plain_pin() -> Pin {
        Pin {
            key: vec![1],
            verified: false,
            pending: None,
        }
    }

    /// Presence is followed most-recent-conversation first: with more contacts than a
    /// session may watch, the people you talk to now are never the ones left out.
    #[test]
    fn contacts_by_recency_puts_the_latest_conversation_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        let pin = plain_pin();
        for name in ["aaron", "bob", "zed", "quiet"] {
            store.save_pin(name, &pin).unwrap();
        }
        for (n, peer) in [(1u8, "bob"), (2, "aaron"), (3, "zed")] {
            store.enqueue(&outgoing(n, peer)).unwrap();
        }
        assert_eq!(
            store.contacts_by_recency().unwrap(),
            ["zed", "aaron", "bob", "quiet"]
        );
        assert_eq!(store.contacts().unwrap(), ["aaron", "bob", "quiet", "zed"]);
        assert!(store.verified_contacts().unwrap().is_empty());
        store
            .save_pin(
                "zed",
                &Pin {
                    verified: true,
                    ..pin
                },
            )
            .unwrap();
        assert_eq!(store.verified_contacts().unwrap(), ["zed"]);
    }

    /// Archive hides a contact until a new message in either direction; remove deletes the
    /// conversation and its outbox but keeps the pinned key; a later message lists them again.
    #[test]
    fn archive_and_remove_hide_a_contact_until_a_new_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        let pin = plain_pin();
        for name in ["amy", "bob"] {
            store.save_pin(name, &pin).unwrap();
        }
        store.enqueue(&outgoing(1, "bob")).unwrap();
        assert!(store.set_archived("amy", true).unwrap());
        assert!(!store.set_archived("nobody", true).unwrap());
        assert_eq!(store.archived_contacts().unwrap(), ["amy"]);
        assert_eq!(
            store.contacts().unwrap(),
            ["amy", "bob"],
            "archived stays a contact"
        );

        assert!(store.remove_contact("bob").unwrap());
        assert!(
            !store.remove_contact("bob").unwrap(),
            "nothing left to remove"
        );
        assert_eq!(store.contacts().unwrap(), ["amy"]);
        assert_eq!(store.contacts_by_recency().unwrap(), ["amy"]);
        assert!(store.history("bob", 10).unwrap().is_empty());
        assert_eq!(store.outbox_len().unwrap(), 0);
        assert_eq!(
            store.pin("bob").unwrap(),
            Some(pin.clone()),
            "key stays pinned"
        );

        // New messages bring both back.
        store.enqueue(&outgoing(2, "amy")).unwrap();
        store.enqueue(&outgoing(3, "bob")).unwrap();
        assert!(store.archived_contacts().unwrap().is_empty());
        assert_eq!(store.contacts().unwrap(), ["amy", "bob"]);
        assert!(store.set_archived("amy", true).unwrap());
        assert!(store.set_archived("amy", false).unwrap());
        assert!(store.archived_contacts().unwrap().is_empty());
    }

    /// A removed conversation's received messages are not shown again if re-sent, and a
    /// removed verified contact is not listed as verified.
    #[test]
    fn a_removed_conversation_stays_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), false);
        store
            .save_pin(
                "bob",
                &Pin {
                    verified: true,
                    ..plain_pin()
                },
            )
            .unwrap();
        let state = chat_protocol::e2e::Inbound::default();
        let text = |id| crate::store::ReceivedText {
            peer: "bob",
            id,
            text: "hi",
            sent_at: 5,
            stored_at: 10,
        };
        assert!(store.commit_text(text(&[1; 16]), &state, None).unwrap());
        assert_eq!(store.verified_contacts().unwrap(), ["bob"]);
        assert!(store.remove_contact("bob").unwrap());
        assert!(store.verified_contacts().unwrap().is_empty());
        assert!(
            !store.commit_text(text(&[1; 16]), &state, None).unwrap(),
            "the same message again is a duplicate"
        );
        assert!(store.history("bob", 10).unwrap().is_empty());
        assert!(
            store.contacts().unwrap().is_empty(),
            "and does not relist bob"
        );
        assert!(store.commit_text(text(&[2; 16]), &state, None).unwrap());
        assert_eq!(store.contacts().unwrap(), ["bob"]);
    }
}
