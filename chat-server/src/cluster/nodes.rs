//! Taking a NATS node out of the cluster for good: `admin evacuate-node` and
//! `admin forget-node`, which `cargo xtask deploy --allow-shrink` runs on a node that stays.
//!
//! JetStream keeps each stream's replicas on R of the cluster's nodes, and every node that
//! ever joined stays a member of the meta group (the Raft group of the cluster's
//! metadata). A node that is merely switched off leaves its streams one replica short and
//! still counts toward the meta group's quorum, so the next failure could stop the cluster.
//! A node therefore leaves in two steps (NATS documentation, "JetStream Clustering:
//! Administration"):
//!
//! 1. [`evacuate`], while it runs: for every stream of the account with a replica on the
//!    node, a peer removal (`$JS.API.STREAM.PEER.REMOVE.<stream>`). The meta leader places
//!    that replica on another node, which catches up from the others; replicated
//!    consumers follow their stream. Then wait until no stream (and no replicated
//!    consumer) has the node and every replica is current.
//! 2. [`forget`], once its NATS is stopped: `$JS.API.SERVER.REMOVE` with the system
//!    account, which takes the node out of the meta group (its quorum shrinks with it).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures_util::TryStreamExt;
use serde::Deserialize;

/// How long one request to NATS may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node could not be taken out.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot reach NATS at {urls}: {detail}. Is this host's nats-server running?")]
    Connect { urls: String, detail: String },
    #[error("NATS failed to {doing}: {detail}")]
    Nats { doing: String, detail: String },
    #[error(
        "the stream {stream} keeps its only copy on {node} (1 replica); moving it would \
         lose it. Raise its replicas (stream_replicas) first"
    )]
    OnlyCopy { stream: String, node: String },
    #[error("JetStream refused to move the stream {stream}'s replica off {node}: {detail}")]
    Refused {
        stream: String,
        node: String,
        detail: String,
    },
    #[error(
        "after {waited:?} the replicas are still not settled elsewhere: {detail}. Does the \
         cluster have a node free to take each (at least replicas + 1 nodes)? Nothing is \
         lost; run the command again to keep waiting"
    )]
    Unsettled { waited: Duration, detail: String },
    #[error(
        "JetStream refused to remove {node} from the cluster: {detail}. Is the seed the \
         system account's, and is {node} stopped?"
    )]
    Forget { node: String, detail: String },
}

/// Where one stream or consumer keeps its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The stream, or `stream > consumer`.
    pub what: String,
    /// Replicas wanted.
    pub replicas: usize,
    /// The leader, if elected.
    pub leader: Option<String>,
    /// Every peer (leader first), with whether it is current.
    pub peers: Vec<(String, bool)>,
}

impl Placement {
    fn of(what: String, replicas: usize, cluster: Option<&stream::ClusterInfo>) -> Self {
        let mut peers = Vec::new();
        let leader = cluster.and_then(|c| c.leader.clone());
        if let Some(leader) = &leader {
            peers.push((leader.clone(), true));
        }
        for peer in cluster.map(|c| c.replicas.as_slice()).unwrap_or_default() {
            peers.push((peer.name.clone(), peer.current && !peer.offline));
        }
        Self {
            what,
            replicas,
            leader,
            peers,
        }
    }

    /// Whether `node` holds a replica.
    pub fn has(&self, node: &str) -> bool {
        self.peers.iter().any(|(name, _)| name == node)
    }

    /// Whether the replicas are all placed off `node`, elected and current.
    pub fn settled_without(&self, node: &str) -> bool {
        !self.has(node)
            && self.leader.is_some()
            && self.peers.len() >= self.replicas
            && self.peers.iter().all(|(_, current)| *current)
    }
}

/// Connects to NATS at `urls`, with the NKey `seed` if given.
async fn connect(urls: &[String], seed: Option<String>) -> Result<async_nats::Client, NodeError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("secure-chat admin")
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connection_timeout(REQUEST_TIMEOUT);
    if let Some(seed) = seed {
        options = options.nkey(seed);
    }
    options.connect(urls).await.map_err(|e| NodeError::Connect {
        urls: urls.join(","),
        detail: e.to_string(),
    })
}

fn nats(doing: impl Into<String>) -> impl FnOnce(String) -> NodeError {
    let doing = doing.into();
    move |detail| NodeError::Nats { doing, detail }
}

/// Every stream of the account and its replicated consumers, with their placements.
pub async fn placements(js: &jetstream::Context) -> Result<Vec<Placement>, NodeError> {
    let names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| nats("list the streams")(e.to_string()))?;
    let mut all = Vec::new();
    for name in names {
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| nats(format!("read the stream {name}"))(e.to_string()))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats(format!("read the stream {name}"))(e.to_string()))?
            .clone();
        let replicas = info.config.num_replicas.max(1);
        all.push(Placement::of(name.clone(), replicas, info.cluster.as_ref()));
        let consumers: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| nats(format!("list the consumers of {name}"))(e.to_string()))?;
        for consumer in consumers {
            // R1 consumers (a relay's ordered consumers) live where they were made and
            // are made again by their owner when their node goes.
            let wanted = match consumer.config.num_replicas {
                0 => replicas,
                n => n,
            };
            let placement = Placement::of(
                format!("{name} > {}", consumer.name),
                wanted,
                consumer.cluster.as_ref(),
            );
            if wanted > 1 && placement.peers.len() > 1 {
                all.push(placement);
            }
        }
    }
    Ok(all)
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct ApiResponse {
    #[serde(default)]
    success: bool,
    error: Option<ApiError>,
}

