//! End-to-end encryption between two users; the relay only ever sees [`Envelope`] bytes.
//!
//! Per sending direction the sender runs *epochs*. An epoch starts with a fresh random
//! AES-256 key, wrapped to the recipient's pinned public key with RSA-OAEP-SHA256 and
//! carried in a [`KeyOffer`] that the sender signs (RSA-PSS-SHA256) over the protocol
//! version, both names, both key fingerprints, the epoch id, its creation time and the
//! wrapped key. Messages in the epoch are AES-256-GCM with nonce `epoch (4 B) || counter
//! (8 B)` and associated data binding version, envelope kind, sender, recipient, epoch and
//! counter. The offer rides along with every message of the epoch until the recipient
//! acknowledges it (a delivery receipt), so any message can be opened without a round trip.
//!
//! The recipient verifies the offer against the sender's *pinned* key before unwrapping,
//! refuses replays with a sliding window, refuses offers older than the newest it accepted,
//! and drops older epochs' keys as soon as a newer epoch is in use.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identity::{Fingerprint, Identity, PublicIdentity};
use crate::username::Username;

/// Version of the envelope format and of everything signed or authenticated in it.
pub const E2E_VERSION: u8 = 1;
const OFFER_CONTEXT: &[u8] = b"secure-chat/v1/key-offer";
const AAD_CONTEXT: &[u8] = b"secure-chat/v1/message";
/// The only envelope kind so far; bound in the AAD so a future kind can't be confused with it.
const KIND_MESSAGE: u8 = 1;
/// Largest text body accepted for sealing (bytes of UTF-8).
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Out-of-order tolerance of the replay window, in messages.
const REPLAY_WINDOW: u64 = 64;

/// Random 128-bit message id, chosen by the sender; recipients deduplicate by it.
pub type MessageId = [u8; 16];

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
    /// Sender's clock in ms since the Unix epoch; strictly increasing per sender.
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
    pub sent_at_ms: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Text(String),
    /// "I decrypted and stored these messages", sent in the sender's `epoch`.
    Receipt {
        epoch: u32,
        ids: Vec<MessageId>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("message is {0} bytes; the limit is {MAX_TEXT_BYTES}")]
    TooLong(usize),
    #[error("encryption failed")]
    Crypto,
}

/// Why an envelope was refused. Nothing is ever sent back to the sender on failure, so the
/// relay learns nothing from which check failed.
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
    #[error("the key offer is older than one already accepted (replayed)")]
    StaleOffer,
    #[error("message for an unknown or expired epoch")]
    UnknownEpoch,
    #[error("message already received (replay or duplicate)")]
    Replay,
    #[error("decryption failed")]
    Decrypt,
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

/// Sending state towards one contact.
#[derive(Default)]
pub struct Outbound {
    current: Option<SendEpoch>,
    last_created_ms: u64,
}

struct SendEpoch {
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
    next_counter: u64,
    created_ms: u64,
    offer: KeyOffer,
    acknowledged: bool,
    recipient_fp: Fingerprint,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("epoch", &self.current.as_ref().map(|e| e.epoch))
            .finish_non_exhaustive()
    }
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

impl Outbound {
    /// Resumes after a restart without reusing an older creation time.
    pub fn after(last_created_ms: u64) -> Self {
        Self {
            current: None,
            last_created_ms,
        }
    }

    /// Creation time of the newest epoch; persist it to keep offers increasing.
    pub fn last_created_ms(&self) -> u64 {
        self.last_created_ms
    }

    pub fn current_epoch(&self) -> Option<u32> {
        self.current.as_ref().map(|e| e.epoch)
    }

    /// Ends the current epoch (its key is erased); the next message starts a new one.
    /// Call at every new connection.
    pub fn rotate(&mut self) {
        self.current = None;
    }

    /// The recipient confirmed it holds `epoch`'s key: stop attaching the offer.
    pub fn acknowledge(&mut self, epoch: u32) {
        if let Some(current) = &mut self.current
            && current.epoch == epoch
        {
            current.acknowledged = true;
        }
    }

