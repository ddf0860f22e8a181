//! Server settings: defaults, overridden by a RON file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod backend;

use backend::nats_url_ok;
pub use backend::{Backend, NatsBackend};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is the I/O error (shown once, by whoever prints the chain).
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `line` is 1-based; `excerpt` is that line of the file, trimmed.
    #[error(
        "config file {path}, line {line}: `{excerpt}`: {reason} (`chat-server --print-config` \
         shows every setting with its default)"
    )]
    Parse {
        path: PathBuf,
        line: usize,
        excerpt: String,
        reason: String,
    },
    #[error("invalid setting `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Every setting of the relay. All fields are optional in the RON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory holding the account database.
    pub data_dir: PathBuf,
    /// Largest frame body accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Connections served at once; further ones get `server_busy` and are closed.
    pub max_connections: usize,
    /// Seconds a new connection has to finish Hello and login. With the cluster backend
    /// also how long a login may try to write its session (at most 10 s: see
    /// `cluster::LOGIN_WINDOW`).
    pub login_timeout_secs: f64,
    /// Seconds of silence from a client before the server sends it a Ping.
    pub ping_interval_secs: f64,
    /// Seconds of silence from a client before the connection is closed.
    pub idle_timeout_secs: f64,
    /// Seconds a write to a client may take before it counts as not reading.
    pub write_timeout_secs: f64,
    /// Messages queued for one client before it counts as not reading and is disconnected.
    pub send_queue_len: usize,
    /// Bytes of messages (payloads and names) queued for one client before it counts as
    /// not reading and is disconnected; a message larger than this is still queued when
    /// nothing else is. Bounds what a reader that reads just enough not to time out can
    /// make the relay hold for it (`send_queue_len` full-size frames would be 16 MiB).
    pub send_queue_bytes: u64,
    /// Per-connection request rate limit.
    pub rate_limit: RateLimit,
    /// Seconds to let connections finish their writes at shutdown.
    pub shutdown_grace_secs: f64,
    /// Store-and-forward queue for recipients who are offline (or not yet acknowledged).
    pub queue: QueueConfig,
    /// Connections that have not finished login: their own small budget, so silent or
    /// slow sockets cannot take the slots of logged-in users.
    pub pre_login: PreLogin,
    /// New connections accepted per source address (IPv6: per /64); over it they are
    /// refused with `server_busy`.
    pub connect_rate: RateLimit,
    /// New accounts per source address (IPv6: per /64); over it registration is refused
    /// with `rate_limited`.
    pub registrations: Registrations,
    /// Bytes of writes (envelopes, acknowledgements, accounts) waiting for the store at
    /// once. A connection whose write does not fit is paced: it is not read until there is
    /// room.
    pub writer_queue_bytes: u64,
    /// Envelope ids taken from one `Ack` frame; the rest are ignored (and counted).
    pub max_ack_ids: usize,
    /// Milliseconds of scheduling delay (how long work that is ready waits for a thread)
    /// the relay aims to stay under. Held above it, the relay is saturated: it refuses a
    /// growing share of new sends with `server_busy` (clients keep them and retry) so the
    /// delay of what it accepts stays bounded (see `overload`). `0` (the default): never
    /// refuse; 5 is a reasonable value (docs/PERFORMANCE.md says why it is off).
    pub shed_delay_ms: f64,
    /// What a connection with a full pipeline (128 requests, or 512 copies of `SendMany`s,
    /// waiting for their answer) or a send that finds the store writer full gets. `true`
    /// (the default): reading goes on, and such sends are refused with `server_busy`
    /// (clients keep them and retry; ours never has that many in flight), so the `Ack`s
    /// behind them in the
    /// stream still answer the held envelopes the pipeline waits for. Under an open-loop
    /// overload that keeps the relay out of the regime where late Acks turn every
    /// envelope into a write and a delete (docs/PERFORMANCE.md, "Overload"). `false`: it
    /// is paced, not read until there is room.
    pub shed_when_full: bool,
    /// The relay's TLS certificate chain and key as PEM files (e.g. Let's Encrypt's
    /// `fullchain.pem` and `privkey.pem`). `None`: the relay's own key and a self-signed
    /// certificate in the data directory, created on first start.
    pub tls: Option<TlsFiles>,
    /// Where accounts, sessions, presence and the offline queue live: `Sqlite` (one relay,
    /// a file in `data_dir`; the default) or `Nats(...)` (many relays sharing a NATS
    /// JetStream cluster; see docs/CLUSTER.md).
    pub backend: Backend,
}

/// An operator's TLS certificate chain (leaf first) and private key, PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
}

/// The budget of connections that have not logged in yet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreLogin {
    /// Connections not yet logged in, in all; more are refused with `server_busy`.
    pub max_connections: usize,
    /// Of those, from one source address (IPv6: one /64).
    pub max_per_address: usize,
    /// Seconds a new connection has to send its first byte.
    pub first_byte_timeout_secs: f64,
}

impl Default for PreLogin {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_address: 16,
            first_byte_timeout_secs: 3.0,
        }
    }
}

