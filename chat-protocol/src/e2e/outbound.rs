//! The sending side: one epoch at a time towards a contact, rotated by count, age,
//! reconnection, a key change or the recipient's retry request.

use rand::CryptoRng;
use zeroize::Zeroizing;

use super::{
    Body, Content, E2E_VERSION, Envelope, KeyOffer, MAX_TEXT_BYTES, Parties, RotationPolicy,
    SealError, Sealed, message_aad, nonce, offer_transcript, pad,
};
use crate::identity::Fingerprint;
use crate::primitives;

/// Sending state towards one contact. Lives in memory only: a restarted client simply
/// starts a new epoch.
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
    /// epoch): it only decides rotation by age and is signed into a new offer.
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
    })
}
