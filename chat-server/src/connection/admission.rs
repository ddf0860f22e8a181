//! What a connection may ask of the server at once, and how each request is admitted and
//! dispatched: the send pipeline's bounds, refusing sends `server_busy` when it is full
//! (`shed_when_full`) or the relay is saturated, the rate-limit work a request is charged,
//! and the store writer's room a write waits for.

use chat_protocol::message::RequestId;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::fan_out::{self, Busy};
use super::{Close, Handler, MAX_PIPELINED, Parked, State, WRITE_BATCH};
use crate::limits::work;
use crate::metrics::Metrics;
use crate::writer::{Room, cost};

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
    /// Envelopes a session may have been given and not acknowledged: its whole queue (the
    /// bound, which envelopes delivered live and written late may pass by `send_queue_len`:
    /// `QueueLimits::delivered`), what its router queue holds, and one backlog batch. More
    /// means it does not acknowledge.
    pub(super) fn max_unacked(&self) -> usize {
        let config = &self.shared.config;
        config.queue.max_envelopes_per_user as usize + 2 * config.send_queue_len + 2 * WRITE_BATCH
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

/// The work of a send refused `server_busy` before anything of it is done: the frame
/// and its bytes, as read (a `SendMany`'s copies are not charged).
fn refused_work(msg: &ClientMessage) -> f64 {
    match msg {
        ClientMessage::SendMany { payload, to, .. } => {
            let names: usize = to.iter().map(String::len).sum();
            work::frame(payload.len() + names, 0)
        }
        other => request_work(other),
    }
}

/// Admission and dispatch of one request.
impl Handler {
    /// Charges `msg` against the rate limit, refuses it `server_busy` if sends are shed,
    /// reserves the store writer's room it needs (parking it until there is some), then
    /// dispatches it.
    pub(super) async fn handle(&mut self, msg: ClientMessage) -> Result<(), Close> {
        debug!(conn = self.conn_id, kind = msg.kind(), "request");
        // While the relay is saturated a share of new sends is refused, before they cost
        // anything more (see `overload`).
        let shed_id = match (&msg, &self.state) {
            (ClientMessage::Send { id, .. }, State::Ready(_)) => Some(*id),
            (ClientMessage::SendMany { id, to, .. }, State::Ready(_))
                if fan_out::fan_out_size_ok(to) =>
            {
                Some(*id)
            }
            _ => None,
        };
        let busy = shed_id.and_then(|_| {
            if self.shed_fence.is_some() {
                Some(Busy::Fenced)
            } else if self.shared.shedder.shed() {
                Some(Busy::Saturated)
            } else if self.shedding() && self.pipeline_full() {
                Some(Busy::PipelineFull)
            } else {
                None
            }
        });
        // Charged by the work it asks for (a refused send by its bytes alone: nothing of
        // it is stored or fanned out); `last_heard` was set as this frame arrived.
        let work = match busy {
            Some(_) => refused_work(&msg),
            None => request_work(&msg),
        };
        let wait = self.bucket.take_n(work, self.last_heard.into_std());
        if !wait.is_zero() {
            // Over the rate: pace this connection instead of dropping (keeps order).
            Box::pin(tokio::time::sleep(wait)).await;
        }
        if let (Some(id), Some(busy)) = (shed_id, busy) {
            return self.refuse_busy(id, busy);
        }
        // Writes to the store need room in the writer first; without room now the
        // request waits (and the connection is not read) until there is some.
        let needs = match (&msg, &self.state) {
            (ClientMessage::Send { payload, .. }, State::Ready(_)) => {
                Some(cost::envelope(payload.len()))
            }
            // A fan-out that will be refused whole reserves nothing.
            (ClientMessage::SendMany { payload, to, .. }, State::Ready(_))
                if fan_out::fan_out_size_ok(to) =>
            {
                Some(cost::envelope(payload.len()).saturating_mul(to.len()))
            }
            _ => None,
        };
        let room = match needs {
            None => None,
            Some(cost) => match self.shared.writer.try_reserve(cost) {
                Some(room) => Some(room),
                // With shedding on, a full writer refuses a send rather than stop reading
                // the connection: the Acks behind it in the stream still free room.
                None if let Some(id) = shed_id
                    && self.shedding() =>
                {
                    return self.refuse_busy(id, Busy::WriterFull);
                }
                None => {
                    Metrics::inc(&self.shared.metrics.paced);
                    let writer = self.shared.writer.clone();
                    self.parked = Some(Parked {
                        msg,
                        room: Box::pin(async move { writer.reserve(cost).await }),
                    });
                    return Ok(());
                }
            },
        };
        self.dispatch(msg, room).await
    }

    /// A parked request got its room.
    pub(super) async fn with_room(&mut self, msg: ClientMessage, room: Room) -> Result<(), Close> {
        self.dispatch(msg, Some(room)).await
    }

    /// Every frame's future is boxed by `serve` (so an idle connection's state stays
    /// small), so what runs on each `Send` and `Ack` must be small too: the login steps
    /// and the queries await large futures and are boxed apart, which keeps the frame's
    /// box a few hundred bytes instead of over 5 KB (an allocation that bypasses glibc's
    /// thread cache and consolidates its fast bins, twice per message).
    async fn dispatch(&mut self, msg: ClientMessage, room: Option<Room>) -> Result<(), Close> {
        let id = msg.request_id();
        match msg {
            ClientMessage::Hello { version, software } => {
                Box::pin(self.hello(version, &software)).await
            }
            _ if matches!(self.state, State::AwaitHello) => Err(Close::tell(
                ErrorCode::ProtocolViolation,
                "the first message must be Hello",
            )),
            ClientMessage::Ping { nonce } => {
                Box::pin(self.write(ServerMessage::Pong { nonce })).await
            }
            ClientMessage::Pong { nonce } => {
                match self.shed_fence {
                    Some((fence, _)) if fence == nonce => self.shed_fence = None,
                    // An older Ping answered: the client reads and answers, it just sent
                    // more before it had read the newest refusal. Not to be closed as
                    // one that never answers (the fence itself stays up).
                    Some((fence, _)) => self.shed_fence = Some((fence, Instant::now())),
                    None => {}
                }
                self.order.pong(nonce, self.sends.is_empty());
                Ok(())
            }
            ClientMessage::Ack { envelope_ids } => {
                if let State::Ready(user) = &self.state {
                    let user = user.clone();
                    let deletes = self.ack(&user, envelope_ids);
                    if let Some(cluster) = &self.shared.cluster
                        && !deletes.is_empty()
                    {
                        let floor = self.unacked.iter().min().copied().unwrap_or(u64::MAX);
                        cluster.delete(&user, deletes, floor);
                    }
                    let cap = self.max_unacked();
                    if self.unacked.len() > cap {
                        return Err(self.not_acknowledging());
                    }
                }
                Ok(())
            }
            ClientMessage::Register {
                id,
                username,
                public_key,
            } => Box::pin(self.begin_login(id, &username, Some(public_key))).await,
            ClientMessage::Login { id, username } => {
                Box::pin(self.begin_login(id, &username, None)).await
            }
            ClientMessage::Prove { id, signature } => Box::pin(self.prove(id, &signature)).await,
            msg => {
                let State::Ready(user) = &self.state else {
                    let id = id.unwrap_or_default();
                    return Box::pin(self.fail(id, ErrorCode::ProtocolViolation, "log in first"))
                        .await;
                };
                let user = user.clone();
                self.request(user, msg, room).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_fan_out_costs_its_bytes_not_its_copies() {
        let to: Vec<String> = (0..200).map(|i| format!("member{i}")).collect();
        let fan_out = ClientMessage::SendMany {
            id: 1,
            to,
            payload: vec![0; 1200],
        };
        // Accepted, 200 copies cost ~112 tokens (over a second of the default 100/s);
        // refused, a frame of its 2.8 KB, under 4.
        assert!(request_work(&fan_out) > 100.0, "{}", request_work(&fan_out));
        assert!(refused_work(&fan_out) < 4.0, "{}", refused_work(&fan_out));
        let send = ClientMessage::Send {
            id: 2,
            to: "bob".into(),
            payload: vec![0; 1200],
        };
        assert_eq!(refused_work(&send), request_work(&send));
    }
}
