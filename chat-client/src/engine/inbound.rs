//! What the server sends: deliveries (opened, committed with their state, acknowledged);
//! replies to our requests are settled in `replies`.
//!
//! An envelope is acknowledged (the relay forgets it) only once dealt with for good:
//! stored; a duplicate; held locally for a pending key change; recorded as needing a
//! retry request (we lack its key: the sender keeps the message and sends it again); or
//! found forged and reported. A local store failure leaves it unacknowledged.

use chat_protocol::e2e::{Body, Envelope, Failure, Inbound, OpenError, Opened, Parties};
use chat_protocol::group::PayloadKind;
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::offers::Parked;
use super::{Engine, Pending, SessionEnd, Source, UNDECRYPTABLE_EVERY, Waiting, now_ms};
use crate::api::{ConnectionState, Event, id_hex};
use crate::store::ReceivedText;

impl Engine {
    pub(super) fn server_message(&mut self, msg: ServerMessage) -> Option<SessionEnd> {
        match msg {
            ServerMessage::Deliver {
                envelope_id,
                from,
                payload,
            } => {
                if self.stalled.is_empty() {
                    self.deliver(Source::Relay(envelope_id), from, payload, Instant::now());
                } else {
                    // Behind deliveries waiting for the store: keep the order.
                    self.stall(Source::Relay(envelope_id), &from, &payload);
                }
            }
            ServerMessage::Ok { id } => self.request_done(id),
            ServerMessage::Outcomes { id, outcomes } => {
                if !matches!(self.pending.get(&id), Some(Pending::GroupSend { .. })) {
                    warn!("outcomes for a request that was no SendMany; ignored");
                } else if let Some(Pending::GroupSend { group, id, members }) =
                    self.pending.remove(&id)
                {
                    self.group_sends_answered(group, id, members, outcomes);
                    self.connection_event(ConnectionState::Connected, None);
                }
            }
            ServerMessage::Error {
                id: Some(id),
                code,
                message,
            } => self.request_failed(id, code, message),
            ServerMessage::Error {
                id: None,
                code,
                message,
            } => {
                return Some(match code {
                    ErrorCode::SessionReplaced => SessionEnd::Fatal {
                        code: code.as_str().into(),
                        message: format!(
                            "{message}. This client stopped so the two don't keep replacing each other."
                        ),
                    },
                    _ => SessionEnd::Lost(format!("{code}: {message}")),
                });
            }
            ServerMessage::Users { id, online } => match self.pending.remove(&id) {
                Some(Pending::Watch { users }) => {
                    for user in users {
                        let online = online.contains(&user);
                        self.peer_presence(&user, online);
                        self.sink.emit(Event::Presence { user, online });
                    }
                }
                _ => self.sink.emit(Event::Users { online }),
            },
            ServerMessage::Presence { username, online } => {
                self.peer_presence(&username, online);
                self.sink.emit(Event::Presence {
                    user: username,
                    online,
                });
            }
            ServerMessage::PublicKey {
                id,
                username,
                public_key,
            } => {
                if let Some(Pending::Key { user }) = self.pending.remove(&id)
                    && user == username
                {
                    self.key_arrived(&user, &public_key);
                    let answer = match self.pin(&user) {
                        Some(_) => Ok(()),
                        None => Err(format!("{user}'s key could not be read or stored")),
                    };
                    self.member_checked(&user, answer);
                }
            }
            ServerMessage::Ping { nonce } => {
                self.out.push(ClientMessage::Pong { nonce });
                // With every send answered this is the ping after the last refusal (the
                // relay writes one right after each): sends written from now on come
                // after its `Pong`.
                self.lift_shed_fence_if_drained();
            }
            ServerMessage::Pong { .. } => {}
            ServerMessage::Hello { .. }
            | ServerMessage::Challenge { .. }
            | ServerMessage::Welcome { .. } => {
                warn!("unexpected login message after login; ignored");
            }
        }
        None
    }

