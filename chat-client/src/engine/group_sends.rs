//! Sending group messages: one `SendMany` per message to the members whose copies are
//! due, each member's outcome from the relay (held and retried, or failed for good),
//! copies withdrawn for people no longer in the group, and receipts counted per member.

use chat_protocol::e2e::MessageId;
use chat_protocol::group::GroupId;
use chat_protocol::message::{MAX_FANOUT, send_many_frame_len};
use chat_protocol::{ClientMessage, ErrorCode};
use tracing::warn;

use super::unsettled::Unsettled;
use super::{Engine, FLUSH_PAGE, Pending, now_ms};
use crate::api::{Event, id_hex};
use crate::store::Withdrawn;

impl Engine {
    /// Whether group sends may go out: the backlog waiting at login has been read and
    /// no envelope of it waits for its sender's key, so every membership change it held
    /// is applied (a member removed while we were away gets nothing more from us).
    pub(super) fn group_sends_ready(&self) -> bool {
        self.synced
            && !self
                .awaiting_key
                .values()
                .flatten()
                .any(|w| matches!(w, super::Waiting::Envelope { .. }))
    }

    /// Whether `member` is (still) someone our messages to `group` go to.
    pub(super) fn sends_to(&self, group: &GroupId, member: &str) -> bool {
        self.groups.get(group).is_some_and(|g| {
            let state = g.membership.current();
            state.is_member(&self.me) && state.members.iter().any(|m| m.as_str() == member)
        })
    }

    /// Hands queued copies of group messages to the relay, once
    /// [`Engine::group_sends_ready`]: one `SendMany` per message naming every member whose
    /// copy is due (split where it would pass [`MAX_FANOUT`] names or the relay's frame
    /// limit). A copy for someone no longer in the group is withdrawn instead, unless it
    /// was handed to the relay already (then the relay's answer settles it).
    ///
    /// Messages are walked oldest first, [`FLUSH_PAGE`] at a time, and a message's members
    /// and envelope are read only when it comes up: a flush stops at the first message the
    /// window has no room for, so a long group outbox costs it what it sends.
    pub(super) fn flush_group_sends(&mut self) {
        if !self.group_sends_ready() {
            return;
        }
        let mut after = 0;
        loop {
            let page = match self.store.group_sends_queued_after(after, FLUSH_PAGE) {
                Ok(page) => page,
                Err(e) => return self.store_error(e),
            };
            let last_page = page.len() < FLUSH_PAGE;
            for message in page {
                after = message.seq;
                if !self.flush_group_message(message.group, message.id) {
                    return;
                }
            }
            if last_page {
                return;
            }
        }
    }

    /// Hands the relay the copies of our group message `id` that are due. Returns false
    /// if the window had no room for it (the flush stops there: messages go in order).
    fn flush_group_message(&mut self, group: GroupId, id: MessageId) -> bool {
        let queued = match self.store.group_send_members_queued(&id) {
            Ok(queued) => queued,
            Err(e) => {
                self.store_error(e);
                return false;
            }
        };
        let mut members = Vec::new();
        for member in queued {
            // A copy handed to the relay on this connection is past withdrawing: its
            // answer settles it (and a removed member opens it, as sent before we knew).
            // Which copies were handed over is not remembered across connections.
            if self.group_in_flight.contains(&(id, member.clone())) {
                continue;
            }
            if !self.sends_to(&group, &member) {
                self.withdraw_group_send(group, id, &member);
                continue;
            }
            if !self.held(&member) {
                members.push(member);
            }
        }
        if members.is_empty() {
            return true;
        }
        // A new message waits for room in the window, counted with the messages before
        // it (sent first); one under way is sent whole.
        if self.send_window_full() {
            return false;
        }
        let payload = match self.store.group_payload(&id) {
            Ok(Some(payload)) => payload,
            Ok(None) => return true,
            Err(e) => {
                self.store_error(e);
                return false;
            }
        };
        for member in &members {
            self.group_in_flight.insert((id, member.clone()));
        }
        self.send_group_copies(group, id, payload, members);
        true
    }

    /// One `SendMany` of `payload` (our message `id` to `group`) per run of `members` that
    /// fits [`MAX_FANOUT`] and the relay's frame limit.
    fn send_group_copies(
        &mut self,
        group: GroupId,
        id: MessageId,
        payload: Vec<u8>,
        members: Vec<String>,
    ) {
        let max_frame = self.max_frame;
        let fits = |to: &[String]| {
            to.len() <= MAX_FANOUT
                && (max_frame == 0 || send_many_frame_len(to, payload.len()) <= max_frame)
        };
        let mut chunk: Vec<String> = Vec::new();
        let mut chunks = Vec::new();
        for member in members {
            chunk.push(member);
            if chunk.len() > 1 && !fits(&chunk) {
                let member = chunk.pop().expect("just pushed");
                chunks.push(std::mem::replace(&mut chunk, vec![member]));
            }
        }
        chunks.push(chunk);
        for members in chunks {
            let (to, payload) = (members.clone(), payload.clone());
            self.request(Pending::GroupSend { group, id, members }, |id| {
                ClientMessage::SendMany { id, to, payload }
            });
        }
    }

