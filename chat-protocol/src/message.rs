//! The messages of the client ↔ relay protocol (see docs/PROTOCOL.md).
//!
//! Requests carry a client-chosen `id` that the server echoes in the matching reply
//! (`Ok`, `Error`, `Challenge`, `Welcome`, `Users`, `PublicKey`). Unsolicited server messages
//! (`Presence`, `Deliver`, `Ping`, and `Error` with no id) carry none.

use serde::{Deserialize, Serialize};

/// Request id chosen by the client, echoed by the server.
pub type RequestId = u32;

/// Most users one session may watch for presence (see `ClientMessage::Watch`).
pub const MAX_WATCHED: usize = 1024;

/// Sends (`Send` and `SendMany` requests) one connection may have awaiting their answer
/// before the relay stops reading it, or with its `shed_when_full` setting refuses more
/// with `server_busy`. A client keeps fewer in flight (ours: half) and is never refused
/// for it.
pub const MAX_PIPELINED: usize = 128;

/// Most recipients one `ClientMessage::SendMany` may name (the default group size limit
/// of 256 less the sender). A client splits a larger fan-out into several requests.
pub const MAX_FANOUT: usize = 255;

/// Length of the login challenge nonce.
pub const CHALLENGE_LEN: usize = 32;

/// Bytes a varint (LEB128, as postcard writes integers) of `n` takes.
fn varint_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

/// Body length (without the 4-byte prefix) of a `Send` to `to` carrying `payload_len`
/// bytes, at most (whatever its request id): what must fit the server's `max_frame`.
pub fn send_frame_len(to: &str, payload_len: usize) -> usize {
    1 + 5 + varint_len(to.len()) + to.len() + varint_len(payload_len) + payload_len
}

