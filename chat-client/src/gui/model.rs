//! What the window shows, built only from core [`Event`]s. No drawing, no I/O: the view
//! reads it, and tests drive it directly.

use std::collections::BTreeMap;

use crate::api::{ConnectionState, Event, HistoryItem, Listing, Status};

/// One message in a conversation view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub id: String,
    pub outgoing: bool,
    pub text: String,
    /// Sender's clock, ms since the Unix epoch: shown, never used for order.
    pub sent_at: u64,
    /// Our clock when stored (written or arrived), ms since the Unix epoch: the order.
    pub stored_at: u64,
    pub status: Status,
    /// Sent long ago and still not delivered.
    pub undelivered: bool,
    /// Why it failed, for people.
    pub reason: Option<String>,
}

/// How the conversation with yourself is labelled.
pub const NOTE_TO_SELF: &str = "Note to self";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contact {
    /// `Some(online)` as the relay last said on this connection; `None` while not
    /// connected (shown as unknown, never as a stale green).
    pub online: Option<bool>,
    pub unread: usize,
    pub lines: Vec<Line>,
    /// History has been requested from the store.
    pub history_requested: bool,
    pub verified: bool,
    /// A new key awaits acceptance; sending is disabled.
    pub key_changed: bool,
    /// The key that changed had been verified (a louder warning).
    pub key_changed_was_verified: bool,
    /// Fingerprint of the new key awaiting acceptance, as the core reported it.
    pub pending_fingerprint: Option<String>,
    /// Latest safety number received for this contact, and the fingerprint of the key it
    /// is for (what accepting it accepts).
    pub safety: Option<String>,
    pub safety_fingerprint: Option<String>,
    /// The newest message as the store had it at sign-in (before any history is loaded).
    pub last: Option<crate::api::LastMessage>,
    /// Archived: left out of the list (not out of search) until a new message.
    pub archived: bool,
    /// Known only as a group member whose safety number was looked at: not in the list
    /// until a chat with them is opened or they write.
    pub unlisted: bool,
}

impl Contact {
    /// The newest message for the contact list: (first line, when stored, ours).
    pub fn preview(&self) -> Option<(&str, u64, bool)> {
        match (self.lines.last(), &self.last) {
            (Some(line), Some(last)) if last.stored_at > line.stored_at => {
                Some((last.text.as_str(), last.stored_at, last.outgoing))
            }
            (Some(line), _) => Some((
                line.text.lines().next().unwrap_or(""),
                line.stored_at,
                line.outgoing,
            )),
            (None, Some(last)) => Some((last.text.as_str(), last.stored_at, last.outgoing)),
            (None, None) => None,
        }
    }
}

/// Connection as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub state: ConnectionState,
    pub retry_in_ms: Option<u64>,
    pub reason: Option<String>,
    pub queued: usize,
    /// When the reconnect countdown started (for "reconnecting in Ns").
    pub since: std::time::Instant,
}

#[derive(Debug, Clone)]
pub struct Model {
    /// Set once logged in.
    pub me: Option<String>,
    pub fingerprint: Option<String>,
    pub contacts: BTreeMap<String, Contact>,
    pub open: Option<String>,
    pub link: Link,
    /// Latest progress line (key generation etc.).
    pub status: Option<String>,
    /// Latest error, shown until dismissed or replaced.
    pub error: Option<(String, String)>,
    /// Whether the user is looking at the window (affects unread counts).
    pub focused: bool,
    /// Everyone online, as the relay last listed them (`/users`, the people view).
    pub online_users: Vec<String>,
    /// Names the relay said do not exist (this session).
    pub unknown: std::collections::BTreeSet<String>,
    /// The longest text the relay last connected to can carry, if known.
    pub max_text: Option<usize>,
    /// A relay key waiting for the user's decision (first use, or a changed key).
    pub relay_key: Option<RelayKeyPrompt>,
    /// Groups, by id.
    pub groups: super::group_model::Groups,
    /// The open group (its id), when a group rather than a contact is open.
    pub open_group: Option<String>,
    /// Presence of everyone the relay told this connection about (contacts and group
    /// members); emptied when the connection drops.
    pub presence: BTreeMap<String, bool>,
}

