//! A logged-in user's requests and what is relayed to them: sends (pipelined into the
//! group commit, answered in order), acknowledgements (only of what this session was
//! given), routed deliveries and the stored backlog.

use chat_protocol::message::RequestId;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username};
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_util::bytes::Bytes;

use super::fan_out::{self, fan_out_recipients, no_such_user};
use super::{Close, Handler, InFlight, MAX_SYNCS, State, WRITE_BATCH, unix_secs};
use crate::metrics::Metrics;
use crate::router::{Routed, WatchError};
use crate::store::{Enqueued, StoreError};
use crate::writer::{Envelope, Room};

impl Handler {
    /// Requests of a logged-in user: sends here, the rest boxed apart (see
    /// `Handler::dispatch` on why the send path's future must stay small).
    pub(super) async fn request(
        &mut self,
        me: Username,
        msg: ClientMessage,
        room: Option<Room>,
    ) -> Result<(), Close> {
        match msg {
            ClientMessage::Send { id, to, payload } => {
                let Ok(to_user) = Username::parse(&to) else {
                    return Box::pin(self.unknown_user(id, &to)).await;
                };
                let room = room.expect("a send comes with room in the writer");
                let payload = Bytes::from(payload);
                self.submit(&me, id, (to_user, to), payload, room, None)
                    .await;
                Ok(())
            }
            ClientMessage::SendMany { id, to, payload } => {
                Box::pin(self.send_many(&me, id, to, payload, room)).await
            }
            other => Box::pin(self.query(me, other)).await,
        }
    }

    /// A `SendMany`: one envelope per recipient, answered together by `Outcomes`.
    async fn send_many(
        &mut self,
        me: &Username,
        id: RequestId,
        to: Vec<String>,
        payload: Vec<u8>,
        room: Option<Room>,
    ) -> Result<(), Close> {
        let recipients = match fan_out_recipients(&to) {
            Ok(recipients) => recipients,
            Err(message) => {
                // Replies keep request order: earlier sends are answered first.
                self.finish_sends().await?;
                return self.fail(id, ErrorCode::ProtocolViolation, message).await;
            }
        };
        let mut room = room.expect("a valid fan-out comes with room in the writer");
        if self.shared.cluster.is_some() {
            drop(room);
            self.publish_many(me, id, to, recipients, payload).await;
            return Ok(());
        }
        let payload = Bytes::from(payload);
        let cost = crate::writer::cost::envelope(payload.len());
        let last = recipients.len() - 1;
        for (i, (name, user)) in to.into_iter().zip(recipients).enumerate() {
            let part = Some(i == last);
            let room = room.split(cost);
            match user {
                Some(user) => {
                    let payload = payload.clone();
                    self.submit(me, id, (user, name), payload, room, part).await;
                }
                None => self.sends.push_back(no_such_user(id, name, part)),
            }
        }
        Ok(())
    }