    /// Encrypts `content` for the peer.
    pub fn seal(
        &mut self,
        rng: &mut impl CryptoRng,
        parties: Parties<'_>,
        content: &Content,
        now_ms: u64,
        policy: RotationPolicy,
    ) -> Result<Sealed, SealError> {
        if let Body::Text(text) = &content.body
            && text.len() > MAX_TEXT_BYTES
        {
            return Err(SealError::TooLong(text.len()));
        }
        let expired = self.current.as_ref().is_none_or(|e| {
            e.recipient_fp != parties.peer.fingerprint()
                || e.next_counter >= policy.max_messages
                || now_ms.saturating_sub(e.created_ms) >= policy.max_age_ms
        });
        if expired {
            self.current = Some(self.new_epoch(rng, parties, now_ms)?);
        }
        let epoch = self.current.as_mut().expect("an epoch was just ensured");
        let counter = epoch.next_counter;
        epoch.next_counter += 1;

        let plaintext = Zeroizing::new(pad(
            &postcard::to_allocvec(content).map_err(|_| SealError::Crypto)?
        ));
        let aad = message_aad(parties.my_name, parties.peer_name, epoch.epoch, counter);
        let cipher = Aes256Gcm::new(&(*epoch.key).into());
        let ciphertext = cipher
            .encrypt(
                &nonce(epoch.epoch, counter),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Crypto)?;
        let envelope = Envelope {
            version: E2E_VERSION,
            sender: parties.my_name.to_string(),
            recipient: parties.peer_name.to_string(),
            epoch: epoch.epoch,
            counter,
            offer: (!epoch.acknowledged).then(|| epoch.offer.clone()),
            ciphertext,
        };
        Ok(Sealed {
            bytes: postcard::to_allocvec(&envelope).map_err(|_| SealError::Crypto)?,
            epoch: epoch.epoch,
            counter,
        })
    }

    fn new_epoch(
        &mut self,
        rng: &mut impl CryptoRng,
        parties: Parties<'_>,
        now_ms: u64,
    ) -> Result<SendEpoch, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        let epoch = rng.next_u32();
        let created_ms = now_ms.max(self.last_created_ms + 1);
        self.last_created_ms = created_ms;
        let wrapped_key = parties
            .peer
            .key()
            .oaep_encrypt_with_rng::<Sha256, _>(rng, key.as_ref())
            .map_err(|_| SealError::Crypto)?;
        let mut offer = KeyOffer {
            created_ms,
            sender_fp: parties.me.fingerprint().0,
            recipient_fp: parties.peer.fingerprint().0,
            wrapped_key,
            signature: Vec::new(),
        };
        let transcript = offer_transcript(parties.my_name, parties.peer_name, epoch, &offer);
        offer.signature = parties
            .me
            .private_key()
            .pss_sign_with_rng::<Sha256, _>(rng, &transcript)
            .map_err(|_| SealError::Crypto)?;
        Ok(SendEpoch {
            epoch,
            key,
            next_counter: 0,
            created_ms,
            offer,
            acknowledged: false,
            recipient_fp: parties.peer.fingerprint(),
        })
    }
}

/// Receiving state from one contact.
///
/// Only the newest epoch's key is kept: a new epoch is installed only when a message in
/// it opens, and that drops (zeroizes) the previous key. The relay keeps each sender's
/// order and senders re-seal queued messages in their current epoch, so nothing valid is
/// ever addressed to an older epoch.
#[derive(Default)]
pub struct Inbound {
    current: Option<RecvEpoch>,
    newest_offer_ms: u64,
}

struct RecvEpoch {
    epoch: u32,
    created_ms: u64,
    key: Zeroizing<[u8; 32]>,
    window: ReplayWindow,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("epoch", &self.current.as_ref().map(|e| e.epoch))
            .field("newest_offer_ms", &self.newest_offer_ms)
            .finish()
    }
}

impl Inbound {
    /// Resumes after a restart: offers not newer than `newest_offer_ms` are refused.
    pub fn after(newest_offer_ms: u64) -> Self {
        Self {
            current: None,
            newest_offer_ms,
        }
    }

    /// Creation time of the newest accepted offer; persist it to refuse replays after a
    /// restart.
    pub fn newest_offer_ms(&self) -> u64 {
        self.newest_offer_ms
    }

