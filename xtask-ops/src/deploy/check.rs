//! "Is it really serving?": open a TLS connection to the relay (checking its key against
//! the fingerprint, when one is given) and complete the protocol's opening exchange (our
//! `Hello`, its `Hello` with version and limits).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;
use chat_protocol::frame::{self, HEADER_LEN};
use chat_protocol::relay_id::{RelayAddress, RelayFingerprint};
use chat_protocol::tls::PinVerifier;
use chat_protocol::{ClientMessage, DEFAULT_MAX_FRAME, PROTOCOL_VERSION, ServerMessage};

/// What the relay said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub version: u16,
    pub software: String,
    /// The key the relay presented (equal to the address's fingerprint, if it had one).
    pub fingerprint: RelayFingerprint,
}

/// Connects to `addr` (`HOST:PORT` or `HOST:PORT#FINGERPRINT`) over TLS and exchanges
/// `Hello`s. With a fingerprint, another key is an error naming both.
pub fn handshake(addr: &str, timeout: Duration) -> anyhow::Result<Answer> {
    let address: RelayAddress = addr.parse()?;
    let addr = address.host_port.as_str();
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let tcp = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let verifier = PinVerifier::new(address.fingerprint);
    let name = rustls::pki_types::ServerName::try_from(address.host().to_owned())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::try_from("relay").expect("valid"));
    let conn = rustls::ClientConnection::new(verifier.client_config()?, name)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            if let (Some(expected), Some(presented)) = (address.fingerprint, verifier.presented())
                && expected != presented
            {
                anyhow::bail!(
                    "{addr} presented the key {presented}, not the expected {expected}: \
                     another server, or the relay's identity changed"
                );
            }
            return Err(e).with_context(|| {
                format!("{addr} does not speak TLS 1.3 as a Secure Chat relay does")
            });
        }
    }
    let fingerprint = verifier
        .presented()
        .context("the handshake checked no certificate")?;
    let hello = ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        software: format!("xtask-deploy-check/{}", env!("CARGO_PKG_VERSION")),
    };
    stream.write_all(&frame::encode(&hello, DEFAULT_MAX_FRAME)?)?;
    let mut header = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut header)
        .with_context(|| format!("{addr} accepted the connection but sent no frame"))?;
    let frame::Check::Incomplete {
        needed: Some(total),
    } = frame::check(&header, DEFAULT_MAX_FRAME)?
    else {
        anyhow::bail!("{addr} sent an empty frame; is that a Secure Chat relay?");
    };
    let mut body = vec![0u8; total - HEADER_LEN];
    stream.read_exact(&mut body)?;
    match frame::decode::<ServerMessage>(&body)
        .with_context(|| format!("{addr} does not speak the Secure Chat protocol"))?
    {
        ServerMessage::Hello {
            version, software, ..
        } => Ok(Answer {
            version,
            software,
            fingerprint,
        }),
        ServerMessage::Error { code, message, .. } => {
            anyhow::bail!("{addr} refused the handshake: {code:?}: {message}")
        }
        other => anyhow::bail!("{addr} answered Hello with {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn something_that_is_not_a_relay_is_named_as_such() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(b"\x00\x00\x00\x05HTTP/");
        });
        let err = format!(
            "{:#}",
            handshake(&addr, Duration::from_secs(5)).unwrap_err()
        );
        assert!(err.contains("does not speak TLS 1.3"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let err = format!(
            "{:#}",
            handshake(&addr, Duration::from_secs(5)).unwrap_err()
        );
        assert!(err.contains("cannot connect"), "{err}");
    }
}