/// A relay key the user must compare before the client connects with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayKeyPrompt {
    /// `HOST:PORT`.
    pub server: String,
    pub fingerprint: String,
    /// Another key was pinned for this relay: why the connection stopped, as the core said.
    pub mismatch: Option<String>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            me: None,
            fingerprint: None,
            contacts: BTreeMap::new(),
            open: None,
            link: Link {
                state: ConnectionState::Connecting,
                retry_in_ms: None,
                reason: None,
                queued: 0,
                since: std::time::Instant::now(),
            },
            status: None,
            error: None,
            focused: true,
            online_users: Vec::new(),
            unknown: std::collections::BTreeSet::new(),
            max_text: None,
            relay_key: None,
            groups: Default::default(),
            open_group: None,
            presence: BTreeMap::new(),
        }
    }
}

impl Model {
    /// The contact `name`, made (and listed) if need be.
    pub fn contact(&mut self, name: &str) -> &mut Contact {
        let contact = self.contacts.entry(name.to_owned()).or_default();
        contact.unlisted = false;
        contact
    }

    /// Opens a conversation; returns true if its history still needs loading.
    pub fn open(&mut self, name: &str) -> bool {
        self.open = Some(name.to_owned());
        self.open_group = None;
        let contact = self.contact(name);
        contact.unread = 0;
        !std::mem::replace(&mut contact.history_requested, true)
    }

    /// Contacts for the side list: matching `filter`, your notes to yourself first (once
    /// there are any; "note" finds them too), then online contacts, then by name.
    /// Archived contacts are listed only when searched for (a non-empty `filter`).
    pub fn listed(&self, filter: &str) -> Vec<(&str, &Contact)> {
        let filter = filter.trim().to_lowercase();
        let me = self.me.as_deref();
        let mut list: Vec<(&str, &Contact)> = self
            .contacts
            .iter()
            .filter(|(_, c)| !c.unlisted && (!c.archived || !filter.is_empty()))
            .filter(|(name, _)| {
                name.contains(&filter)
                    || (Some(name.as_str()) == me && NOTE_TO_SELF.to_lowercase().contains(&filter))
            })
            .map(|(n, c)| (n.as_str(), c))
            .collect();
        list.sort_by_key(|(name, c)| (Some(*name) != me, c.online != Some(true), *name));
        list
    }

    /// Opens group `id`; returns true if its history still needs loading.
    pub fn open_group(&mut self, id: &str) -> bool {
        self.open = None;
        self.open_group = Some(id.to_owned());
        self.groups.open(id)
    }

    /// `user`'s presence as last told on this connection (`None`: not known, or not
    /// connected).
    pub fn online(&self, user: &str) -> Option<bool> {
        if self.link.state != ConnectionState::Connected {
            return None;
        }
        self.contacts
            .get(user)
            .and_then(|c| c.online)
            .or_else(|| self.presence.get(user).copied())
    }

    /// Archived contacts, by name.
    pub fn archived(&self) -> Vec<(&str, &Contact)> {
        self.contacts
            .iter()
            .filter(|(_, c)| c.archived)
            .map(|(n, c)| (n.as_str(), c))
            .collect()
    }

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

/// This computer's clock, ms since the Unix epoch (for lines the core gave no time).
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn history_item(id: &str, at: u64) -> HistoryItem {
        HistoryItem {
            id: id.into(),
            outgoing: false,
            text: format!("text {id}"),
            sent_at: at,
            stored_at: at,
            status: Status::Delivered,
            undelivered: false,
            reason: None,
        }
    }

    fn msg(from: &str, id: &str, at: u64) -> Event {
        Event::Message {
            from: from.into(),
            id: id.into(),
            text: format!("text {id}"),
            sent_at: at,
        }
    }