    /// Verifies and decrypts an envelope that the server says came from `parties.peer_name`.
    /// State changes only when it succeeds.
    pub fn open(&mut self, parties: Parties<'_>, bytes: &[u8]) -> Result<Opened, OpenError> {
        let envelope: Envelope = crate::frame::decode(bytes).map_err(|_| OpenError::Malformed)?;
        if envelope.version != E2E_VERSION {
            return Err(OpenError::UnsupportedVersion);
        }
        if envelope.sender != parties.peer_name.as_str() {
            return Err(OpenError::SenderMismatch);
        }
        if envelope.recipient != parties.my_name.as_str() {
            return Err(OpenError::WrongRecipient);
        }

        let known = self.current.as_ref().filter(|e| e.epoch == envelope.epoch);
        let fresh = match (known, &envelope.offer) {
            (Some(_), _) => None,
            (None, Some(offer)) => Some(self.accept_offer(parties, envelope.epoch, offer)?),
            (None, None) => return Err(OpenError::UnknownEpoch),
        };
        let epoch = known.or(fresh.as_ref()).expect("known or fresh");
        if !epoch.window.fresh(envelope.counter) {
            return Err(OpenError::Replay);
        }
        let aad = message_aad(
            parties.peer_name,
            parties.my_name,
            envelope.epoch,
            envelope.counter,
        );
        let cipher = Aes256Gcm::new(&(*epoch.key).into());
        let padded = Zeroizing::new(
            cipher
                .decrypt(
                    &nonce(envelope.epoch, envelope.counter),
                    Payload {
                        msg: &envelope.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| OpenError::Decrypt)?,
        );
        let content = unpad::<Content>(&padded).ok_or(OpenError::Malformed)?;

        // Success: commit. A fresh epoch replaces (and erases) the previous key.
        if let Some(fresh) = fresh {
            self.newest_offer_ms = fresh.created_ms;
            self.current = Some(fresh);
        }
        let current = self.current.as_mut().expect("an epoch is installed");
        current.window.mark(envelope.counter);
        Ok(Opened {
            content,
            epoch: envelope.epoch,
            counter: envelope.counter,
        })
    }

    fn accept_offer(
        &self,
        parties: Parties<'_>,
        epoch: u32,
        offer: &KeyOffer,
    ) -> Result<RecvEpoch, OpenError> {
        if offer.sender_fp != parties.peer.fingerprint().0 {
            return Err(OpenError::SenderKeyMismatch);
        }
        let transcript = offer_transcript(parties.peer_name, parties.my_name, epoch, offer);
        parties
            .peer
            .key()
            .pss_verify::<Sha256>(&transcript, &offer.signature)
            .map_err(|_| OpenError::BadOfferSignature)?;
        if offer.recipient_fp != parties.me.fingerprint().0 {
            return Err(OpenError::OfferNotForUs);
        }
        if offer.created_ms <= self.newest_offer_ms {
            return Err(OpenError::StaleOffer);
        }
        let unwrapped = Zeroizing::new(
            parties
                .me
                .private_key()
                .oaep_decrypt::<Sha256>(&offer.wrapped_key)
                .map_err(|_| OpenError::Decrypt)?,
        );
        let key: [u8; 32] = unwrapped
            .as_slice()
            .try_into()
            .map_err(|_| OpenError::Decrypt)?;
        Ok(RecvEpoch {
            epoch,
            created_ms: offer.created_ms,
            key: Zeroizing::new(key),
            window: ReplayWindow::default(),
        })
    }
}

/// Highest counter seen and a bitmap of the `REPLAY_WINDOW` counters below it.
#[derive(Debug, Default, Clone, Copy)]
struct ReplayWindow {
    /// `None` until the first message.
    highest: Option<u64>,
    /// Bit i set: counter `highest - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    fn fresh(&self, counter: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if counter > h => true,
            Some(h) => {
                let back = h - counter;
                back < REPLAY_WINDOW && self.seen & (1 << back) == 0
            }
        }
    }

    fn mark(&mut self, counter: u64) {
        match self.highest {
            Some(h) if counter <= h => self.seen |= 1 << (h - counter),
            Some(h) => {
                let shift = counter - h;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.highest = Some(counter);
            }
            None => {
                self.highest = Some(counter);
                self.seen = 1;
            }
        }
    }
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

fn nonce(epoch: u32, counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n.into()
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

pub(crate) fn padded_len(len: usize) -> usize {
    [256, 1024, 4096, 16384]
        .into_iter()
        .find(|&b| len <= b)
        .unwrap_or_else(|| len.div_ceil(16384) * 16384)
}

fn unpad<T: serde::de::DeserializeOwned>(padded: &[u8]) -> Option<T> {
    let (value, rest) = postcard::take_from_bytes::<T>(padded).ok()?;
    rest.iter().all(|&b| b == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.fresh(5));
        w.mark(5);
        assert!(!w.fresh(5));
        assert!(w.fresh(3), "a little out of order is fine");
        w.mark(3);
        assert!(!w.fresh(3));
        w.mark(100);
        assert!(!w.fresh(5), "fell out of the window");
        assert!(w.fresh(99) && w.fresh(37));
        assert!(!w.fresh(36));
        w.mark(99);
        assert!(!w.fresh(99) && !w.fresh(100) && w.fresh(101));
    }

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
}
