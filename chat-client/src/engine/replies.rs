//! Replies to our requests: what an accepted request settles (a message sent, receipts
//! and retry requests owed no more, a sync done), and what a refusal does — a transient
//! one holds the peer's queue and retries later, said once per pause; a final one fails
//! the message and says why.

use std::time::Duration;

use chat_protocol::ErrorCode;
use chat_protocol::message::RequestId;
use tokio::time::Instant;

use super::{Engine, Pending, RATE_LIMIT_RETRY, Waiting, now_ms};
use crate::api::{ConnectionState, Event, id_hex};

impl Engine {
    /// The server accepted request `id`.
    pub(super) fn request_done(&mut self, id: RequestId) {
        match self.pending.remove(&id) {
            Some(Pending::Send {
                id: msg_id,
                to,
                epoch,
            }) => {
                self.in_flight.remove(&msg_id);
                self.peer_accepted(&to);
                if self.retired_out.contains(&(to.clone(), epoch)) {
                    // Its recipient asked for this epoch again meanwhile: it stays queued.
                    self.sink.emit(Event::Requeued {
                        to,
                        id: id_hex(&msg_id),
                        reason: "recipient_lost_key".into(),
                    });
                    self.flush_due = true;
                    return;
                }
                let accepted_at = self.relay_now_ms().unwrap_or_else(now_ms);
                self.record_sent(msg_id, to, epoch, accepted_at);
                self.connection_event(ConnectionState::Connected, None);
            }
            Some(Pending::GroupSend { group, id, members }) => {
                // A `SendMany` is answered by `Outcomes`; an `Ok` accepts every copy.
                let outcomes = vec![None; members.len()];
                self.group_sends_answered(group, id, members, outcomes);
                self.connection_event(ConnectionState::Connected, None);
            }
            Some(Pending::Receipt { peer, ids, epoch }) => {
                for id in &ids {
                    self.receipts_in_flight.remove(&(peer.clone(), *id));
                }
                if self.retired_out.contains(&(peer.clone(), epoch)) {
                    // The peer cannot open that epoch: still owed, sent again.
                    self.flush_due = true;
                } else {
                    self.record_receipts(peer, ids, Some(epoch));
                }
            }
            Some(Pending::Retry {
                peer,
                epochs,
                epoch,
            }) => {
                for e in &epochs {
                    self.retries_in_flight.remove(&(peer.clone(), *e));
                }
                if self.retired_out.contains(&(peer.clone(), epoch)) {
                    self.flush_due = true;
                } else {
                    self.record_retries(peer, epochs, Some(epoch));
                }
            }
            Some(Pending::Sync) => {
                self.synced = true;
                self.flush_due = true;
            }
            _ => {}
        }
    }

    /// How long to hold `peer` after a transient refusal with `code`, and whether the
    /// user is to be told (not again while a run of full-queue refusals goes on); the
    /// retry timer is set for it.
    pub(super) fn retry_after(&mut self, code: ErrorCode, peer: &str) -> (Duration, bool) {
        let (delay, tell) = match code {
            ErrorCode::RateLimited | ErrorCode::ServerBusy => (RATE_LIMIT_RETRY, true),
            ErrorCode::RecipientQueueFull => self.queue_full_delay(peer),
            _ => (self.config.retry_later, true),
        };
        let at = Instant::now() + delay;
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
        (delay, tell)
    }

    /// Holds everything to `peer` after a transient refusal with `code`, telling it once
    /// per pause (not once per message); a full queue at most once a minute.
    pub(super) fn hold_and_tell(&mut self, peer: &str, code: ErrorCode, message: &str) {
        let (delay, tell) = self.retry_after(code, peer);
        let newly_held = self.hold_peer(peer, delay);
        let notice = if code == ErrorCode::RecipientQueueFull {
            tell.then(|| self.full_queue_notice(peer, message, delay))
        } else if code == ErrorCode::ServerBusy && self.probing(peer) {
            // The relay holds the sends behind a refused one (`full_queue`): that
            // refusal was told; these are sent again with the rest.
            None
        } else {
            (newly_held && tell).then(|| {
                format!(
                    "{}; messages to {peer} stay queued and are retried in {} s",
                    relay_reason(message),
                    delay.as_secs().max(1)
                )
            })
        };
        if let Some(notice) = notice {
            self.sink.emit(Event::error(code.as_str(), notice));
        }
    }

