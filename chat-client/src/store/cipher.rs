//! Encryption at rest, per value: AES-256-GCM under a key derived from the identity
//! (HKDF-SHA256 over the private key, see `Identity::derive_key`), with a random 96-bit
//! nonce per value and the value's place (table, column, row) as associated data, so a
//! value cannot be moved to another row or column unnoticed.
//!
//! Stored form: `b"SC1" || nonce (12 B) || ciphertext || tag (16 B)` as a BLOB. Plain
//! values stay TEXT or BLOB without the prefix; reading accepts both, so a store can be
//! migrated in place.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::Rng;
use zeroize::Zeroizing;

/// Marks an encrypted value.
pub const MAGIC: &[u8; 3] = b"SC1";
const NONCE_LEN: usize = 12;
/// Bytes an encrypted value adds to its plaintext.
pub const OVERHEAD: usize = MAGIC.len() + NONCE_LEN + 16;

/// HKDF context of the store key.
pub const STORE_KEY_CONTEXT: &[u8] = b"secure-chat/v2/client-store";

/// The key values are encrypted under. Never printed.
pub struct RowCipher {
    cipher: Aes256Gcm,
    /// Encrypt values written from now on (the identity has a passphrase). Reading
    /// decrypts either way.
    pub encrypt: bool,
}

impl std::fmt::Debug for RowCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowCipher")
            .field("encrypt", &self.encrypt)
            .finish_non_exhaustive()
    }
}

/// A value that was encrypted and does not open: damaged, or under another identity.
#[derive(Debug, thiserror::Error)]
#[error(
    "a stored value could not be decrypted (the database belongs to another identity, or it is damaged)"
)]
pub struct Undecryptable;

impl RowCipher {
    pub fn new(key: Zeroizing<[u8; 32]>, encrypt: bool) -> Self {
        Self {
            cipher: Aes256Gcm::new(&(*key).into()),
            encrypt,
        }
    }

    /// `plaintext` as stored at `place`: encrypted if this store encrypts, else as is.
    pub fn seal(&self, place: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        if !self.encrypt {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: place,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Some(out)
    }

    /// Whether `stored` is an encrypted value.
    pub fn is_sealed(stored: &[u8]) -> bool {
        stored.len() >= OVERHEAD && stored.starts_with(MAGIC)
    }

    /// Opens an encrypted value stored at `place`.
    pub fn open(&self, place: &[u8], stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, Undecryptable> {
        if !Self::is_sealed(stored) {
            return Err(Undecryptable);
        }
        let (nonce, ciphertext) = stored[MAGIC.len()..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                &Nonce::try_from(nonce).map_err(|_| Undecryptable)?,
                Payload {
                    msg: ciphertext,
                    aad: place,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| Undecryptable)
    }
}

/// The associated data naming where a value lives.
pub fn place(table: &str, column: &str, row: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for part in [table.as_bytes(), column.as_bytes()]
        .into_iter()
        .chain(row.iter().copied())
    {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(encrypt: bool) -> RowCipher {
        RowCipher::new(Zeroizing::new([7; 32]), encrypt)
    }

    #[test]
    fn round_trip_bound_to_its_place() {
        let c = cipher(true);
        let here = place("messages", "body", &[b"bob", &[1; 16]]);
        let there = place("messages", "body", &[b"bob", &[2; 16]]);
        let sealed = c.seal(&here, b"hello").unwrap();
        assert!(RowCipher::is_sealed(&sealed));
        assert_eq!(sealed.len(), OVERHEAD + 5);
        assert_eq!(&**c.open(&here, &sealed).unwrap(), b"hello");
        assert!(c.open(&there, &sealed).is_err(), "moved to another row");
        let other = RowCipher::new(Zeroizing::new([8; 32]), true);
        assert!(
            other.open(&here, &sealed).is_err(),
            "another identity's key"
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(c.open(&here, &flipped).is_err());
        assert_ne!(
            c.seal(&here, b"hello"),
            Some(sealed),
            "fresh nonce each time"
        );
    }

    #[test]
    fn plain_stores_do_not_encrypt() {
        assert_eq!(cipher(false).seal(b"p", b"x"), None);
        assert!(!RowCipher::is_sealed(b"plain text"));
        // The place encoding is unambiguous.
        assert_ne!(place("a", "bc", &[]), place("ab", "c", &[]));
    }
}