    /// Handles one envelope from `from` (stamped by the server) that reached us at
    /// `arrived`.
    pub(super) fn deliver(
        &mut self,
        source: Source,
        from: String,
        payload: Vec<u8>,
        arrived: Instant,
    ) {
        let Ok(sender) = Username::parse(&from) else {
            warn!("delivery stamped with an invalid name; dropped");
            return self.settle(source);
        };
        let from = sender.to_string();
        self.peer_active(&from);
        if self.left_behind(source, &from) {
            return;
        }
        match self.pin(&from) {
            None => {
                let waiting = Waiting::Envelope {
                    source,
                    payload,
                    arrived,
                };
                if !self.fetch_key(&from, Some(waiting)) {
                    debug!("sender's key unknown while offline; kept for later");
                }
                return;
            }
            Some(pin) if !pin.usable() => return self.hold(source, &from, &payload),
            Some(_) => {}
        }
        let Some((_, public)) = self.usable_key(&from) else {
            return self.settle(source);
        };
        if chat_protocol::group::payload_kind(&payload) == Some(PayloadKind::Group) {
            return self.deliver_group(source, &sender, &public, payload);
        }
        if let Source::GroupHeld(seq) = source {
            // Not a group envelope after all: nothing to hold it for.
            return self.settle(Source::GroupHeld(seq));
        }
        if self.offers.is_blocked(&from) {
            // Behind an offer being unwrapped (or a throttled sender): keep the order.
            let parked = Parked {
                source,
                payload,
                arrived,
            };
            if !self.offers.park(&from, parked) {
                debug!("too many envelopes waiting for one sender; left to the relay");
                self.leave_to_relay(source, &from);
            }
            return;
        }
        let mut state = match self.inbound_state(&from) {
            Ok(state) => state,
            Err(e) => return self.store_error(e),
        };
        let parties = Parties {
            me: &self.identity,
            my_name: &self.me,
            peer_name: &sender,
            peer: &public,
        };
        let inspected = match state.inspect(parties, &payload) {
            Ok(inspected) => inspected,
            Err(e) => return self.open_failed(source, &from, payload, arrived, e),
        };
        // A new offer: RSA, unless it is known (good or bad) already.
        let fresh = match inspected.needs_unwrap() {
            None => None,
            Some(offer_id) => match self.offers.cached(offer_id) {
                Some(Ok(key)) => Some(key.clone()),
                Some(Err(e)) => {
                    let e = *e;
                    return self.open_failed(source, &from, payload, arrived, e);
                }
                None => {
                    let parked = Parked {
                        source,
                        payload,
                        arrived,
                    };
                    return self.await_offer(&from, inspected, public, parked);
                }
            },
        };
        match state.open_inspected(parties, inspected, fresh.as_ref()) {
            Ok(opened) => self.commit_opened(source, &from, opened, state, &payload),
            Err(e) => self.open_failed(source, &from, payload, arrived, e),
        }
    }

    /// An envelope did not open: drop it, ask for it again, or check the sender's key.
    fn open_failed(
        &mut self,
        source: Source,
        from: &str,
        payload: Vec<u8>,
        arrived: Instant,
        e: OpenError,
    ) {
        match e.failure() {
            Failure::Duplicate => {
                // Delivery is at least once: processed before, not yet acknowledged.
                debug!("duplicate envelope dropped");
                self.settle(source);
            }
            Failure::MissingKey => {
                // We lack the key (lost state, or its offer never reached us): the
                // sender still holds the message; ask for it again, once per epoch.
                let epoch = chat_protocol::frame::decode::<Envelope>(&payload)
                    .map(|e| e.epoch)
                    .unwrap_or_default();
                match self.store.request_retry(from, epoch, now_ms()) {
                    Ok(new) => {
                        if new {
                            info!(error = %e, "asking the sender to send an epoch again");
                            self.flush_due = true;
                        }
                        self.settle(source);
                    }
                    Err(e) => self.store_error(e),
                }
            }
            Failure::KeyMismatch if self.checked_keys.get(from).is_none_or(|at| *at < arrived) => {
                // Perhaps they have a new key (since we last checked): ask the server,
                // which reports a change. Envelopes that arrived before the answer are
                // judged by it, so a flood costs one question per round trip.
                let waiting = Waiting::Envelope {
                    source,
                    payload,
                    arrived,
                };
                self.fetch_key(from, Some(waiting));
            }
            Failure::KeyMismatch | Failure::Forged => {
                self.settle(source);
                self.report_undecryptable(from, e);
            }
        }
    }

    /// Tells the user a message from `from` was forged or damaged — at once the first
    /// time, then at most once a minute per sender with a count (a flood of forgeries
    /// must not become a flood of alarms).
    pub(super) fn report_undecryptable(&mut self, from: &str, e: impl std::fmt::Display) {
        let now = Instant::now();
        let (last, suppressed) = self
            .undecryptable
            .entry(from.to_owned())
            .or_insert((None, 0));
        if last.is_some_and(|at| now.duration_since(at) < UNDECRYPTABLE_EVERY) {
            *suppressed += 1;
            return;
        }
        let more = std::mem::take(suppressed);
        *last = Some(now);
        warn!(error = %e, more, "envelope refused");
        let message = if more == 0 {
            format!("a message from {from} failed verification and was discarded ({e})")
        } else {
            format!(
                "{} messages from {from} failed verification and were discarded ({e})",
                more + 1
            )
        };
        self.sink.emit(Event::error("undecryptable", message));
    }

