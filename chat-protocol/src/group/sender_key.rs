//! Sender keys: each member's own sending key in a group (the design of Signal's Sender
//! Keys, as in libsignal's `SenderKeyMessage`, with a counter nonce instead of a hash
//! ratchet and RSA-PSS instead of a per-key Ed25519 signing key).
//!
//! A member seals a group message once: AES-256-GCM under its current [`SenderKey`], nonce
//! `key_id (4 B) || counter (8 B)`, associated data binding the group id, the sender, the
//! key id and the counter; then it signs the result with its identity key, so a member
//! who holds the sender key still cannot write in the sender's name. The same bytes go to
//! every member. The key itself reaches each member as a [`SenderKeyDistribution`] inside
//! the 1:1 end-to-end channel, so only the members it was given to can read.
//!
//! A sending key is replaced ([`SenderKey::needs_rotation`]) whenever the set of members it
//! would go to differs from the set it was given to — someone left, was removed, was added,
//! or is excluded for an unaccepted key change — and after a count or an age, so a removed
//! member cannot read what is sent after the removal and an added one cannot read what was
//! sent before.

use std::collections::BTreeSet;

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{GROUP_ENVELOPE_VERSION, GroupId};
use crate::e2e::window::ReplayWindow;
use crate::e2e::{Body, Content, MAX_TEXT_BYTES, RotationPolicy, SealError};
use crate::e2e::{pad_content, unpad_content};
use crate::identity::{Identity, PublicIdentity};
use crate::primitives;
use crate::username::Username;

const MESSAGE_CONTEXT: &[u8] = b"secure-chat/v2/group-message";
const SIGNATURE_CONTEXT: &[u8] = b"secure-chat/v2/group-signature";
/// Receiving keys kept per member and group: the current one and a few before it, so
/// messages sealed just before a rotation still open.
pub const KEYS_PER_MEMBER: usize = 3;
/// Version of the persisted forms.
const STATE_VERSION: u8 = 1;

/// What travels in a `Send` payload for a group: the same bytes to every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEnvelope {
    /// [`GROUP_ENVELOPE_VERSION`]; its first byte tells it from a 1:1 envelope.
    pub version: u8,
    pub group: GroupId,
    pub sender: Username,
    pub key_id: u32,
    pub counter: u64,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// RSA-PSS-SHA256 by the sender's identity key over [`GroupEnvelope::transcript`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl GroupEnvelope {
    fn aad(&self) -> Vec<u8> {
        let mut aad = MESSAGE_CONTEXT.to_vec();
        aad.push(self.version);
        aad.extend_from_slice(&self.group);
        aad.push(self.sender.as_str().len() as u8);
        aad.extend_from_slice(self.sender.as_str().as_bytes());
        aad.extend_from_slice(&self.key_id.to_be_bytes());
        aad.extend_from_slice(&self.counter.to_be_bytes());
        aad
    }

    /// The bytes signed: a context, the associated data and the ciphertext.
    pub fn transcript(&self) -> Vec<u8> {
        let mut t = SIGNATURE_CONTEXT.to_vec();
        t.extend(self.aad());
        t.extend_from_slice(&(self.ciphertext.len() as u32).to_be_bytes());
        t.extend_from_slice(&self.ciphertext);
        t
    }

    /// Decodes a payload; `Malformed` unless it is a whole group envelope of this version.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupOpenError> {
        let envelope: Self = crate::frame::decode(bytes).map_err(|_| GroupOpenError::Malformed)?;
        if envelope.version != GROUP_ENVELOPE_VERSION {
            return Err(GroupOpenError::Malformed);
        }
        Ok(envelope)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an envelope always encodes")
    }
}

fn nonce(key_id: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&key_id.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// One member's sending key, as given to the others (inside the 1:1 channel).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderKeyDistribution {
    pub group: GroupId,
    pub key_id: u32,
    pub key: [u8; 32],
}

impl std::fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Drop for SenderKeyDistribution {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Our sending key in one group. Persist it ([`to_bytes`](Self::to_bytes)) in the same
/// transaction as every message sealed with it: a counter must never be used twice.
#[derive(Clone, Serialize, Deserialize)]
pub struct SenderKey {
    pub key_id: u32,
    key: [u8; 32],
    /// Counter of the next message.
    pub next_counter: u64,
    pub created_ms: u64,
    /// The members this key was given to.
    pub given_to: BTreeSet<Username>,
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("key_id", &self.key_id)
            .field("next_counter", &self.next_counter)
            .field("given_to", &self.given_to.len())
            .finish_non_exhaustive()
    }
}

impl Drop for SenderKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// The persisted state could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stored sender key state is damaged or from a newer version")]
pub struct SenderKeyStateError;

