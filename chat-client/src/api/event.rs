//! [`Event`]: what the client core tells its front end, one variant per headless
//! `"event"` (the README lists their fields).

use serde::Serialize;

use super::{ConnectionState, GroupHistoryItem, GroupInfo, HistoryItem, LastMessage, Listing};

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
