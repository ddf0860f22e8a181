//! What the engine keeps per contact: send holds after a refusal, E2E session state,
//! pinned identity keys and the names contacts are shown by.

use std::time::Duration;

use chat_protocol::Username;
use chat_protocol::e2e::Inbound;
use chat_protocol::identity::PublicIdentity;
use chat_protocol::trust::Pin;
use tokio::time::Instant;
use tracing::warn;

use super::{Engine, Peer};
use crate::api::Event;
use crate::store::StoreError;

impl Engine {
    /// Sends nothing to `peer` for `delay`. Returns whether it was not held already.
    pub(super) fn hold_peer(&mut self, peer: &str, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        match self.hold.insert(peer.to_owned(), until) {
            Some(before) if before > Instant::now() => {
                self.hold.insert(peer.to_owned(), before.max(until));
                false
            }
            _ => true,
        }
    }

    /// Whether nothing may be sent to `peer` now. A held peer's hold end is a time to
    /// try again (a hold may have been extended past the retry already set).
    pub(super) fn held(&mut self, peer: &str) -> bool {
        match self.hold.get(peer).copied() {
            Some(until) if until > Instant::now() => {
                self.retry_at = Some(self.retry_at.map_or(until, |r| r.min(until)));
                true
            }
            Some(_) => {
                self.hold.remove(peer);
                false
            }
            None => false,
        }
    }

    pub(super) fn peer(&mut self, name: &str) -> &mut Peer {
        self.peers.entry(name.to_owned()).or_default()
    }

    /// `name`'s receiving state (from the store the first time).
    pub(super) fn inbound_state(&mut self, name: &str) -> Result<Inbound, StoreError> {
        if let Some(state) = self.peers.get(name).and_then(|p| p.inbound.clone()) {
            return Ok(state);
        }
        let state = match self.store.inbound_state(name) {
            Ok(state) => state,
            Err(StoreError::Undecryptable(_)) => {
                // Unreadable state is lost state: start afresh; retry requests recover.
                warn!(
                    peer = name,
                    "stored end-to-end state unreadable; starting afresh"
                );
                self.store.reset_state(name)?;
                Inbound::default()
            }
            Err(e) => return Err(e),
        };
        self.peer(name).inbound = Some(state.clone());
        Ok(state)
    }

    pub(super) fn pin(&mut self, user: &str) -> Option<Pin> {
        match self.store.pin(user) {
            Ok(pin) => pin,
            Err(e) => {
                self.store_error(e);
                None
            }
        }
    }

    /// Saves a pin; false (and the user told) if the store could not write it.
    pub(super) fn save_pin(&mut self, user: &str, pin: &Pin) -> bool {
        match self.store.save_pin(user, pin) {
            Ok(()) => true,
            Err(e) => {
                self.store_error(e);
                false
            }
        }
    }

    /// Saves a new contact's pin, listed or not (see `Store::save_pin_unlisted`); false
    /// (and the user told) if the store could not write it.
    pub(super) fn save_new_pin(&mut self, user: &str, pin: &Pin, listed: bool) -> bool {
        let saved = if listed {
            self.store.save_pin(user, pin)
        } else {
            self.store.save_pin_unlisted(user, pin)
        };
        saved.map_err(|e| self.store_error(e)).is_ok()
    }

    /// The pinned, usable key of `user`, parsed.
    pub(super) fn usable_key(&mut self, user: &str) -> Option<(Username, PublicIdentity)> {
        let pin = self.pin(user).filter(Pin::usable)?;
        let name = Username::parse(user).ok()?;
        let public = PublicIdentity::from_der(&pin.key).ok()?;
        Some((name, public))
    }

    /// Canonical form of a user-typed contact name, or an error event.
    pub(super) fn contact_name(&self, raw: &str) -> Option<String> {
        parse_contact(raw).map_err(|e| self.sink.emit(e)).ok()
    }
}

/// Canonical form of a user-typed contact name, or the `invalid_username` error event to
/// give (not given yet).
pub(super) fn parse_contact(raw: &str) -> Result<String, Event> {
    Username::parse(raw.trim())
        .map(|name| name.to_string())
        .map_err(|e| Event::error("invalid_username", format!("{}: {e}", quoted(raw))))
}

/// Characters of a rejected name an error message quotes; a pasted paragraph is cut.
const QUOTED_CHARS: usize = 40;

/// `raw` quoted for an error message (Rust string escapes), cut after [`QUOTED_CHARS`]
/// characters with an ellipsis and the full length, so the error stays one readable line.
fn quoted(raw: &str) -> String {
    let chars = raw.chars().count();
    if chars <= QUOTED_CHARS {
        return format!("{raw:?}");
    }
    let head: String = raw.chars().take(QUOTED_CHARS).collect();
    format!("{head:?}… ({chars} characters)")
}
