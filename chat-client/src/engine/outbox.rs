//! What we send: the outbox (texts, until receipted), the receipts and retry requests we
//! owe, sealing, and giving up — with a reason — on what can never arrive.

use std::collections::HashSet;

use chat_protocol::ClientMessage;
use chat_protocol::e2e::{self, Body, Content, MessageId, Parties, Sealed};
use chat_protocol::message::send_frame_len;
use tracing::warn;

use super::peers::parse_contact;
use super::unsettled::Unsettled;
use super::{
    COPY_WINDOW, Engine, FLUSH_PAGE, META_QUEUE_MAX_AGE, Pending, SEND_WINDOW, now_ms, random_id,
};
use crate::api::{ConnectionState, Event, id_hex};
use crate::store::OutboxItem;

/// Ids per receipt: keeps one receipt well inside a frame.
const RECEIPT_BATCH: usize = 512;
/// Smallest envelope around a text: padding bucket, AES-GCM tag, names, counters. A text
/// whose padded size alone passes the relay's frame limit can never be sent.
pub(super) const ENVELOPE_OVERHEAD: usize = 16 + 2 * 33 + 32;

impl Engine {
    /// Writes a new message to the outbox. Returns whether it was queued.
    pub(super) fn enqueue(&mut self, to: &str, text: String) -> bool {
        self.enqueue_burst(vec![(to.to_owned(), text)])
    }

    /// Writes texts sent together (commands that were waiting at once: a script, a
    /// paste) to the outbox, in order, committing each run of plain ones in one
    /// transaction (one `fsync` rather than one per text); a refused one (a bad name, a
    /// text too long, a changed key) or a note to oneself is handled after the run before
    /// it is committed, so events keep the order of the commands. Returns whether any
    /// was queued.
    pub(super) fn enqueue_burst(&mut self, sends: Vec<(String, String)>) -> bool {
        let mut run = Vec::new();
        let mut queued = false;
        for (to, text) in sends {
            match self.check_send(&to, text) {
                Ok(item) if item.peer != self.me.as_str() => run.push(item),
                checked => {
                    queued |= self.commit_burst(std::mem::take(&mut run));
                    match checked {
                        Ok(note) => self.save_note(note),
                        Err(refusal) => self.sink.emit(refusal),
                    }
                }
            }
        }
        queued | self.commit_burst(run)
    }

    /// A `send` command as the outbox item it becomes, or the error event that refuses
    /// it (`invalid_username`, `message_too_long`, `key_changed`); nothing written yet.
    fn check_send(&mut self, to: &str, text: String) -> Result<OutboxItem, Event> {
        let to = parse_contact(to)?;
        if let Some(limit) = self.text_limit(&text, ENVELOPE_OVERHEAD, "texts") {
            return Err(Event::error("message_too_long", limit));
        }
        if self.pin(&to).is_some_and(|p| !p.usable()) {
            return Err(Event::error(
                "key_changed",
                format!(
                    "{to}'s key changed; check the safety number and accept or reject the new key before sending"
                ),
            ));
        }
        Ok(OutboxItem {
            id: random_id(),
            peer: to,
            body: Body::Text(text),
            sent_at: now_ms(),
        })
    }

    /// A note to oneself: stored, and so delivered, at once (`queued`, `sent` and
    /// `delivered` together), never sent.
    fn save_note(&mut self, item: OutboxItem) {
        if let Err(e) = self.store.store_note(&item) {
            warn!("store error: {e}");
            self.sink.emit(Event::error(
                "store_error",
                format!("your note was NOT saved: {e}; free some disk space and try again"),
            ));
            return;
        }
        let Body::Text(text) = item.body else {
            return;
        };
        let (to, id) = (item.peer, id_hex(&item.id));
        self.sink.emit(Event::Queued {
            to: to.clone(),
            id: id.clone(),
            text,
            sent_at: item.sent_at,
        });
        self.sink.emit(Event::Sent {
            to: to.clone(),
            id: id.clone(),
        });
        self.sink.emit(Event::Delivered { to, id });
    }

