//! The group row of `cargo xtask bench`: one text to a group of `members` as the client
//! sends it — sealed once under the sender's key and signed (Signal's sender keys), then
//! one `SendMany` naming every member — beside two designs measured in the same run on the
//! same relay: the same envelope in one `Send` per member, pipelined (the fan-out the
//! client used before `SendMany`), and the baseline of the same text sent 1:1 to each
//! member (sealed per member, one `Send` each), which is what a group would cost without
//! sender keys.
//!
//! Per round it measures the time from "send pressed" (before sealing) until the last
//! member's connection got its copy, and the bytes the sender uploads (our frames; TLS
//! adds ~22 B per record). Receivers are raw protocol connections that ack what they get:
//! opening costs each member the same in both designs (one RSA-PSS verification and one
//! AES-GCM open; see the crypto row).

use std::time::{Duration, Instant};

use anyhow::Context;
use chat_protocol::codec::WireCodec;
use chat_protocol::e2e::{Body, Content, Inbound, Outbound, Parties, RotationPolicy};
use chat_protocol::group::{GroupId, MemberKeys, SenderKey};
use chat_protocol::identity::Identity;
use chat_protocol::message::MAX_FANOUT;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username};
use futures_util::{SinkExt, StreamExt};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Encoder;

use super::load::relay_login;

/// What one design measured over its rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Design {
    /// Sealing one message for everyone, µs (median of the rounds).
    pub seal_us: f64,
    /// Bytes the sender uploads for one message (our frames, without TLS).
    pub upload_bytes: usize,
    /// From "send pressed" to the last member's copy, ms: [p50, max] over the rounds.
    pub last_delivery_ms: [f64; 2],
}

/// The group row: sender keys (fanned out by one `SendMany`, or by a `Send` per member)
/// against pairwise 1:1 for the same members.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupFigures {
    pub members: usize,
    pub rounds: usize,
    pub text_bytes: usize,
    /// Sender keys, one `SendMany` (what the client does).
    pub send_many: Design,
    /// Sender keys, one `Send` per member.
    pub sender_keys: Design,
    pub pairwise: Design,
}

/// How the sender hands its copies to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FanOut {
    /// One `SendMany` of the (same) payload naming every member.
    Many,
    /// One `Send` per member, pipelined.
    Each,
}

/// Measures `rounds` messages of `text_bytes` to `members` members through the relay at
/// `addr` (`HOST:PORT#FINGERPRINT`), each design on its own accounts.
pub async fn measure(
    addr: &str,
    key: &rsa::PrivateKey,
    members: usize,
    rounds: usize,
    text_bytes: usize,
) -> anyhow::Result<GroupFigures> {
    let mut rng = rand::rng();
    // RSA-3072 as the client makes them; the member identity stands for every member in
    // the pairwise seals (each costs the same whoever it is for).
    let sender = Identity::generate(&mut rng)?;
    let member = Identity::generate(&mut rng)?;
    let sender_name = Username::parse("gsender")?;
    let names: Vec<Username> = (0..members)
        .map(|i| Username::parse(&format!("gm{i:03}")))
        .collect::<Result<_, _>>()?;
    let group: GroupId = rand::random();
    let content = Content {
        id: [9; 16],
        sent_at_ms: 1,
        body: Body::Text("x".repeat(text_bytes)),
    };

    // Sender keys: one key for the group, given to every member beforehand (through the
    // 1:1 channel: not part of a message's cost). One envelope is checked to open.
    let mut sender_key = SenderKey::generate(&mut rng, names.iter().cloned().collect(), 0);
    let mut check = MemberKeys::default();
    check.add(&sender_key.distribution(group));
    let sample = sender_key.seal(&mut rng, &sender, &sender_name, group, &content)?;
    let envelope = chat_protocol::group::GroupEnvelope::decode(&sample)?;
    check
        .open(&envelope, &sender_name, sender.public())
        .context("a sealed group envelope does not open")?;
    let mut seal_group = || -> anyhow::Result<Vec<Vec<u8>>> {
        let bytes = sender_key.seal(&mut rand::rng(), &sender, &sender_name, group, &content)?;
        Ok(vec![bytes; members])
    };
    let many = (members, rounds, FanOut::Many);
    let send_many = run_design(addr, key, "gn", many, &mut seal_group).await?;
    let each = (members, rounds, FanOut::Each);
    let sender_keys = run_design(addr, key, "gk", each, &mut seal_group).await?;

    // Pairwise 1:1: a sealed message per member (the session set up beforehand).
    let policy = RotationPolicy {
        max_messages: u64::MAX,
        max_age_ms: u64::MAX,
    };
    let to = Parties {
        me: &sender,
        my_name: &sender_name,
        peer_name: &names[0],
        peer: member.public(),
    };
    let mut outbound = Outbound::default();
    let first = outbound.seal(&mut rng, to, &content, 1, policy)?;
    Inbound::default().open(
        Parties {
            me: &member,
            my_name: &names[0],
            peer_name: &sender_name,
            peer: sender.public(),
        },
        &first.bytes,
    )?;
    outbound.acknowledge(first.epoch);
    let mut seal_pairwise = || -> anyhow::Result<Vec<Vec<u8>>> {
        (0..members)
            .map(|_| {
                Ok(outbound
                    .seal(&mut rand::rng(), to, &content, 1, policy)?
                    .bytes)
            })
            .collect()
    };
    let each = (members, rounds, FanOut::Each);
    let pairwise = run_design(addr, key, "gp", each, &mut seal_pairwise).await?;
    Ok(GroupFigures {
        members,
        rounds,
        text_bytes,
        send_many,
        sender_keys,
        pairwise,
    })
}