    /// Requests other than sends. Replies keep request order: earlier sends are answered
    /// first.
    async fn query(&mut self, me: Username, msg: ClientMessage) -> Result<(), Close> {
        self.finish_sends().await?;
        match msg {
            ClientMessage::ListUsers { id } => {
                let online = self.shared.router.online();
                self.write(ServerMessage::Users { id, online }).await
            }
            ClientMessage::Watch { id, usernames } => {
                let limit = chat_protocol::message::MAX_WATCHED;
                let watched = if usernames.len() > limit {
                    Err(WatchError::Limit(limit))
                } else {
                    // A name that is not valid can never come online: nothing to watch.
                    let users = usernames
                        .iter()
                        .filter_map(|u| Username::parse(u).ok())
                        .collect();
                    self.shared.router.watch(&me, self.conn_id, users, limit)
                };
                match watched {
                    Ok(online) => self.write(ServerMessage::Users { id, online }).await,
                    Err(WatchError::Limit(n)) => {
                        self.fail(
                            id,
                            ErrorCode::WatchLimit,
                            format!("a session may watch at most {n} users; nothing was added"),
                        )
                        .await
                    }
                    // Replaced meanwhile: the kick closes this connection next.
                    Err(WatchError::NotJoined) => Ok(()),
                }
            }
            ClientMessage::Sync { id } => {
                if self.caught_up() {
                    self.write(ServerMessage::Ok { id }).await
                } else if self.syncs.len() >= MAX_SYNCS {
                    let message = format!(
                        "at most {MAX_SYNCS} sync requests may wait at once; wait for their answers"
                    );
                    self.fail(id, ErrorCode::RateLimited, message).await
                } else {
                    self.syncs.push(id);
                    Ok(())
                }
            }
            ClientMessage::GetPublicKey { id, username } => {
                let Ok(user) = Username::parse(&username) else {
                    return self.unknown_user(id, &username).await;
                };
                let patience = tokio::time::Instant::now() + crate::cluster::PATIENCE;
                match self.public_key(user.clone(), patience).await {
                    Ok(Some(public_key)) => {
                        self.write(ServerMessage::PublicKey {
                            id,
                            username: user.to_string(),
                            public_key,
                        })
                        .await
                    }
                    Ok(None) => self.unknown_user(id, &username).await,
                    Err(close) => self.fail_internal(id, close).await,
                }
            }
            other => {
                // Hello, login and ping are handled before; nothing else exists.
                let id = other.request_id().unwrap_or_default();
                self.fail(id, ErrorCode::ProtocolViolation, "unexpected message")
                    .await
            }
        }
    }

    /// Hands one envelope for `to_user` to the backend; it is answered (as `Ok` or as one
    /// of a `SendMany`'s outcomes) once durable, in request order. `named` is the
    /// recipient as the request spelled it, kept for the answer's error text.
    async fn submit(
        &mut self,
        me: &Username,
        id: RequestId,
        (to_user, named): (Username, String),
        payload: Bytes,
        room: Room,
        part: Option<bool>,
    ) {
        let fence = self.order.tag(&to_user);
        if fence.holds() {
            // An earlier send to `to_user` was refused and the client may not have read
            // that yet: this one must not overtake it.
            fence.refused();
            self.sends
                .push_back(fan_out::fenced(id, named, part, fence));
            return;
        }
        if let Some(cluster) = self.shared.cluster.clone() {
            // Published in request order on the one NATS connection; answered
            // once JetStream has it on a quorum. The room is only the pacing.
            drop(room);
            let msg_id = format!("{:032x}", rand::random::<u128>());
            let address =
                crate::limits::shared_address_name(&self.shared.address_secret, self.peer.ip());
            // Boxed: this future is large, and the send path's must stay small.
            let ticket =
                Box::pin(cluster.publish(&to_user, me, &address, payload, msg_id, fence.clone()))
                    .await;
            self.sends.push_back(InFlight {
                id,
                to: named,
                route: None,
                ticket,
                part,
                fence: Some(fence),
            });
            return;
        }
        // The sender hears `Ok` only once the envelope cannot be lost: committed,
        // or (delivered at once to an online recipient) acknowledged by it. Later
        // sends are read meanwhile, so they share the commit.
        let writer = &self.shared.writer;
        let (recipient, sender) = (to_user.clone(), me.clone());
        let (now_secs, limits) = (unix_secs(), self.shared.config.queue.limits());
        let slack = self.shared.config.send_queue_len as u64;
        let max_frame = self.shared.config.max_frame_bytes as u64;
        let source = self.source;
        // Every envelope is checked against earlier refusals where it is written, also one
        // delivered at once and written late (its Ack after the grace): that write can be
        // refused past the recipient's slack, and if the recipient's session then ended
        // before it stored the envelope, a later one stored would overtake it. Refused,
        // such an envelope is sent again by the client; a recipient that has it drops it.
        let tag = fence.clone();
        let envelope = |payload, delivered: bool| Envelope {
            recipient,
            sender,
            source,
            payload,
            now_secs,
            limits: if delivered {
                limits.delivered(slack, slack * max_frame)
            } else {
                limits
            },
            fence: Some(tag),
        };
        let ((ticket, payload), _) =
            self.shared
                .router
                .accept(&to_user, me, payload, |envelope_id, delivered, payload| {
                    if delivered {
                        (
                            writer.enqueue_held(room, envelope_id, envelope(payload, true)),
                            None,
                        )
                    } else {
                        // Kept to route once committed.
                        let ticket =
                            writer.enqueue(room, envelope_id, envelope(payload.clone(), false));
                        (ticket, Some(payload))
                    }
                });
        self.sends.push_back(InFlight {
            id,
            to: named,
            route: payload.map(|payload| (to_user, payload)),
            ticket,
            part,
            fence: Some(fence),
        });
    }