    /// Writes `items` (texts, checked) to the outbox in one transaction and says so with
    /// a `queued` event each; if that fails, none is queued and each is reported.
    fn commit_burst(&mut self, items: Vec<OutboxItem>) -> bool {
        if items.is_empty() {
            return false;
        }
        if let Err(e) = self.store.enqueue_many(&items) {
            // Not queued: say so plainly (nothing will retry them).
            warn!("store error: {e}");
            for item in &items {
                self.sink.emit(Event::error(
                    "store_error",
                    format!(
                        "your message to {} was NOT queued: {e}; free some disk space (or check \
                         the home directory) and send it again",
                        item.peer
                    ),
                ));
            }
            return false;
        }
        for item in items {
            let Body::Text(text) = item.body else {
                continue;
            };
            self.sink.emit(Event::Queued {
                to: item.peer,
                id: id_hex(&item.id),
                text,
                sent_at: item.sent_at,
            });
        }
        true
    }

    /// Why `text` can never be sent, if it can't: over the E2E limit, or (the relay's
    /// frame limit being known) too big for any envelope the relay accepts, an envelope
    /// adding `overhead` bytes to the padded text (`what`: "texts", "group texts").
    pub(super) fn text_limit(&self, text: &str, overhead: usize, what: &str) -> Option<String> {
        if text.len() > e2e::MAX_TEXT_BYTES {
            return Some(format!(
                "the message is {} bytes; the limit is {} bytes",
                text.len(),
                e2e::MAX_TEXT_BYTES
            ));
        }
        let smallest = e2e::padded_len(text.len() + 24) + overhead;
        (self.max_frame > 0 && smallest > self.max_frame).then(|| {
            format!(
                "the message is {} bytes; the relay at {} accepts envelopes up to {} bytes, \
                 so {what} must stay under about {} bytes",
                text.len(),
                self.config.server,
                self.max_frame,
                self.largest_text()
                    .saturating_sub(overhead.saturating_sub(ENVELOPE_OVERHEAD))
            )
        })
    }

    /// About the largest text whose envelope (with a key offer) fits the relay's frames.
    pub(super) fn largest_text(&self) -> usize {
        let mut size = [256, 1024, 4096, 16384]
            .into_iter()
            .chain((2..).map(|n| n * 16384))
            .take_while(|bucket| bucket + ENVELOPE_OVERHEAD + 1600 <= self.max_frame)
            .last()
            .unwrap_or(0);
        size = size.saturating_sub(24);
        size.min(e2e::MAX_TEXT_BYTES)
    }

    /// Seals and sends what can go now: queued texts (in order per contact), receipts and
    /// retry requests owed.
    pub(super) fn flush(&mut self) {
        if !self.online {
            return;
        }
        self.flush_texts();
        self.flush_group_sends();
        self.flush_receipts();
        self.flush_retries();
    }

    /// Sends (texts, group sends, receipts, retry requests) awaiting their answer.
    pub(super) fn sends_in_flight(&self) -> usize {
        self.copies_in_flight().0
    }

    /// Lifts a shed send's fence (`shed_fence`) once every send in flight is answered,
    /// and flushes what waited behind it.
    pub(super) fn lift_shed_fence_if_drained(&mut self) {
        if self.shed_fence && self.sends_in_flight() == 0 {
            self.shed_fence = false;
            self.flush_due = true;
        }
    }

    /// Sends awaiting their answer, and their copies (a group send has one per member).
    fn copies_in_flight(&self) -> (usize, usize) {
        self.pending
            .values()
            .fold((0, 0), |(sends, copies), p| match p {
                Pending::Send { .. } | Pending::Receipt { .. } | Pending::Retry { .. } => {
                    (sends + 1, copies + 1)
                }
                Pending::GroupSend { members, .. } => (sends + 1, copies + members.len()),
                _ => (sends, copies),
            })
    }

