//! Proof of key possession at login.
//!
//! The client signs, with RSA-PSS-SHA256, a transcript that binds a fixed context string
//! (domain separation: the signature means nothing anywhere else), the canonical username,
//! the SHA-256 of the public key being proved, the server's random challenge and the TLS
//! channel binding of the connection it is sent on:
//!
//! ```text
//! "secure-chat/v2/login" || u8(len(username)) || username || SHA-256(SPKI DER) || nonce[32]
//!     || channel_binding[32]
//! ```
//!
//! The channel binding is the `tls-exporter` value of RFC 9266: 32 bytes exported from the
//! TLS 1.3 session (RFC 8446 §7.5) with the label [`EXPORTER_LABEL`] and no context. Both
//! ends compute it from their own session, so a proof captured in one TLS session (say by
//! a relay impostor that terminates TLS itself) does not verify in any other.

use rand::CryptoRng;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

use crate::message::CHALLENGE_LEN;
use crate::primitives;
use crate::username::Username;

/// Domain-separation context of the login signature.
pub const LOGIN_CONTEXT: &[u8] = b"secure-chat/v2/login";

/// TLS exporter label of the channel binding (RFC 9266 `tls-exporter`).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// Bytes of channel binding exported from the TLS session.
pub const CHANNEL_BINDING_LEN: usize = 32;

/// The TLS channel binding a login proof is tied to (see the module docs).
pub type ChannelBinding = [u8; CHANNEL_BINDING_LEN];

/// Smallest RSA modulus accepted for an account key.
pub const MIN_KEY_BITS: usize = 2048;
/// Largest RSA modulus accepted (bounds the server's verification cost).
pub const MAX_KEY_BITS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("public key is not a valid RSA SubjectPublicKeyInfo (DER)")]
    InvalidKey,
    #[error("RSA key of {0} bits is outside the accepted {MIN_KEY_BITS}..={MAX_KEY_BITS} bits")]
    KeySize(usize),
    #[error("login signature does not verify")]
    BadSignature,
    #[error("signing failed")]
    Signing,
}

/// Parses and bounds-checks an account public key (SPKI DER).
pub fn parse_public_key(der: &[u8]) -> Result<PublicKey, AuthError> {
    let key = PublicKey::from_public_key_der(der).map_err(|_| AuthError::InvalidKey)?;
    let bits = key.n().bit_width() as usize;
    if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
        return Err(AuthError::KeySize(bits));
    }
    Ok(key)
}

/// SPKI DER encoding of a public key, the form the server stores and hands out.
pub fn public_key_der(key: &PublicKey) -> Vec<u8> {
    key.to_public_key_der()
        .expect("encoding an in-memory RSA public key cannot fail")
        .into_vec()
}

/// The bytes a login signature covers.
pub fn login_transcript(
    username: &Username,
    public_key_der: &[u8],
    nonce: &[u8; CHALLENGE_LEN],
    channel: &ChannelBinding,
) -> Vec<u8> {
    let name = username.as_str().as_bytes();
    let mut t = Vec::with_capacity(
        LOGIN_CONTEXT.len() + 1 + name.len() + 32 + CHALLENGE_LEN + CHANNEL_BINDING_LEN,
    );
    t.extend_from_slice(LOGIN_CONTEXT);
    // Usernames are at most 32 bytes, so one length byte is unambiguous.
    t.push(name.len() as u8);
    t.extend_from_slice(name);
    t.extend_from_slice(&Sha256::digest(public_key_der));
    t.extend_from_slice(nonce);
    t.extend_from_slice(channel);
    t
}

/// Client side: signs the login transcript for the connection whose channel binding is
/// `channel`.
pub fn sign_login(
    key: &PrivateKey,
    rng: &mut impl CryptoRng,
    username: &Username,
    nonce: &[u8; CHALLENGE_LEN],
    channel: &ChannelBinding,
) -> Result<Vec<u8>, AuthError> {
    let der = public_key_der(&key.to_public_key());
    primitives::pss_sign(rng, key, &login_transcript(username, &der, nonce, channel))
        .map_err(|_| AuthError::Signing)
}

