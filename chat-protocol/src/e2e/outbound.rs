//! The sending side: one epoch at a time towards a contact, rotated by count, age, a key
//! change or the recipient's retry request, and kept across restarts.
//!
//! **Counter leases.** AES-GCM must never see one nonce twice under one key, and the nonce
//! is the epoch id and a counter. A persisted epoch stores not its next counter but the
//! end of a lease of [`COUNTER_LEASE`] counters: [`Sealed::lease_renewed`] says the
//! caller must store [`Outbound::to_bytes`] before the envelope goes anywhere, and a
//! restart resumes at the lease's end. So a crash can skip counters (the receiver's
//! replay window takes gaps) but never reuse one, with one write per lease rather than
//! per message (the same scheme as leased nonce or sequence blocks in many stores). A
//! caller that cannot store it must [`Outbound::rotate`]: nothing more may be sealed
//! under an epoch whose lease is not on disk.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    Body, Content, E2E_VERSION, Envelope, KeyOffer, MAX_TEXT_BYTES, Parties, RotationPolicy,
    SealError, Sealed, StateError, message_aad, nonce, offer_transcript, pad,
};
use crate::identity::Fingerprint;
use crate::primitives;

/// Counters reserved by one stored state of a sending epoch (see the module's doc): a
/// store write per this many messages to one contact, and at most this many counters of
/// the epoch's [`RotationPolicy::max_messages`] skipped at each restart.
pub const COUNTER_LEASE: u64 = 64;

/// Version of [`Outbound::to_bytes`]'s format.
const OUTBOUND_STATE_VERSION: u8 = 1;

/// The stored form of a sending epoch.
#[derive(Serialize, Deserialize)]
struct PersistedSendEpoch {
    version: u8,
    epoch: u32,
    key: [u8; 32],
    /// The lease's end: the first counter a restart may use.
    resume_at: u64,
    created_ms: u64,
    offer: KeyOffer,
    recipient_fp: [u8; 32],
}

/// Sending state towards one contact: its current epoch, kept in memory and, through
/// [`Outbound::to_bytes`], by the caller (encrypted at rest where the user asked for it).
#[derive(Default)]
pub struct Outbound {
    current: Option<SendEpoch>,
}

struct SendEpoch {
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
    next_counter: u64,
    created_ms: u64,
    offer: KeyOffer,
    acknowledged: bool,
    recipient_fp: Fingerprint,
    /// Counters below this are covered by the stored state (see the module's doc).
    leased_to: u64,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("epoch", &self.current.as_ref().map(|e| e.epoch))
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn current_epoch(&self) -> Option<u32> {
        self.current.as_ref().map(|e| e.epoch)
    }

    /// The stored form of the current epoch (postcard; holds its key: store it encrypted
    /// where the user asked for encryption at rest), or `None` without one. Its counter is
    /// the current lease's end, so a state read back never seals under a counter used
    /// before it was written. The offer is attached again after a restart until the
    /// recipient acknowledges it anew (it holds the epoch already: no RSA work).
    pub fn to_bytes(&self) -> Option<Zeroizing<Vec<u8>>> {
        let e = self.current.as_ref()?;
        let persisted = PersistedSendEpoch {
            version: OUTBOUND_STATE_VERSION,
            epoch: e.epoch,
            key: *e.key,
            resume_at: e.leased_to,
            created_ms: e.created_ms,
            offer: e.offer.clone(),
            recipient_fp: e.recipient_fp.0,
        };
        let bytes = postcard::to_allocvec(&persisted).expect("in-memory state encodes");
        Some(Zeroizing::new(bytes))
    }

    /// Reads [`Outbound::to_bytes`]'s output: the epoch goes on from its lease's end.
    /// Errors: damaged, or from another version (the caller starts afresh: a new epoch).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let p: PersistedSendEpoch = crate::frame::decode(bytes).map_err(|_| StateError)?;
        if p.version != OUTBOUND_STATE_VERSION {
            return Err(StateError);
        }
        Ok(Self {
            current: Some(SendEpoch {
                epoch: p.epoch,
                key: Zeroizing::new(p.key),
                next_counter: p.resume_at,
                created_ms: p.created_ms,
                offer: p.offer,
                acknowledged: false,
                recipient_fp: Fingerprint(p.recipient_fp),
                leased_to: p.resume_at,
            }),
        })
    }

    /// Ends the current epoch (its key is erased); the next message starts a new one.
    /// [`Outbound::retire`] calls it; an epoch otherwise ends by count, age or a key
    /// change (see `seal`), not at a reconnection.
    pub fn rotate(&mut self) {
        self.current = None;
    }

    /// The recipient asked for `epoch` again (it lacks the key): if it is the current one,
    /// end it, so what is re-sent carries a fresh offer. Returns whether it was current.
    pub fn retire(&mut self, epoch: u32) -> bool {
        let current = self.current_epoch() == Some(epoch);
        if current {
            self.rotate();
        }
        current
    }

    /// The recipient confirmed it holds `epoch`'s key: stop attaching the offer.
    pub fn acknowledge(&mut self, epoch: u32) {
        if let Some(current) = &mut self.current
            && current.epoch == epoch
        {
            current.acknowledged = true;
        }
    }

    /// Encrypts `content` for the peer. `now_ms` is the sender's clock (ms since the Unix
    /// epoch): it only decides rotation by age and is signed into a new offer. When
    /// [`Sealed::lease_renewed`], store [`Outbound::to_bytes`] before the envelope goes out
    /// (or [`Outbound::rotate`] if that fails).
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
                // A clock that went back also ends the epoch: its age is unknowable.
                || now_ms < e.created_ms
                || now_ms - e.created_ms >= policy.max_age_ms
        });
        if expired {
            self.current = Some(new_epoch(rng, parties, now_ms)?);
        }
        let epoch = self.current.as_mut().expect("an epoch was just ensured");
        let counter = epoch.next_counter;
        epoch.next_counter += 1;
        let lease_renewed = counter >= epoch.leased_to;
        if lease_renewed {
            epoch.leased_to = counter.saturating_add(COUNTER_LEASE);
        }

        let plaintext = Zeroizing::new(pad(
            &postcard::to_allocvec(content).map_err(|_| SealError::Crypto)?
        ));
        let aad = message_aad(parties.my_name, parties.peer_name, epoch.epoch, counter);
        let ciphertext =
            primitives::aead_seal(&epoch.key, &nonce(epoch.epoch, counter), &aad, &plaintext);
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
            lease_renewed,
        })
    }
}

fn new_epoch(
    rng: &mut impl CryptoRng,
    parties: Parties<'_>,
    now_ms: u64,
) -> Result<SendEpoch, SealError> {
    let mut key = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(key.as_mut());
    let epoch = rng.next_u32();
    let wrapped_key = primitives::oaep_encrypt(rng, parties.peer.key(), key.as_ref())
        .map_err(|_| SealError::Crypto)?;
    let mut offer = KeyOffer {
        created_ms: now_ms,
        sender_fp: parties.me.fingerprint().0,
        recipient_fp: parties.peer.fingerprint().0,
        wrapped_key,
        signature: Vec::new(),
    };
    let transcript = offer_transcript(parties.my_name, parties.peer_name, epoch, &offer);
    offer.signature = primitives::pss_sign(rng, parties.me.private_key(), &transcript)
        .map_err(|_| SealError::Crypto)?;
    Ok(SendEpoch {
        epoch,
        key,
        next_counter: 0,
        created_ms: now_ms,
        offer,
        acknowledged: false,
        recipient_fp: parties.peer.fingerprint(),
        leased_to: 0,
    })
}
