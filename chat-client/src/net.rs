//! Connecting to the relay: TCP, Hello, and challenge-response login.

use std::time::Duration;

use chat_protocol::codec::{CodecError, WireCodec};
use chat_protocol::identity::Identity;
use chat_protocol::{ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage, Username};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// Largest frame we accept from the server.
const MAX_INBOUND_FRAME: usize = 1024 * 1024;
/// Connect plus login must finish within this.
const LOGIN_DEADLINE: Duration = Duration::from_secs(15);

pub type Conn = Framed<TcpStream, WireCodec<ServerMessage, ClientMessage>>;

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
}

/// How long the first bytes of the relay's `Hello` may take after connecting.
pub const FIRST_ANSWER: Duration = Duration::from_secs(10);

impl From<CodecError> for ConnectError {
    fn from(e: CodecError) -> Self {
        Self::Transient(format!("connection error: {e}"))
    }
}

/// Checks a relay address given by the user: `HOST:PORT` (IPv6 as `[ADDR]:PORT`), port
/// 1–65535. The error says what was expected, with an example.
pub fn check_server_address(server: &str) -> Result<(), String> {
    let example = "e.g. 127.0.0.1:65432 or chat.example.org:65432";
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err(format!(
            "{server:?} is not a relay address: expected HOST:PORT ({example})"
        ));
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace)
    };
    if !host_ok {
        return Err(format!(
            "{server:?} has no valid host before the port: expected HOST:PORT ({example})"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "{server:?} has no valid port (1-65535) after the host: expected HOST:PORT ({example})"
        )),
    }
}

/// Connects to `server` and logs in as `user`, registering the name on first use.
pub async fn connect(
    server: &str,
    user: &Username,
    identity: &Identity,
) -> Result<Session, ConnectError> {
    match tokio::time::timeout(LOGIN_DEADLINE, connect_inner(server, user, identity)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Transient(format!(
            "{server} did not complete login within {LOGIN_DEADLINE:?}"
        ))),
    }
}

async fn connect_inner(
    server: &str,
    user: &Username,
    identity: &Identity,
) -> Result<Session, ConnectError> {
    let stream = TcpStream::connect(server).await.map_err(|e| {
        ConnectError::Transient(format!("cannot reach the server at {server}: {e}"))
    })?;
    let _ = stream.set_nodelay(true);
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
        .sign_login(&mut rand::rng(), user, &nonce)
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
        ] {
            assert_eq!(check_server_address(good), Ok(()), "{good}");
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
