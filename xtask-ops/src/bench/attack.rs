//! Hostile load for the "under attack" latency row: an `Ack` flood and an offer replay,
//! run against the relay while the echo pairs measure round trips.
//!
//! - Ack flood: three accounts send the largest `Ack` frames a frame holds (~65,000
//!   made-up ids each), as fast as the relay takes them.
//! - Offer replay: one account sends the same ~1.2 KB envelope (a key offer with junk
//!   ciphertext, as a replayer would) over and over to a victim that reads and
//!   acknowledges, as a client does.
//!
//! Both stop when `stop` is set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chat_protocol::ClientMessage;
use futures_util::{SinkExt, StreamExt};
use rsa::PrivateKey;

use super::load::relay_login;

/// Starts the attack; it runs until `stop` is set.
pub async fn start(
    addr: &str,
    key: &PrivateKey,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let ack = ClientMessage::Ack {
        envelope_ids: (0..65_000u64).map(|i| i % 128).collect(),
    };
    for i in 0..3 {
        let mut conn = relay_login(addr, &format!("flood{i}"), key, Some([127, 0, 9, 1])).await?;
        let (ack, stop) = (ack.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if conn.send(ack.clone()).await.is_err() {
                    return;
                }
            }
        }));
    }
    let victim = relay_login(addr, "victim", key, Some([127, 0, 9, 2])).await?;
    let (mut sink, mut stream) = victim.split();
    let reader_stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        while !reader_stop.load(Ordering::Relaxed) {
            let Some(Ok(msg)) = stream.next().await else {
                return;
            };
            if let chat_protocol::ServerMessage::Deliver { envelope_id, .. } = msg
                && sink
                    .send(ClientMessage::Ack {
                        envelope_ids: vec![envelope_id],
                    })
                    .await
                    .is_err()
            {
                return;
            }
        }
    }));
    let mut replayer = relay_login(addr, "replayer", key, Some([127, 0, 9, 3])).await?;
    let envelope = vec![0xa5u8; 1200];
    tasks.push(tokio::spawn(async move {
        let mut id = 0u32;
        while !stop.load(Ordering::Relaxed) {
            id = id.wrapping_add(1);
            let send = ClientMessage::Send {
                id,
                to: "victim".into(),
                payload: envelope.clone(),
            };
            if replayer.send(send).await.is_err() {
                return;
            }
            // Drain the answers that are there; pings are answered, as an attacker that
            // wants to go on being served does (a relay that shed a send waits for it).
            while let Some(Some(Ok(msg))) = futures_util::FutureExt::now_or_never(replayer.next()) {
                if let chat_protocol::ServerMessage::Ping { nonce } = msg
                    && replayer.send(ClientMessage::Pong { nonce }).await.is_err()
                {
                    return;
                }
            }
        }
    }));
    Ok(tasks)
}
