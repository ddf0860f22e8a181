//! What front ends send to the client core and what they get back.
//!
//! Events serialise to the headless JSON-lines contract (one object per line, tagged by
//! `"event"`); see the README for the stable field list.

use serde::Serialize;

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

/// Something that happened. Serialised as `{"event": "<name>", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A group message for us (the `message` event with a `group` field).
    #[serde(rename = "message")]
    GroupMessage {
        group: String,
        from: String,
        id: String,
        text: String,
        sent_at: u64,
    },
    /// Our group message `id` is in the outbox, for `recipients` members.
    #[serde(rename = "queued")]
    GroupQueued {
        group: String,
        id: String,
        text: String,
        sent_at: u64,
        recipients: usize,
    },
    /// The relay accepted our group message `id` for every member.
    #[serde(rename = "sent")]
    GroupSent {
        group: String,
        id: String,
    },
    /// Member `to` stored our group message `id`: `delivered_to` of `recipients` now.
    #[serde(rename = "delivered")]
    GroupDelivered {
        group: String,
        to: String,
        id: String,
        delivered_to: usize,
        recipients: usize,
    },
    /// `member`'s copy of our group message `id` was not sent: they were no longer in the
    /// group (a change read after it was queued, e.g. a removal waiting for us while we
    /// were away), or we were not. Now `delivered_to` of `recipients`. A copy handed to
    /// the relay on the current connection is not withdrawn (the relay's answer settles
    /// it); one whose answer was lost with the connection can be.
    #[serde(rename = "withdrawn")]
    GroupWithdrawn {
        group: String,
        id: String,
        member: String,
        delivered_to: usize,
        recipients: usize,
    },
    /// Our group message `id` went to nobody: `reason` `not_a_member` (we left or were
    /// removed before it could go out) or `no_recipients` (everyone it was for left).
    #[serde(rename = "failed")]
    GroupFailed {
        group: String,
        id: String,
        reason: String,
        /// What happened, for people.
        message: String,
    },
    /// A group was created, joined or changed (`change`, `by`), or asked about.
    Group(Box<GroupInfo>),
    /// Answer to `Groups`.
    Groups {
        items: Vec<GroupInfo>,
    },
    /// Answer to `GroupHistory`.
    GroupHistory {
        group: String,
        items: Vec<GroupHistoryItem>,
    },
    /// A membership change was refused: `reason` `not_admin`, `bad_signature`,
    /// `replayed`, `forked`, `stale` or `invalid`; `by` is its claimed author, `from`
    /// who passed it to us. Nothing changed.
    GroupRefused {
        group: String,
        from: String,
        by: String,
        reason: String,
        message: String,
    },
    /// Logged in; `fingerprint` is ours.
    Ready {
        user: String,
        fingerprint: String,
    },
    /// Progress the user should see (e.g. identity key generation).
    Status {
        message: String,
    },
    Users {
        online: Vec<String>,
    },
    Presence {
        user: String,
        online: bool,
    },
    /// A new message for us. `sent_at` is the sender's clock, ms since the Unix epoch.
    Message {
        from: String,
        id: String,
        text: String,
        sent_at: u64,
    },
    /// Our message `id` is in the outbox.
    Queued {
        to: String,
        id: String,
        text: String,
        sent_at: u64,
    },
    /// Everyone we have talked to or pinned a key for (sent after `ready`), and which of
    /// them have a key marked verified.
    Contacts {
        users: Vec<String>,
        verified: Vec<String>,
        /// The newest message with each contact that has one.
        last: Vec<LastMessage>,
        /// Those of `users` the user archived (a list hides them until a new message).
        archived: Vec<String>,
    },
    /// `user`'s place in the contact list changed at the user's request.
    ContactListing {
        user: String,
        listing: Listing,
    },
    Sent {
        to: String,
        id: String,
    },
    Delivered {
        to: String,
        id: String,
    },
    /// Our message `id` can never be delivered; it left the outbox. `reason` is a code:
    /// `unknown_user`, `message_too_long`, `expired` (not delivered within the relay's
    /// age limit), `key_rejected`, or the relay's refusal.
    Failed {
        to: String,
        id: String,
        reason: String,
        /// What happened, for people.
        message: String,
    },
    /// Our message `id` was accepted by the relay at `since` (ms since the Unix epoch)
    /// and is still not delivered; it stays in the outbox. Once per message.
    Undelivered {
        to: String,
        id: String,
        since: u64,
    },
    /// `to` could not open our message `id` (their client lost its keys): it is being
    /// sent again under a new key. `sent` and `delivered` follow as usual.
    Requeued {
        to: String,
        id: String,
        reason: String,
    },
    /// Messages from `from` were thrown away unread: `reason` `key_rejected` (they came
    /// under a key the user rejected).
    Discarded {
        from: String,
        count: usize,
        reason: String,
    },
    Safety {
        user: String,
        number: String,
        /// Fingerprint of the key the number is for (pass it to `/accept-key`).
        fingerprint: String,
        verified: bool,
        /// A new key is waiting to be accepted; `number` is for that new key.
        key_changed: bool,
    },
    /// `user` presented a new key (`fingerprint`); traffic with them is held until
    /// `/accept-key` or `/reject-key`. `was_verified`: the old key had been verified.
    KeyChanged {
        user: String,
        fingerprint: String,
        was_verified: bool,
    },
    Connection {
        state: ConnectionState,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_in_ms: Option<u64>,
        /// Why the connection was lost or refused, when reconnecting.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Messages waiting in the outbox.
        queued: usize,
        /// When connected: the longest text (bytes) this relay's frames can carry.
        #[serde(skip_serializing_if = "Option::is_none")]
        max_text_bytes: Option<usize>,
        /// The relay (`host:port`) connected to, being tried, or last tried (of the
        /// `--server` list); `None` before the first try.
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<String>,
    },
    History {
        user: String,
        items: Vec<HistoryItem>,
    },
    Error {
        code: String,
        message: String,
    },
    /// Something worth knowing that did not stop anything (e.g. a damaged settings file
    /// was ignored, permissions were fixed).
    Warning {
        code: String,
        message: String,
    },
    /// The relay has no user by this name (a key lookup or a send found out); follows the
    /// `error` event `unknown_user`.
    NoSuchUser {
        user: String,
    },
    /// The relay's TLS key was pinned for `server` (`HOST:PORT`): on the first connection
    /// to an address (`first_use`: trust on first use, compare `fingerprint` with the one
    /// the operator gave you), or from an address given with `#FINGERPRINT`. With
    /// `needs_confirmation` nothing was pinned or sent yet: the client waits for
    /// `TrustServerKey` (the window's dialog). With `certified` the key was pinned
    /// without asking: the relay's certificate chains to a trusted certificate authority
    /// for its host name (the system's, or `--ca-file`).
    ServerKey {
        server: String,
        fingerprint: String,
        first_use: bool,
        needs_confirmation: bool,
        certified: bool,
    },
}

