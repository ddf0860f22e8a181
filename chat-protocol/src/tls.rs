//! The TLS layer (feature `tls`): TLS 1.3 only, with `rustls` and its `ring` provider, and
//! the relay authenticated by its key fingerprint ([`crate::relay_id`]) rather than by a
//! certificate authority. No sockets here: the relay and the client wrap their own streams
//! with these configurations (through `tokio-rustls`).
//!
//! - [`RelayIdentity`]: the relay's long-term ECDSA P-256 key and a self-signed
//!   certificate (made with `rcgen`), or an operator's PEM chain and key.
//! - [`PinVerifier`]: the client's certificate check: the leaf's SubjectPublicKeyInfo must
//!   hash to the expected fingerprint (or, on first use, is recorded), and the TLS 1.3
//!   handshake signature must verify under that key. Names, dates and issuers are not
//!   checked: the key is the identity. With nothing pinned it can also check the chain
//!   against certificate authorities (WebPKI, RFC 5280 path validation and RFC 6125 name
//!   checks), for operators whose relay has a certificate for its domain name.
//! - [`channel_binding`]: the RFC 9266 `tls-exporter` value a login proof is bound to.
//!
//! Why `ring`: it cross-builds with `cargo zigbuild` for glibc 2.28 (the deploy target)
//! from plain C and assembly, where `aws-lc-rs` needs CMake and a working cross toolchain.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::auth::{CHANNEL_BINDING_LEN, ChannelBinding, EXPORTER_LABEL};
use crate::relay_id::RelayFingerprint;

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the relay's key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error(
        "the private key does not belong to the first certificate of the chain: check that \
         the key and certificate files go together and that the chain lists the relay's own \
         certificate first"
    )]
    KeyMismatch,
    #[error("the relay certificate cannot be parsed: {0}")]
    Certificate(webpki::Error),
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("the trusted certificate authorities cannot be used: {0}")]
    Authorities(#[from] rustls::client::VerifierBuilderError),
}

/// The crypto provider every TLS configuration here uses (`ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The fingerprint of a certificate's key: SHA-256 of its SubjectPublicKeyInfo.
pub fn fingerprint_of(cert: &CertificateDer<'_>) -> Result<RelayFingerprint, TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(TlsError::Certificate)?;
    Ok(RelayFingerprint::of_spki(
        parsed.subject_public_key_info().as_ref(),
    ))
}

/// A relay's TLS identity: its certificate chain (leaf first), private key, and the
/// fingerprint clients pin.
#[derive(Debug)]
pub struct RelayIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: RelayFingerprint,
}

/// The name in self-signed relay certificates (clients do not check it).
pub const SELF_SIGNED_NAME: &str = "secure-chat-relay";

impl RelayIdentity {
    /// A new ECDSA P-256 key, as PKCS#8 PEM (randomness from `ring`'s system RNG).
    pub fn generate_key_pem() -> Result<String, TlsError> {
        Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_pem())
    }

    /// A self-signed certificate for the key in `key_pem` (valid from now for 100 years:
    /// the key, not the dates, is what clients check), as PEM.
    pub fn self_signed_pem(key_pem: &str) -> Result<String, TlsError> {
        let key = rcgen::KeyPair::from_pem(key_pem)?;
        let mut params = rcgen::CertificateParams::new(vec![SELF_SIGNED_NAME.to_owned()])?;
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2125, 1, 1);
        Ok(params.self_signed(&key)?.pem())
    }

    /// Reads a PEM certificate chain (leaf first) and its PEM private key.
    ///
    /// Errors: [`TlsError::Pem`] or [`TlsError::NoCertificate`] for unreadable files, and
    /// [`TlsError::KeyMismatch`] unless the key is the leaf's (a chain out of order, or a
    /// certificate of another relay), so the fingerprint is always the key's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let cert_chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "the certificate file",
                detail: e.to_string(),
            })?;
        let leaf = cert_chain.first().ok_or(TlsError::NoCertificate)?;
        let fingerprint = fingerprint_of(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "the key file",
            detail: e.to_string(),
        })?;
        let signing_key = provider().key_provider.load_private_key(key.clone_key())?;
        match signing_key.public_key() {
            Some(spki) if RelayFingerprint::of_spki(spki.as_ref()) != fingerprint => {
                return Err(TlsError::KeyMismatch);
            }
            _ => {}
        }
        Ok(Self {
            cert_chain,
            key,
            fingerprint,
        })
    }

    /// The relay's TLS configuration: TLS 1.3 only, no client certificates.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())?;
        // Sessions are short-lived and few per client; tickets would only cost memory.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// The client's check of the relay's certificate: by key fingerprint, not by CA.
#[derive(Debug)]
pub struct PinVerifier {
    expected: Option<RelayFingerprint>,
    presented: Mutex<Option<RelayFingerprint>>,
    /// With nothing pinned: the CA check, and whether the last chain passed it.
    authorities: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    certified: std::sync::atomic::AtomicBool,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// Accepts only a certificate whose key hashes to `expected`; with `None`, accepts any
    /// key and records it (trust on first use: the caller decides whether to pin it).
    pub fn new(expected: Option<RelayFingerprint>) -> Arc<Self> {
        Arc::new(Self {
            expected,
            presented: Mutex::new(None),
            authorities: None,
            certified: false.into(),
            provider: provider(),
        })
    }

    /// As [`Self::new`]; with `expected` `None`, the chain is also checked against `roots`
    /// for the server name the handshake was started with (WebPKI path validation, dates
    /// and name included), and [`Self::certified`] says whether it passed. The handshake
    /// goes ahead either way: the caller decides what an uncertified key means (trust on
    /// first use). A pinned fingerprint is never overruled by a CA. Fails if `roots` is
    /// empty.
    pub fn with_authorities(
        expected: Option<RelayFingerprint>,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Arc<Self>, TlsError> {
        let authorities =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()?;
        Ok(Arc::new(Self {
            expected,
            presented: Mutex::new(None),
            authorities: Some(authorities),
            certified: false.into(),
            provider: provider(),
        }))
    }

    /// Whether the last certificate chain, with nothing pinned, verified against the
    /// certificate authorities of [`Self::with_authorities`] for the server's name.
    pub fn certified(&self) -> bool {
        self.certified.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fingerprint the relay presented in the last handshake (also when refused).
    pub fn presented(&self) -> Option<RelayFingerprint> {
        *self.presented.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client configuration using this verifier: TLS 1.3 only.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// The message a fingerprint mismatch fails the handshake with.
pub const MISMATCH: &str = "relay key fingerprint mismatch";

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_of(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(presented);
        if let (None, Some(authorities)) = (self.expected, &self.authorities) {
            let certified = authorities
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .is_ok();
            self.certified
                .store(certified, std::sync::atomic::Ordering::Relaxed);
        }
        match self.expected {
            Some(expected) if expected != presented => Err(rustls::Error::General(MISMATCH.into())),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The channel binding of a TLS session (either side): RFC 9266's `tls-exporter`, 32
/// bytes exported with [`EXPORTER_LABEL`] and no context. Fails only before the handshake
/// is complete.
pub fn channel_binding<D>(
    conn: &rustls::ConnectionCommon<D>,
) -> Result<ChannelBinding, rustls::Error> {
    let mut out = [0u8; CHANNEL_BINDING_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
