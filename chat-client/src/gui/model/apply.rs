//! How each core [`Event`] changes the [`Model`].

use super::{Contact, Line, Link, Model, RelayKeyPrompt, now_ms};
use crate::api::{ConnectionState, Event, HistoryItem, Listing, Status};

impl Model {
    pub fn apply(&mut self, event: Event) {
        let looking = self.open_group.clone().filter(|_| self.focused);
        if self.groups.apply(&event, looking.as_deref()) {
            return;
        }
        match event {
            Event::Ready { user, fingerprint } => {
                self.me = Some(user);
                self.fingerprint = Some(fingerprint);
                self.error = None;
                self.status = None;
            }
            Event::Status { message } => self.status = Some(message),
            Event::Contacts {
                users,
                verified,
                last,
                archived,
            } => {
                for user in users {
                    self.contact(&user);
                }
                for user in archived {
                    self.contact(&user).archived = true;
                }
                for user in verified {
                    if let Some(c) = self.contacts.get_mut(&user) {
                        c.verified = true;
                    }
                }
                for message in last {
                    let user = message.user.clone();
                    self.contact(&user).last = Some(message);
                }
            }
            Event::Users { online } => {
                // Contacts' dots follow the list; strangers do not become contacts.
                for (name, c) in self.contacts.iter_mut() {
                    c.online = Some(online.contains(name));
                }
                for (name, now) in self.presence.iter_mut() {
                    *now = online.contains(name);
                }
                self.online_users = online;
            }
            // Presence never makes a contact (a removed one is still followed until the
            // next connection).
            Event::Presence { user, online } => {
                if let Some(c) = self.contacts.get_mut(&user) {
                    c.online = Some(online);
                }
                self.presence.insert(user, online);
            }
            Event::Message {
                from,
                id,
                text,
                sent_at,
            } => {
                let looking = self.focused && self.open.as_deref() == Some(from.as_str());
                let contact = self.contact(&from);
                contact.archived = false;
                insert_line(
                    contact,
                    Line {
                        id,
                        outgoing: false,
                        text,
                        sent_at,
                        stored_at: now_ms(),
                        status: Status::Delivered,
                        undelivered: false,
                        reason: None,
                    },
                );
                if !looking {
                    contact.unread += 1;
                }
            }
            Event::Queued {
                to,
                id,
                text,
                sent_at,
            } => {
                let contact = self.contact(&to);
                contact.archived = false;
                insert_line(
                    contact,
                    Line {
                        id,
                        outgoing: true,
                        text,
                        // Our own clock: the time it was written is its place.
                        stored_at: sent_at,
                        sent_at,
                        status: Status::Sending,
                        undelivered: false,
                        reason: None,
                    },
                )
            }
            Event::ContactListing { user, listing } => match listing {
                Listing::Removed => {
                    self.contacts.remove(&user);
                    if self.open.as_deref() == Some(user.as_str()) {
                        self.open = None;
                    }
                }
                Listing::Archived | Listing::Shown => {
                    if let Some(c) = self.contacts.get_mut(&user) {
                        c.archived = listing == Listing::Archived;
                    }
                }
            },
            Event::Sent { to, id } => self.set_status(&to, &id, Status::Sent),
            Event::Delivered { to, id } => self.set_status(&to, &id, Status::Delivered),
            Event::Failed {
                to, id, message, ..
            } => {
                self.set_status(&to, &id, Status::Failed);
                if let Some(line) = self.line(&to, &id) {
                    line.reason = Some(message);
                    line.undelivered = false;
                }
            }
            Event::Undelivered { to, id, .. } => {
                if let Some(line) = self.line(&to, &id)
                    && line.status == Status::Sent
                {
                    line.undelivered = true;
                }
            }
            Event::Requeued { to, id, .. } => {
                // Sent again under a new key: back to sending (the only step back).
                if let Some(line) = self.line(&to, &id)
                    && line.status == Status::Sent
                {
                    line.status = Status::Sending;
                    line.undelivered = false;
                }
            }
            Event::Discarded { from, count, .. } => {
                self.error = Some((
                    "discarded".into(),
                    format!(
                        "{count} message(s) from {from} under the rejected key were discarded unread"
                    ),
                ));
            }
            Event::Safety {
                user,
                number,
                fingerprint,
                verified,
                key_changed,
            } => {
                // A group member's number does not make a contact of them.
                let c = self.contacts.entry(user).or_insert_with(|| Contact {
                    unlisted: true,
                    ..Contact::default()
                });
                c.safety = Some(number);
                c.verified = verified;
                c.key_changed = key_changed;
                if key_changed {
                    c.pending_fingerprint = Some(fingerprint.clone());
                }
                c.safety_fingerprint = Some(fingerprint);
            }
            Event::KeyChanged {
                user,
                fingerprint,
                was_verified,
            } => {
                let c = self.contact(&user);
                c.key_changed = true;
                c.key_changed_was_verified = was_verified;
                c.pending_fingerprint = Some(fingerprint);
                c.verified = false;
                // A number shown before the change is not for the new key.
                c.safety = None;
                c.safety_fingerprint = None;
            }
            Event::Warning { code, message } => self.error = Some((code, message)),
            Event::NoSuchUser { user } => {
                // A name that was only tried (nothing received from it, no key) is not a
                // contact: it leaves the list, and its conversation closes.
                let tried_only = self.contacts.get(&user).is_some_and(|c| {
                    c.safety.is_none() && c.last.is_none() && c.lines.iter().all(|l| l.outgoing)
                });
                if tried_only {
                    self.contacts.remove(&user);
                    if self.open.as_deref() == Some(user.as_str()) {
                        self.open = None;
                    }
                }
                self.error = Some((
                    "unknown_user".into(),
                    format!("There is no user named {user}; check the spelling."),
                ));
                self.unknown.insert(user);
            }
            Event::Connection {
                state,
                retry_in_ms,
                reason,
                queued,
                max_text_bytes,
                server,
            } => {
                if max_text_bytes.is_some() {
                    self.max_text = max_text_bytes;
                }
                if state != ConnectionState::Connected {
                    for c in self.contacts.values_mut() {
                        c.online = None;
                    }
                    self.presence.clear();
                }
                self.link = Link {
                    state,
                    retry_in_ms,
                    reason,
                    queued,
                    server,
                    since: std::time::Instant::now(),
                };
            }
            Event::History { user, items } => {
                let contact = self.contact(&user);
                for item in items {
                    insert_line(contact, line_of(item));
                }
            }
            Event::ServerKey {
                server,
                fingerprint,
                needs_confirmation: true,
                ..
            } => {
                let mismatch = self
                    .error
                    .as_ref()
                    .filter(|(code, _)| code == "server_key_mismatch")
                    .map(|(_, message)| message.clone());
                self.relay_key = Some(RelayKeyPrompt {
                    server,
                    fingerprint,
                    mismatch,
                });
            }
            // Pinned without asking (an address with #FINGERPRINT): nothing to decide.
            Event::ServerKey { .. } => {}
            Event::Error { code, message } => self.error = Some((code, message)),
            Event::GroupFailed {
                reason, message, ..
            } => self.error = Some((reason, message)),
            Event::GroupMessage { .. }
            | Event::GroupQueued { .. }
            | Event::GroupSent { .. }
            | Event::GroupDelivered { .. }
            | Event::GroupWithdrawn { .. }
            | Event::Group(_)
            | Event::Groups { .. }
            | Event::GroupHistory { .. }
            | Event::GroupRefused { .. } => {}
        }
    }