/// Token bucket for account creation: `burst` at once, refilled at `per_hour`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registrations {
    pub per_hour: f64,
    pub burst: f64,
}

impl Default for Registrations {
    fn default() -> Self {
        Self {
            per_hour: 20.0,
            burst: 10.0,
        }
    }
}

/// Bounds of the per-recipient queue of undelivered envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Envelopes waiting for one recipient; more get `recipient_queue_full`.
    pub max_envelopes_per_user: u64,
    /// Bytes waiting for one recipient; more get `recipient_queue_full`.
    pub max_bytes_per_user: u64,
    /// Envelopes older than this are deleted undelivered (and counted).
    pub max_age_secs: f64,
    /// How often expired envelopes are purged.
    pub purge_interval_secs: f64,
    /// Seconds an envelope delivered to an online recipient waits for its Ack before it is
    /// written to the queue; one acknowledged in time is never written (0: always write).
    /// Default 0.05: under load Acks come later than a few milliseconds, and each envelope
    /// written for want of one is written and deleted again (at 5 ms the store writer
    /// took 46 % of the relay's CPU with 100 senders pipelining; docs/PERFORMANCE.md).
    /// A recipient that never acknowledges delays its senders' `Ok` by this much.
    pub live_grace_secs: f64,
    /// Largest part of one recipient's queue (envelopes and bytes) that one sender may
    /// hold, as a fraction; over it that sender gets `recipient_queue_full`.
    pub max_sender_share: f64,
    /// Bytes queued for everyone together; over it every sender gets `server_full`.
    pub max_total_bytes: u64,
    /// Largest part of `max_total_bytes` that senders from one address (IPv6: one /64)
    /// may have queued, as a fraction; over it they get `server_full`. Also, all senders
    /// from one address together hold at most `max_sender_share` of one recipient's queue.
    pub max_source_share: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_envelopes_per_user: 10_000,
            max_bytes_per_user: 64 * 1024 * 1024,
            max_age_secs: 30.0 * 24.0 * 3600.0,
            purge_interval_secs: 3600.0,
            live_grace_secs: 0.05,
            max_sender_share: 0.25,
            max_total_bytes: 1024 * 1024 * 1024,
            max_source_share: 0.05,
        }
    }
}

impl QueueConfig {
    pub fn limits(&self) -> crate::store::QueueLimits {
        let share = |n: u64| ((n as f64 * self.max_sender_share).ceil() as u64).max(1);
        crate::store::QueueLimits {
            max_envelopes: self.max_envelopes_per_user,
            max_bytes: self.max_bytes_per_user,
            max_sender_envelopes: share(self.max_envelopes_per_user),
            max_sender_bytes: share(self.max_bytes_per_user),
            max_total_bytes: self.max_total_bytes,
            max_source_bytes: ((self.max_total_bytes as f64 * self.max_source_share).ceil() as u64)
                .max(1),
        }
    }
}

/// Token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 100.0,
            burst: 200.0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], chat_protocol::DEFAULT_PORT)),
            data_dir: PathBuf::from("chat-server-data"),
            max_frame_bytes: chat_protocol::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            login_timeout_secs: 10.0,
            ping_interval_secs: 30.0,
            idle_timeout_secs: 90.0,
            write_timeout_secs: 10.0,
            send_queue_len: 256,
            send_queue_bytes: 1024 * 1024,
            rate_limit: RateLimit::default(),
            shutdown_grace_secs: 5.0,
            queue: QueueConfig::default(),
            pre_login: PreLogin::default(),
            connect_rate: RateLimit {
                per_second: 20.0,
                burst: 100.0,
            },
            registrations: Registrations::default(),
            writer_queue_bytes: 32 * 1024 * 1024,
            max_ack_ids: 4096,
            shed_delay_ms: 0.0,
            shed_when_full: true,
            tls: None,
            backend: Backend::Sqlite,
        }
    }
}

