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