/// Body length (without the 4-byte prefix) of a `SendMany` to `to` carrying `payload_len`
/// bytes, at most (whatever its request id): what must fit the server's `max_frame`.
pub fn send_many_frame_len<S: AsRef<str>>(to: &[S], payload_len: usize) -> usize {
    let names: usize = to
        .iter()
        .map(|n| varint_len(n.as_ref().len()) + n.as_ref().len())
        .sum();
    1 + 5 + varint_len(to.len()) + names + varint_len(payload_len) + payload_len
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// First message of every connection.
    Hello { version: u16, software: String },
    /// Bind `username` to `public_key` (SPKI DER) or, if already bound to this key, log in.
    /// Answered by `Challenge`.
    Register {
        id: RequestId,
        username: String,
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
    },
    /// Log in to an existing account. Answered by `Challenge`.
    Login { id: RequestId, username: String },
    /// RSA-PSS-SHA256 signature over the login transcript (see `auth`). Answered by
    /// `Welcome` or `Error`.
    Prove {
        id: RequestId,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Everyone online now. Answered by `Users`.
    ListUsers { id: RequestId },
    /// Answered by `PublicKey`.
    GetPublicKey { id: RequestId, username: String },
    /// Relay an opaque payload to `to`. Answered by `Ok` once stored durably for the
    /// recipient (delivered now if online, else at their next login).
    Send {
        id: RequestId,
        to: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Liveness probe; answered by `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// Answer to the server's `Ping`.
    Pong { nonce: u64 },
    /// The client has processed these delivered envelopes; the server may forget them.
    Ack { envelope_ids: Vec<u64> },
    /// Subscribe to the presence of `usernames` (added to those already watched, up to
    /// `MAX_WATCHED` per session). Answered by `Users` listing which of them are online
    /// now; afterwards `Presence` tells when one of them comes or goes. Presence is only
    /// ever sent to watchers. Names that are not valid usernames are never online.
    Watch {
        id: RequestId,
        usernames: Vec<String>,
    },
    /// Answered by `Ok` once everything stored for you when your session began has been
    /// written to you (every `Deliver` of that backlog comes before the `Ok`). A client
    /// reads its backlog before acting on what it might change — e.g. a group message is
    /// not sent before the membership changes waiting for you are applied. Protocol 6.
    Sync { id: RequestId },
    /// Relay one opaque payload to each of `to` (1 to [`MAX_FANOUT`] distinct names): the
    /// same as one `Send` per name, in that order, uploading the payload once. Answered by
    /// one `Outcomes` listing each recipient's outcome in `to` order, once every copy is
    /// durable or refused; or by `Error` (`protocol_violation`) if `to` is empty, too
    /// long or names someone twice, and then nothing was sent. Protocol 7.
    SendMany {
        id: RequestId,
        to: Vec<String>,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_many_frame_len_bounds_the_encoding() {
        let long = "x".repeat(200);
        for to in [vec!["bob"], vec!["bob", "carol"], vec![long.as_str(); 130]] {
            for payload_len in [0, 1, 128, 70_000] {
                for id in [0, u32::MAX] {
                    let msg = ClientMessage::SendMany {
                        id,
                        to: to.iter().map(|s| s.to_string()).collect(),
                        payload: vec![0; payload_len],
                    };
                    let body = postcard::to_allocvec(&msg).unwrap().len();
                    let bound = send_many_frame_len(&to, payload_len);
                    assert!(body <= bound && bound <= body + 4, "{body} vs {bound}");
                }
            }
        }
    }

    #[test]
    fn send_frame_len_bounds_the_encoding() {
        for payload_len in [0, 1, 127, 128, 16383, 16384, 70_000] {
            for id in [0, 127, 300, u32::MAX] {
                let msg = ClientMessage::Send {
                    id,
                    to: "bob".into(),
                    payload: vec![0; payload_len],
                };
                let body = postcard::to_allocvec(&msg).unwrap().len();
                let bound = send_frame_len("bob", payload_len);
                assert!(
                    body <= bound && bound <= body + 4,
                    "{payload_len} {id}: {body} vs {bound}"
                );
            }
        }
    }
}

impl ClientMessage {
    /// The request id, for messages that expect a reply.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Self::Register { id, .. }
            | Self::Login { id, .. }
            | Self::Prove { id, .. }
            | Self::ListUsers { id }
            | Self::GetPublicKey { id, .. }
            | Self::Send { id, .. }
            | Self::Watch { id, .. }
            | Self::Sync { id }
            | Self::SendMany { id, .. } => Some(*id),
            Self::Hello { .. } | Self::Ping { .. } | Self::Pong { .. } | Self::Ack { .. } => None,
        }
    }

    /// Short name of the message kind, for logs (never the contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Register { .. } => "register",
            Self::Login { .. } => "login",
            Self::Prove { .. } => "prove",
            Self::ListUsers { .. } => "list_users",
            Self::GetPublicKey { .. } => "get_public_key",
            Self::Send { .. } => "send",
            Self::Ping { .. } => "ping",
            Self::Pong { .. } => "pong",
            Self::Ack { .. } => "ack",
            Self::Watch { .. } => "watch",
            Self::Sync { .. } => "sync",
            Self::SendMany { .. } => "send_many",
        }
    }
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Answer to the client's `Hello`: the server's version and limits.
    Hello {
        version: u16,
        software: String,
        /// Largest frame body the server accepts. A client never sends a larger frame:
        /// a message that would not fit ends as too long instead.
        max_frame: u32,
        /// Seconds an undelivered envelope is kept before it is deleted (`queue.max_age_secs`);
        /// a sender whose message waits longer knows it can no longer arrive.
        queue_max_age_secs: u64,
        /// The server's clock, seconds since the Unix epoch. Ages of queued messages are
        /// judged by it, not by the client's clock (which may be off by days).
        server_time_secs: u64,
    },
    /// Sign this nonce (with the transcript in `auth`) to prove the key.
    Challenge {
        id: RequestId,
        nonce: [u8; CHALLENGE_LEN],
    },
    /// Logged in as `username` (canonical form). `registered` is true for a new account.
    Welcome {
        id: RequestId,
        username: String,
        registered: bool,
    },
    /// A watched `username` came online or went offline.
    Presence { username: String, online: bool },
    /// Answer to `ListUsers` (everyone online now, the caller included) or to `Watch`
    /// (those of the named users online now). Sorted.
    Users { id: RequestId, online: Vec<String> },
    /// The public key (SPKI DER) bound to `username`.
    PublicKey {
        id: RequestId,
        username: String,
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
    },
    /// A payload relayed to you, in the order it was accepted. `from` is stamped by the
    /// server from the sender's authenticated session, never taken from the sender.
    /// Answer with `Ack` once processed, or it is delivered again at the next login.
    Deliver {
        envelope_id: u64,
        from: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The request `id` succeeded.
    Ok { id: RequestId },
    /// A request failed (`id` set) or the connection is being closed (`id` empty).
    Error {
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
    },
    /// Liveness probe; answer with `Pong`.
    Ping { nonce: u64 },
    /// Answer to the client's `Ping`.
    Pong { nonce: u64 },
    /// Answer to `SendMany`: one outcome per recipient, in the request's `to` order —
    /// `None` where the copy is durable (as `Ok` to a `Send`), else the code a `Send` to
    /// that recipient would have been refused with (`unknown_user`,
    /// `recipient_queue_full`, `server_full`, `internal`). Protocol 7.
    Outcomes {
        id: RequestId,
        outcomes: Vec<Option<ErrorCode>>,
    },
}

/// Typed failure reasons. The `as_str` names are stable and documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The client's protocol version is not supported. Connection closed.
    UnsupportedVersion,
    /// A frame could not be decoded. Connection closed.
    MalformedFrame,
    /// A frame exceeded the size limit. Connection closed.
    FrameTooLarge,
    /// A message arrived in a state where it is not allowed (e.g. `Send` before login).
    ProtocolViolation,
    /// The username breaks the naming rules.
    InvalidUsername,
    /// The public key is not an acceptable RSA SPKI DER key.
    InvalidPublicKey,
    /// The username is bound to a different key.
    UsernameTaken,
    /// No such registered user.
    UnknownUser,
    /// The login signature did not verify. Connection closed.
    BadSignature,
    /// The recipient is registered but not online. Not sent by version 2 servers, which
    /// store the message instead.
    RecipientOffline,
    /// Too many requests. Version 2 servers pace the connection instead of sending this.
    RateLimited,
    /// Login was not completed in time. Connection closed.
    LoginTimeout,
    /// Nothing was received for too long. Connection closed.
    IdleTimeout,
    /// The server is at its connection limit. Connection closed.
    ServerBusy,
    /// The same user logged in elsewhere. Connection closed.
    SessionReplaced,
    /// The connection did not read its messages fast enough. Connection closed.
    SlowConsumer,
    /// The server is shutting down. Connection closed.
    ShuttingDown,
    /// Something went wrong inside the server.
    Internal,
    /// The recipient has too much undelivered mail queued; try again later.
    RecipientQueueFull,
    /// A `Watch` would pass `MAX_WATCHED` users for this session; nothing was added.
    WatchLimit,
    /// The server's storage for undelivered messages is full; try again later.
    ServerFull,
}

impl ErrorCode {
    /// Stable snake_case name, as used in docs and the client's JSON events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnsupportedVersion => "unsupported_version",
            Self::MalformedFrame => "malformed_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::ProtocolViolation => "protocol_violation",
            Self::InvalidUsername => "invalid_username",
            Self::InvalidPublicKey => "invalid_public_key",
            Self::UsernameTaken => "username_taken",
            Self::UnknownUser => "unknown_user",
            Self::BadSignature => "bad_signature",
            Self::RecipientOffline => "recipient_offline",
            Self::RateLimited => "rate_limited",
            Self::LoginTimeout => "login_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::ServerBusy => "server_busy",
            Self::SessionReplaced => "session_replaced",
            Self::SlowConsumer => "slow_consumer",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::RecipientQueueFull => "recipient_queue_full",
            Self::WatchLimit => "watch_limit",
            Self::ServerFull => "server_full",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