    pub(super) fn request_failed(&mut self, id: RequestId, code: ErrorCode, message: String) {
        if code == ErrorCode::ServerBusy {
            self.shed_fence = true;
        }
        let transient = transient(code);
        match self.pending.remove(&id) {
            Some(Pending::Send { id: msg_id, to, .. }) => {
                self.in_flight.remove(&msg_id);
                if transient {
                    // Worth another try later: the message (and the rest to `to`) stays
                    // in the outbox; said once per pause, not once per message.
                    self.hold_and_tell(&to, code, &message);
                } else {
                    self.sink.emit(Event::error(
                        code.as_str(),
                        format!("message to {to} could not be sent: {message}"),
                    ));
                    self.fail_message(&msg_id, code.as_str(), &message);
                }
                self.connection_event(ConnectionState::Connected, None);
            }
            Some(Pending::GroupSend { group, id, members }) => {
                // The whole `SendMany` was refused: every copy in it is (said once).
                if transient {
                    let mut longest = Duration::ZERO;
                    for member in &members {
                        self.group_in_flight.remove(&(id, member.clone()));
                        let (delay, _) = self.retry_after(code, member);
                        self.hold_peer(member, delay);
                        longest = longest.max(delay);
                    }
                    self.sink.emit(Event::error(
                        code.as_str(),
                        format!(
                            "{message}; the group message stays queued and is retried in {} s",
                            longest.as_secs().max(1)
                        ),
                    ));
                } else {
                    self.sink.emit(Event::error(
                        code.as_str(),
                        format!("a group message could not be sent: {message}"),
                    ));
                    for member in members {
                        self.group_send_answered(group, id, &member, false);
                    }
                }
            }
            Some(Pending::Receipt { peer, ids, .. }) => {
                for id in &ids {
                    self.receipts_in_flight.remove(&(peer.clone(), *id));
                }
                if transient {
                    let (delay, _) = self.retry_after(code, &peer);
                    self.hold_peer(&peer, delay);
                } else {
                    // Refused for good (e.g. the sender's account is gone): owed no more.
                    self.record_receipts(peer, ids, None);
                }
            }
            Some(Pending::Retry { peer, epochs, .. }) => {
                for epoch in &epochs {
                    self.retries_in_flight.remove(&(peer.clone(), *epoch));
                }
                if transient {
                    let (delay, _) = self.retry_after(code, &peer);
                    self.hold_peer(&peer, delay);
                } else {
                    self.record_retries(peer, epochs, None);
                }
            }
            Some(Pending::Key { user }) => {
                let waiting = self.awaiting_key.remove(&user).unwrap_or_default();
                let for_group = self.member_checked(
                    &user,
                    Err(if code == ErrorCode::UnknownUser {
                        format!("there is no user named {user}")
                    } else {
                        format!("{user} could not be looked up ({message})")
                    }),
                );
                // A name looked up only for a group command: its error says it all.
                let told = for_group && waiting.is_empty();
                if code == ErrorCode::UnknownUser {
                    self.fail_outbox_for(
                        &user,
                        code.as_str(),
                        &format!("there is no user named {user}"),
                    );
                    if !told {
                        self.sink.emit(Event::error(
                            code.as_str(),
                            format!("there is no user named {user}"),
                        ));
                        self.sink.emit(Event::NoSuchUser { user: user.clone() });
                    }
                } else if !told {
                    self.sink.emit(Event::error(code.as_str(), message));
                }
                // Envelopes from a sender whose key can't be had are dropped for good.
                for w in waiting {
                    if let Waiting::Envelope { source, .. } = w {
                        self.settle(source);
                    }
                }
                self.flush_due = true;
            }
            Some(Pending::Users | Pending::Watch { .. } | Pending::Sync) | None => {
                self.sink.emit(Event::error(code.as_str(), message));
            }
        }
    }
}

/// The relay's reason for a refusal without its advice to try again later: the client
/// does that itself.
pub(super) fn relay_reason(message: &str) -> &str {
    message.split("; try again").next().unwrap_or(message)
}

/// Whether a refusal with `code` may pass if the request is made again later (the
/// message stays queued) rather than being final.
pub(super) fn transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::RateLimited
            | ErrorCode::ServerBusy
            | ErrorCode::RecipientQueueFull
            | ErrorCode::RecipientOffline
            | ErrorCode::ServerFull
            | ErrorCode::Internal
    )
}
