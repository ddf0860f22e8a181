//! What front ends send to the client core and what they get back.
//!
//! Events serialise to the headless JSON-lines contract (one object per line, tagged by
//! `"event"`); see the README for the stable field list.

use serde::Serialize;

mod event;

pub use event::Event;

/// A request from the front end. Nothing here blocks: results arrive as [`Event`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send `text` to `to`; queued in the outbox first, so it survives restarts.
    Send { to: String, text: String },
    /// Ask for the list of online users.
    ListUsers,
    /// Follow these users' presence (`Presence` events now and whenever they change).
    /// Contacts and everyone messages are exchanged with are followed without asking.
    Watch { users: Vec<String> },
    /// Show the safety number with `user` (fetching their key if needed).
    Safety { user: String },
    /// Mark `user`'s pinned key as verified (after comparing safety numbers).
    Verify { user: String },
    /// Take back a verification.
    Unverify { user: String },
    /// Accept `user`'s new key after a key change. `fingerprint` (hex, spaces and colons
    /// ignored) is the key the user compared: if the pending key is another one (the relay
    /// swapped it meanwhile) nothing is accepted.
    AcceptKey {
        user: String,
        fingerprint: Option<String>,
    },
    /// Reject `user`'s new key: the pinned key stays, and what arrived under the new key
    /// is discarded.
    RejectKey { user: String },
    /// Hide `user` from the contact list until a new message in either direction
    /// (answered by `ContactListing`).
    Archive { user: String },
    /// Show an archived contact in the list again.
    Unarchive { user: String },
    /// Delete the conversation with `user` from this device (history and undelivered
    /// messages) and take them off the list; their key stays pinned. A new message lists
    /// them again.
    Remove { user: String },
    /// Load stored history with `user` (answered by `History`).
    History { user: String },
    /// Pin `fingerprint` as the relay's key (after a `server_key` that needs confirmation,
    /// or after `server_key_mismatch` when the user compared the new key) and connect.
    TrustServerKey { fingerprint: String },
    /// Connect again now rather than at the end of the reconnect delay (the window's
    /// "Retry now"). Answered by a `connection` event: `connecting` when it tries, or
    /// `connected` again when already connected. A failed try goes on with the delays as
    /// they were (they do not start over). After a fatal error (the client stays offline)
    /// or while a relay key waits for confirmation, an `error` `not_connected` says why
    /// it does not connect.
    Reconnect,
    /// Stop: try to hand the outbox to the server until the deadline, then end.
    Shutdown { flush_for: std::time::Duration },
    /// Create a group named `name` with `members` (we are its first admin); answered by
    /// a `group` event with `change: created`.
    GroupCreate { name: String, members: Vec<String> },
    /// Add `users` to `group` (admins only). `group` is the 32-hex id or a name unique
    /// among our groups, here and below.
    GroupAdd { group: String, users: Vec<String> },
    /// Remove `users` from `group` (admins only).
    GroupRemove { group: String, users: Vec<String> },
    /// Make `users` (members) admins of `group` (admins only).
    GroupPromote { group: String, users: Vec<String> },
    /// Leave `group`.
    GroupLeave { group: String },
    /// Rename `group` (admins only).
    GroupRename { group: String, name: String },
    /// Send `text` to every member of `group`; queued in the outbox first, like `Send`.
    GroupSend { group: String, text: String },
    /// List our groups (answered by `Groups`).
    Groups,
    /// Load `group`'s history (answered by `GroupHistory`); it counts as read.
    GroupHistory { group: String },
    /// Emit `event` as it is, in its place among the answers to the commands before and
    /// after it: a front end's own answer to input it could not make a command of (the
    /// headless mode's `invalid_command` for a line it cannot parse), which written
    /// straight out would overtake the answers still owed to the lines before it.
    Report(Event),
}

