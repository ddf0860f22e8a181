//! Group conversations: membership as a chain of signed changes ([`change`], [`membership`]) and
//! Signal-style sender keys ([`sender_key`]). See SECURITY.md, "Groups".
//!
//! What travels where:
//! - Membership changes ([`SignedChange`]) and sending keys ([`SenderKeyDistribution`]) go
//!   to each member inside the 1:1 end-to-end channel, as [`crate::e2e::Body::GroupUpdate`]
//!   and [`crate::e2e::Body::SenderKey`]: the relay sees only 1:1 envelopes.
//! - A group message is one [`GroupEnvelope`], sealed once under the sender's current
//!   sending key and signed by the sender; the same bytes are sent to every member. The
//!   relay sees that one sender sends equal-sized envelopes to several users at once, and
//!   the group id (random, 128 bits) in them.

pub mod change;
pub mod membership;
pub mod sender_key;

pub use change::{
    Change, ChangeError, ChangeKind, GroupState, MAX_NAME_CHARS, SignedChange, apply, check_name,
};
pub use membership::{HISTORY, Membership, MembershipStateError, Received, Refusal};
pub use sender_key::{
    GroupEnvelope, GroupOpenError, KEYS_PER_MEMBER, MemberKeys, SenderKey, SenderKeyDistribution,
    SenderKeyStateError,
};

/// A group's random 128-bit id.
pub type GroupId = [u8; 16];
/// SHA-256 of a [`GroupState`].
pub type StateHash = [u8; 32];
/// SHA-256 identifying a [`SignedChange`].
pub type ChangeId = [u8; 32];

/// Members a group may have unless the client is configured otherwise (for the groups it
/// creates and the changes it makes).
pub const DEFAULT_MAX_MEMBERS: usize = 256;
/// Members a group may reach by changes others make: every client judges those by this
/// one protocol-wide bound, not by its own setting, so no member is split off a group
/// others accepted.
pub const MAX_MEMBERS_ACCEPTED: usize = 4096;
/// First byte (the version field) of a [`GroupEnvelope`]; a 1:1 envelope starts with
/// [`crate::e2e::E2E_VERSION`] (2).
pub const GROUP_ENVELOPE_VERSION: u8 = 3;

/// What a relayed payload is, by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// A 1:1 [`crate::e2e::Envelope`].
    Direct,
    /// A [`GroupEnvelope`].
    Group,
}

/// Tells a 1:1 envelope from a group envelope; `None` for neither (refuse it).
pub fn payload_kind(payload: &[u8]) -> Option<PayloadKind> {
    match payload.first() {
        Some(&crate::e2e::E2E_VERSION) => Some(PayloadKind::Direct),
        Some(&GROUP_ENVELOPE_VERSION) => Some(PayloadKind::Group),
        _ => None,
    }
}
