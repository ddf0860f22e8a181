//! Connecting to the relay: TCP, TLS 1.3 with the relay's key pinned, Hello, and
//! challenge-response login bound to the TLS session.

use std::sync::Arc;
use std::time::Duration;

use chat_protocol::codec::{CodecError, WireCodec};
use chat_protocol::identity::Identity;
use chat_protocol::relay_id::{RelayAddress, RelayFingerprint, RelayList};
use chat_protocol::tls::PinVerifier;
use chat_protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage, Username};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::codec::Framed;

/// Largest frame we accept from the server.
const MAX_INBOUND_FRAME: usize = 1024 * 1024;
/// Connect plus login must finish within this. Longer than a cluster relay's window for
/// writing the session (chat-server `cluster::LOGIN_WINDOW`, 10 s): when this client
/// gives up and tries another relay, the first one has stopped trying to write.
const LOGIN_DEADLINE: Duration = Duration::from_secs(15);

pub type Conn =
    Framed<tokio_rustls::client::TlsStream<TcpStream>, WireCodec<ServerMessage, ClientMessage>>;

/// A logged-in connection and what the relay said about itself.
pub struct Session {
    pub conn: Conn,
    /// The account was created by this login.
    pub registered: bool,
    /// Largest frame body the relay accepts.
    pub max_frame: usize,
    /// Seconds the relay keeps an undelivered envelope.
    pub queue_max_age_secs: u64,
    /// The relay's clock minus ours, in ms, when it said `Hello`.
    pub clock_offset_ms: i64,
    /// The relay's key fingerprint (checked against the pin, if there was one).
    pub fingerprint: RelayFingerprint,
    /// With nothing pinned: the relay's certificate chain verified against a trusted
    /// certificate authority for its host name (see [`authorities`]).
    pub certified: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Worth retrying: network trouble, server restarting or busy.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help; the user must act.
    #[error("{message}")]
    Fatal { code: String, message: String },
    /// The connection opened, but nothing at all came back within [`FIRST_ANSWER`]: a
    /// relay answers `Hello` at once, so this is probably another kind of server (one
    /// that waits for its client to speak first), or a relay that hangs.
    #[error("{0}")]
    Silent(String),
    /// The relay presented another key than the one pinned: a hard stop, never retried.
    #[error("the relay's key is {presented}, not the pinned {expected}")]
    KeyMismatch {
        expected: RelayFingerprint,
        presented: RelayFingerprint,
    },
    /// No key was pinned and the caller asked to confirm a new one first: nothing was
    /// sent over the connection.
    #[error("the relay's key {presented} is not pinned yet")]
    Unpinned { presented: RelayFingerprint },
}

/// What the client expects of the relay's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only this key.
    Pinned(RelayFingerprint),
    /// None pinned yet: go ahead with whatever key (trust on first use).
    FirstUse,
    /// None pinned yet: stop after the handshake with [`ConnectError::Unpinned`] so the
    /// user can compare the fingerprint first.
    AskFirst,
}

/// How long the first bytes of the relay's `Hello` may take after connecting.
pub const FIRST_ANSWER: Duration = Duration::from_secs(10);

impl From<CodecError> for ConnectError {
    fn from(e: CodecError) -> Self {
        Self::Transient(connection_lost(&e))
    }
}

/// What a broken connection means to the user: a relay that vanished (crashed, restarted,
/// killed) is said so, not in the TLS library's words.
pub fn connection_lost(e: &CodecError) -> String {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e {
        CodecError::Io(io) if io.kind() == UnexpectedEof => {
            "the relay dropped the connection without closing it (it may have stopped or \
             restarted)"
                .into()
        }
        CodecError::Io(io) if matches!(io.kind(), ConnectionReset | ConnectionAborted) => {
            "the connection to the relay was reset".into()
        }
        e => format!("connection error: {e}"),
    }
}

/// Checks the relay addresses given by the user: `HOST:PORT` or `HOST:PORT#FINGERPRINT`
/// (IPv6 as `[ADDR]:PORT`), port 1–65535, or several of one cluster separated by commas
/// (one fingerprint for all). The error says what was expected, with an example.
pub fn check_server_address(server: &str) -> Result<RelayList, String> {
    server.parse::<RelayList>().map_err(|e| e.to_string())
}

/// The certificate authorities that may vouch for a relay named without a fingerprint
/// and not pinned yet: the system's trust store (`rustls-native-certs`) and the PEM
/// certificates in `extra` (a private CA). `Ok(None)` when there are none. Errors name
/// the file that could not be used.
pub fn authorities(
    extra: Option<&std::path::Path>,
) -> Result<Option<Arc<tokio_rustls::rustls::RootCertStore>>, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    if !system.errors.is_empty() {
        tracing::debug!(
            "some system certificates could not be read: {:?}",
            system.errors
        );
    }
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("a certificate in {} is not usable: {e}", path.display()))?;
        }
    }
    Ok((!roots.is_empty()).then(|| Arc::new(roots)))
}

