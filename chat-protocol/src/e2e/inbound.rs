//! The receiving side: the keys of a sender's recent epochs, kept as state the client
//! persists, and opening in three steps so the expensive one can run anywhere:
//!
//! 1. [`Inbound::inspect`] (cheap): decode, check names, find the epoch or the new offer,
//!    refuse replays — no RSA.
//! 2. [`unwrap_offer`] (RSA, pure, any thread): only when step 1 met a new offer. The
//!    caller may cache its [`EpochKey`] by offer id, so a replayed offer costs a lookup.
//! 3. [`Inbound::open_inspected`]: AES-GCM, then commit the state change.
//!
//! State changes only when a message opens. Keys of at most [`ACTIVE_EPOCHS`] epochs per
//! sender are kept (least recently used dropped first); the ids of dropped offers are
//! remembered ([`RETIRED_OFFERS`] of them), so their replay is refused without RSA work.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::window::ReplayWindow;
use super::{
    Content, E2E_VERSION, Envelope, OfferId, OpenError, Opened, Parties, message_aad, nonce,
    offer_id, offer_transcript, unpad,
};
use crate::primitives;

/// Epoch keys kept per sender. More than one, so a replayed or delayed old offer can never
/// push out the epoch in use; few, so little key material lingers (see SECURITY.md).
pub const ACTIVE_EPOCHS: usize = 3;
/// Ids of dropped offers remembered per sender, to refuse their replay cheaply.
pub const RETIRED_OFFERS: usize = 32;
/// Version of [`Inbound::to_bytes`].
const STATE_VERSION: u8 = 1;

/// Receiving state from one contact. Serialise it with [`Inbound::to_bytes`] and store it
/// together with what a message changed, in one transaction.
#[derive(Default, Clone)]
pub struct Inbound {
    /// Most recently used last.
    epochs: Vec<RecvEpoch>,
    /// Offer ids of dropped epochs, oldest first.
    retired: VecDeque<OfferId>,
}

#[derive(Clone)]
struct RecvEpoch {
    epoch: u32,
    offer_id: OfferId,
    key: Zeroizing<[u8; 32]>,
    window: ReplayWindow,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("epochs", &self.epochs().collect::<Vec<_>>())
            .field("retired", &self.retired.len())
            .finish()
    }
}

/// The persisted state could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stored end-to-end state is damaged or from a newer version")]
pub struct StateError;

/// A verified and unwrapped epoch key (the result of [`unwrap_offer`]). Never printed.
#[derive(Clone)]
pub struct EpochKey {
    offer_id: OfferId,
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
}

impl EpochKey {
    pub fn offer_id(&self) -> &OfferId {
        &self.offer_id
    }
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// An envelope that passed the cheap checks of [`Inbound::inspect`].
#[derive(Debug, Clone)]
pub struct Inspected {
    envelope: Envelope,
    /// Set when the envelope carries an offer this state does not hold yet.
    new_offer: Option<OfferId>,
}

impl Inspected {
    /// The offer to verify and unwrap first ([`unwrap_offer`]), if any.
    pub fn needs_unwrap(&self) -> Option<&OfferId> {
        self.new_offer.as_ref()
    }

    pub fn epoch(&self) -> u32 {
        self.envelope.epoch
    }
}

impl Inbound {
    /// Epoch ids held, least recently used first.
    pub fn epochs(&self) -> impl Iterator<Item = u32> + '_ {
        self.epochs.iter().map(|e| e.epoch)
    }

    /// The most recently used epoch: named in receipts, so the sender may stop attaching
    /// its offer.
    pub fn newest_epoch(&self) -> Option<u32> {
        self.epochs.last().map(|e| e.epoch)
    }

    /// Step 1: decodes and routes an envelope the server says came from `parties.peer_name`.
    pub fn inspect(&self, parties: Parties<'_>, bytes: &[u8]) -> Result<Inspected, OpenError> {
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
        let held = match &envelope.offer {
            Some(offer) => {
                let id = offer_id(parties.peer_name, parties.my_name, envelope.epoch, offer);
                match self.epochs.iter().find(|e| e.offer_id == id) {
                    Some(held) => held,
                    None if self.retired.contains(&id) => return Err(OpenError::RetiredEpoch),
                    None if offer.sender_fp != parties.peer.fingerprint().0 => {
                        return Err(OpenError::SenderKeyMismatch);
                    }
                    None => {
                        return Ok(Inspected {
                            envelope,
                            new_offer: Some(id),
                        });
                    }
                }
            }
            None => self
                .epochs
                .iter()
                .find(|e| e.epoch == envelope.epoch)
                .ok_or(OpenError::UnknownEpoch)?,
        };
        if !held.window.fresh(envelope.counter) {
            return Err(OpenError::Replay);
        }
        Ok(Inspected {
            envelope,
            new_offer: None,
        })
    }

