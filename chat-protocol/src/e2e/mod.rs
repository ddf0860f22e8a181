//! End-to-end encryption between two users; the relay only ever sees [`Envelope`] bytes.
//!
//! Per sending direction the sender runs *epochs*. An epoch starts with a fresh random
//! AES-256 key, wrapped to the recipient's pinned public key with RSA-OAEP-SHA256 and
//! carried in a [`KeyOffer`] that the sender signs (RSA-PSS-SHA256) over the E2E version,
//! both names, both key fingerprints, the epoch id, its creation time and the wrapped key.
//! Messages in the epoch are AES-256-GCM with nonce `epoch (4 B) || counter (8 B)` and
//! associated data binding version, envelope kind, sender, recipient, epoch and counter.
//! The offer rides along with every message of the epoch until the recipient acknowledges
//! it (a delivery receipt), so any message can be opened without a round trip.
//!
//! The recipient ([`Inbound`]) verifies an offer against the sender's *pinned* key before
//! unwrapping it, and keeps the keys of the few most recently used epochs per sender as
//! durable state the client stores (so a restart or crash can open what was already
//! offered). Offers are recognised by their hash, never by the sender's clock. A recipient
//! that cannot open an envelope because *it* lacks the epoch key asks the sender to send
//! again with a [`Body::RetryRequest`] — the idea of Signal's retry receipts — and the
//! sender re-seals the undelivered messages of that epoch under a new one, with their
//! original ids, so the recipient shows each once.
//!
//! - `outbound`: the sending side ([`Outbound`]).
//! - `inbound`: the receiving side ([`Inbound`]) and its persisted form.
//! - `window`: the per-epoch replay window.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::group::{GroupState, SenderKeyDistribution, SignedChange};
use crate::identity::{Identity, PublicIdentity};
use crate::username::Username;

mod inbound;
mod outbound;
pub(crate) mod window;

pub use inbound::{
    ACTIVE_EPOCHS, EpochKey, Inbound, Inspected, RETIRED_OFFERS, StateError, unwrap_offer,
};
pub use outbound::Outbound;

/// Version of the envelope format and of everything signed or authenticated in it.
/// Version 2: offers are identified by hash (no clock-based replay floor) and
/// [`Body::RetryRequest`] exists.
pub const E2E_VERSION: u8 = 2;
const OFFER_CONTEXT: &[u8] = b"secure-chat/v2/key-offer";
const AAD_CONTEXT: &[u8] = b"secure-chat/v2/message";
const OFFER_ID_CONTEXT: &[u8] = b"secure-chat/v2/offer-id";
/// The only envelope kind so far; bound in the AAD so a future kind can't be confused with it.
const KIND_MESSAGE: u8 = 1;
/// Largest text body accepted for sealing (bytes of UTF-8).
pub const MAX_TEXT_BYTES: usize = 32 * 1024;

/// Random 128-bit message id, chosen by the sender; recipients deduplicate by it.
pub type MessageId = [u8; 16];

/// SHA-256 identifying one key offer (see [`offer_id`]).
pub type OfferId = [u8; 32];

/// What travels in a `Send` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u8,
    pub sender: String,
    pub recipient: String,
    pub epoch: u32,
    pub counter: u64,
    pub offer: Option<KeyOffer>,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// The signed, wrapped key of one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOffer {
    /// Sender's clock in ms since the Unix epoch when the epoch began. Signed, but only
    /// informational: nothing is ordered or refused by it (clocks jump).
    pub created_ms: u64,
    pub sender_fp: [u8; 32],
    pub recipient_fp: [u8; 32],
    /// RSA-OAEP-SHA256 of the 32-byte AES key, to the recipient's key.
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Vec<u8>,
    /// RSA-PSS-SHA256 by the sender over [`offer_transcript`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The decrypted content of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub id: MessageId,
    /// Sender's clock, ms since the Unix epoch: shown, never trusted for order.
    pub sent_at_ms: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Text(String),
    /// "I decrypted and stored these messages"; `epoch` is the newest epoch of the
    /// recipient's direction whose key the receipt's sender holds (the offer may stop).
    Receipt {
        epoch: u32,
        ids: Vec<MessageId>,
    },
    /// "I cannot open your envelopes of these epochs: I do not hold their keys (lost, or
    /// never received). Send what I have not receipted again, under a new epoch." Like
    /// Signal's retry receipts; a sender acts on each epoch at most once.
    RetryRequest {
        epochs: Vec<u32>,
    },
    /// A change to a group's membership, signed by its author. `prior` is the state it
    /// changes, given to members new to the group (see `group::Membership::join`).
    GroupUpdate {
        prior: Option<Box<GroupState>>,
        change: Box<SignedChange>,
    },
    /// The sender's current sending key in a group (`group::sender_key`).
    SenderKey(SenderKeyDistribution),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("message is {0} bytes; the limit is {MAX_TEXT_BYTES}")]
    TooLong(usize),
    #[error("encryption failed")]
    Crypto,
}