    fn line(&mut self, to: &str, id: &str) -> Option<&mut Line> {
        self.contact(to)
            .lines
            .iter_mut()
            .find(|l| l.id == id && l.outgoing)
    }

    fn set_status(&mut self, to: &str, id: &str, status: Status) {
        if let Some(line) = self.contact(to).lines.iter_mut().find(|l| l.id == id) {
            // Receipts can overtake the server's answer: never go backwards.
            if rank(status) > rank(line.status) {
                line.status = status;
            }
        }
    }
}

/// Status only moves forward: sending → sent → delivered, or sending → failed.
fn rank(s: Status) -> u8 {
    match s {
        Status::Sending => 0,
        Status::Failed | Status::Sent => 1,
        Status::Delivered => 2,
    }
}

fn line_of(item: HistoryItem) -> Line {
    Line {
        id: item.id,
        outgoing: item.outgoing,
        text: item.text,
        sent_at: item.sent_at,
        stored_at: item.stored_at,
        status: item.status,
        undelivered: item.undelivered,
        reason: item.reason,
    }
}

/// Adds a line in the order this client stored it, ignoring one already present
/// (history vs live events; the stored copy's place wins).
fn insert_line(contact: &mut Contact, line: Line) {
    if let Some(at) = contact
        .lines
        .iter()
        .position(|l| l.id == line.id && l.outgoing == line.outgoing)
    {
        let existing = &mut contact.lines[at];
        if rank(line.status) > rank(existing.status) {
            existing.status = line.status;
        }
        existing.undelivered |= line.undelivered;
        if line.reason.is_some() {
            existing.reason = line.reason;
        }
        if existing.stored_at != line.stored_at && line.stored_at != 0 {
            // The store's time is the truth: move the line there.
            let mut moved = contact.lines.remove(at);
            moved.stored_at = line.stored_at;
            let to = contact
                .lines
                .partition_point(|l| l.stored_at <= moved.stored_at);
            contact.lines.insert(to, moved);
        }
        return;
    }
    let at = contact
        .lines
        .partition_point(|l| l.stored_at <= line.stored_at);
    contact.lines.insert(at, line);
}
