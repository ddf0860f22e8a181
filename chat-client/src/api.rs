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
    /// Accept `user`'s new key after a key change.
    AcceptKey { user: String },
    /// Load stored history with `user` (answered by `History`).
    History { user: String },
    /// Stop: try to hand the outbox to the server until the deadline, then end.
    Shutdown { flush_for: std::time::Duration },
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

/// A stored message, for history views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryItem {
    pub id: String,
    pub outgoing: bool,
    pub text: String,
    pub sent_at: u64,
    pub status: Status,
}

/// Something that happened. Serialised as `{"event": "<name>", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
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
    /// Everyone we have talked to or pinned a key for (sent after `ready`).
    Contacts {
        users: Vec<String>,
    },
    Sent {
        to: String,
        id: String,
    },
    Delivered {
        to: String,
        id: String,
    },
    /// Our message `id` can never be sent (e.g. no such user); it left the outbox.
    Failed {
        to: String,
        id: String,
    },
    Safety {
        user: String,
        number: String,
        verified: bool,
        /// A new key is waiting to be accepted; `number` is for that new key.
        key_changed: bool,
    },
    /// `user` presented a new key; traffic with them is blocked until `/accept-key`.
    KeyChanged {
        user: String,
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
    },
    History {
        user: String,
        items: Vec<HistoryItem>,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Event {
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Message ids travel as 32 lowercase hex digits.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