/// Server side: checks a login signature against the account's stored key and the
/// channel binding of the connection it arrived on.
pub fn verify_login(
    public_key_der: &[u8],
    username: &Username,
    nonce: &[u8; CHALLENGE_LEN],
    channel: &ChannelBinding,
    signature: &[u8],
) -> Result<(), AuthError> {
    let key = parse_public_key(public_key_der)?;
    primitives::pss_verify(
        &key,
        &login_transcript(username, public_key_der, nonce, channel),
        signature,
    )
    .map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn key() -> &'static PrivateKey {
        static KEY: OnceLock<PrivateKey> = OnceLock::new();
        KEY.get_or_init(|| PrivateKey::new(&mut rand::rng(), 2048).unwrap())
    }

    #[test]
    fn signature_verifies_only_for_its_transcript() {
        let mut rng = rand::rng();
        let alice = Username::parse("alice").unwrap();
        let der = public_key_der(&key().to_public_key());
        let nonce = [7u8; CHALLENGE_LEN];
        let tls = [3u8; CHANNEL_BINDING_LEN];
        let sig = sign_login(key(), &mut rng, &alice, &nonce, &tls).unwrap();
        assert_eq!(verify_login(&der, &alice, &nonce, &tls, &sig), Ok(()));

        let other_nonce = [8u8; CHALLENGE_LEN];
        assert_eq!(
            verify_login(&der, &alice, &other_nonce, &tls, &sig),
            Err(AuthError::BadSignature)
        );
        // The same proof relayed into another TLS session.
        let other_session = [4u8; CHANNEL_BINDING_LEN];
        assert_eq!(
            verify_login(&der, &alice, &nonce, &other_session, &sig),
            Err(AuthError::BadSignature)
        );
        let bob = Username::parse("bob").unwrap();
        assert_eq!(
            verify_login(&der, &bob, &nonce, &tls, &sig),
            Err(AuthError::BadSignature)
        );
        let mut tampered = sig.clone();
        tampered[10] ^= 1;
        assert_eq!(
            verify_login(&der, &alice, &nonce, &tls, &tampered),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_login(&der, &alice, &nonce, &tls, &[]),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn signature_over_raw_nonce_is_useless() {
        // A signature made for another purpose over the bare nonce must not log anyone in.
        let mut rng = rand::rng();
        let alice = Username::parse("alice").unwrap();
        let der = public_key_der(&key().to_public_key());
        let nonce = [1u8; CHALLENGE_LEN];
        let sig = key()
            .pss_sign_with_rng::<Sha256, _>(&mut rng, &nonce)
            .unwrap();
        assert_eq!(
            verify_login(&der, &alice, &nonce, &[0; CHANNEL_BINDING_LEN], &sig),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn rejects_bad_and_small_keys() {
        assert_eq!(
            parse_public_key(b"not a key").unwrap_err(),
            AuthError::InvalidKey
        );
        assert_eq!(parse_public_key(&[]).unwrap_err(), AuthError::InvalidKey);
        let small = PrivateKey::new(&mut rand::rng(), 1024).unwrap();
        assert_eq!(
            parse_public_key(&public_key_der(&small.to_public_key())).unwrap_err(),
            AuthError::KeySize(1024)
        );
        assert!(parse_public_key(&public_key_der(&key().to_public_key())).is_ok());
    }

    #[test]
    fn transcript_layout() {
        let t = login_transcript(
            &Username::parse("ab").unwrap(),
            b"k",
            &[9; CHALLENGE_LEN],
            &[5; CHANNEL_BINDING_LEN],
        );
        assert!(t.starts_with(LOGIN_CONTEXT));
        let rest = &t[LOGIN_CONTEXT.len()..];
        assert_eq!(&rest[..3], &[2, b'a', b'b']);
        assert_eq!(&rest[3..35], Sha256::digest(b"k").as_slice());
        assert_eq!(&rest[35..35 + CHALLENGE_LEN], &[9; CHALLENGE_LEN]);
        assert_eq!(&rest[35 + CHALLENGE_LEN..], &[5; CHANNEL_BINDING_LEN]);
    }
}
