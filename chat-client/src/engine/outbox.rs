//! Outgoing messages: the outbox, sealing, and giving up on what can never be sent.

use std::collections::HashSet;

use chat_protocol::ClientMessage;
use chat_protocol::e2e::{self, Body, Content, MessageId, Parties};
use rand::Rng;

use super::{Engine, Pending, now_ms};
use crate::api::{ConnectionState, Event, id_hex};
use crate::store::{Floors, OutboxItem};

impl Engine {
    /// Writes a new message to the outbox. Returns whether it was queued.
    pub(super) fn enqueue(&mut self, to: &str, text: String) -> bool {
        let Some(to) = self.contact_name(to) else {
            return false;
        };
        if text.len() > e2e::MAX_TEXT_BYTES {
            self.sink.emit(Event::error(
                "message_too_long",
                format!(
                    "the message is {} bytes; the limit is {}",
                    text.len(),
                    e2e::MAX_TEXT_BYTES
                ),
            ));
            return false;
        }
        if self.pin(&to).is_some_and(|p| !p.usable()) {
            self.sink.emit(Event::error(
                "key_changed",
                format!("{to}'s key changed; check the safety number and accept the new key before sending"),
            ));
            return false;
        }
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        let item = OutboxItem {
            id,
            peer: to.clone(),
            text,
            sent_at: now_ms(),
        };
        if let Err(e) = self.store.enqueue(&item) {
            self.store_error(e);
            return false;
        }
        self.sink.emit(Event::Queued {
            to,
            id: id_hex(&id),
            text: item.text,
            sent_at: item.sent_at,
        });
        true
    }
    /// Seals and sends every outbox message that can go now, in order.
    pub(super) fn flush_outbox(&mut self, out: &mut Vec<ClientMessage>) {
        let items = match self.store.outbox() {
            Ok(items) => items,
            Err(e) => return self.store_error(e),
        };
        // Keep per-contact order: once one message to a contact must wait, so do the rest.
        let mut held: HashSet<String> = HashSet::new();
        for item in items {
            if self.in_flight.contains(&item.id) || held.contains(&item.peer) {
                continue;
            }
            let ready = self.checked_keys.contains(&item.peer)
                && self.pin(&item.peer).is_some_and(|p| p.usable());
            if !ready {
                if !self.checked_keys.contains(&item.peer) {
                    self.fetch_key(&item.peer, None, out);
                }
                held.insert(item.peer);
                continue;
            }
            let content = Content {
                id: item.id,
                sent_at_ms: item.sent_at,
                body: Body::Text(item.text),
            };
            match self.seal(&item.peer, &content) {
                Some(payload) => {
                    self.in_flight.insert(item.id);
                    let to = item.peer;
                    self.request(
                        out,
                        Pending::Send {
                            id: item.id,
                            to: to.clone(),
                        },
                        |id| ClientMessage::Send { id, to, payload },
                    );
                }
                None => {
                    held.insert(item.peer);
                }
            }
        }
    }
    /// Encrypts for `to` with its pinned key, persisting the new-epoch floor if any.
    pub(super) fn seal(&mut self, to: &str, content: &Content) -> Option<Vec<u8>> {
        let (peer_name, public) = self.usable_key(to)?;
        let floors = self.store.floors(to).unwrap_or_default();
        let rotation = self.config.rotation;
        let peer = Self::peer(&mut self.peers, to, floors);
        let before = peer.outbound.last_created_ms();
        let parties = Parties {
            me: &self.identity,
            my_name: &self.me,
            peer_name: &peer_name,
            peer: &public,
        };
        match peer
            .outbound
            .seal(&mut rand::rng(), parties, content, now_ms(), rotation)
        {
            Ok(sealed) => {
                let after = peer.outbound.last_created_ms();
                if after != before {
                    let floors = Floors {
                        out_created_ms: after,
                        ..floors
                    };
                    if let Err(e) = self.store.save_floors(to, floors) {
                        self.store_error(e);
                    }
                }
                Some(sealed.bytes)
            }
            Err(e) => {
                self.sink.emit(Event::error(
                    "encrypt_failed",
                    format!("could not encrypt for {to}: {e}"),
                ));
                None
            }
        }
    }
    pub(super) fn fail_outbox_for(&mut self, user: &str) {
        let items = self.store.outbox().unwrap_or_default();
        for item in items.into_iter().filter(|i| i.peer == user) {
            self.fail_message(&item.id);
        }
        self.connection_event(ConnectionState::Connected, None);
    }
    /// Takes a message out of the outbox for good and says so.
    pub(super) fn fail_message(&mut self, id: &MessageId) {
        match self.store.mark_failed(id) {
            Ok(Some(to)) => self.sink.emit(Event::Failed { to, id: id_hex(id) }),
            Ok(None) => {}
            Err(e) => self.store_error(e),
        }
    }
}