/// JetStream's error code for "peer not a member" (of a stream's group).
const PEER_NOT_MEMBER: u64 = 10040;
/// JetStream's error code for "server is not a member of the cluster" (meta group).
const SERVER_NOT_MEMBER: u64 = 10044;

/// Moves every replica off `node` (see the module documentation) and waits up to
/// `patience` for them to settle elsewhere; `progress` is told each stream as its move is
/// asked for. Returns the streams moved (empty if the node held none).
///
/// Errors: [`NodeError::OnlyCopy`] for a 1-replica stream on the node (nothing is moved),
/// [`NodeError::Refused`] if JetStream refuses a move, [`NodeError::Unsettled`] after
/// `patience`.
pub async fn evacuate(
    urls: &[String],
    node: &str,
    patience: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Vec<String>, NodeError> {
    let client = connect(urls, None).await?;
    let js = jetstream::new(client);
    let before = placements(&js).await?;
    if let Some(only) = before
        .iter()
        .find(|p| p.has(node) && p.replicas == 1 && !p.what.contains(" > "))
    {
        return Err(NodeError::OnlyCopy {
            stream: only.what.clone(),
            node: node.to_owned(),
        });
    }
    let mut moved = Vec::new();
    for placement in before.iter().filter(|p| p.has(node)) {
        if placement.what.contains(" > ") {
            continue; // consumers follow their stream
        }
        let stream = &placement.what;
        progress(stream);
        let response: ApiResponse = js
            .request(
                format!("STREAM.PEER.REMOVE.{stream}"),
                &serde_json::json!({ "peer": node }),
            )
            .await
            .map_err(|e| nats(format!("ask to move {stream}"))(e.to_string()))?;
        match response.error {
            None if response.success => {}
            Some(e) if e.err_code == PEER_NOT_MEMBER => {}
            e => {
                return Err(NodeError::Refused {
                    stream: stream.clone(),
                    node: node.to_owned(),
                    detail: e.map(|e| e.description).unwrap_or_default(),
                });
            }
        }
        moved.push(stream.clone());
    }
    let start = Instant::now();
    loop {
        // While a group elects a new leader its info requests go unanswered: an error
        // here is a reason to keep waiting, reported if it lasts.
        let detail = match placements(&js).await {
            Ok(now) => {
                let waiting: Vec<String> = now
                    .iter()
                    .filter(|p| !p.settled_without(node))
                    .map(|p| {
                        let peers: Vec<String> = p
                            .peers
                            .iter()
                            .map(|(n, current)| format!("{n}{}", if *current { "" } else { "…" }))
                            .collect();
                        format!("{} on [{}]", p.what, peers.join(" "))
                    })
                    .collect();
                if waiting.is_empty() {
                    return Ok(moved);
                }
                waiting.join("; ")
            }
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= patience {
            return Err(NodeError::Unsettled {
                waited: start.elapsed(),
                detail,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What [`forget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgot {
    /// The node was removed from the meta group.
    Removed,
    /// It was not a member (already removed).
    NotMember,
}

/// Removes the stopped `node` from the JetStream meta group, connecting to `urls` as a
/// user of the system account with the NKey `seed` (`SU…`).
///
/// Errors: [`NodeError::Connect`] (a wrong seed is refused there: "authorization
/// violation"), [`NodeError::Forget`] if JetStream refuses.
pub async fn forget(urls: &[String], seed: &str, node: &str) -> Result<Forgot, NodeError> {
    let client = connect(urls, Some(seed.trim().to_owned())).await?;
    // Right after the node stopped, the meta group may be electing a new leader (the node
    // may have led it): no answer, or a refusal, until then. Asked again until
    // FORGET_PATIENCE has passed.
    let start = Instant::now();
    loop {
        let detail = match client
            .request(
                "$JS.API.SERVER.REMOVE",
                serde_json::json!({ "peer": node }).to_string().into(),
            )
            .await
        {
            Err(e) => format!(
                "{e} (no answer: only the system account may ask, and only while the \
                 cluster has its quorum)"
            ),
            Ok(reply) => match serde_json::from_slice::<ApiResponse>(&reply.payload) {
                Err(e) => format!("unreadable answer: {e}"),
                Ok(response) => match response.error {
                    None if response.success => return Ok(Forgot::Removed),
                    Some(e) if e.err_code == SERVER_NOT_MEMBER => return Ok(Forgot::NotMember),
                    e => e.map(|e| e.description).unwrap_or_default(),
                },
            },
        };
        if start.elapsed() >= FORGET_PATIENCE {
            return Err(NodeError::Forget {
                node: node.to_owned(),
                detail,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long [`forget`] keeps asking (a meta leader election takes seconds).
const FORGET_PATIENCE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(replicas: usize, leader: Option<&str>, peers: &[(&str, bool)]) -> Placement {
        let mut all: Vec<(String, bool)> =
            leader.map(|l| (l.to_owned(), true)).into_iter().collect();
        all.extend(peers.iter().map(|(n, c)| (n.to_string(), *c)));
        Placement {
            what: "S".into(),
            replicas,
            leader: leader.map(str::to_owned),
            peers: all,
        }
    }

    #[test]
    fn a_placement_is_settled_only_off_the_node_elected_complete_and_current() {
        let settled = placement(3, Some("b"), &[("c", true), ("d", true)]);
        assert!(settled.settled_without("a"));
        assert!(!settled.settled_without("c"), "still on the node");
        assert!(!placement(3, None, &[("c", true), ("d", true)]).settled_without("a"));
        assert!(!placement(3, Some("b"), &[("c", true)]).settled_without("a"));
        assert!(!placement(3, Some("b"), &[("c", true), ("d", false)]).settled_without("a"));
    }
}