    /// Answers the oldest send now that its commit is done, and routes it on success.
    /// Also answers every later send whose outcome is already known, in one write.
    pub(super) async fn send_committed(
        &mut self,
        done: Result<Enqueued, StoreError>,
    ) -> Result<(), Close> {
        let mut replies = Vec::new();
        let mut done = Some(done);
        while let Some(outcome) = done.take() {
            let Some(sent) = self.sends.pop_front() else {
                break;
            };
            let (id, part) = (sent.id, sent.part);
            let fence = match outcome {
                Ok(Enqueued::Shed { fence, .. }) => Some(fence),
                _ => None,
            };
            if crate::fence::holds_back(&outcome) {
                // Refused for a reason that may pass: later sends to the recipient are
                // held until the client has read this (`crate::fence`).
                self.order.refused();
            }
            let reply = self.settle(sent, outcome);
            match part {
                None => replies.push(reply),
                Some(last) => {
                    self.fan_out.push(match reply {
                        ServerMessage::Error { code, .. } => Some(code),
                        _ => None,
                    });
                    if last {
                        let outcomes = std::mem::take(&mut self.fan_out);
                        replies.push(ServerMessage::Outcomes { id, outcomes });
                    }
                }
            }
            if let Some(nonce) = fence {
                // Right behind the refusal: its `Pong` lifts the fence.
                replies.push(ServerMessage::Ping { nonce });
            }
            done = self.sends.front_mut().and_then(|s| s.ticket.try_enqueued());
        }
        if let Some(nonce) = self.order.ping(self.fan_out.is_empty()) {
            // Behind the refusals: its `Pong` says the client has read them.
            replies.push(ServerMessage::Ping { nonce });
        }
        let write_timeout = self.shared.config.write_timeout();
        let writer = &mut self.writer;
        let write = async {
            for reply in replies {
                writer.feed(reply).await?;
            }
            SinkExt::<ServerMessage>::flush(writer).await
        };
        let result = timeout(write_timeout, write).await;
        self.finish_write(result)
    }

    /// Writes one routed message, then whatever else is already queued, then flushes.
    pub(super) async fn forward(&mut self, first: Routed) -> Result<(), Close> {
        let write_timeout = self.shared.config.write_timeout();
        let Self {
            writer,
            membership,
            backlog_cursor,
            backlog_done,
            unacked,
            ..
        } = self;
        let batch = async {
            let mut next = Some(first);
            let mut written = 0;
            while let Some(msg) = next.take() {
                if let Some(envelope_id) = msg.envelope_id() {
                    // While the backlog streams, or if already sent from it, the stored copy
                    // is (or was) written in order instead.
                    if !*backlog_done || envelope_id <= *backlog_cursor {
                        next = membership.as_mut().and_then(|m| m.inbox.try_next());
                        continue;
                    }
                    unacked.insert(envelope_id);
                }
                match msg {
                    Routed::Deliver(deliver) => writer.feed(deliver).await?,
                    Routed::Message(msg) => writer.feed(msg).await?,
                }
                written += 1;
                if written < WRITE_BATCH {
                    next = membership.as_mut().and_then(|m| m.inbox.try_next());
                }
            }
            SinkExt::<ServerMessage>::flush(writer).await
        };
        let result = timeout(write_timeout, batch).await;
        self.finish_write(result)?;
        self.check_acknowledging()
    }

    /// Whether everything stored for this session when it began has been written.
    fn caught_up(&self) -> bool {
        if self.cluster_inbox.is_some() {
            self.mailbox_caught_up
        } else {
            self.backlog_done && self.settling.is_none()
        }
    }