impl Event {
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn warning(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Warning {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The event's name in the JSON contract (for logs: never the contents).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready { .. } => "ready",
            Self::GroupMessage { .. } => "message",
            Self::GroupQueued { .. } => "queued",
            Self::GroupSent { .. } => "sent",
            Self::GroupDelivered { .. } => "delivered",
            Self::GroupWithdrawn { .. } => "withdrawn",
            Self::GroupFailed { .. } => "failed",
            Self::Group(_) => "group",
            Self::Groups { .. } => "groups",
            Self::GroupHistory { .. } => "group_history",
            Self::GroupRefused { .. } => "group_refused",
            Self::Status { .. } => "status",
            Self::Users { .. } => "users",
            Self::Presence { .. } => "presence",
            Self::Message { .. } => "message",
            Self::Queued { .. } => "queued",
            Self::Contacts { .. } => "contacts",
            Self::ContactListing { .. } => "contact_listing",
            Self::Sent { .. } => "sent",
            Self::Delivered { .. } => "delivered",
            Self::Failed { .. } => "failed",
            Self::Undelivered { .. } => "undelivered",
            Self::Requeued { .. } => "requeued",
            Self::Discarded { .. } => "discarded",
            Self::Safety { .. } => "safety",
            Self::KeyChanged { .. } => "key_changed",
            Self::Connection { .. } => "connection",
            Self::History { .. } => "history",
            Self::Error { .. } => "error",
            Self::Warning { .. } => "warning",
            Self::NoSuchUser { .. } => "no_such_user",
            Self::ServerKey { .. } => "server_key",
        }
    }
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