/// Logs in a sender and `members` receivers (names `{tag}s`, `{tag}m{i}`), then per round
/// seals with `seal` (one payload per member) and sends them as `fan_out` says (for
/// `Many`, the first payload to everyone), waiting until each receiver got its copy and
/// the relay accepted every copy.
async fn run_design(
    addr: &str,
    key: &rsa::PrivateKey,
    tag: &str,
    (members, rounds, fan_out): (usize, usize, FanOut),
    seal: &mut dyn FnMut() -> anyhow::Result<Vec<Vec<u8>>>,
) -> anyhow::Result<Design> {
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut to = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..members {
        let name = format!("{tag}m{i:03}");
        let conn = relay_login(addr, &name, key, None).await?;
        to.push(name);
        let got_tx = got_tx.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = conn.split();
            while let Some(Ok(msg)) = stream.next().await {
                if let ServerMessage::Deliver { envelope_id, .. } = msg {
                    let _ = got_tx.send(());
                    let ack = ClientMessage::Ack {
                        envelope_ids: vec![envelope_id],
                    };
                    if sink.send(ack).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    let conn = relay_login(addr, &format!("{tag}s"), key, None).await?;
    let (mut sink, mut stream) = conn.split();
    let mut seals = Vec::new();
    let mut times = Vec::new();
    let mut upload = 0;
    let mut id = 10u32;
    for _ in 0..rounds {
        let pressed = Instant::now();
        let payloads = seal()?;
        seals.push(pressed.elapsed().as_secs_f64() * 1e6);
        upload = 0;
        let msgs: Vec<ClientMessage> = match fan_out {
            FanOut::Each => payloads
                .into_iter()
                .zip(&to)
                .map(|(payload, member)| {
                    id += 1;
                    ClientMessage::Send {
                        id,
                        to: member.clone(),
                        payload,
                    }
                })
                .collect(),
            FanOut::Many => {
                let payload = payloads.into_iter().next().context("nothing sealed")?;
                to.chunks(MAX_FANOUT)
                    .map(|names| {
                        id += 1;
                        ClientMessage::SendMany {
                            id,
                            to: names.to_vec(),
                            payload: payload.clone(),
                        }
                    })
                    .collect()
            }
        };
        for msg in &msgs {
            upload += frame_len(msg)?;
            sink.feed(msg.clone()).await?;
        }
        sink.flush().await?;
        // Every member's copy, and the relay's answer to every send. A send the relay
        // shed (`server_busy`) is sent again after a second, as the client does.
        let mut oks = 0;
        let mut delivered = 0;
        let mut shed = Vec::new();
        let mut retry_at = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while delivered < members || oks < members {
            tokio::select! {
                Some(()) = got.recv() => delivered += 1,
                () = sleep_until_some(retry_at) => {
                    retry_at = None;
                    for msg in shed.drain(..) {
                        sink.feed(msg).await?;
                    }
                    sink.flush().await?;
                }
                Some(msg) = stream.next() => match msg? {
                    ServerMessage::Ok { .. } => oks += 1,
                    ServerMessage::Ping { nonce } => {
                        sink.send(ClientMessage::Pong { nonce }).await?;
                    }
                    ServerMessage::Error {
                        id: Some(refused),
                        code: ErrorCode::ServerBusy,
                        ..
                    } => {
                        let msg = msgs.iter().find(|m| m.request_id() == Some(refused));
                        shed.push(msg.context("a refusal of no request sent")?.clone());
                        retry_at.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    ServerMessage::Outcomes { outcomes, .. } => {
                        if let Some(code) = outcomes.iter().flatten().next() {
                            anyhow::bail!("the relay refused a group copy: {code}");
                        }
                        oks += outcomes.len();
                    }
                    ServerMessage::Error { code, message, .. } => {
                        anyhow::bail!("the relay refused a group copy: {code}: {message}")
                    }
                    _ => {}
                },
                _ = tokio::time::sleep_until(deadline) => anyhow::bail!(
                    "{delivered} of {members} copies delivered, {oks} accepted after 60 s"
                ),
            }
            if delivered == members && times.len() < seals.len() {
                times.push(pressed.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for task in tasks {
        task.abort();
    }
    Ok(Design {
        seal_us: median(&mut seals),
        upload_bytes: upload,
        last_delivery_ms: [
            median(&mut times.clone()),
            times.iter().copied().fold(0.0, f64::max),
        ],
    })
}

/// One message's size on the wire (our framing, before TLS).
fn frame_len(msg: &ClientMessage) -> anyhow::Result<usize> {
    let mut buf = BytesMut::new();
    WireCodec::<ServerMessage, ClientMessage>::new(1 << 20).encode(msg.clone(), &mut buf)?;
    Ok(buf.len())
}

/// Waits until `at`; never resolves for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}
