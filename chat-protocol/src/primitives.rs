//! The cryptographic calls every construction here goes through, and only these:
//!
//! - RSA-OAEP with SHA-256 and MGF1-SHA-256, empty label (RFC 8017 §7.1): wrapping epoch
//!   keys in key offers.
//! - RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (RFC 8017 §8.1): key offers and
//!   login proofs.
//! - AES-256-GCM with a 96-bit nonce and a 128-bit tag (NIST SP 800-38D): messages.
//!
//! Keeping them in one place lets an external test suite run through exactly these calls:
//! `tests/wycheproof.rs` feeds them Google's Wycheproof vectors.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::CryptoRng;
use rsa::{PrivateKey, PublicKey};
use sha2::Sha256;
use zeroize::Zeroizing;

/// A primitive refused its input (a bad signature, ciphertext or padding). Deliberately
/// without detail: callers must not tell these failures apart on the wire.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("cryptographic check failed")]
pub struct Refused;

/// RSA-OAEP-SHA256 encryption of `msg` to `key`.
pub fn oaep_encrypt(
    rng: &mut impl CryptoRng,
    key: &PublicKey,
    msg: &[u8],
) -> Result<Vec<u8>, Refused> {
    key.oaep_encrypt_with_rng::<Sha256, _>(rng, msg)
        .map_err(|_| Refused)
}

/// RSA-OAEP-SHA256 decryption (blinded, constant-time arithmetic in `rsa` 0.10).
pub fn oaep_decrypt(key: &PrivateKey, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Refused> {
    key.oaep_decrypt::<Sha256>(ciphertext)
        .map(Zeroizing::new)
        .map_err(|_| Refused)
}

/// RSA-PSS-SHA256 signature (salt as long as the hash, 32 bytes).
pub fn pss_sign(
    rng: &mut impl CryptoRng,
    key: &PrivateKey,
    msg: &[u8],
) -> Result<Vec<u8>, Refused> {
    key.pss_sign_with_rng::<Sha256, _>(rng, msg)
        .map_err(|_| Refused)
}

/// RSA-PSS-SHA256 verification.
pub fn pss_verify(key: &PublicKey, msg: &[u8], signature: &[u8]) -> Result<(), Refused> {
    key.pss_verify::<Sha256>(msg, signature)
        .map_err(|_| Refused)
}

/// AES-256-GCM encryption: ciphertext with the 16-byte tag appended.
pub fn aead_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    Aes256Gcm::new(key.into())
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail")
}

/// AES-256-GCM decryption of ciphertext-with-tag; refused unless the tag authenticates.
pub fn aead_open(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Refused> {
    Aes256Gcm::new(key.into())
        .decrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Refused)
}