/// Why an envelope was refused. Nothing is ever sent back to the sender on failure, except
/// a [`Body::RetryRequest`] for [`Failure::MissingKey`], which names only an epoch id the
/// relay already saw.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum OpenError {
    #[error("not a valid envelope")]
    Malformed,
    #[error("envelope version is not supported")]
    UnsupportedVersion,
    #[error("the envelope's sender does not match who the server says sent it")]
    SenderMismatch,
    #[error("the envelope is addressed to someone else")]
    WrongRecipient,
    #[error("the key offer is not signed by the sender's pinned key")]
    BadOfferSignature,
    #[error("the key offer was made for a different key of ours")]
    OfferNotForUs,
    #[error("the key offer names a different sender key than the pinned one")]
    SenderKeyMismatch,
    #[error("no key for this epoch is held (lost, or its offer never arrived)")]
    UnknownEpoch,
    #[error("the key offer belongs to an epoch already retired")]
    RetiredEpoch,
    #[error("message already received (replay or duplicate)")]
    Replay,
    #[error("decryption failed")]
    Decrypt,
}

/// What a recipient should do about an [`OpenError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Already opened and processed (at-least-once redelivery or a replay): drop quietly.
    Duplicate,
    /// We lack the epoch key through no fault of the envelope: ask the sender to re-send.
    MissingKey,
    /// The sender's key may have changed: check it with the server before judging.
    KeyMismatch,
    /// Forged, tampered or malformed: drop, and tell the user.
    Forged,
}

impl OpenError {
    pub fn failure(self) -> Failure {
        match self {
            Self::Replay => Failure::Duplicate,
            Self::UnknownEpoch | Self::RetiredEpoch | Self::OfferNotForUs => Failure::MissingKey,
            Self::SenderKeyMismatch | Self::BadOfferSignature => Failure::KeyMismatch,
            Self::Malformed
            | Self::UnsupportedVersion
            | Self::SenderMismatch
            | Self::WrongRecipient
            | Self::Decrypt => Failure::Forged,
        }
    }
}

/// When a sender starts a new epoch on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationPolicy {
    pub max_messages: u64,
    pub max_age_ms: u64,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_messages: 1000,
            max_age_ms: 60 * 60 * 1000,
        }
    }
}

/// Result of sealing.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub bytes: Vec<u8>,
    pub epoch: u32,
    pub counter: u64,
}

/// Result of opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub content: Content,
    pub epoch: u32,
    pub counter: u64,
}

/// The two parties of a conversation, from our side.
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    pub me: &'a Identity,
    pub my_name: &'a Username,
    pub peer_name: &'a Username,
    /// The peer's *pinned* key.
    pub peer: &'a PublicIdentity,
}

/// The bytes a key offer's signature covers.
pub fn offer_transcript(
    sender: &Username,
    recipient: &Username,
    epoch: u32,
    offer: &KeyOffer,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(OFFER_CONTEXT.len() + 128 + offer.wrapped_key.len());
    t.extend_from_slice(OFFER_CONTEXT);
    t.push(E2E_VERSION);
    put_name(&mut t, sender);
    put_name(&mut t, recipient);
    t.extend_from_slice(&offer.sender_fp);
    t.extend_from_slice(&offer.recipient_fp);
    t.extend_from_slice(&epoch.to_be_bytes());
    t.extend_from_slice(&offer.created_ms.to_be_bytes());
    t.extend_from_slice(&(offer.wrapped_key.len() as u32).to_be_bytes());
    t.extend_from_slice(&offer.wrapped_key);
    t
}