    #[test]
    fn unread_counts_and_ordering() {
        let mut m = Model::default();
        m.apply(Event::Ready {
            user: "me".into(),
            fingerprint: "f".into(),
        });
        m.apply(msg("bob", "b", 20));
        m.apply(msg("bob", "a", 10));
        m.apply(msg("bob", "a", 10)); // duplicate
        assert_eq!(
            m.contacts["bob"].unread, 3,
            "each event counts; duplicates are rare"
        );
        let ids: Vec<&str> = m.contacts["bob"]
            .lines
            .iter()
            .map(|l| l.id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["b", "a"],
            "in arrival order, whatever the sender's clock said"
        );
        // History from the store puts lines where the store has them.
        m.apply(Event::History {
            user: "bob".into(),
            items: vec![history_item("a", 1), history_item("old", 0)],
        });
        let ids: Vec<&str> = m.contacts["bob"]
            .lines
            .iter()
            .map(|l| l.id.as_str())
            .collect();
        assert_eq!(ids, ["old", "a", "b"]);
        assert!(m.open("bob"));
        assert!(!m.open("bob"), "history is requested once");
        assert_eq!(m.contacts["bob"].unread, 0);
        m.apply(msg("bob", "c", 30));
        assert_eq!(m.contacts["bob"].unread, 0, "open and focused: read");
        m.focused = false;
        m.apply(msg("bob", "d", 40));
        assert_eq!(m.contacts["bob"].unread, 1);
    }

    #[test]
    fn status_moves_forward_only() {
        let mut m = Model::default();
        m.apply(Event::Queued {
            to: "bob".into(),
            id: "x".into(),
            text: "hi".into(),
            sent_at: 1,
        });
        m.apply(Event::Delivered {
            to: "bob".into(),
            id: "x".into(),
        });
        m.apply(Event::Sent {
            to: "bob".into(),
            id: "x".into(),
        });
        assert_eq!(m.contacts["bob"].lines[0].status, Status::Delivered);
        m.apply(Event::Queued {
            to: "bob".into(),
            id: "y".into(),
            text: "to nobody".into(),
            sent_at: 2,
        });
        m.apply(Event::Failed {
            to: "bob".into(),
            id: "y".into(),
            reason: "unknown_user".into(),
            message: "no such user".into(),
        });
        assert_eq!(m.contacts["bob"].lines[1].status, Status::Failed);
        assert_eq!(
            m.contacts["bob"].lines[1].reason.as_deref(),
            Some("no such user")
        );
    }

    #[test]
    fn late_requeued_and_failed_messages_are_marked() {
        let mut m = Model::default();
        let (to, id) = ("bob".to_string(), "x".to_string());
        m.apply(Event::Queued {
            to: to.clone(),
            id: id.clone(),
            text: "hi".into(),
            sent_at: 1,
        });
        m.apply(Event::Sent {
            to: to.clone(),
            id: id.clone(),
        });
        m.apply(Event::Undelivered {
            to: to.clone(),
            id: id.clone(),
            since: 1,
        });
        assert!(
            m.contacts["bob"].lines[0].undelivered,
            "the clock mark shows"
        );
        // The recipient lost its key: sent again, so back to sending and unmarked.
        m.apply(Event::Requeued {
            to: to.clone(),
            id: id.clone(),
            reason: "recipient_lost_key".into(),
        });
        let line = &m.contacts["bob"].lines[0];
        assert_eq!((line.status, line.undelivered), (Status::Sending, false));
        m.apply(Event::Delivered { to, id });
        assert_eq!(m.contacts["bob"].lines[0].status, Status::Delivered);
    }

