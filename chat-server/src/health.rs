//! `chat-server admin health`: whether a relay is serving, asked the way a client asks
//! (TCP, TLS 1.3, `Hello`), so the answer covers everything a client depends on: the
//! listener, the TLS identity and, with the cluster backend, NATS (a relay that lost NATS
//! refuses with `server_busy`).

use std::net::SocketAddr;
use std::time::Duration;

use chat_protocol::codec::WireCodec;
use chat_protocol::relay_id::RelayFingerprint;
use chat_protocol::{ClientMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// What a relay answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It completed the TLS handshake and answered `Hello`.
    Serving {
        /// The relay's software string (from its `Hello`).
        software: String,
        /// The fingerprint of the key it presented.
        fingerprint: RelayFingerprint,
    },
    /// It did not: why, in words for an operator.
    NotServing(String),
}

/// Largest frame accepted from the relay during the probe (a `Hello` or an error).
const PROBE_MAX_FRAME: usize = 64 * 1024;

/// Connects to `addr`, completes TLS (any key: the probe sends nothing secret, and reports
/// the key's fingerprint) and says `Hello`. Each step gets `patience`.
pub async fn probe(addr: SocketAddr, patience: Duration) -> Health {
    match tokio::time::timeout(patience * 3, exchange(addr, patience)).await {
        Ok(Ok(health)) => health,
        Ok(Err(reason)) => Health::NotServing(reason),
        Err(_) => Health::NotServing(format!("{addr} did not answer within {patience:?}")),
    }
}

async fn exchange(addr: SocketAddr, patience: Duration) -> Result<Health, String> {
    let stream = tokio::time::timeout(patience, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no TCP connection to {addr} within {patience:?}"))?
        .map_err(|e| format!("cannot connect to {addr} ({e}): is the relay running there?"))?;
    let verifier = chat_protocol::tls::PinVerifier::new(None);
    let config = verifier
        .client_config()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("relay.invalid")
        .map_err(|e| e.to_string())?
        .to_owned();
    let tls = tokio::time::timeout(
        patience,
        tokio_rustls::TlsConnector::from(config).connect(name, stream),
    )
    .await
    .map_err(|_| format!("{addr} did not complete the TLS handshake within {patience:?}"))?
    .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
    let fingerprint = verifier
        .presented()
        .ok_or_else(|| format!("{addr} presented no key"))?;
    let mut framed = Framed::new(
        tls,
        WireCodec::<ServerMessage, ClientMessage>::new(PROBE_MAX_FRAME),
    );
    framed
        .send(ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            software: format!("chat-server admin health {}", env!("CARGO_PKG_VERSION")),
        })
        .await
        .map_err(|e| format!("cannot say Hello to {addr}: {e}"))?;
    let answer = tokio::time::timeout(patience, framed.next())
        .await
        .map_err(|_| format!("{addr} did not answer Hello within {patience:?}"))?;
    Ok(match answer {
        Some(Ok(ServerMessage::Hello { software, .. })) => Health::Serving {
            software,
            fingerprint,
        },
        Some(Ok(ServerMessage::Error { code, message, .. })) => {
            Health::NotServing(format!("{addr} refused ({code}): {message}"))
        }
        Some(Ok(other)) => Health::NotServing(format!("{addr} answered {other:?} to Hello")),
        Some(Err(e)) => Health::NotServing(format!("{addr} sent something unreadable: {e}")),
        None => Health::NotServing(format!("{addr} closed the connection without a word")),
    })
}