/// Connects to `server` over TLS (its key as `expect` says; with nothing pinned, a chain
/// from one of `authorities` for the host name makes the session `certified`) and logs in
/// as `user`, registering the name on first use.
pub async fn connect(
    server: &RelayAddress,
    expect: Expect,
    authorities: Option<&Arc<tokio_rustls::rustls::RootCertStore>>,
    user: &Username,
    identity: &Identity,
) -> Result<Session, ConnectError> {
    match tokio::time::timeout(
        LOGIN_DEADLINE,
        connect_inner(server, expect, authorities, user, identity),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Transient(format!(
            "{} did not complete login within {LOGIN_DEADLINE:?}",
            server.host_port
        ))),
    }
}

/// What a TLS handshake with the relay gave.
struct Handshake {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The key the relay presented.
    fingerprint: RelayFingerprint,
    /// Its chain verified against one of the authorities (nothing pinned).
    certified: bool,
}

/// TCP, then the TLS handshake with the relay's key checked.
/// Whether a failed handshake shows a peer that does not speak TLS 1.3 at all (a plaintext
/// relay of an older version, an HTTP or SSH server): its first bytes are no TLS record, or
/// it offered only versions or suites we refuse. A TLS peer whose handshake was damaged on
/// the path fails later, to decrypt or verify, and is not this.
fn speaks_no_tls(e: &std::io::Error) -> bool {
    use tokio_rustls::rustls::{Error, InvalidMessage};
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()),
        Some(
            Error::InvalidMessage(
                InvalidMessage::InvalidContentType
                    | InvalidMessage::UnknownProtocolVersion
                    | InvalidMessage::MessageTooLarge,
            ) | Error::PeerIncompatible(_)
        )
    )
}

async fn tls_connect(
    server: &RelayAddress,
    expect: Expect,
    authorities: Option<&Arc<tokio_rustls::rustls::RootCertStore>>,
) -> Result<Handshake, ConnectError> {
    let addr = &server.host_port;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::Transient(format!("cannot reach the server at {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let expected = match expect {
        Expect::Pinned(fp) => Some(fp),
        Expect::FirstUse | Expect::AskFirst => None,
    };
    let internal = |e: chat_protocol::tls::TlsError| ConnectError::Fatal {
        code: "internal".into(),
        message: e.to_string(),
    };
    let verifier = match (expected, authorities) {
        (None, Some(roots)) => {
            PinVerifier::with_authorities(None, roots.clone()).map_err(internal)?
        }
        _ => PinVerifier::new(expected),
    };
    let config = verifier.client_config().map_err(internal)?;
    // The name is sent as SNI; with a pinned key the key, not the name, is what is
    // checked, else an authority's certificate must name it.
    let name = ServerName::try_from(server.host().to_owned())
        .unwrap_or_else(|_| ServerName::try_from("secure-chat-relay").expect("a valid name"));
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    let tls = match tokio::time::timeout(FIRST_ANSWER, handshake).await {
        Err(_) => {
            return Err(ConnectError::Silent(format!(
                "{addr} accepted the connection but did not complete a TLS handshake in {} s",
                FIRST_ANSWER.as_secs()
            )));
        }
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let (Some(expected), Some(presented)) = (expected, verifier.presented())
                && expected != presented
            {
                return Err(ConnectError::KeyMismatch {
                    expected,
                    presented,
                });
            }
            return Err(if speaks_no_tls(&e) {
                ConnectError::Fatal {
                    code: "not_a_relay".into(),
                    message: format!(
                        "{addr} answered, but not with TLS 1.3 as a Secure Chat relay does \
                         ({e}). Check the address and port (the relay's default port is \
                         65432); a relay older than protocol {PROTOCOL_VERSION} must be updated"
                    ),
                }
            } else {
                // Anything else, a handshake damaged on the path included (it fails to
                // decrypt), is retried like a dropped connection.
                ConnectError::Transient(format!("TLS with {addr} failed: {e}"))
            });
        }
    };
    let presented = verifier
        .presented()
        .expect("a completed handshake checked a certificate");
    let certified = verifier.certified();
    if expect == Expect::AskFirst && !certified {
        return Err(ConnectError::Unpinned { presented });
    }
    Ok(Handshake {
        stream: tls,
        fingerprint: presented,
        certified,
    })
}

