use rustls::{ClientConnection, ServerConnection};

use super::*;

fn identity() -> RelayIdentity {
    let key = RelayIdentity::generate_key_pem().unwrap();
    let cert = RelayIdentity::self_signed_pem(&key).unwrap();
    RelayIdentity::from_pem(&cert, &key).unwrap()
}

/// Runs a TLS handshake in memory (no sockets), pumping records both ways.
fn handshake(
    relay: &RelayIdentity,
    verifier: &Arc<PinVerifier>,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let name = ServerName::try_from("relay.test").unwrap();
    let mut client = ClientConnection::new(verifier.client_config().unwrap(), name)?;
    let mut server = ServerConnection::new(relay.server_config().unwrap())?;
    for _ in 0..10 {
        let mut records = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut records).unwrap();
        }
        server.read_tls(&mut records.as_slice()).unwrap();
        server.process_new_packets()?;
        let mut records = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut records).unwrap();
        }
        client.read_tls(&mut records.as_slice()).unwrap();
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn a_pinned_relay_connects_over_tls_1_3_with_one_channel_binding() {
    let relay = identity();
    let verifier = PinVerifier::new(Some(relay.fingerprint));
    let (client, server) = handshake(&relay, &verifier).unwrap();
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(verifier.presented(), Some(relay.fingerprint));
    let (a, b) = (
        channel_binding(&client).unwrap(),
        channel_binding(&server).unwrap(),
    );
    assert_eq!(a, b, "both ends export the same binding");
    // Another session to the same relay has another binding.
    let (again, _) = handshake(&relay, &verifier).unwrap();
    assert_ne!(channel_binding(&again).unwrap(), a);
}

#[test]
fn another_key_is_refused_and_named() {
    let relay = identity();
    let impostor = identity();
    let verifier = PinVerifier::new(Some(relay.fingerprint));
    let err = handshake(&impostor, &verifier).unwrap_err();
    assert!(err.to_string().contains(MISMATCH), "{err}");
    assert_eq!(verifier.presented(), Some(impostor.fingerprint));
}

#[test]
fn first_use_accepts_and_records_the_key() {
    let relay = identity();
    let verifier = PinVerifier::new(None);
    handshake(&relay, &verifier).unwrap();
    assert_eq!(verifier.presented(), Some(relay.fingerprint));
}

/// The fingerprint is the key's: a certificate renewed under the same key keeps it.
#[test]
fn a_renewed_certificate_keeps_the_fingerprint() {
    let key = RelayIdentity::generate_key_pem().unwrap();
    let first =
        RelayIdentity::from_pem(&RelayIdentity::self_signed_pem(&key).unwrap(), &key).unwrap();
    let renewed =
        RelayIdentity::from_pem(&RelayIdentity::self_signed_pem(&key).unwrap(), &key).unwrap();
    assert_ne!(first.cert_chain[0], renewed.cert_chain[0]);
    assert_eq!(first.fingerprint, renewed.fingerprint);
    let other = identity();
    assert_ne!(first.fingerprint, other.fingerprint);
}

#[test]
fn bad_pem_is_a_clear_error() {
    let key = RelayIdentity::generate_key_pem().unwrap();
    let err = RelayIdentity::from_pem("not pem", &key).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate), "{err}");
    let cert = RelayIdentity::self_signed_pem(&key).unwrap();
    let err = RelayIdentity::from_pem(&cert, "junk").unwrap_err();
    assert!(err.to_string().contains("key file"), "{err}");
}

/// A private certificate authority and a relay identity it issued for `name` (the chain
/// leaf first, then the CA), as an operator's PEM files would hold them.
fn ca_and_relay(name: &str) -> (Arc<rustls::RootCertStore>, RelayIdentity) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
    let chain = format!("{}{}", leaf.pem(), ca.pem());
    let identity = RelayIdentity::from_pem(&chain, &leaf_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    (Arc::new(roots), identity)
}

#[test]
fn a_chain_from_a_trusted_authority_for_the_name_is_certified() {
    let (roots, relay) = ca_and_relay("relay.test");
    let verifier = PinVerifier::with_authorities(None, roots).unwrap();
    handshake(&relay, &verifier).unwrap();
    assert!(verifier.certified());
    assert_eq!(verifier.presented(), Some(relay.fingerprint));
}

#[test]
fn another_name_an_unknown_authority_or_a_self_signed_key_is_not_certified() {
    // Issued by a trusted CA, but for another name than the one connected to.
    let (roots, other_name) = ca_and_relay("other.test");
    let verifier = PinVerifier::with_authorities(None, roots.clone()).unwrap();
    handshake(&other_name, &verifier).expect("the handshake itself completes");
    assert!(!verifier.certified());
    // The right name, but a CA the client does not trust.
    let (_, untrusted) = ca_and_relay("relay.test");
    let verifier = PinVerifier::with_authorities(None, roots.clone()).unwrap();
    handshake(&untrusted, &verifier).unwrap();
    assert!(!verifier.certified());
    // The relay's own self-signed identity.
    let verifier = PinVerifier::with_authorities(None, roots).unwrap();
    handshake(&identity(), &verifier).unwrap();
    assert!(!verifier.certified());
    assert!(
        PinVerifier::with_authorities(None, Arc::new(rustls::RootCertStore::empty())).is_err(),
        "no authorities at all is a configuration error"
    );
}

#[test]
fn a_pin_is_never_overruled_by_an_authority() {
    let (roots, relay) = ca_and_relay("relay.test");
    // The CA vouches for the relay, but another key is pinned: refused.
    let pinned_elsewhere = identity().fingerprint;
    let verifier = PinVerifier::with_authorities(Some(pinned_elsewhere), roots.clone()).unwrap();
    let err = handshake(&relay, &verifier).unwrap_err();
    assert!(err.to_string().contains(MISMATCH), "{err}");
    assert!(!verifier.certified());
    // Pinned to the right key: accepted by the pin, the CA not consulted.
    let verifier = PinVerifier::with_authorities(Some(relay.fingerprint), roots).unwrap();
    handshake(&relay, &verifier).unwrap();
    assert!(!verifier.certified());
}

#[test]
fn a_key_that_is_not_the_leafs_is_refused() {
    let key = RelayIdentity::generate_key_pem().unwrap();
    let other_key = RelayIdentity::generate_key_pem().unwrap();
    let other_cert = RelayIdentity::self_signed_pem(&other_key).unwrap();
    // Another relay's certificate with our key.
    assert!(matches!(
        RelayIdentity::from_pem(&other_cert, &key),
        Err(TlsError::KeyMismatch)
    ));
    // A chain in the wrong order: the authority first.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["relay.test".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let reversed = format!("{}{}", ca.pem(), leaf.pem());
    let err = RelayIdentity::from_pem(&reversed, &leaf_key.serialize_pem()).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch), "{err}");
    assert!(err.to_string().contains("first"), "{err}");
    let ordered = format!("{}{}", leaf.pem(), ca.pem());
    RelayIdentity::from_pem(&ordered, &leaf_key.serialize_pem()).unwrap();
}