/// Identifies an offer: SHA-256 over a context, the transcript and the signature. Two
/// offers with the same id are the same offer (a replay), whatever their clocks said.
pub fn offer_id(sender: &Username, recipient: &Username, epoch: u32, offer: &KeyOffer) -> OfferId {
    let mut h = Sha256::new();
    h.update(OFFER_ID_CONTEXT);
    h.update(offer_transcript(sender, recipient, epoch, offer));
    h.update((offer.signature.len() as u32).to_be_bytes());
    h.update(&offer.signature);
    h.finalize().into()
}

/// Associated data of a message.
fn message_aad(sender: &Username, recipient: &Username, epoch: u32, counter: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_CONTEXT.len() + 80);
    aad.extend_from_slice(AAD_CONTEXT);
    aad.push(E2E_VERSION);
    aad.push(KIND_MESSAGE);
    put_name(&mut aad, sender);
    put_name(&mut aad, recipient);
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad.extend_from_slice(&counter.to_be_bytes());
    aad
}

fn put_name(out: &mut Vec<u8>, name: &Username) {
    // Usernames are at most 32 bytes: one length byte keeps the encoding unambiguous.
    out.push(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
}

fn nonce(epoch: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// Pads an encoded content with zero bytes to a size bucket, hiding the exact length:
/// 256 B, 1 KiB, 4 KiB, 16 KiB, then multiples of 16 KiB.
fn pad(encoded: &[u8]) -> Vec<u8> {
    let target = padded_len(encoded.len());
    let mut out = Vec::with_capacity(target);
    out.extend_from_slice(encoded);
    out.resize(target, 0);
    out
}

/// The padded plaintext size of an encoded content of `len` bytes.
pub fn padded_len(len: usize) -> usize {
    [256, 1024, 4096, 16384]
        .into_iter()
        .find(|&b| len <= b)
        .unwrap_or_else(|| len.div_ceil(16384) * 16384)
}

/// A content's postcard encoding, padded (see [`padded_len`]).
pub(crate) fn pad_content(content: &Content) -> Option<Vec<u8>> {
    Some(pad(&postcard::to_allocvec(content).ok()?))
}

/// The content in a padded plaintext, if it is one.
pub(crate) fn unpad_content(padded: &[u8]) -> Option<Content> {
    unpad(padded)
}

fn unpad<T: serde::de::DeserializeOwned>(padded: &[u8]) -> Option<T> {
    let (value, rest) = postcard::take_from_bytes::<T>(padded).ok()?;
    rest.iter().all(|&b| b == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_buckets() {
        assert_eq!(padded_len(0), 256);
        assert_eq!(padded_len(256), 256);
        assert_eq!(padded_len(257), 1024);
        assert_eq!(padded_len(5000), 16384);
        assert_eq!(padded_len(16385), 32768);
        let padded = pad(&[1, 2, 3]);
        assert_eq!(padded.len(), 256);
        assert_eq!(&padded[..3], &[1, 2, 3]);
    }

    #[test]
    fn every_failure_has_a_remedy() {
        use OpenError::*;
        for (e, f) in [
            (Replay, Failure::Duplicate),
            (UnknownEpoch, Failure::MissingKey),
            (RetiredEpoch, Failure::MissingKey),
            (OfferNotForUs, Failure::MissingKey),
            (SenderKeyMismatch, Failure::KeyMismatch),
            (BadOfferSignature, Failure::KeyMismatch),
            (Decrypt, Failure::Forged),
            (Malformed, Failure::Forged),
            (WrongRecipient, Failure::Forged),
            (SenderMismatch, Failure::Forged),
            (UnsupportedVersion, Failure::Forged),
        ] {
            assert_eq!(e.failure(), f, "{e:?}");
        }
    }
}