    /// Step 3: decrypts, and on success commits: a new epoch is installed (the least
    /// recently used one dropped past [`ACTIVE_EPOCHS`]), the counter marked seen.
    /// `fresh` is step 2's result when step 1 asked for it. On failure nothing changes.
    pub fn open_inspected(
        &mut self,
        parties: Parties<'_>,
        inspected: Inspected,
        fresh: Option<&EpochKey>,
    ) -> Result<Opened, OpenError> {
        let Inspected {
            envelope,
            new_offer,
        } = inspected;
        let (key, window) = match &new_offer {
            Some(id) => {
                let fresh = fresh
                    .filter(|k| k.offer_id == *id && k.epoch == envelope.epoch)
                    .ok_or(OpenError::UnknownEpoch)?;
                (fresh.key.clone(), ReplayWindow::default())
            }
            None => {
                let held = self.find(&envelope).ok_or(OpenError::UnknownEpoch)?;
                (held.key.clone(), held.window)
            }
        };
        if !window.fresh(envelope.counter) {
            return Err(OpenError::Replay);
        }
        let aad = message_aad(
            parties.peer_name,
            parties.my_name,
            envelope.epoch,
            envelope.counter,
        );
        let padded = primitives::aead_open(
            &key,
            &nonce(envelope.epoch, envelope.counter),
            &aad,
            &envelope.ciphertext,
        )
        .map_err(|_| OpenError::Decrypt)?;
        let content = unpad::<Content>(&padded).ok_or(OpenError::Malformed)?;

        // Success: commit.
        let mut used = match new_offer {
            Some(offer_id) => {
                // A different offer under the same epoch id replaces that epoch.
                if let Some(at) = self.epochs.iter().position(|e| e.epoch == envelope.epoch) {
                    let old = self.epochs.remove(at);
                    self.retire(old.offer_id);
                }
                RecvEpoch {
                    epoch: envelope.epoch,
                    offer_id,
                    key,
                    window,
                }
            }
            None => {
                let at = self
                    .position(&envelope)
                    .expect("found above and nothing changed since");
                self.epochs.remove(at)
            }
        };
        used.window.mark(envelope.counter);
        self.epochs.push(used);
        while self.epochs.len() > ACTIVE_EPOCHS {
            let old = self.epochs.remove(0);
            self.retire(old.offer_id);
        }
        Ok(Opened {
            content,
            epoch: envelope.epoch,
            counter: envelope.counter,
        })
    }

    /// All three steps at once.
    pub fn open(&mut self, parties: Parties<'_>, bytes: &[u8]) -> Result<Opened, OpenError> {
        let inspected = self.inspect(parties, bytes)?;
        let fresh = match inspected.needs_unwrap() {
            Some(_) => Some(unwrap_offer(parties, &inspected)?),
            None => None,
        };
        self.open_inspected(parties, inspected, fresh.as_ref())
    }

    /// The persisted form (postcard; holds keys: store it encrypted where the user asked
    /// for encryption at rest).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let persisted = Persisted {
            version: STATE_VERSION,
            epochs: self
                .epochs
                .iter()
                .map(|e| PersistedEpoch {
                    epoch: e.epoch,
                    offer_id: e.offer_id,
                    key: *e.key,
                    window: e.window,
                })
                .collect(),
            retired: self.retired.iter().copied().collect(),
        };
        Zeroizing::new(postcard::to_allocvec(&persisted).expect("in-memory state encodes"))
    }

    /// Reads [`Inbound::to_bytes`]'s output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let persisted: Persisted = crate::frame::decode(bytes).map_err(|_| StateError)?;
        if persisted.version != STATE_VERSION || persisted.epochs.len() > ACTIVE_EPOCHS {
            return Err(StateError);
        }
        Ok(Self {
            epochs: persisted
                .epochs
                .iter()
                .map(|e| RecvEpoch {
                    epoch: e.epoch,
                    offer_id: e.offer_id,
                    key: Zeroizing::new(e.key),
                    window: e.window,
                })
                .collect(),
            retired: persisted
                .retired
                .iter()
                .rev()
                .take(RETIRED_OFFERS)
                .rev()
                .copied()
                .collect(),
        })
    }

    fn find(&self, envelope: &Envelope) -> Option<&RecvEpoch> {
        self.position(envelope).map(|at| &self.epochs[at])
    }

    fn position(&self, envelope: &Envelope) -> Option<usize> {
        self.epochs.iter().position(|e| e.epoch == envelope.epoch)
    }

    fn retire(&mut self, offer_id: OfferId) {
        self.retired.push_back(offer_id);
        while self.retired.len() > RETIRED_OFFERS {
            self.retired.pop_front();
        }
    }
}

/// Step 2: checks a new offer against the sender's pinned key and unwraps its epoch key.
/// Costs one RSA-PSS verification and, if that passes, one RSA-OAEP decryption.
pub fn unwrap_offer(parties: Parties<'_>, inspected: &Inspected) -> Result<EpochKey, OpenError> {
    let envelope = &inspected.envelope;
    let (Some(offer), Some(offer_id)) = (&envelope.offer, inspected.new_offer) else {
        return Err(OpenError::UnknownEpoch);
    };
    if offer.sender_fp != parties.peer.fingerprint().0 {
        return Err(OpenError::SenderKeyMismatch);
    }
    let transcript = offer_transcript(parties.peer_name, parties.my_name, envelope.epoch, offer);
    primitives::pss_verify(parties.peer.key(), &transcript, &offer.signature)
        .map_err(|_| OpenError::BadOfferSignature)?;
    if offer.recipient_fp != parties.me.fingerprint().0 {
        return Err(OpenError::OfferNotForUs);
    }
    let unwrapped = primitives::oaep_decrypt(parties.me.private_key(), &offer.wrapped_key)
        .map_err(|_| OpenError::Decrypt)?;
    let key: [u8; 32] = unwrapped
        .as_slice()
        .try_into()
        .map_err(|_| OpenError::Decrypt)?;
    Ok(EpochKey {
        offer_id,
        epoch: envelope.epoch,
        key: Zeroizing::new(key),
    })
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u8,
    epochs: Vec<PersistedEpoch>,
    retired: Vec<OfferId>,
}

#[derive(Serialize, Deserialize)]
struct PersistedEpoch {
    epoch: u32,
    offer_id: OfferId,
    key: [u8; 32],
    window: ReplayWindow,
}

impl Drop for PersistedEpoch {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}