    /// The relay answered a `SendMany` of our message `id` to `group`: one outcome per
    /// member, in the order they were named (`None`: accepted).
    pub(super) fn group_sends_answered(
        &mut self,
        group: GroupId,
        id: MessageId,
        members: Vec<String>,
        outcomes: Vec<Option<ErrorCode>>,
    ) {
        if outcomes.len() != members.len() {
            warn!(
                "the relay answered {} outcomes for {} recipients; the copies are sent again",
                outcomes.len(),
                members.len()
            );
        }
        let mut outcomes = outcomes.into_iter();
        for member in members {
            match outcomes.next() {
                Some(None) => {
                    self.peer_accepted(&member);
                    self.group_send_answered(group, id, &member, true);
                }
                Some(Some(code)) => {
                    let message = refusal(code, &member);
                    self.group_copy_refused(group, id, member, code, message);
                }
                None => {
                    // Unanswered: it stays queued and goes again later.
                    let message = "the relay did not answer for it".to_owned();
                    self.group_copy_refused(group, id, member, ErrorCode::Internal, message);
                }
            }
        }
    }

    /// The relay refused `member`'s copy of our message `id` to `group` with `code`: held
    /// and tried again later if that may pass, else that copy fails for good.
    pub(super) fn group_copy_refused(
        &mut self,
        group: GroupId,
        id: MessageId,
        member: String,
        code: ErrorCode,
        message: String,
    ) {
        if super::replies::transient(code) {
            self.group_in_flight.remove(&(id, member.clone()));
            self.hold_and_tell(&member, code, &message);
        } else {
            self.sink.emit(Event::error(
                code.as_str(),
                format!("a group message to {member} could not be sent: {message}"),
            ));
            self.group_send_answered(group, id, &member, false);
        }
    }

    /// Drops `member`'s copy of our message `id` to `group`: they are no longer in it
    /// (or we are not). Tells what that made of the message.
    /// If that cannot be recorded, the copy stays in flight (neither sent nor withdrawn
    /// again by a flush) and the withdrawal is retried (`unsettled`).
    pub(super) fn withdraw_group_send(&mut self, group: GroupId, id: MessageId, member: &str) {
        let recorded = self.store.withdraw_group_send(&id, member);
        let unsettled = || Unsettled::Withdrawal {
            group,
            id,
            member: member.to_owned(),
        };
        let Some(Some(withdrawn)) = self.settled(recorded, unsettled) else {
            return;
        };
        let (delivered_to, recipients) = match self.store.group_delivery(&id) {
            Ok(counts) => counts,
            Err(e) => return self.store_error(e),
        };
        let member_still = self
            .groups
            .get(&group)
            .is_some_and(|g| g.membership.current().is_member(&self.me));
        let (group, msg) = (id_hex(&group), id_hex(&id));
        self.sink.emit(Event::GroupWithdrawn {
            group: group.clone(),
            id: msg.clone(),
            member: member.to_owned(),
            delivered_to,
            recipients,
        });
        match withdrawn {
            Withdrawn::Waiting => {}
            Withdrawn::NowSent => self.sink.emit(Event::GroupSent { group, id: msg }),
            Withdrawn::NoneLeft => self.sink.emit(Event::GroupFailed {
                group,
                id: msg,
                reason: if member_still {
                    "no_recipients"
                } else {
                    "not_a_member"
                }
                .into(),
                message: if member_still {
                    "nobody this message was for is in the group any more (the change came \
                     before it could go out); it was sent to nobody"
                } else {
                    "you were no longer in the group when this message could go out; it was \
                     sent to nobody"
                }
                .into(),
            }),
        }
    }

    /// The relay answered a group copy: accepted (`Ok`) or refused for good.
    pub(super) fn group_send_answered(
        &mut self,
        group: GroupId,
        id: MessageId,
        member: &str,
        accepted: bool,
    ) {
        self.group_in_flight.remove(&(id, member.to_owned()));
        let at = accepted.then(|| self.relay_now_ms().unwrap_or_else(now_ms));
        self.record_group_copy(group, id, member, at);
    }

    /// `member` receipted our group messages: `done` is (group, id, whether the message
    /// just became `sent` — the receipt overtook the relay's answer).
    pub(super) fn group_delivered(&mut self, member: &str, done: Vec<(GroupId, MessageId, bool)>) {
        for (group, id, sent_now) in done {
            if sent_now {
                self.sink.emit(Event::GroupSent {
                    group: id_hex(&group),
                    id: id_hex(&id),
                });
            }
            let (delivered_to, recipients) = match self.store.group_delivery(&id) {
                Ok(counts) => counts,
                Err(e) => return self.store_error(e),
            };
            self.sink.emit(Event::GroupDelivered {
                group: id_hex(&group),
                to: member.to_owned(),
                id: id_hex(&id),
                delivered_to,
                recipients,
            });
        }
    }
}

/// What the relay's refusal `code` of a copy for `member` means, for people (an
/// `Outcomes` reply carries codes only).
fn refusal(code: ErrorCode, member: &str) -> String {
    match code {
        ErrorCode::UnknownUser => format!("there is no user named {member}"),
        ErrorCode::RecipientQueueFull => {
            format!("{member} has too many undelivered messages waiting at the relay")
        }
        ErrorCode::ServerFull => "the relay's storage for undelivered messages is full".into(),
        ErrorCode::Internal => "the relay could not reach its storage".into(),
        ErrorCode::ServerBusy => "the relay is overloaded".into(),
        other => format!("the relay refused it ({other})"),
    }
}
