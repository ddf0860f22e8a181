//! Long-term identities: an RSA key pair, its fingerprint, and its storage as PKCS#8 PEM
//! (optionally encrypted with a passphrase: PBES2, scrypt + AES-256-CBC).

use hkdf::Hkdf;
use rand::CryptoRng;
use rsa::pkcs8::der::pem::PemLabel;
use rsa::pkcs8::pkcs5::{pbes2, scrypt};
use rsa::pkcs8::{
    DecodePrivateKey, EncodePrivateKey, EncryptedPrivateKeyInfoRef, LineEnding, PrivateKeyInfoRef,
    SecretDocument,
};
use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::auth;

/// Size of a newly generated identity key.
pub const IDENTITY_BITS: usize = 3072;

/// scrypt cost of a newly encrypted key file: N = 2^17, r = 8, p = 1 (RFC 7914; the
/// `scrypt` crate's and OWASP's current recommendation: ~128 MiB and a few hundred ms).
/// Files written with other parameters still open: they are read from the file.
pub const SCRYPT_LOG_N: u8 = 17;
pub const SCRYPT_R: u32 = 8;
pub const SCRYPT_P: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("generating the identity key failed")]
    Generate,
    #[error("the identity key file is encrypted; a passphrase is needed")]
    PassphraseRequired,
    #[error("wrong passphrase for the identity key (or the key file is damaged)")]
    WrongPassphrase,
    #[error("the identity key file is not a valid PKCS#8 RSA private key: it is damaged")]
    Corrupt,
    #[error("the identity key has an unsupported size: {0}")]
    UnsupportedKey(#[from] auth::AuthError),
    #[error("encoding the identity key failed")]
    Encode,
}

/// SHA-256 of a public key's SPKI DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_der(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// Lowercase hex in groups of four, for people to read.
    pub fn to_hex(&self) -> String {
        let hex: Vec<String> = self.0.iter().map(|b| format!("{b:02x}")).collect();
        hex.chunks(2)
            .map(|pair| pair.concat())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Someone's public identity key as seen on the wire (SPKI DER), parsed and fingerprinted.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicIdentity {
    key: PublicKey,
    der: Vec<u8>,
    fingerprint: Fingerprint,
}

impl PublicIdentity {
    /// Parses an SPKI DER key, enforcing the accepted RSA sizes.
    pub fn from_der(der: &[u8]) -> Result<Self, auth::AuthError> {
        let key = auth::parse_public_key(der)?;
        Ok(Self {
            key,
            der: der.to_vec(),
            fingerprint: Fingerprint::of_der(der),
        })
    }

    pub fn key(&self) -> &PublicKey {
        &self.key
    }
    pub fn der(&self) -> &[u8] {
        &self.der
    }
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl std::fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PublicIdentity")
            .field(&self.fingerprint)
            .finish()
    }
}

/// Our own identity: the private key (zeroized on drop by `rsa`) and its public half.
#[derive(Clone)]
pub struct Identity {
    private: PrivateKey,
    public: PublicIdentity,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("fingerprint", &self.public.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a new RSA-3072 identity. Takes about a second; run it off the UI thread.
    pub fn generate(rng: &mut impl CryptoRng) -> Result<Self, IdentityError> {
        Self::generate_with_bits(rng, IDENTITY_BITS)
    }

    /// As [`generate`](Self::generate) with another size (tests use 2048 for speed).
    pub fn generate_with_bits(
        rng: &mut impl CryptoRng,
        bits: usize,
    ) -> Result<Self, IdentityError> {
        let private = PrivateKey::new(rng, bits).map_err(|_| IdentityError::Generate)?;
        Self::from_private(private)
    }

    pub fn from_private(private: PrivateKey) -> Result<Self, IdentityError> {
        let der = auth::public_key_der(&private.to_public_key());
        let public = PublicIdentity::from_der(&der)?;
        Ok(Self { private, public })
    }

    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.public.fingerprint
    }

