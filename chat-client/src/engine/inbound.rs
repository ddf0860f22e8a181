//! What the server sends: deliveries (opened, stored, acknowledged, receipted), replies
//! to our requests, and contact keys going through the trust store.

use chat_protocol::e2e::{Body, Content, OpenError, Parties};
use chat_protocol::identity::PublicIdentity;
use chat_protocol::message::RequestId;
use chat_protocol::trust::{self, Seen};
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage, Username};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Engine, Pending, RATE_LIMIT_RETRY, SessionEnd, Waiting, now_ms, random_id};
use crate::api::{ConnectionState, Event, id_hex};
use crate::store::Floors;

impl Engine {
    pub(super) fn server_message(
        &mut self,
        msg: ServerMessage,
        out: &mut Vec<ClientMessage>,
    ) -> Option<SessionEnd> {
        match msg {
            ServerMessage::Deliver {
                envelope_id,
                from,
                payload,
            } => self.deliver(envelope_id, from, payload, out),
            ServerMessage::Ok { id } => {
                if let Some(Pending::Send { id: msg_id, to }) = self.pending.remove(&id) {
                    self.in_flight.remove(&msg_id);
                    match self.store.mark_sent(&msg_id) {
                        Ok(Some(_)) => self.sink.emit(Event::Sent {
                            to,
                            id: id_hex(&msg_id),
                        }),
                        Ok(None) => {}
                        Err(e) => self.store_error(e),
                    }
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
                        self.sink.emit(Event::Presence { user, online });
                    }
                }
                _ => self.sink.emit(Event::Users { online }),
            },
            ServerMessage::Presence { username, online } => {
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
                    self.key_arrived(&user, &public_key, out);
                }
            }
            ServerMessage::Ping { nonce } => out.push(ClientMessage::Pong { nonce }),
            ServerMessage::Pong { .. } => {}
            ServerMessage::Hello { .. }
            | ServerMessage::Challenge { .. }
            | ServerMessage::Welcome { .. } => {
                warn!("unexpected login message after login; ignored");
            }
        }
        None
    }
    pub(super) fn request_failed(&mut self, id: RequestId, code: ErrorCode, message: String) {
        match self.pending.remove(&id) {
            Some(Pending::Send { id: msg_id, to }) => {
                self.in_flight.remove(&msg_id);
                match code {
                    // Worth another try later: the message stays in the outbox.
                    ErrorCode::RateLimited
                    | ErrorCode::RecipientQueueFull
                    | ErrorCode::RecipientOffline
                    | ErrorCode::Internal => {
                        let delay = if code == ErrorCode::RateLimited {
                            RATE_LIMIT_RETRY
                        } else {
                            self.config.retry_later
                        };
                        let at = Instant::now() + delay;
                        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
                        self.sink.emit(Event::error(
                            code.as_str(),
                            format!("{message}; the message to {to} stays queued and is retried in {} s", delay.as_secs().max(1)),
                        ));
                    }
                    _ => {
                        self.fail_message(&msg_id);
                        self.sink.emit(Event::error(
                            code.as_str(),
                            format!("message to {to} could not be sent: {message}"),
                        ));
                    }
                }
                self.connection_event(ConnectionState::Connected, None);
            }
            Some(Pending::Key { user }) => {
                let waiting = self.awaiting_key.remove(&user).unwrap_or_default();
                if code == ErrorCode::UnknownUser {
                    self.fail_outbox_for(&user);
                    self.sink.emit(Event::error(
                        code.as_str(),
                        format!("there is no user named {user}"),
                    ));
                } else {
                    self.sink.emit(Event::error(code.as_str(), message));
                }
                // Envelopes from a sender whose key can't be had are dropped for good.
                for w in waiting {
                    if let Waiting::Envelope { envelope_id, .. } = w {
                        self.acks.push(envelope_id);
                    }
                }
            }
            Some(Pending::Receipt | Pending::Users | Pending::Watch { .. }) | None => {
                self.sink.emit(Event::error(code.as_str(), message));
            }
        }
    }
    /// Asks the server for `user`'s key (once per connection) and parks `then` until it comes.
    pub(super) fn fetch_key(
        &mut self,
        user: &str,
        then: Option<Waiting>,
        out: &mut Vec<ClientMessage>,
    ) {
        let first = !self.awaiting_key.contains_key(user);
        let waiting = self.awaiting_key.entry(user.to_owned()).or_default();
        // Bounded: a flood of undecryptable envelopes must not grow memory.
        if let Some(w) = then
            && waiting.len() < 1000
        {
            waiting.push(w);
        }
        if first {
            // Someone we exchange messages with: follow their presence too.
            self.watch(vec![user.to_owned()], Some(out));
            let username = user.to_owned();
            self.request(
                out,
                Pending::Key {
                    user: user.to_owned(),
                },
                |id| ClientMessage::GetPublicKey { id, username },
            );
        }
    }
    pub(super) fn key_arrived(&mut self, user: &str, der: &[u8], out: &mut Vec<ClientMessage>) {
        let waiting = self.awaiting_key.remove(user).unwrap_or_default();
        if PublicIdentity::from_der(der).is_err() {
            self.sink.emit(Event::error(
                "invalid_key",
                format!("the server sent an unusable key for {user}"),
            ));
            return;
        }
        self.checked_keys.insert(user.to_owned());
        let pin = self.pin(user);
        match trust::observe(pin.as_ref(), der) {
            Seen::New(pin) => {
                info!(user, "pinned first key");
                self.save_pin(user, &pin);
            }
            Seen::Trusted => {}
            Seen::Changed { was_verified, pin } => {
                let first_report =
                    pin.pending.as_deref() != self.pin(user).and_then(|p| p.pending).as_deref();
                self.save_pin(user, &pin);
                if first_report {
                    warn!(user, was_verified, "contact key changed");
                    self.sink.emit(Event::KeyChanged {
                        user: user.to_owned(),
                    });
                }
            }
        }
        for w in waiting {
            match w {
                Waiting::Safety => self.emit_safety(user),
                Waiting::Envelope {
                    envelope_id,
                    payload,
                } => self.deliver(envelope_id, user.to_owned(), payload, out),
            }
        }
        self.flush_outbox(out);
    }
    /// Handles one delivered envelope. It is acknowledged (so the server forgets it) once
    /// it is dealt with for good; only a store failure leaves it for redelivery.
    pub(super) fn deliver(
        &mut self,
        envelope_id: u64,
        from: String,
        payload: Vec<u8>,
        out: &mut Vec<ClientMessage>,
    ) {
        let Ok(sender) = Username::parse(&from) else {
            warn!("delivery stamped with an invalid name; dropped");
            self.acks.push(envelope_id);
            return;
        };
        let from = sender.to_string();
        match self.pin(&from) {
            None => {
                self.fetch_key(
                    &from,
                    Some(Waiting::Envelope {
                        envelope_id,
                        payload,
                    }),
                    out,
                );
                return;
            }
            Some(pin) if !pin.usable() => {
                self.acks.push(envelope_id);
                self.sink.emit(Event::error(
                    "key_changed",
                    format!("a message from {from} was refused: their key changed and is not accepted yet"),
                ));
                return;
            }
            Some(_) => {}
        }
        let Some((_, public)) = self.usable_key(&from) else {
            self.acks.push(envelope_id);
            return;
        };
        let floors = self.store.floors(&from).unwrap_or_default();
        let peer = Self::peer(&mut self.peers, &from, floors);
        let parties = Parties {
            me: &self.identity,
            my_name: &self.me,
            peer_name: &sender,
            peer: &public,
        };
        let opened = match peer.inbound.open(parties, &payload) {
            Ok(opened) => opened,
            Err(OpenError::Replay | OpenError::StaleOffer) => {
                // Delivery is at-least-once: after a crash the server re-sends what we
                // processed but had not acknowledged. Already handled; drop it quietly.
                debug!(from, "duplicate envelope dropped");
                self.acks.push(envelope_id);
                return;
            }
            Err(e) => {
                self.acks.push(envelope_id);
                warn!(from, error = %e, "envelope refused");
                if matches!(
                    e,
                    OpenError::SenderKeyMismatch | OpenError::BadOfferSignature
                ) && !self.checked_keys.contains(&from)
                {
                    // Perhaps they have a new key: ask the server, which reports any change.
                    self.fetch_key(&from, None, out);
                }
                self.sink.emit(Event::error(
                    "undecryptable",
                    format!("a message from {from} failed verification and was discarded ({e})"),
                ));
                return;
            }
        };
        let newest = peer.inbound.newest_offer_ms();
        if newest != floors.in_offer_ms {
            let floors = Floors {
                in_offer_ms: newest,
                ..floors
            };
            if let Err(e) = self.store.save_floors(&from, floors) {
                self.store_error(e);
            }
        }
        match opened.content.body {
            Body::Text(text) => {
                match self.store.store_incoming(
                    &from,
                    &opened.content.id,
                    &text,
                    opened.content.sent_at_ms,
                ) {
                    Ok(true) => self.sink.emit(Event::Message {
                        from: from.clone(),
                        id: id_hex(&opened.content.id),
                        text,
                        sent_at: opened.content.sent_at_ms,
                    }),
                    Ok(false) => debug!(from, "duplicate message ignored"),
                    Err(e) => {
                        // Not stored: no receipt and no ack, so it comes again later.
                        self.store_error(e);
                        return;
                    }
                }
                self.acks.push(envelope_id);
                let receipt = Content {
                    id: random_id(),
                    sent_at_ms: now_ms(),
                    body: Body::Receipt {
                        epoch: opened.epoch,
                        ids: vec![opened.content.id],
                    },
                };
                if let Some(payload) = self.seal(&from, &receipt) {
                    let to = from;
                    self.request(out, Pending::Receipt, |id| ClientMessage::Send {
                        id,
                        to,
                        payload,
                    });
                }
            }
            Body::Receipt { epoch, ids } => {
                self.acks.push(envelope_id);
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.outbound.acknowledge(epoch);
                }
                for id in ids {
                    match self.store.mark_delivered(&from, &id) {
                        Ok(true) => self.sink.emit(Event::Delivered {
                            to: from.clone(),
                            id: id_hex(&id),
                        }),
                        Ok(false) => {}
                        Err(e) => self.store_error(e),
                    }
                }
            }
        }
    }
}