    /// Whether [`SEND_WINDOW`] sends or [`COPY_WINDOW`] copies await their answer, or a
    /// shed send's fence is up (`shed_fence`); if so, the flush stops there and goes on
    /// once there is room.
    pub(super) fn send_window_full(&mut self) -> bool {
        let (sends, copies) = self.copies_in_flight();
        let full = self.shed_fence || sends >= SEND_WINDOW || copies >= COPY_WINDOW;
        self.window_blocked |= full;
        full
    }

    /// Seals and sends queued messages in the order written, until the window is full.
    /// The outbox is walked [`FLUSH_PAGE`] rows at a time and a body is opened only to be
    /// sent, so a flush costs what it sends and what it skips (in flight, or to a held
    /// contact), never a decryption of every message waiting: with thousands queued, one
    /// flush per answer from the relay would otherwise make draining them quadratic.
    fn flush_texts(&mut self) {
        // Keep per-contact order: once one message to a contact must wait, so do the rest.
        let mut held: HashSet<String> = HashSet::new();
        // Contacts with a send in flight: one whose queue at the relay is full gets no
        // other until it is answered (`full_queue`).
        let mut sending: HashSet<String> = self
            .pending
            .values()
            .filter_map(|p| match p {
                Pending::Send { to, .. } => Some(to.clone()),
                _ => None,
            })
            .collect();
        let mut changed = false;
        let mut after = 0;
        'pages: loop {
            let page = match self.store.outbox_queued_after(after, FLUSH_PAGE) {
                Ok(page) => page,
                Err(e) => return self.store_error(e),
            };
            let last_page = page.len() < FLUSH_PAGE;
            for queued in page {
                after = queued.seq;
                if self.in_flight.contains(&queued.id) || held.contains(&queued.peer) {
                    continue;
                }
                if self.send_window_full() {
                    break 'pages;
                }
                if self.held(&queued.peer)
                    || (self.probing(&queued.peer) && sending.contains(&queued.peer))
                {
                    held.insert(queued.peer);
                    continue;
                }
                let item = match self.store.outbox_queued_item(&queued.id) {
                    Ok(Some(item)) => item,
                    Ok(None) => continue,
                    Err(e) => return self.store_error(e),
                };
                changed |= self.flush_text(item, &mut held, &mut sending);
            }
            if last_page {
                break;
            }
        }
        if changed {
            self.connection_event(ConnectionState::Connected, None);
        }
    }

    /// Seals and sends one queued message whose contact is not held, unless its contact
    /// must wait (then it is added to `held`). Returns whether it failed for good (the
    /// queued count changed).
    fn flush_text(
        &mut self,
        item: OutboxItem,
        held: &mut HashSet<String>,
        sending: &mut HashSet<String>,
    ) -> bool {
        // A group sending key goes only to who is still in the group, judged once
        // the backlog (which may hold a removal) is read.
        if let Body::SenderKey(distribution) = &item.body {
            if !self.group_sends_ready() {
                held.insert(item.peer);
                return false;
            }
            if !self.sends_to(&distribution.group, &item.peer) {
                self.fail_message(&item.id, "not_a_member", "no longer in the group");
                return false;
            }
        }
        let ready = self.checked_keys.contains_key(&item.peer)
            && self.pin(&item.peer).is_some_and(|p| p.usable());
        if !ready {
            if !self.checked_keys.contains_key(&item.peer) {
                self.fetch_key(&item.peer, None);
            }
            held.insert(item.peer);
            return false;
        }
        let content = Content {
            id: item.id,
            sent_at_ms: item.sent_at,
            body: item.body,
        };
        let Some(sealed) = self.seal(&item.peer, &content) else {
            held.insert(item.peer);
            return false;
        };
        let len = send_frame_len(&item.peer, sealed.bytes.len());
        if self.max_frame > 0 && len > self.max_frame {
            // A permanent refusal: this message ends; the ones after it go on.
            let message = format!(
                "the message is too long for the relay at {} (its envelope would be {len} \
                 bytes, the relay's limit is {}); texts must stay under about {} bytes",
                self.config.server,
                self.max_frame,
                self.largest_text()
            );
            self.sink
                .emit(Event::error("message_too_long", message.clone()));
            self.fail_message(&item.id, "message_too_long", &message);
            return true;
        }
        self.in_flight.insert(item.id);
        sending.insert(item.peer.clone());
        let to = item.peer;
        let payload = sealed.bytes;
        self.request(
            Pending::Send {
                id: item.id,
                to: to.clone(),
                epoch: sealed.epoch,
            },
            |id| ClientMessage::Send { id, to, payload },
        );
        false
    }

    fn flush_receipts(&mut self) {
        let due = match self.store.receipts_due() {
            Ok(due) => due,
            Err(e) => return self.store_error(e),
        };
        for (peer, ids) in due {
            if self.held(&peer) {
                continue;
            }
            let mut ids: Vec<MessageId> = ids
                .into_iter()
                .filter(|id| !self.receipts_in_flight.contains(&(peer.clone(), *id)))
                .collect();
            let epoch = self
                .peers
                .get(&peer)
                .and_then(|p| p.inbound.as_ref())
                .and_then(|s| s.newest_epoch())
                .unwrap_or_default();
            // As many ids per receipt as fit the relay's frames; halved while one does not.
            let mut batch = RECEIPT_BATCH;
            while !ids.is_empty() {
                // Before sealing: a sealed message is never thrown away.
                if self.send_window_full() {
                    return;
                }
                let chunk: Vec<MessageId> = ids.iter().take(batch).copied().collect();
                let receipt = Content {
                    id: random_id(),
                    sent_at_ms: now_ms(),
                    body: Body::Receipt {
                        epoch,
                        ids: chunk.clone(),
                    },
                };
                let Some(sealed) = self.seal(&peer, &receipt) else {
                    break;
                };
                if !self.fits(&peer, &sealed) {
                    if batch == 1 {
                        break;
                    }
                    batch /= 2;
                    continue;
                }
                ids.drain(..chunk.len());
                for id in &chunk {
                    self.receipts_in_flight.insert((peer.clone(), *id));
                }
                let (to, payload) = (peer.clone(), sealed.bytes);
                self.request(
                    Pending::Receipt {
                        peer: peer.clone(),
                        ids: chunk,
                        epoch: sealed.epoch,
                    },
                    |id| ClientMessage::Send { id, to, payload },
                );
            }
        }
    }

    fn flush_retries(&mut self) {
        let due = match self.store.retries_due() {
            Ok(due) => due,
            Err(e) => return self.store_error(e),
        };
        for (peer, epochs) in due {
            if self.held(&peer) {
                continue;
            }
            let epochs: Vec<u32> = epochs
                .into_iter()
                .filter(|e| !self.retries_in_flight.contains(&(peer.clone(), *e)))
                .take(256)
                .collect();
            if epochs.is_empty() {
                continue;
            }
            if self.send_window_full() {
                return;
            }
            let request = Content {
                id: random_id(),
                sent_at_ms: now_ms(),
                body: Body::RetryRequest {
                    epochs: epochs.clone(),
                },
            };
            let Some(sealed) = self.seal(&peer, &request) else {
                continue;
            };
            if !self.fits(&peer, &sealed) {
                continue;
            }
            for epoch in &epochs {
                self.retries_in_flight.insert((peer.clone(), *epoch));
            }
            let (to, payload) = (peer.clone(), sealed.bytes);
            self.request(
                Pending::Retry {
                    peer: peer.clone(),
                    epochs,
                    epoch: sealed.epoch,
                },
                |id| ClientMessage::Send { id, to, payload },
            );
        }
    }

    /// Whether a `Send` of `sealed` to `to` fits the relay's frame limit (never send one
    /// that does not: the relay would close the connection).
    fn fits(&self, to: &str, sealed: &Sealed) -> bool {
        self.max_frame == 0 || send_frame_len(to, sealed.bytes.len()) <= self.max_frame
    }

    /// Encrypts for `to` with its pinned key.
    pub(super) fn seal(&mut self, to: &str, content: &Content) -> Option<Sealed> {
        let (peer_name, public) = self.usable_key(to)?;
        let rotation = self.config.rotation;
        let Self {
            peers,
            identity,
            me,
            ..
        } = self;
        let peer = peers.entry(to.to_owned()).or_default();
        let parties = Parties {
            me: identity,
            my_name: me,
            peer_name: &peer_name,
            peer: &public,
        };
        match peer
            .outbound
            .seal(&mut rand::rng(), parties, content, now_ms(), rotation)
        {
            Ok(sealed) => Some(sealed),
            Err(e) => {
                self.sink.emit(Event::error(
                    "encrypt_failed",
                    format!("could not encrypt for {to}: {e}"),
                ));
                None
            }
        }
    }

    pub(super) fn fail_outbox_for(&mut self, user: &str, reason: &str, message: &str) {
        let ids = self.store.outbox_ids_for(user).unwrap_or_default();
        for id in ids {
            self.fail_message(&id, reason, message);
        }
        self.connection_event(ConnectionState::Connected, None);
    }

    /// Takes a message out of the outbox for good and says why.
    /// If that cannot be recorded it stays in flight, not sent again, and is recorded
    /// later (`unsettled`).
    pub(super) fn fail_message(&mut self, id: &MessageId, reason: &str, message: &str) {
        let recorded = self.store.mark_failed(id, reason);
        let unsettled = || Unsettled::Failed {
            id: *id,
            reason: reason.to_owned(),
            message: message.to_owned(),
        };
        if let Some(Some(to)) = self.settled(recorded, unsettled) {
            self.sink.emit(Event::Failed {
                to,
                id: id_hex(id),
                reason: reason.to_owned(),
                message: message.to_owned(),
            });
        }
    }

    /// Reports messages that wait long for their receipt, and gives up on those the relay
    /// has deleted by now (older than its queue age limit). Judged by the relay's clock,
    /// so only while connected.
    pub(super) fn housekeeping(&mut self) {
        self.forget_full_queues();
        let Some(now) = self.relay_now_ms() else {
            return;
        };
        let late_before = now.saturating_sub(self.config.undelivered_after.as_millis() as u64);
        match self.store.flag_undelivered(late_before) {
            Ok(late) => {
                for m in late {
                    self.sink.emit(Event::Undelivered {
                        to: m.peer,
                        id: id_hex(&m.id),
                        since: m.accepted_at,
                    });
                }
            }
            // Tried again every round: told once while it keeps failing.
            Err(e) => self.store_failed(e),
        }
        let Ok(Some(max_age_secs)) = self.store.meta(META_QUEUE_MAX_AGE) else {
            return;
        };
        let expired_before = now.saturating_sub(max_age_secs.saturating_mul(1000));
        match self.store.requeue_stale_control(expired_before) {
            Ok(0) => {}
            Ok(_) => self.flush_due = true,
            Err(e) => self.store_failed(e),
        }
        match self.store.expired(expired_before) {
            Ok(expired) => {
                for m in expired {
                    warn!("a message was not delivered within the relay's age limit");
                    let message = format!(
                        "{} did not receive this message within {} days, after which the relay \
                         deletes undelivered messages; send it again if it still matters",
                        m.peer,
                        max_age_secs / 86_400
                    );
                    self.fail_message(&m.id, "expired", &message);
                }
            }
            Err(e) => self.store_error(e),
        }
    }
}
