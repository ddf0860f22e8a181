//! What the window shows, built only from core [`Event`](crate::api::Event)s. No
//! drawing, no I/O: the view reads it, and tests drive it directly.

use std::collections::BTreeMap;

use crate::api::{ConnectionState, Status};

mod apply;
#[cfg(test)]
mod tests;

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
    /// The relay (`host:port`) connected to or being tried.
    pub server: Option<String>,
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
                server: None,
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
}

/// This computer's clock, ms since the Unix epoch (for lines the core gave no time).
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
