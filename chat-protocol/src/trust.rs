//! Trust on first use, like SSH's known_hosts: the first key seen for a contact is pinned;
//! a different key later is a *key change* that blocks the contact until the user accepts
//! it. Verification (after comparing safety numbers) is recorded per pinned key.
//!
//! This is the pure decision logic; the client persists [`Pin`]s in its store.

use serde::{Deserialize, Serialize};

use crate::identity::Fingerprint;

/// What we hold for one contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// SPKI DER of the pinned key.
    pub key: Vec<u8>,
    /// The user compared safety numbers and confirmed this key.
    pub verified: bool,
    /// A different key was presented and not yet accepted: traffic is blocked.
    pub pending: Option<Vec<u8>>,
}

/// Outcome of seeing a key for a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// First key for this contact: pin it.
    New(Pin),
    /// Matches the pin (and nothing is pending).
    Trusted,
    /// Differs from the pin: store the returned pin (with `pending` set) and block the
    /// contact until [`accept_pending`] is called.
    Changed { was_verified: bool, pin: Pin },
}

/// Judges `key` against the contact's current pin.
pub fn observe(pin: Option<&Pin>, key: &[u8]) -> Seen {
    match pin {
        None => Seen::New(Pin {
            key: key.to_vec(),
            verified: false,
            pending: None,
        }),
        Some(pin) if pin.key == key && pin.pending.is_none() => Seen::Trusted,
        Some(pin) => Seen::Changed {
            was_verified: pin.verified,
            pin: Pin {
                key: pin.key.clone(),
                verified: pin.verified,
                pending: Some(key.to_vec()),
            },
        },
    }
}

impl Pin {
    /// Whether messages may be exchanged with this contact.
    pub fn usable(&self) -> bool {
        self.pending.is_none()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.key)
    }
}

/// The user accepts the new key: it becomes the pin, unverified.
pub fn accept_pending(pin: &Pin) -> Option<Pin> {
    pin.pending.as_ref().map(|new| Pin {
        key: new.clone(),
        verified: false,
        pending: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_pins_then_change_blocks_until_accepted() {
        let Seen::New(mut pin) = observe(None, b"k1") else {
            panic!()
        };
        assert!(pin.usable());
        assert_eq!(observe(Some(&pin), b"k1"), Seen::Trusted);
        pin.verified = true;

        let Seen::Changed {
            was_verified,
            pin: changed,
        } = observe(Some(&pin), b"k2")
        else {
            panic!()
        };
        assert!(was_verified);
        assert!(!changed.usable());
        assert_eq!(changed.key, b"k1");
        // Even the old key is blocked while a change is pending: the user must decide.
        assert!(matches!(
            observe(Some(&changed), b"k1"),
            Seen::Changed { .. }
        ));

        let accepted = accept_pending(&changed).unwrap();
        assert_eq!(accepted.key, b"k2");
        assert!(!accepted.verified && accepted.usable());
        assert_eq!(accept_pending(&accepted), None);
    }
}