    /// Stores what an envelope carried together with the advanced state, then settles it.
    fn commit_opened(
        &mut self,
        source: Source,
        from: &str,
        opened: Opened,
        state: Inbound,
        payload: &[u8],
    ) {
        let held = match source {
            Source::Held(seq) => Some(seq),
            Source::Relay(_) | Source::GroupHeld(_) => None,
        };
        let content = opened.content;
        let committed = match &content.body {
            Body::Text(text) => {
                let received = ReceivedText {
                    peer: from,
                    id: &content.id,
                    text,
                    sent_at: content.sent_at_ms,
                    stored_at: now_ms(),
                };
                self.store.commit_text(received, &state, held).map(|new| {
                    if new {
                        self.sink.emit(Event::Message {
                            from: from.to_owned(),
                            id: id_hex(&content.id),
                            text: text.clone(),
                            sent_at: content.sent_at_ms,
                        });
                    } else {
                        debug!("duplicate message ignored; receipted again");
                    }
                    self.flush_due = true;
                    super::crash_point_after_store();
                })
            }
            Body::Receipt { epoch, ids } => {
                self.store
                    .commit_receipt(from, ids, &state, held)
                    .map(|(done, group_done)| {
                        self.peer(from).outbound.acknowledge(*epoch);
                        self.group_delivered(from, group_done);
                        for d in done {
                            let id = id_hex(&d.id);
                            // The receipt can overtake the server's answer: keep the
                            // documented order, queued → sent → delivered.
                            if d.was_sending {
                                self.sink.emit(Event::Sent {
                                    to: from.to_owned(),
                                    id: id.clone(),
                                });
                            }
                            self.sink.emit(Event::Delivered {
                                to: from.to_owned(),
                                id,
                            });
                        }
                    })
            }
            body @ (Body::GroupUpdate { .. } | Body::SenderKey(_)) => {
                self.control_opened(from, content.id, body, &state, held)
            }
            Body::RetryRequest { epochs } => {
                let epochs: Vec<u32> = epochs.iter().copied().take(256).collect();
                self.store
                    .commit_retry_request(from, &epochs, &state, held)
                    .map(|ids| {
                        info!(count = ids.len(), "recipient lost an epoch; sending again");
                        let peer = self.peer(from);
                        for epoch in &epochs {
                            peer.outbound.retire(*epoch);
                        }
                        // What went under those epochs and still waits for the server's
                        // answer is sent again once answered.
                        self.retired_out
                            .extend(epochs.iter().map(|e| (from.to_owned(), *e)));
                        // Also what was accepted under them and not yet recorded.
                        self.unsettled_resealed(from, Some(&epochs));
                        // Their client may hold a new key: check before sending again.
                        self.checked_keys.remove(from);
                        for id in ids {
                            self.sink.emit(Event::Requeued {
                                to: from.to_owned(),
                                id: id_hex(&id),
                                reason: "recipient_lost_key".into(),
                            });
                        }
                        self.flush_due = true;
                    })
            }
        };
        match committed {
            Ok(()) => {
                self.peer(from).inbound = Some(state);
                if let Source::Relay(id) = source {
                    self.acks.push(id);
                }
            }
            Err(e) => {
                // Nothing changed: not acknowledged; retried from the same state.
                self.stall(source, from, payload);
                self.store_error(e);
            }
        }
    }

    /// Reports forgeries held back by [`Engine::report_undecryptable`] once their minute
    /// is over.
    pub(super) fn flush_undecryptable(&mut self) {
        let now = Instant::now();
        for (from, (last, suppressed)) in &mut self.undecryptable {
            if *suppressed > 0
                && last.is_none_or(|at| now.duration_since(at) >= UNDECRYPTABLE_EVERY)
            {
                let n = std::mem::take(suppressed);
                *last = Some(now);
                self.sink.emit(Event::error(
                    "undecryptable",
                    format!(
                        "{n} more message(s) from {from} failed verification and were discarded"
                    ),
                ));
            }
        }
    }

    /// An envelope is dealt with for good: acknowledge it, or release it from the held.
    pub(super) fn settle(&mut self, source: Source) {
        match source {
            Source::Relay(id) => self.acks.push(id),
            Source::Held(seq) => {
                if let Err(e) = self.store.release_held(seq) {
                    self.store_error(e);
                }
            }
            Source::GroupHeld(seq) => {
                if let Err(e) = self.store.drop_group_held(seq) {
                    self.store_error(e);
                }
            }
        }
    }
}