impl SenderKey {
    /// A fresh random key, to be given to `recipients`.
    pub fn generate(
        rng: &mut impl CryptoRng,
        recipients: BTreeSet<Username>,
        created_ms: u64,
    ) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self {
            key_id: rng.next_u32(),
            key,
            next_counter: 0,
            created_ms,
            given_to: recipients,
        }
    }

    /// What to send each recipient (through its 1:1 channel).
    pub fn distribution(&self, group: GroupId) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group,
            key_id: self.key_id,
            key: self.key,
        }
    }

    /// Whether a new key must be made before sealing for `recipients`: they are not
    /// exactly whom this key was given to, or the key is past `policy`'s count or age (a
    /// clock gone back counts as past).
    pub fn needs_rotation(
        &self,
        recipients: &BTreeSet<Username>,
        now_ms: u64,
        policy: RotationPolicy,
    ) -> bool {
        self.given_to != *recipients
            || self.next_counter >= policy.max_messages
            || now_ms < self.created_ms
            || now_ms - self.created_ms >= policy.max_age_ms
    }

    /// Seals `content` (a text) for the group and signs it; returns the envelope's bytes.
    pub fn seal(
        &mut self,
        rng: &mut impl CryptoRng,
        identity: &Identity,
        sender: &Username,
        group: GroupId,
        content: &Content,
    ) -> Result<Vec<u8>, SealError> {
        match &content.body {
            Body::Text(text) if text.len() > MAX_TEXT_BYTES => {
                return Err(SealError::TooLong(text.len()));
            }
            Body::Text(_) => {}
            _ => return Err(SealError::Crypto),
        }
        let counter = self.next_counter;
        self.next_counter += 1;
        let plaintext = Zeroizing::new(pad_content(content).ok_or(SealError::Crypto)?);
        let mut envelope = GroupEnvelope {
            version: GROUP_ENVELOPE_VERSION,
            group,
            sender: sender.clone(),
            key_id: self.key_id,
            counter,
            ciphertext: Vec::new(),
            signature: Vec::new(),
        };
        envelope.ciphertext = primitives::aead_seal(
            &self.key,
            &nonce(self.key_id, counter),
            &envelope.aad(),
            &plaintext,
        );
        envelope.signature =
            primitives::pss_sign(rng, identity.private_key(), &envelope.transcript())
                .map_err(|_| SealError::Crypto)?;
        Ok(envelope.to_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        out.extend(postcard::to_allocvec(self).expect("a sender key always encodes"));
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SenderKeyStateError> {
        match bytes.split_first() {
            Some((&STATE_VERSION, rest)) => {
                crate::frame::decode(rest).map_err(|_| SenderKeyStateError)
            }
            _ => Err(SenderKeyStateError),
        }
    }
}

/// Why a group envelope was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupOpenError {
    #[error("not a valid group envelope")]
    Malformed,
    #[error("the envelope's sender does not match who the server says sent it")]
    SenderMismatch,
    #[error("the envelope is not signed by the sender's pinned key")]
    BadSignature,
    #[error("the sender's key for this message has not arrived (or was replaced long ago)")]
    UnknownKey,
    #[error("message already received (replay or duplicate)")]
    Replay,
    #[error("decryption failed")]
    Decrypt,
}

#[derive(Clone, Serialize, Deserialize)]
struct RecvKey {
    key_id: u32,
    key: [u8; 32],
    window: ReplayWindow,
}

impl Drop for RecvKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// The sending keys we hold from one member of one group (the newest
/// [`KEYS_PER_MEMBER`]), each with its replay window. Persist it after every change.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct MemberKeys {
    /// Oldest first.
    keys: Vec<RecvKey>,
}

impl std::fmt::Debug for MemberKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberKeys")
            .field(
                "key_ids",
                &self.keys.iter().map(|k| k.key_id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl MemberKeys {
    /// Takes a key the member gave us. A key id already held keeps its replay window.
    pub fn add(&mut self, distribution: &SenderKeyDistribution) {
        if let Some(held) = self
            .keys
            .iter()
            .position(|k| k.key_id == distribution.key_id)
        {
            if self.keys[held].key == distribution.key {
                return;
            }
            // The same id for another key: the newer one counts, afresh.
            self.keys.remove(held);
        }
        self.keys.push(RecvKey {
            key_id: distribution.key_id,
            key: distribution.key,
            window: ReplayWindow::default(),
        });
        if self.keys.len() > KEYS_PER_MEMBER {
            self.keys.remove(0);
        }
    }

    pub fn holds(&self, key_id: u32) -> bool {
        self.keys.iter().any(|k| k.key_id == key_id)
    }

    /// Opens a group envelope the server says came from `from`, whose pinned key is
    /// `sender`. The replay window moves only when the message opens.
    pub fn open(
        &mut self,
        envelope: &GroupEnvelope,
        from: &Username,
        sender: &PublicIdentity,
    ) -> Result<Content, GroupOpenError> {
        if envelope.sender != *from {
            return Err(GroupOpenError::SenderMismatch);
        }
        let held = self
            .keys
            .iter_mut()
            .find(|k| k.key_id == envelope.key_id)
            .ok_or(GroupOpenError::UnknownKey)?;
        if !held.window.fresh(envelope.counter) {
            return Err(GroupOpenError::Replay);
        }
        primitives::pss_verify(sender.key(), &envelope.transcript(), &envelope.signature)
            .map_err(|_| GroupOpenError::BadSignature)?;
        let plaintext = primitives::aead_open(
            &held.key,
            &nonce(envelope.key_id, envelope.counter),
            &envelope.aad(),
            &envelope.ciphertext,
        )
        .map_err(|_| GroupOpenError::Decrypt)?;
        let content: Content = unpad_content(&plaintext).ok_or(GroupOpenError::Malformed)?;
        if !matches!(content.body, Body::Text(_)) {
            return Err(GroupOpenError::Malformed);
        }
        held.window.mark(envelope.counter);
        Ok(content)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        out.extend(postcard::to_allocvec(self).expect("member keys always encode"));
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SenderKeyStateError> {
        match bytes.split_first() {
            Some((&STATE_VERSION, rest)) => {
                crate::frame::decode(rest).map_err(|_| SenderKeyStateError)
            }
            _ => Err(SenderKeyStateError),
        }
    }
}