    #[test]
    fn list_filters_and_puts_online_first() {
        let mut m = Model::default();
        m.apply(Event::Ready {
            user: "me".into(),
            fingerprint: "f".into(),
        });
        m.apply(Event::Contacts {
            users: vec!["zed".into(), "amy".into()],
            verified: vec!["amy".into()],
            last: vec![crate::api::LastMessage {
                user: "zed".into(),
                text: "see you".into(),
                outgoing: false,
                stored_at: 5,
            }],
            archived: vec![],
        });
        assert_eq!(m.contacts["zed"].preview(), Some(("see you", 5, false)));
        assert_eq!(m.contacts["amy"].preview(), None);
        assert!(
            m.contacts["amy"].verified,
            "the badge is known from the start"
        );
        assert!(!m.contacts["zed"].verified);
        m.apply(Event::Users {
            online: vec!["me".into(), "zed".into()],
        });
        let names: Vec<&str> = m.listed("").iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["zed", "amy"]);
        // A note to yourself: listed first, found by "note" too.
        m.contact("me");
        let names: Vec<&str> = m.listed("").iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["me", "zed", "amy"]);
        let names: Vec<&str> = m.listed("note").iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["me"]);
        m.contacts.remove("me");
        let names: Vec<&str> = m.listed(" AM").iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["amy"]);
        m.apply(Event::KeyChanged {
            user: "amy".into(),
            fingerprint: "ab cd".into(),
            was_verified: true,
        });
        assert!(m.contacts["amy"].key_changed && m.contacts["amy"].key_changed_was_verified);
        assert!(!m.contacts["amy"].verified);
        // The relay is gone: nobody's presence is known, none stays green.
        m.apply(Event::Connection {
            state: ConnectionState::Reconnecting,
            retry_in_ms: Some(2000),
            reason: Some("connection lost".into()),
            queued: 0,
            max_text_bytes: None,
        });
        assert_eq!(m.contacts["zed"].online, None);
        assert_eq!(m.contacts["amy"].online, None);
        m.apply(Event::Connection {
            state: ConnectionState::Connected,
            retry_in_ms: None,
            reason: None,
            queued: 0,
            max_text_bytes: Some(4072),
        });
        assert_eq!(m.max_text, Some(4072));
        m.apply(Event::Presence {
            user: "zed".into(),
            online: false,
        });
        assert_eq!(m.contacts["zed"].online, Some(false));
        assert_eq!(
            m.contacts["amy"].pending_fingerprint.as_deref(),
            Some("ab cd")
        );
    }

    /// Archived contacts leave the list but not search, and come back with a new message;
    /// a removed one leaves the model (and closes if open).
    #[test]
    fn archived_and_removed_contacts() {
        let mut m = Model::default();
        m.apply(Event::Contacts {
            users: vec!["amy".into(), "bob".into(), "cy".into()],
            verified: vec![],
            last: vec![],
            archived: vec!["cy".into()],
        });
        let names = |m: &Model, f: &str| -> Vec<String> {
            m.listed(f).iter().map(|(n, _)| n.to_string()).collect()
        };
        assert_eq!(names(&m, ""), ["amy", "bob"]);
        assert_eq!(names(&m, "c"), ["cy"], "search finds archived contacts");
        m.apply(Event::ContactListing {
            user: "amy".into(),
            listing: Listing::Archived,
        });
        assert_eq!(names(&m, ""), ["bob"]);
        let archived: Vec<&str> = m.archived().iter().map(|(n, _)| *n).collect();
        assert_eq!(archived, ["amy", "cy"]);
        m.apply(Event::Message {
            from: "cy".into(),
            id: "01".into(),
            text: "back".into(),
            sent_at: 1,
        });
        assert_eq!(names(&m, ""), ["bob", "cy"]);
        m.open("bob");
        m.apply(Event::ContactListing {
            user: "bob".into(),
            listing: Listing::Removed,
        });
        assert_eq!(names(&m, ""), ["cy"]);
        assert_eq!(m.open, None);
        // Presence (still followed this session) and a stale verified mark bring no row back.
        m.apply(Event::Presence {
            user: "bob".into(),
            online: false,
        });
        m.apply(Event::Contacts {
            users: vec![],
            verified: vec!["bob".into()],
            last: vec![],
            archived: vec![],
        });
        assert_eq!(names(&m, ""), ["cy"]);
    }
}