impl Command {
    /// The answer owed for this command when the client stopped before doing it (its
    /// start failed, e.g. a wrong passphrase, or it had already ended): a `Report` is its
    /// own event, `Shutdown` needs none, anything else is an `error` `not_running` that
    /// says what was not done — a text in particular was not queued, so it is not sent.
    pub fn not_done(self) -> Option<Event> {
        let what = match self {
            Command::Report(event) => return Some(event),
            Command::Shutdown { .. } => return None,
            Command::Send { to, .. } => format!("the message to {to} was not queued"),
            Command::GroupSend { group, .. } => {
                format!("the message to the group {group} was not queued")
            }
            Command::ListUsers => "the online users were not listed".into(),
            Command::Watch { .. } => "presence was not followed".into(),
            Command::Safety { user } => format!("the safety number with {user} was not shown"),
            Command::Verify { user } => format!("{user} was not marked verified"),
            Command::Unverify { user } => format!("{user}'s verification was not taken back"),
            Command::AcceptKey { user, .. } => format!("{user}'s new key was not accepted"),
            Command::RejectKey { user } => format!("{user}'s new key was not rejected"),
            Command::Archive { user } => format!("{user} was not archived"),
            Command::Unarchive { user } => format!("{user} was not unarchived"),
            Command::Remove { user } => format!("{user} was not removed"),
            Command::History { user } => format!("the history with {user} was not loaded"),
            Command::TrustServerKey { .. } => "the relay's key was not pinned".into(),
            Command::Reconnect => "no connection was tried".into(),
            Command::GroupCreate { name, .. } => format!("the group {name} was not created"),
            Command::GroupAdd { group, .. } => format!("nobody was added to {group}"),
            Command::GroupRemove { group, .. } => format!("nobody was removed from {group}"),
            Command::GroupPromote { group, .. } => format!("nobody was promoted in {group}"),
            Command::GroupLeave { group } => format!("the group {group} was not left"),
            Command::GroupRename { group, .. } => format!("the group {group} was not renamed"),
            Command::Groups => "the groups were not listed".into(),
            Command::GroupHistory { group } => {
                format!("the history of the group {group} was not loaded")
            }
        };
        Some(Event::error(
            "not_running",
            format!(
                "{what}: the client stopped before it could do it (see the error above); \
                 start it again and repeat it"
            ),
        ))
    }
}

/// A group as shown to the user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// 32 lowercase hex digits.
    pub id: String,
    pub name: String,
    pub members: Vec<String>,
    pub admins: Vec<String>,
    /// Changes applied since creation (the created group is 1).
    pub version: u64,
    /// We are a member (false once we left or were removed).
    pub active: bool,
    /// Members whose new key is not accepted yet: they get no new sending keys (and so
    /// cannot read new messages) until it is.
    pub excluded: Vec<String>,
    /// Texts not yet seen.
    pub unread: u64,
    /// What just happened, for a `group` event: `created`, `added`, `removed`, `left`,
    /// `renamed`, `promoted`, or `undone` (a change, `by` its author, lost to a
    /// concurrent one: see the history's "undone: …" line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// Who made the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Whom the change named (added, removed or promoted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// The newest line of its history (a list's preview), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<GroupHistoryItem>,
}

/// A line of a group's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupHistoryItem {
    pub id: String,
    pub from: String,
    pub outgoing: bool,
    /// A membership line ("alice added dave"), not a text.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    pub text: String,
    pub sent_at: u64,
    pub stored_at: u64,
    pub status: Status,
    /// Ours: members whose client stored it, of `recipients` it was sent to.
    pub delivered_to: usize,
    pub recipients: usize,
}

/// Connection state, as shown in a status bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// Lost or refused; the next attempt is in `retry_in_ms`.
    Reconnecting,
    /// Stopped for good (fatal login error or shutdown).
    Offline,
}

/// Where a contact appears in the contact list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Listing {
    Shown,
    Archived,
    /// Off the list, conversation deleted (the key stays pinned).
    Removed,
}

/// Delivery state of one of our messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In the outbox, not yet accepted by the server.
    Sending,
    /// Accepted by the server.
    Sent,
    /// The recipient decrypted and stored it.
    Delivered,
    /// Refused for good (e.g. no such user).
    Failed,
}

/// The newest message of a conversation, for the contact list: `text` is its first line,
/// at most 80 characters; `stored_at` is when this client stored it (ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastMessage {
    pub user: String,
    pub text: String,
    pub outgoing: bool,
    pub stored_at: u64,
}

/// A stored message, for history views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryItem {
    pub id: String,
    pub outgoing: bool,
    pub text: String,
    /// The sender's clock, ms since the Unix epoch: shown, never used for order.
    pub sent_at: u64,
    /// When this client stored it (ours: written; theirs: arrived), ms since the Unix
    /// epoch. History is in this order.
    pub stored_at: u64,
    pub status: Status,
    /// Sent long ago and still not delivered.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub undelivered: bool,
    /// Why it failed (a code, e.g. `unknown_user`, `message_too_long`, `expired`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Parses a fingerprint as users type it: hex digits, with any spaces or colons.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Message ids travel as 32 lowercase hex digits.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_as_shown_or_typed() {
        let fp = [0xab; 32];
        let shown = chat_protocol::identity::Fingerprint(fp).to_string();
        assert_eq!(parse_fingerprint(&shown), Some(fp));
        assert_eq!(parse_fingerprint(&shown.replace(' ', "")), Some(fp));
        assert_eq!(
            parse_fingerprint(&shown.to_uppercase().replace(' ', ":")),
            Some(fp)
        );
        assert_eq!(parse_fingerprint("abcd"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
        assert_eq!(parse_fingerprint(&"é".repeat(32)), None);
    }
}
