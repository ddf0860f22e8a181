//! What the front end asks for: sending, user lists, presence, safety numbers,
//! verification, key decisions and history.

use std::collections::HashSet;

use chat_protocol::ClientMessage;
use chat_protocol::Username;
use chat_protocol::identity::{Fingerprint, PublicIdentity};
use chat_protocol::safety::SafetyNumber;
use chat_protocol::trust::{self, Pin};

use super::{Engine, Pending, Waiting};
use crate::api::{Command, ConnectionState, Event, Listing, parse_fingerprint};

impl Engine {
    pub(super) fn command_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Send { to, text } => {
                self.enqueue(&to, text);
            }
            Command::ListUsers => self.sink.emit(Event::error(
                "not_connected",
                "not connected to the server; the list will be available once reconnected",
            )),
            other => self.local_command(other),
        }
    }

    pub(super) fn command_online(&mut self, cmd: Command) {
        match cmd {
            Command::Send { to, text } => {
                if self.enqueue(&to, text) {
                    self.flush_due = true;
                }
            }
            Command::ListUsers => {
                self.request(Pending::Users, |id| ClientMessage::ListUsers { id })
            }
            other => self.local_command(other),
        }
    }

    /// Commands that work on local state (and use the connection when there is one).
    fn local_command(&mut self, cmd: Command) {
        match cmd {
            Command::Safety { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.pin(&user) {
                    Some(_) => self.emit_safety(&user),
                    None if self.online => {
                        self.fetch_key(&user, Some(Waiting::Safety));
                    }
                    None => self.sink.emit(Event::error(
                        "not_connected",
                        format!("{user}'s key is not known yet; connect to fetch it"),
                    )),
                }
            }
            Command::Unverify { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                if let Some(pin) = self.pin(&user) {
                    self.save_pin(
                        &user,
                        &Pin {
                            verified: false,
                            ..pin
                        },
                    );
                    self.emit_safety(&user);
                }
            }
            Command::Verify { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.pin(&user) {
                    Some(pin) if pin.usable() => {
                        self.save_pin(&user, &Pin { verified: true, ..pin });
                        self.emit_safety(&user);
                    }
                    Some(_) => self.sink.emit(Event::error(
                        "key_changed",
                        format!("{user}'s key changed; compare the new safety number and accept the key before verifying"),
                    )),
                    None => self.sink.emit(Event::error(
                        "unknown_contact",
                        format!("no key for {user} yet; open the safety number first"),
                    )),
                }
            }
            Command::AcceptKey { user, fingerprint } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                self.accept_key(&user, fingerprint.as_deref());
            }
            Command::RejectKey { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                self.reject_key(&user);
            }
            Command::History { user } => {
                let Some(user) = self.contact_name(&user) else {
                    return;
                };
                match self.store.history(&user, 10_000) {
                    Ok(items) => self.sink.emit(Event::History { user, items }),
                    Err(e) => self.store_error(e),
                }
            }
            Command::Archive { user } => self.set_listing(&user, Listing::Archived),
            Command::Unarchive { user } => self.set_listing(&user, Listing::Shown),
            Command::Remove { user } => self.set_listing(&user, Listing::Removed),
            Command::Watch { users } => self.watch(users),
            Command::Report(event) => self.sink.emit(event),
            // Already connected: the answer is the state as it is.
            Command::Reconnect if self.online => {
                self.connection_event(ConnectionState::Connected, None)
            }
            // Offline here only while a relay key waits for the user (`await_trust`).
            Command::Reconnect => self.sink.emit(Event::error(
                "not_connected",
                "not connected: the relay's key waits for your confirmation (see the \
                 server_key event); trust it, or start again with the fingerprint, to connect",
            )),
            cmd @ (Command::GroupCreate { .. }
            | Command::GroupAdd { .. }
            | Command::GroupRemove { .. }
            | Command::GroupLeave { .. }
            | Command::GroupPromote { .. }
            | Command::GroupRename { .. }
            | Command::GroupSend { .. }
            | Command::Groups
            | Command::GroupHistory { .. }) => self.group_command(cmd),
            Command::Send { .. }
            | Command::ListUsers
            | Command::Shutdown { .. }
            | Command::TrustServerKey { .. } => {}
        }
    }

    /// Archives, un-archives or removes a contact; answers `ContactListing`, or
    /// `not_a_contact` if `user` is not on the list.
    fn set_listing(&mut self, user: &str, listing: Listing) {
        let Some(user) = self.contact_name(user) else {
            return;
        };
        let done = match listing {
            Listing::Archived => self.store.set_archived(&user, true),
            Listing::Shown => self.store.set_archived(&user, false),
            Listing::Removed => self.store.remove_contact(&user),
        };
        match done {
            Ok(true) => self.sink.emit(Event::ContactListing { user, listing }),
            Ok(false) => self.sink.emit(Event::error(
                "not_a_contact",
                format!("{user} is not in your contact list; nothing changed"),
            )),
            Err(e) => self.store_error(e),
        }
    }

    /// The user accepts `user`'s pending key, optionally naming the fingerprint compared.
    fn accept_key(&mut self, user: &str, fingerprint: Option<&str>) {
        let Some(pin) = self.pin(user).filter(|p| p.pending.is_some()) else {
            self.sink.emit(Event::error(
                "no_key_change",
                format!("{user} has no new key waiting to be accepted"),
            ));
            return;
        };
        let pending = Fingerprint::of_der(pin.pending.as_deref().unwrap_or_default());
        if let Some(given) = fingerprint {
            let Some(given) = parse_fingerprint(given) else {
                self.sink.emit(Event::error(
                    "invalid_fingerprint",
                    format!("{given:?} is not a fingerprint: give the 64 hex digits shown with the key (spaces are fine)"),
                ));
                return;
            };
            if given != pending.0 {
                self.sink.emit(Event::error(
                    "fingerprint_mismatch",
                    format!(
                        "{user}'s new key is {pending}, not {} as given; nothing was accepted. \
                         Compare the safety number again (it may have changed since you looked)",
                        Fingerprint(given)
                    ),
                ));
                self.emit_safety(user);
                return;
            }
        }
        let Some(accepted) = trust::accept_pending(&pin) else {
            return;
        };
        self.save_pin(user, &accepted);
        // Fresh E2E state for the new key.
        self.peers.remove(user);
        if let Err(e) = self.store.reset_state(user) {
            self.store_error(e);
        }
        self.checked_keys
            .insert(user.to_owned(), tokio::time::Instant::now());
        // What the old key never receipted goes out again, to the new key.
        self.unsettled_resealed(user, None);
        match self.store.requeue_unreceipted(user) {
            Ok(ids) => {
                for id in ids {
                    self.sink.emit(Event::Requeued {
                        to: user.to_owned(),
                        id: crate::api::id_hex(&id),
                        reason: "key_changed".into(),
                    });
                }
            }
            Err(e) => self.store_error(e),
        }
        self.emit_safety(user);
        self.release_held(user);
        // Group changes signed by them waited for this decision.
        self.retry_all_held_changes();
        self.flush_due = true;
    }

    /// The user rejects `user`'s pending key: the pin stays, held envelopes go.
    fn reject_key(&mut self, user: &str) {
        let Some(pin) = self.pin(user).filter(|p| p.pending.is_some()) else {
            self.sink.emit(Event::error(
                "no_key_change",
                format!("{user} has no new key waiting to be rejected"),
            ));
            return;
        };
        self.save_pin(
            user,
            &Pin {
                pending: None,
                ..pin
            },
        );
        match self.store.discard_held(user) {
            Ok(0) => {}
            Ok(count) => self.sink.emit(Event::Discarded {
                from: user.to_owned(),
                count,
                reason: "key_rejected".into(),
            }),
            Err(e) => self.store_error(e),
        }
        self.emit_safety(user);
        self.flush_due = true;
    }

    pub(super) fn emit_safety(&mut self, user: &str) {
        let Some(pin) = self.pin(user) else { return };
        // While a change is pending, show the number for the *new* key: that is what the
        // user must compare before accepting it.
        let key = pin.pending.as_ref().unwrap_or(&pin.key);
        let (Ok(name), Ok(public)) = (Username::parse(user), PublicIdentity::from_der(key)) else {
            return;
        };
        let number = SafetyNumber::new((&self.me, self.identity.public()), (&name, &public));
        self.sink.emit(Event::Safety {
            user: user.to_owned(),
            number: number.to_string(),
            fingerprint: public.fingerprint().to_string(),
            verified: pin.verified && pin.pending.is_none(),
            key_changed: pin.pending.is_some(),
        });
    }

    /// Follows the presence of `users` (now if connected, else from the next connection).
    pub(super) fn watch(&mut self, users: Vec<String>) {
        let me = self.me.to_string();
        let mut seen = HashSet::new();
        let names: Vec<String> = users
            .iter()
            .filter_map(|u| self.contact_name(u))
            .filter(|u| *u != me && seen.insert(u.clone()))
            .collect();
        for name in &names {
            self.watch_list.insert(name.clone());
        }
        if !self.online {
            return;
        }
        // Followed on the relay already (a contact, or watched before): asked again, so
        // each gets its `presence` now too; the relay counts no one twice against its
        // limit. The others (one left out by that limit included) are asked as new.
        let (followed, new): (Vec<String>, Vec<String>) =
            names.into_iter().partition(|u| self.watching.contains(u));
        self.send_watch(new);
        if !followed.is_empty() {
            self.watch_request(followed);
        }
    }

    /// Asks the relay to follow `users` (in this order of priority) as far as the
    /// session's `MAX_WATCHED` allows; who is left out is named in a `watch_limit` warning.
    pub(super) fn send_watch(&mut self, users: Vec<String>) {
        let me = self.me.to_string();
        let mut users: Vec<String> = users
            .into_iter()
            .filter(|u| *u != me && !self.watching.contains(u))
            .collect();
        let room = chat_protocol::message::MAX_WATCHED.saturating_sub(self.watching.len());
        if users.len() > room {
            let left: Vec<String> = users.split_off(room);
            let named: Vec<&str> = left.iter().take(10).map(String::as_str).collect();
            self.sink.emit(Event::warning(
                "watch_limit",
                format!(
                    "presence is followed for at most {} people at a time (the most recent \
                     conversations first); not followed: {}{} ({} in all)",
                    chat_protocol::message::MAX_WATCHED,
                    named.join(", "),
                    if left.len() > named.len() {
                        ", …"
                    } else {
                        ""
                    },
                    left.len()
                ),
            ));
        }
        if users.is_empty() {
            return;
        }
        self.watching.extend(users.iter().cloned());
        self.watch_request(users);
    }

    /// The `Watch` request for `users`; its answer raises their `presence` events.
    fn watch_request(&mut self, users: Vec<String>) {
        let usernames = users.clone();
        self.request(Pending::Watch { users }, |id| ClientMessage::Watch {
            id,
            usernames,
        });
    }
}
