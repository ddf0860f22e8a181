//! Contact keys: fetched from the server once per connection, judged by the trust store
//! (trust on first use), and the envelopes held while a key change awaits the user.

use chat_protocol::ClientMessage;
use chat_protocol::identity::PublicIdentity;
use chat_protocol::trust::{self, Seen};
use tracing::{info, warn};

use super::{Engine, Pending, Source, Waiting, max_waiting, now_ms};
use crate::api::Event;

impl Engine {
    /// Asks the server for `user`'s key (once per connection) and parks `then` until it
    /// comes. Offline, nothing can be fetched: returns false and parks nothing.
    pub(super) fn fetch_key(&mut self, user: &str, then: Option<Waiting>) -> bool {
        if !self.online {
            return false;
        }
        let first = !self.awaiting_key.contains_key(user);
        let waiting = self.awaiting_key.entry(user.to_owned()).or_default();
        if let Some(w) = then {
            if waiting.len() < max_waiting() {
                waiting.push(w);
            } else if let Waiting::Envelope { source, .. } = w {
                warn!(
                    user,
                    "too many envelopes waiting for a key; left to the relay"
                );
                self.leave_to_relay(source, user);
            }
        }
        if first {
            // Someone we exchange messages with: follow their presence too.
            self.watch(vec![user.to_owned()]);
            let username = user.to_owned();
            self.request(
                Pending::Key {
                    user: user.to_owned(),
                },
                |id| ClientMessage::GetPublicKey { id, username },
            );
        }
        true
    }

    pub(super) fn key_arrived(&mut self, user: &str, der: &[u8]) {
        let waiting = self.awaiting_key.remove(user).unwrap_or_default();
        if PublicIdentity::from_der(der).is_err() {
            self.sink.emit(Event::error(
                "invalid_key",
                format!("the server sent an unusable key for {user}"),
            ));
            return;
        }
        self.checked_keys
            .insert(user.to_owned(), tokio::time::Instant::now());
        let pin = self.pin(user);
        match trust::observe(pin.as_ref(), der) {
            Seen::New(pin) => {
                // Listed only if the user asked (safety number, a text to them); anyone
                // else is listed by their first text (a trigger on the history), so
                // fellow group members who only sent keys or changes stay off the list:
                // a 100-member group must not put 99 strangers in the contact list.
                let asked = waiting.iter().any(|w| matches!(w, Waiting::Safety))
                    || self.store.has_text_for(user).unwrap_or(true);
                if !self.save_new_pin(user, &pin, asked) {
                    // The store cannot write (a full disk): what waited for the key waits
                    // with the other stalled deliveries and is retried with them.
                    for w in waiting {
                        if let Waiting::Envelope {
                            source, payload, ..
                        } = w
                        {
                            self.stall(source, user, &payload);
                        }
                    }
                    return;
                }
                info!("pinned a contact's first key");
            }
            Seen::Trusted => {}
            Seen::Changed { was_verified, pin } => {
                let before = self.pin(user).and_then(|p| p.pending);
                self.save_pin(user, &pin);
                if pin.pending != before {
                    warn!(was_verified, "a contact's key changed");
                    self.sink.emit(Event::KeyChanged {
                        user: user.to_owned(),
                        fingerprint: PublicIdentity::from_der(der)
                            .map(|k| k.fingerprint().to_string())
                            .unwrap_or_default(),
                        was_verified,
                    });
                }
            }
        }
        for w in waiting {
            match w {
                Waiting::Safety => self.emit_safety(user),
                Waiting::Envelope {
                    source,
                    payload,
                    arrived,
                } => self.deliver(source, user.to_owned(), payload, arrived),
            }
        }
        // Changes held for this key (their author's) can be judged now.
        self.retry_all_held_changes();
        self.flush_due = true;
    }

    /// Keeps an envelope from `from`, whose key change is pending, in the store until the
    /// user decides. Acknowledged to the relay once stored; if the store refuses (full,
    /// or too many held), it stays on the relay.
    pub(super) fn hold(&mut self, source: Source, from: &str, payload: &[u8]) {
        let Source::Relay(envelope_id) = source else {
            return; // Already held: it stays.
        };
        match self.store.hold(from, payload, now_ms()) {
            Ok(true) => self.acks.push(envelope_id),
            Ok(false) => {
                warn!("too many envelopes held for one contact; left to the relay");
                self.leave_to_relay(source, from);
            }
            Err(e) => self.store_error(e),
        }
    }

    /// Opens what was held for `user` (after their new key was accepted), in order.
    pub(super) fn release_held(&mut self, user: &str) {
        let held = match self.store.held(user) {
            Ok(held) => held,
            Err(e) => return self.store_error(e),
        };
        for h in held {
            let now = tokio::time::Instant::now();
            self.deliver(Source::Held(h.seq), user.to_owned(), h.payload, now);
        }
    }

    /// At a new connection: opens what is still held for contacts whose key is usable
    /// again (accepted while something could not be finished, e.g. offline).
    pub(super) fn release_held_for_usable_keys(&mut self) {
        let users: Vec<String> = match self.store.contacts() {
            Ok(users) => users,
            Err(e) => return self.store_error(e),
        };
        for user in users {
            if self.store.held_count(&user).unwrap_or(0) > 0
                && self.pin(&user).is_some_and(|p| p.usable())
            {
                self.release_held(&user);
            }
        }
    }
}
