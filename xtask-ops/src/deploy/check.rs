//! "Is it really serving?": open a TCP connection to the relay and complete the protocol's
//! opening exchange (our `Hello`, its `Hello` with version and limits).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;
use chat_protocol::frame::{self, HEADER_LEN};
use chat_protocol::{ClientMessage, DEFAULT_MAX_FRAME, PROTOCOL_VERSION, ServerMessage};

/// What the relay said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub version: u16,
    pub software: String,
}

/// Connects to `addr` and exchanges `Hello`s.
pub fn handshake(addr: &str, timeout: Duration) -> anyhow::Result<Answer> {
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
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
        } => Ok(Answer { version, software }),
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
        assert!(
            err.contains("does not speak the Secure Chat protocol"),
            "{err}"
        );
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
