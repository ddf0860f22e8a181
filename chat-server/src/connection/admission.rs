//! What a connection may ask of the server at once: the send pipeline's bounds, refusing
//! sends `server_busy` when it is full (`shed_when_full`), and the rate-limit work a
//! request is charged.

use chat_protocol::message::RequestId;
use chat_protocol::{ClientMessage, ErrorCode};
use rand::Rng;
use tokio::time::Instant;
use tracing::warn;

use super::fan_out::{self, Busy};
use super::{Close, Handler, MAX_PIPELINED, WRITE_BATCH};
use crate::limits::work;
use crate::metrics::Metrics;

impl Handler {
    /// Whether a full pipeline or writer refuses sends rather than pausing reads
    /// (`shed_when_full`).
    pub(super) fn shedding(&self) -> bool {
        self.shared.config.shed_when_full
    }

    /// With `shed_when_full`, whether a new send is refused: `MAX_PIPELINED` requests
    /// await their answer, or `4 × MAX_PIPELINED` copies (a `SendMany` has one per
    /// recipient, so one to a large group does not fill the pipeline by itself).
    pub(super) fn pipeline_full(&self) -> bool {
        self.sends.requests() >= MAX_PIPELINED || self.sends.len() >= 4 * MAX_PIPELINED
    }

    /// How many unanswered copies stop this connection being read. By default a full
    /// pipeline does (`MAX_PIPELINED` copies); with `shed_when_full`, reading goes on
    /// (the Acks behind a send answer the held envelopes the pipeline waits for) and sends
    /// over the pipeline are refused busy, a copy each, until room for the largest
    /// accepted `SendMany` past `pipeline_full` and as many refusals again.
    pub(super) fn read_limit(&self) -> usize {
        if self.shedding() {
            4 * MAX_PIPELINED + chat_protocol::message::MAX_FANOUT + MAX_PIPELINED
        } else {
            MAX_PIPELINED
        }
    }

    /// Refuses send `id` with `server_busy`, and every later send until the client answers
    /// the Ping that follows the refusal (so it resends them in order).
    pub(super) fn refuse_busy(&mut self, id: RequestId, why: Busy) -> Result<(), Close> {
        let since = match self.shed_fence {
            // A client that does not answer pings would be refused for ever: closed.
            Some((_, since)) if since.elapsed() > self.shared.config.idle_timeout() => {
                return Err(Close::tell(
                    ErrorCode::ProtocolViolation,
                    "the server's Ping after a refused send was never answered",
                ));
            }
            Some((_, since)) => since,
            None => Instant::now(),
        };
        Metrics::inc(&self.shared.metrics.shed);
        let nonce = rand::rng().next_u64();
        self.shed_fence = Some((nonce, since));
        self.sends.push_back(fan_out::shed(id, nonce, why));
        Ok(())
    }
    /// Envelopes a session may have been given and not acknowledged: its whole queue, what
    /// its router queue holds, and one backlog batch. More means it does not acknowledge.
    pub(super) fn max_unacked(&self) -> usize {
        let config = &self.shared.config;
        config.queue.max_envelopes_per_user as usize + config.send_queue_len + 2 * WRITE_BATCH
    }

    pub(super) fn not_acknowledging(&self) -> Close {
        warn!(conn = self.conn_id, peer = %self.peer, "client does not acknowledge what it receives; disconnecting");
        Close::tell(
            ErrorCode::SlowConsumer,
            "messages were not acknowledged; acknowledge what you receive",
        )
    }
}

/// The work a request asks for, in rate-limit tokens (see `limits::work`).
pub(super) fn request_work(msg: &ClientMessage) -> f64 {
    match msg {
        ClientMessage::Send { payload, to, .. } => work::frame(payload.len() + to.len(), 0),
        ClientMessage::SendMany { payload, to, .. } => {
            let names: usize = to.iter().map(String::len).sum();
            work::fan_out(payload.len() + names, payload.len(), to.len())
        }
        ClientMessage::Ack { envelope_ids } => work::frame(0, envelope_ids.len()),
        ClientMessage::Watch { usernames, .. } => work::frame(0, usernames.len()),
        ClientMessage::Register { public_key, .. } => work::frame(public_key.len(), 0),
        _ => work::frame(0, 0),
    }
}
