//! Where the relay keeps shared state: [`Backend`], and the `Nats` backend's settings.

use serde::{Deserialize, Serialize};

/// The relay's backend for shared state. In RON: `Sqlite`, or
/// `Nats(urls: [...], stream_replicas: 3, prefix: "chat", reader_idle_secs: 60.0)` (any
/// field may be left out).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "BackendRon", into = "BackendRon")]
pub enum Backend {
    /// An SQLite file in the data directory: one relay.
    #[default]
    Sqlite,
    /// A NATS JetStream cluster shared by every relay of the deployment.
    Nats(NatsBackend),
}

/// [`Backend`] as written in RON: `Nats` is a struct variant, so its fields go directly
/// in its parentheses.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
enum BackendRon {
    Sqlite,
    Nats {
        #[serde(default = "default_urls")]
        urls: Vec<String>,
        #[serde(default = "default_replicas")]
        stream_replicas: usize,
        #[serde(default = "default_prefix")]
        prefix: String,
        #[serde(default = "default_reader_idle")]
        reader_idle_secs: f64,
    },
}

/// Whether `url` is a NATS server URL the client can use: `nats://`, `tls://`, `ws://`
/// or `wss://`, then a host (and port), nothing else.
pub(super) fn nats_url_ok(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    ["nats", "tls", "ws", "wss"].contains(&scheme)
        && !rest.is_empty()
        && !rest.contains(|c: char| c.is_whitespace() || c == '/')
        && url.parse::<async_nats::ServerAddr>().is_ok()
}

fn default_urls() -> Vec<String> {
    NatsBackend::default().urls
}

fn default_replicas() -> usize {
    NatsBackend::default().stream_replicas
}

fn default_prefix() -> String {
    NatsBackend::default().prefix
}

fn default_reader_idle() -> f64 {
    NatsBackend::default().reader_idle_secs
}

impl From<BackendRon> for Backend {
    fn from(ron: BackendRon) -> Self {
        match ron {
            BackendRon::Sqlite => Self::Sqlite,
            BackendRon::Nats {
                urls,
                stream_replicas,
                prefix,
                reader_idle_secs,
            } => Self::Nats(NatsBackend {
                urls,
                stream_replicas,
                prefix,
                reader_idle_secs,
            }),
        }
    }
}

impl From<Backend> for BackendRon {
    fn from(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::Sqlite,
            Backend::Nats(NatsBackend {
                urls,
                stream_replicas,
                prefix,
                reader_idle_secs,
            }) => Self::Nats {
                urls,
                stream_replicas,
                prefix,
                reader_idle_secs,
            },
        }
    }
}

/// Settings of the `Nats` backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsBackend {
    /// NATS server URLs (`nats://host:port`); the client connects to one and fails over
    /// to the others, and to the cluster's nodes it learns from them.
    pub urls: Vec<String>,
    /// Copies of every stream and bucket (JetStream replicas, Raft): 3 survives the loss
    /// of one node; 1 for a single NATS node. An acknowledged write is on a quorum.
    pub stream_replicas: usize,
    /// Names of the streams and buckets start with this, so clusters can share NATS.
    pub prefix: String,
    /// Seconds a session's mailbox reader keeps its JetStream consumer with nothing to
    /// read (0.1 to 86,400; 60 by default). A reader makes one only for much mail at once
    /// (a backlog, a sender in full flow); then it gives it up and waits for mail on a core
    /// NATS subscription again, reading little mail by gets (CLUSTER.md, "Delivering"): a
    /// consumer is made through the cluster's meta layer, at a few dozen a second, and
    /// costs an idle heartbeat every 5 s.
    pub reader_idle_secs: f64,
}

impl Default for NatsBackend {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            stream_replicas: 3,
            prefix: "chat".into(),
            reader_idle_secs: 60.0,
        }
    }
}