async fn connect_inner(
    server: &RelayAddress,
    expect: Expect,
    authorities: Option<&Arc<tokio_rustls::rustls::RootCertStore>>,
    user: &Username,
    identity: &Identity,
) -> Result<Session, ConnectError> {
    let server_name = &server.host_port;
    let Handshake {
        stream,
        fingerprint,
        certified,
    } = tls_connect(server, expect, authorities).await?;
    let channel = chat_protocol::tls::channel_binding(stream.get_ref().1).map_err(|e| {
        ConnectError::Transient(format!("the TLS session has no channel binding: {e}"))
    })?;
    let server = server_name;
    let mut conn = Framed::new(stream, WireCodec::new(MAX_INBOUND_FRAME));

    conn.send(ClientMessage::Hello {
        version: PROTOCOL_VERSION,
        software: concat!("chat-client/", env!("CARGO_PKG_VERSION")).into(),
    })
    .await?;
    // What answers first tells whether this is a chat relay at all (a relay's first frame
    // is its Hello): anything that is not one of our frames (an HTTP or SSH server, a
    // different program) will not become one by retrying.
    let first = match tokio::time::timeout(FIRST_ANSWER, conn.next()).await {
        Err(_) if conn.read_buffer().is_empty() => {
            return Err(ConnectError::Silent(format!(
                "{server} accepted the connection but sent nothing for {} s",
                FIRST_ANSWER.as_secs()
            )));
        }
        Err(_) => {
            return Err(ConnectError::Transient(format!(
                "{server} began but did not finish its greeting"
            )));
        }
        Ok(Some(Ok(msg))) => msg,
        Ok(Some(Err(CodecError::Frame(e)))) => {
            return Err(ConnectError::Fatal {
                code: "not_a_relay".into(),
                message: format!(
                    "{server} answered, but not as a Secure Chat relay ({e}). Check the address \
                     and port (the relay's default port is 65432)"
                ),
            });
        }
        Ok(Some(Err(e))) => return Err(e.into()),
        Ok(None) => {
            return Err(ConnectError::Transient(
                "the server closed the connection".into(),
            ));
        }
    };
    let (max_frame, queue_max_age_secs, clock_offset_ms) = match first {
        ServerMessage::Hello {
            max_frame,
            queue_max_age_secs,
            server_time_secs,
            ..
        } => {
            let ours = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let offset = (server_time_secs as i64).saturating_mul(1000) - ours;
            (max_frame as usize, queue_max_age_secs, offset)
        }
        other => return Err(unexpected(other)),
    };
    conn.send(ClientMessage::Register {
        id: 1,
        username: user.to_string(),
        public_key: identity.public().der().to_vec(),
    })
    .await?;
    let nonce = match next(&mut conn).await? {
        ServerMessage::Challenge { nonce, .. } => nonce,
        other => return Err(unexpected(other)),
    };
    let signature = identity
        .sign_login(&mut rand::rng(), user, &nonce, &channel)
        .map_err(|e| ConnectError::Fatal {
            code: "internal".into(),
            message: e.to_string(),
        })?;
    conn.send(ClientMessage::Prove { id: 2, signature }).await?;
    match next(&mut conn).await? {
        ServerMessage::Welcome { registered, .. } => Ok(Session {
            conn,
            registered,
            max_frame,
            queue_max_age_secs,
            clock_offset_ms,
            fingerprint,
            certified,
        }),
        other => Err(unexpected(other)),
    }
}

/// The next login-relevant message; presence and pings during login are handled here.
async fn next(conn: &mut Conn) -> Result<ServerMessage, ConnectError> {
    loop {
        match conn.next().await {
            None => {
                return Err(ConnectError::Transient(
                    "the server closed the connection".into(),
                ));
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(ServerMessage::Presence { .. })) => continue,
            Some(Ok(ServerMessage::Ping { nonce })) => {
                conn.send(ClientMessage::Pong { nonce }).await?
            }
            Some(Ok(msg)) => return Ok(msg),
        }
    }
}

fn unexpected(msg: ServerMessage) -> ConnectError {
    let ServerMessage::Error { code, message, .. } = msg else {
        return ConnectError::Transient(format!("unexpected reply during login: {msg:?}"));
    };
    let fatal = |hint: &str| ConnectError::Fatal {
        code: code.as_str().into(),
        message: format!("{message}. {hint}"),
    };
    match code {
        ErrorCode::UsernameTaken => fatal(
            "If the name is yours, start the client with the --home folder you created it with.",
        ),
        ErrorCode::InvalidUsername => fatal("Use 1-32 letters, digits, '_', '-' or '.'."),
        ErrorCode::UnsupportedVersion => fatal("Update chat-client."),
        ErrorCode::BadSignature | ErrorCode::InvalidPublicKey => {
            fatal("The identity key was refused; check the home directory.")
        }
        _ => ConnectError::Transient(format!("the server refused the login ({code}): {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::check_server_address;

    #[test]
    fn relay_addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:65432",
            "chat.example.org:1",
            "[::1]:65432",
            "localhost:80",
            "a.example:1,b.example:2",
        ] {
            assert!(check_server_address(good).is_ok(), "{good}");
        }
        for bad in [
            "65432",
            ":65432",
            "host:",
            "host:0",
            "host:70000",
            "::1:65432",
            "a b:1",
            "[::1:5",
        ] {
            let err = check_server_address(bad).unwrap_err();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }
}