impl Config {
    /// Reads a RON file; missing fields keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = ron::Options::default().from_str(&text).map_err(|e| {
            let line = e.span.start.line.max(1);
            let excerpt = text.lines().nth(line - 1).unwrap_or("").trim();
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                excerpt: excerpt.chars().take(120).collect(),
                reason: e.code.to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The settings as a RON document (for `--print-config`).
    pub fn to_ron(&self) -> String {
        ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::default())
            .expect("server settings always serialise")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        // A frame must at least hold one envelope with a key offer for a 4096-bit key
        // (about 1.5 KB), and a login.
        if self.max_frame_bytes < 4096 || self.max_frame_bytes > 16 * 1024 * 1024 {
            return invalid(
                "max_frame_bytes",
                "must be between 4096 (one message with its key offer) and 16777216",
            );
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if self.send_queue_len == 0 {
            return invalid("send_queue_len", "must be at least 1");
        }
        if self.send_queue_bytes == 0 {
            return invalid("send_queue_bytes", "must be at least 1");
        }
        if self.pre_login.max_connections == 0 || self.pre_login.max_per_address == 0 {
            return invalid(
                "pre_login",
                "max_connections and max_per_address must be at least 1",
            );
        }
        if self.max_ack_ids == 0 {
            return invalid("max_ack_ids", "must be at least 1");
        }
        let shed = self.shed_delay_ms;
        if !(shed == 0.0 || (1.0..=60_000.0).contains(&shed)) {
            return invalid(
                "shed_delay_ms",
                "must be 0 (never refuse sends) or between 1 and 60000 milliseconds",
            );
        }
        if let Backend::Nats(nats) = &self.backend {
            if nats.urls.is_empty() {
                return invalid("backend.urls", "must name at least one NATS server");
            }
            if let Some(bad) = nats.urls.iter().find(|u| !nats_url_ok(u)) {
                return invalid(
                    "backend.urls",
                    &format!("{bad:?} is not a NATS URL; write nats://HOST:PORT"),
                );
            }
            if !(1..=5).contains(&nats.stream_replicas) {
                return invalid(
                    "backend.stream_replicas",
                    "must be 1 to 5 (JetStream's limit); 3 survives one node's loss",
                );
            }
            if nats.prefix.is_empty()
                || !nats
                    .prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return invalid(
                    "backend.prefix",
                    "must be letters, digits, '_' or '-' (it begins stream and bucket names)",
                );
            }
            if !(0.1..=86_400.0).contains(&nats.reader_idle_secs) {
                return invalid(
                    "backend.reader_idle_secs",
                    "must be between 0.1 and 86400 seconds",
                );
            }
        }
        // The largest request's writes must fit: a `SendMany` of the largest payload to
        // `MAX_FANOUT` recipients (one envelope each), and two of the largest frames.
        let fan_out = chat_protocol::message::MAX_FANOUT as u64
            * crate::writer::cost::envelope(self.max_frame_bytes) as u64;
        if self.writer_queue_bytes < fan_out.max(2 * self.max_frame_bytes as u64 + 4096) {
            return invalid(
                "writer_queue_bytes",
                &format!(
                    "must hold the writes of the largest request: at least {fan_out} bytes \
                     (255 × (max_frame_bytes + 256), a SendMany of the largest frame to 255 \
                     recipients)"
                ),
            );
        }
        if !(self.queue.max_sender_share.is_finite()
            && self.queue.max_sender_share > 0.0
            && self.queue.max_sender_share <= 1.0)
        {
            return invalid("queue.max_sender_share", "must be above 0 and at most 1");
        }
        if !(self.queue.max_source_share.is_finite()
            && self.queue.max_source_share > 0.0
            && self.queue.max_source_share <= 1.0)
        {
            return invalid("queue.max_source_share", "must be above 0 and at most 1");
        }
        if self.queue.max_total_bytes == 0 {
            return invalid("queue.max_total_bytes", "must be at least 1");
        }
        for (field, secs) in [
            ("login_timeout_secs", self.login_timeout_secs),
            ("ping_interval_secs", self.ping_interval_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("write_timeout_secs", self.write_timeout_secs),
            ("rate_limit.per_second", self.rate_limit.per_second),
            ("rate_limit.burst", self.rate_limit.burst),
            ("queue.max_age_secs", self.queue.max_age_secs),
            ("queue.purge_interval_secs", self.queue.purge_interval_secs),
            (
                "pre_login.first_byte_timeout_secs",
                self.pre_login.first_byte_timeout_secs,
            ),
            ("connect_rate.per_second", self.connect_rate.per_second),
            ("connect_rate.burst", self.connect_rate.burst),
            ("registrations.per_hour", self.registrations.per_hour),
            ("registrations.burst", self.registrations.burst),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
                return invalid(field, "must be a positive number below 1000000000");
            }
        }
        if !(self.shutdown_grace_secs.is_finite() && (0.0..1e9).contains(&self.shutdown_grace_secs))
        {
            return invalid("shutdown_grace_secs", "must be zero or more");
        }
        if !(self.queue.live_grace_secs.is_finite()
            && (0.0..=60.0).contains(&self.queue.live_grace_secs))
        {
            return invalid("queue.live_grace_secs", "must be between 0 and 60");
        }
        if self.queue.max_envelopes_per_user == 0 || self.queue.max_bytes_per_user == 0 {
            return invalid(
                "queue",
                "max_envelopes_per_user and max_bytes_per_user must be at least 1",
            );
        }
        if self.idle_timeout_secs <= self.ping_interval_secs {
            return invalid(
                "idle_timeout_secs",
                "must be longer than ping_interval_secs",
            );
        }
        Ok(())
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.login_timeout_secs)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs_f64(self.ping_interval_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.write_timeout_secs)
    }
    /// The scheduling delay load shedding aims under; `None` when it is off.
    pub fn shed_target(&self) -> Option<Duration> {
        (self.shed_delay_ms > 0.0).then(|| Duration::from_secs_f64(self.shed_delay_ms / 1000.0))
    }
    pub fn live_grace(&self) -> Duration {
        Duration::from_secs_f64(self.queue.live_grace_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pre_login.first_byte_timeout_secs)
    }
}

#[cfg(test)]
mod tests;