    /// Answers the waiting `Sync`s, once caught up.
    pub(super) async fn answer_syncs(&mut self) -> Result<(), Close> {
        if self.syncs.is_empty() || !self.caught_up() {
            return Ok(());
        }
        let write_timeout = self.shared.config.write_timeout();
        let (writer, syncs) = (&mut self.writer, std::mem::take(&mut self.syncs));
        let write = async {
            for id in syncs {
                writer.feed(ServerMessage::Ok { id }).await?;
            }
            SinkExt::<ServerMessage>::flush(writer).await
        };
        let result = timeout(write_timeout, write).await;
        self.finish_write(result)
    }

    /// Writes the next batch of stored envelopes; marks the backlog done when it runs out
    /// (and answers the `Sync`s waiting for that).
    pub(super) async fn send_backlog(&mut self) -> Result<(), Close> {
        let State::Ready(user) = &self.state else {
            self.backlog_done = true;
            return Ok(());
        };
        let user = user.clone();
        let (lookup, after) = (user.clone(), self.backlog_cursor);
        let batch = match self
            .store(move |s| s.pending(&lookup, after, WRITE_BATCH))
            .await
        {
            Ok(batch) => batch,
            Err(e) => return Err(self.storage_lost(e)),
        };
        // Caught up, unless envelopes committed meanwhile were left to the store.
        if batch.len() < WRITE_BATCH && self.shared.router.set_live(&user, self.conn_id) {
            self.backlog_done = true;
        }
        let write_timeout = self.shared.config.write_timeout();
        let Some(last) = batch.last().map(|q| q.id) else {
            return self.answer_syncs().await;
        };
        let writer = &mut self.writer;
        self.unacked.extend(batch.iter().map(|q| q.id));
        let write = async {
            for q in batch {
                writer
                    .feed(ServerMessage::Deliver {
                        envelope_id: q.id,
                        from: q.sender,
                        payload: q.payload,
                    })
                    .await?;
            }
            SinkExt::<ServerMessage>::flush(writer).await
        };
        let result = timeout(write_timeout, write).await;
        self.finish_write(result)?;
        self.backlog_cursor = last;
        self.check_acknowledging()?;
        self.answer_syncs().await
    }

    pub(super) fn storage_lost(&self, e: StoreError) -> Close {
        tracing::error!(conn = self.conn_id, "storage error reading the queue: {e}");
        Close::tell(
            ErrorCode::Internal,
            "the server could not read your queued messages; reconnect later",
        )
    }

    /// At shutdown: write what was already routed to this client, within the write timeout.
    pub(super) async fn drain_routed(&mut self) {
        while let Some(msg) = self.membership.as_mut().and_then(|m| m.inbox.try_next()) {
            if self.forward(msg).await.is_err() {
                return;
            }
        }
    }

    /// A session given far more than it acknowledged is not acknowledging: it goes.
    fn check_acknowledging(&self) -> Result<(), Close> {
        if self.unacked.len() > self.max_unacked() {
            return Err(self.not_acknowledging());
        }
        Ok(())
    }

    /// An `Ack`: only ids this session was given and has not acknowledged count (the
    /// rest are ignored and counted), at most `max_ack_ids` of them. Held envelopes among
    /// them are answered at once; the rest are deleted in the next commit (an ack is
    /// never paced: see [`crate::writer::Writer::ack`]).
    /// With the cluster backend nothing is submitted: the ids to delete are returned.
    pub(super) fn ack(&mut self, me: &Username, ids: Vec<u64>) -> Vec<u64> {
        let offered = ids.len();
        let max = self.shared.config.max_ack_ids;
        let mut mine: Vec<u64> = ids
            .into_iter()
            .take(max)
            .filter(|id| self.unacked.remove(id))
            .collect();
        let ignored = offered - mine.len();
        if ignored > 0 {
            Metrics::add(&self.shared.metrics.acks_ignored, ignored as u64);
        }
        if mine.is_empty() {
            return mine;
        }
        mine.sort_unstable();
        if self.shared.cluster.is_some() {
            return mine;
        }
        // Nothing is answered, so nothing waits: the writer logs a failure.
        self.shared.writer.ack(me.clone(), mine);
        Vec::new()
    }
}