    pub(crate) fn private_key(&self) -> &PrivateKey {
        &self.private
    }

    /// A 256-bit key for `context`, derived with HKDF-SHA256 (RFC 5869) from this
    /// identity's private key (PKCS#8 DER as input keying material). The client encrypts
    /// its local store at rest under it: whoever can read the identity can read the store,
    /// and nobody else. Deterministic: the same identity and context give the same key.
    pub fn derive_key(&self, context: &[u8]) -> Zeroizing<[u8; 32]> {
        let der = self
            .private
            .to_pkcs8_der()
            .expect("encoding an in-memory RSA private key cannot fail");
        let hkdf = Hkdf::<Sha256>::new(Some(b"secure-chat/v2/derive-key"), der.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf.expand(context, key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }

    /// Signs a server login challenge (see [`auth`]).
    pub fn sign_login(
        &self,
        rng: &mut impl CryptoRng,
        username: &crate::Username,
        nonce: &[u8; crate::message::CHALLENGE_LEN],
        channel: &auth::ChannelBinding,
    ) -> Result<Vec<u8>, auth::AuthError> {
        auth::sign_login(&self.private, rng, username, nonce, channel)
    }

    /// PKCS#8 PEM; encrypted under `passphrase` when one is given.
    pub fn to_pem(
        &self,
        passphrase: Option<&str>,
        rng: &mut impl CryptoRng,
    ) -> Result<Zeroizing<String>, IdentityError> {
        let der = self
            .private
            .to_pkcs8_der()
            .map_err(|_| IdentityError::Encode)?;
        let Some(passphrase) = passphrase else {
            return der
                .to_pem(PrivateKeyInfoRef::PEM_LABEL, LineEnding::LF)
                .map_err(|_| IdentityError::Encode);
        };
        let info =
            PrivateKeyInfoRef::try_from(der.as_bytes()).map_err(|_| IdentityError::Encode)?;
        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut iv);
        let cost = scrypt::Params::new(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
            .map_err(|_| IdentityError::Encode)?;
        let params = pbes2::Parameters::generate_scrypt_aes256cbc(cost, &salt, iv)
            .map_err(|_| IdentityError::Encode)?;
        info.encrypt_with_params(params, passphrase.as_bytes())
            .map_err(|_| IdentityError::Encode)?
            .to_pem(EncryptedPrivateKeyInfoRef::PEM_LABEL, LineEnding::LF)
            .map_err(|_| IdentityError::Encode)
    }

    /// Reads a PEM written by [`to_pem`](Self::to_pem). A wrong or missing passphrase and a
    /// damaged file are distinct errors; none of them panics.
    pub fn from_pem(pem: &str, passphrase: Option<&str>) -> Result<Self, IdentityError> {
        let (label, doc) = SecretDocument::from_pem(pem).map_err(|_| IdentityError::Corrupt)?;
        let private = if label == EncryptedPrivateKeyInfoRef::PEM_LABEL {
            let passphrase = passphrase.ok_or(IdentityError::PassphraseRequired)?;
            let info = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes())
                .map_err(|_| IdentityError::Corrupt)?;
            let der = info
                .decrypt(passphrase.as_bytes())
                .map_err(|_| IdentityError::WrongPassphrase)?;
            // A wrong passphrase can pass the padding check by chance and yield garbage.
            PrivateKey::from_pkcs8_der(der.as_bytes())
                .map_err(|_| IdentityError::WrongPassphrase)?
        } else if label == PrivateKeyInfoRef::PEM_LABEL {
            PrivateKey::from_pkcs8_der(doc.as_bytes()).map_err(|_| IdentityError::Corrupt)?
        } else {
            return Err(IdentityError::Corrupt);
        };
        Self::from_private(private)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// Two 2048-bit identities shared by the tests of this crate.
    pub(crate) fn pair() -> &'static (Identity, Identity) {
        static PAIR: OnceLock<(Identity, Identity)> = OnceLock::new();
        PAIR.get_or_init(|| {
            let mut rng = rand::rng();
            (
                Identity::generate_with_bits(&mut rng, 2048).unwrap(),
                Identity::generate_with_bits(&mut rng, 2048).unwrap(),
            )
        })
    }

    #[test]
    fn pem_round_trip_plain_and_encrypted() {
        let (alice, _) = pair();
        let mut rng = rand::rng();
        let plain = alice.to_pem(None, &mut rng).unwrap();
        assert!(plain.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = Identity::from_pem(&plain, None).unwrap();
        assert_eq!(back.fingerprint(), alice.fingerprint());
        // A passphrase given for a plain file is simply not needed.
        assert!(Identity::from_pem(&plain, Some("x")).is_ok());

        let enc = alice.to_pem(Some("correct horse"), &mut rng).unwrap();
        assert!(enc.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        assert_eq!(
            Identity::from_pem(&enc, Some("correct horse"))
                .unwrap()
                .fingerprint(),
            alice.fingerprint()
        );
        assert_eq!(
            Identity::from_pem(&enc, Some("wrong")).unwrap_err(),
            IdentityError::WrongPassphrase
        );
        assert_eq!(
            Identity::from_pem(&enc, None).unwrap_err(),
            IdentityError::PassphraseRequired
        );
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let (alice, _) = pair();
        let mut rng = rand::rng();
        let plain = alice.to_pem(None, &mut rng).unwrap();
        let enc = alice.to_pem(Some("pw"), &mut rng).unwrap();
        assert_eq!(
            Identity::from_pem("", None).unwrap_err(),
            IdentityError::Corrupt
        );
        assert_eq!(
            Identity::from_pem("hello", None).unwrap_err(),
            IdentityError::Corrupt
        );
        let truncated = &plain[..plain.len() / 2];
        assert_eq!(
            Identity::from_pem(truncated, None).unwrap_err(),
            IdentityError::Corrupt
        );
        let truncated = &enc[..enc.len() / 2];
        assert_eq!(
            Identity::from_pem(truncated, Some("pw")).unwrap_err(),
            IdentityError::Corrupt
        );
        // Flip characters in the base64 body: an error of some kind, never a panic or a
        // silently different key.
        for at in (40..plain.len() - 40).step_by(97) {
            let mut bytes = plain.as_bytes().to_vec();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let text = String::from_utf8(bytes).unwrap();
            if let Ok(id) = Identity::from_pem(&text, None) {
                assert_eq!(id.fingerprint(), alice.fingerprint());
            }
        }
    }

    #[test]
    fn new_key_files_use_the_current_scrypt_cost() {
        let (alice, _) = pair();
        let enc = alice.to_pem(Some("pw"), &mut rand::rng()).unwrap();
        let (_, doc) = SecretDocument::from_pem(&enc).unwrap();
        let info = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes()).unwrap();
        let rsa::pkcs8::pkcs5::EncryptionScheme::Pbes2(params) = &info.encryption_algorithm else {
            panic!("not PBES2")
        };
        let kdf = params.kdf.scrypt().expect("scrypt");
        assert_eq!(kdf.cost_parameter, 1 << 17);
        assert_eq!((kdf.block_size, kdf.parallelization), (8, 1));
    }

    #[test]
    fn derived_keys_are_stable_per_identity_and_context() {
        let (alice, bob) = pair();
        let a1 = alice.derive_key(b"store");
        assert_eq!(*a1, *alice.derive_key(b"store"));
        assert_ne!(*a1, *alice.derive_key(b"other"));
        assert_ne!(*a1, *bob.derive_key(b"store"));
        let reloaded = Identity::from_pem(&alice.to_pem(None, &mut rand::rng()).unwrap(), None);
        assert_eq!(*a1, *reloaded.unwrap().derive_key(b"store"));
    }

    #[test]
    fn debug_never_prints_key_material() {
        let (alice, _) = pair();
        let shown = format!("{alice:?}");
        assert!(shown.contains("fingerprint"));
        assert!(shown.len() < 200, "{shown}");
    }
}
