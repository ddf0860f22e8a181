//! Groups, the receiving side: group envelopes (opened with the sender's sending key,
//! or held until it arrives), and the control messages inside 1:1 envelopes — sending
//! keys and membership changes, each checked against the chain before it counts.
//!
//! A change or an envelope that cannot be judged yet (the change before it, the sender's
//! key or the change adding the sender is still on its way) is held in the store, not
//! dropped, and judged again whenever the group changes or a key arrives.

use chat_protocol::e2e::{Body, Inbound, MessageId};
use chat_protocol::group::{
    GroupEnvelope, GroupId, GroupOpenError, Membership, Received, Refusal, SignedChange,
};
use chat_protocol::identity::PublicIdentity;
use chat_protocol::username::Username;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::group_changes::{change_line, undone_line};
use super::{Engine, Source, now_ms};
use crate::api::{Event, id_hex};
use crate::store::{GroupLine, GroupRecord, GroupWrite, StoreError};

/// What to do with a membership change.
enum Judged {
    /// Valid: the group becomes `membership`; `superseded` changes lost a fork.
    Apply {
        membership: Membership,
        superseded: Vec<SignedChange>,
    },
    /// Not yet judgeable: keep it.
    Hold,
    /// Refused (the user is told).
    Refuse(Refusal),
    /// Nothing to do (a copy sent again, or a group we are not in).
    Ignore,
}

impl Engine {
    /// A group envelope from `from`, whose pinned key is `public`.
    pub(super) fn deliver_group(
        &mut self,
        source: Source,
        from: &Username,
        public: &PublicIdentity,
        payload: Vec<u8>,
    ) {
        let envelope = match GroupEnvelope::decode(&payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.settle(source);
                return self.report_undecryptable(from.as_str(), e);
            }
        };
        let id = envelope.group;
        let Some(record) = self.groups.get(&id) else {
            // The change that makes us a member may still be on its way.
            return self.hold_group(source, &id, from.as_str(), &payload);
        };
        let state = record.membership.current();
        if !state.is_member(from) {
            // The sender may be added by a change still on its way. One removed is never
            // heard again unless added back: nothing tells what they sent before they knew
            // of their removal from what they send on purpose after it.
            return self.hold_group(source, &id, from.as_str(), &payload);
        }
        // Removed ourselves, we still open what a member sent under a sending key we were
        // given: they wrote it before they knew (a member changes its key at a removal,
        // and gives us none after), and counts us among its recipients until we receipt
        // it. Under a key we do not hold it stays held: we may be added again.
        let mut keys = match self.store.member_keys(&id, from.as_str()) {
            Ok(keys) => keys,
            Err(e) => return self.store_error(e),
        };
        let content = match keys.open(&envelope, from, public) {
            Ok(content) => content,
            Err(GroupOpenError::UnknownKey) => {
                return self.hold_group(source, &id, from.as_str(), &payload);
            }
            Err(GroupOpenError::Replay) => {
                debug!("duplicate group envelope dropped");
                return self.settle(source);
            }
            Err(e) => {
                self.settle(source);
                return self.report_undecryptable(from.as_str(), e);
            }
        };
        let Body::Text(text) = &content.body else {
            return self.settle(source);
        };
        let write = GroupWrite {
            member_keys: Some((from.as_str(), &keys)),
            lines: vec![GroupLine {
                group: id,
                sender: from.to_string(),
                id: content.id,
                outgoing: false,
                system: false,
                text: text.clone(),
                sent_at: content.sent_at_ms,
            }],
            receipt: Some((from.as_str(), content.id)),
            held: match source {
                Source::Held(seq) => Some(seq),
                _ => None,
            },
            group_held: match source {
                Source::GroupHeld(seq) => Some(seq),
                _ => None,
            },
            ..GroupWrite::default()
        };
        match self.store.commit_group(&id, write, now_ms()) {
            Ok(new) => {
                if new {
                    if let Some(g) = self.groups.get_mut(&id) {
                        g.unread += 1;
                    }
                    self.sink.emit(Event::GroupMessage {
                        group: id_hex(&id),
                        from: from.to_string(),
                        id: id_hex(&content.id),
                        text: text.clone(),
                        sent_at: content.sent_at_ms,
                    });
                }
                self.flush_due = true;
                if let Source::Relay(envelope_id) = source {
                    self.acks.push(envelope_id);
                }
                super::crash_point_after_store();
            }
            Err(e) => {
                self.stall(source, from.as_str(), &payload);
                self.store_error(e);
            }
        }
    }

    /// Keeps a group envelope that cannot be opened yet; acknowledged (or released from
    /// the 1:1 held) once stored. One held already stays.
    fn hold_group(&mut self, source: Source, group: &GroupId, from: &str, payload: &[u8]) {
        if let Source::GroupHeld(_) = source {
            return;
        }
        match self
            .store
            .hold_group_envelope(group, from, payload, now_ms())
        {
            Ok(true) => self.settle(source),
            // Left to the relay (or the 1:1 held): delivered again later.
            Ok(false) => warn!("too many group envelopes held for one sender"),
            Err(e) => self.store_error(e),
        }
    }

    /// Opens again what is held for `group` (from `sender`, or from anyone).
    pub(super) fn release_group_held(&mut self, group: &GroupId, sender: Option<&str>) {
        let held = match self.store.held_group_envelopes(group, sender) {
            Ok(held) => held,
            Err(e) => return self.store_error(e),
        };
        for (seq, from, payload) in held {
            self.deliver(Source::GroupHeld(seq), from, payload, Instant::now());
        }
    }

    /// A sending key or a membership change arrived in `from`'s 1:1 envelope (message
    /// `msg`): committed with that envelope's state and a receipt, then acted upon.
    pub(super) fn control_opened(
        &mut self,
        from: &str,
        msg: MessageId,
        body: &Body,
        state: &Inbound,
        held: Option<i64>,
    ) -> Result<(), StoreError> {
        let base = || GroupWrite {
            inbound: Some((from, state)),
            held,
            receipt: Some((from, msg)),
            ..GroupWrite::default()
        };
        match body {
            Body::SenderKey(distribution) => {
                let group = distribution.group;
                let mut keys = self.store.member_keys(&group, from)?;
                keys.add(distribution);
                let write = GroupWrite {
                    member_keys: Some((from, &keys)),
                    ..base()
                };
                self.store.commit_group(&group, write, now_ms())?;
                self.flush_due = true;
                self.release_group_held(&group, Some(from));
                Ok(())
            }
            Body::GroupUpdate { prior, change } => {
                let judged = self.judge(from, prior.as_deref(), change);
                self.act_on(from, change, judged, base(), None)
            }
            _ => Ok(()),
        }
    }

    /// Judges a change passed on by `from`.
    fn judge(
        &mut self,
        from: &str,
        prior: Option<&chat_protocol::group::GroupState>,
        change: &SignedChange,
    ) -> Judged {
        let id = change.change.group;
        let max = chat_protocol::group::MAX_MEMBERS_ACCEPTED;
        let author = change.change.author.clone();
        if let Some(record) = self.groups.get(&id) {
            let mut membership = record.membership.clone();
            let keys: std::collections::HashMap<Username, PublicIdentity> = membership
                .current()
                .members
                .iter()
                .chain(std::iter::once(&author))
                .filter_map(|u| self.usable_key(u.as_str()).map(|(_, k)| (u.clone(), k)))
                .collect();
            let was_member = membership.current().is_member(&self.me);
            let author_is_admin = membership.current().is_admin(&author);
            let received = membership.receive(change, |u| keys.get(u).cloned(), max);
            // Added by a change our history cannot follow: join from the state the adding
            // admin sends. Either we were out (removed, and missed changes meanwhile), or
            // our history is a branch that lost a fork — we were added on it, and an admin
            // of ours adds us again on the winning one (its author remade the add; the
            // winning change itself never comes to us, as we are not in its state).
            let lost_fork = author_is_admin
                && matches!(
                    received,
                    Received::Refused(Refusal::Forked | Refusal::Stale) | Received::Ahead
                );
            if (!was_member || lost_fork)
                && !matches!(received, Received::Applied { .. })
                && let Some(prior) = prior
                && !prior.is_member(&self.me)
                && author.as_str() == from
                && let Some((_, key)) = self.usable_key(from)
                && let Ok(joined) = Membership::join(prior.clone(), change.clone(), &key, max)
                && joined.current().is_member(&self.me)
            {
                return Judged::Apply {
                    membership: joined,
                    superseded: vec![],
                };
            }
            return match received {
                Received::Applied { superseded, .. } => Judged::Apply {
                    membership,
                    superseded,
                },
                Received::Ahead => Judged::Hold,
                Received::NeedKey(user) => {
                    // Not pinned yet: ask. A key change awaiting the user's decision is
                    // not asked about again: the change waits for the decision.
                    if self.pin(user.as_str()).is_none() {
                        self.fetch_key(user.as_str(), None);
                    }
                    Judged::Hold
                }
                // A copy its author sent again (their client re-sent unreceipted control
                // messages): not news.
                Received::Refused(Refusal::Replayed) if author.as_str() == from => Judged::Ignore,
                Received::Refused(refusal) => Judged::Refuse(refusal),
            };
        }
        // A group new to us: only its author's word counts (create, or the add of us).
        if author.as_str() != from {
            return Judged::Hold;
        }
        let Some((_, key)) = self.usable_key(from) else {
            return Judged::Hold;
        };
        let joined = match prior {
            Some(prior) => Membership::join(prior.clone(), change.clone(), &key, max),
            None => Membership::from_create(change.clone(), &key, max),
        };
        match joined {
            Ok(membership) if membership.current().is_member(&self.me) => Judged::Apply {
                membership,
                superseded: vec![],
            },
            Ok(_) => Judged::Ignore,
            Err(chat_protocol::group::ChangeError::WrongState) if prior.is_none() => Judged::Hold,
            Err(e) => Judged::Refuse(Refusal::Invalid(e)),
        }
    }

    /// Commits what a judgement means (with `base`: the carrying envelope's state, or the
    /// held change's row), then tells the front end and follows up.
    fn act_on(
        &mut self,
        from: &str,
        change: &SignedChange,
        judged: Judged,
        base: GroupWrite<'_>,
        held_seq: Option<i64>,
    ) -> Result<(), StoreError> {
        let id = change.change.group;
        let changes_done: Vec<i64> = held_seq.into_iter().collect();
        match judged {
            Judged::Apply {
                membership,
                superseded,
            } => {
                let was_member = self
                    .groups
                    .get(&id)
                    .is_some_and(|g| g.membership.current().is_member(&self.me));
                // A change it undid says so in the history, after the one that won.
                let mut lines = vec![change_line(id, change, self.me.as_str())];
                lines.extend(superseded.iter().map(|lost| undone_line(id, lost, change)));
                let write = GroupWrite {
                    clear_sender_key: was_member && !membership.current().is_member(&self.me),
                    membership: Some(&membership),
                    lines,
                    changes_done,
                    ..base
                };
                self.store.commit_group(&id, write, now_ms())?;
                let record = self.groups.entry(id).or_insert_with(|| GroupRecord {
                    membership: membership.clone(),
                    sender_key: None,
                    unread: 0,
                });
                record.membership = membership;
                if was_member && !record.membership.current().is_member(&self.me) {
                    record.sender_key = None;
                }
                let members: Vec<String> = record
                    .membership
                    .current()
                    .members
                    .iter()
                    .map(|u| u.to_string())
                    .collect();
                self.watch(members);
                self.emit_change(&id, change);
                for lost in &superseded {
                    self.emit_undone(&id, lost);
                }
                self.flush_due = true;
                self.after_change(&id, superseded);
            }
            Judged::Hold => {
                let write = GroupWrite {
                    hold_change: held_seq.is_none().then_some((id, from, change)),
                    ..base
                };
                self.store.commit_group(&id, write, now_ms())?;
            }
            Judged::Refuse(refusal) => {
                let write = GroupWrite {
                    changes_done,
                    ..base
                };
                self.store.commit_group(&id, write, now_ms())?;
                warn!(reason = refusal.as_str(), "group change refused");
                self.sink.emit(Event::GroupRefused {
                    group: id_hex(&id),
                    from: from.to_owned(),
                    by: change.change.author.to_string(),
                    reason: refusal.as_str().to_owned(),
                    message: format!(
                        "a change to the group from {} was refused: {refusal}",
                        change.change.author
                    ),
                });
            }
            Judged::Ignore => {
                let write = GroupWrite {
                    changes_done,
                    ..base
                };
                self.store.commit_group(&id, write, now_ms())?;
            }
        }
        Ok(())
    }

    /// After a change applied: our own changes that lost a fork are made again on the new
    /// state (if still valid), held changes and envelopes are judged again.
    fn after_change(&mut self, id: &GroupId, superseded: Vec<SignedChange>) {
        for lost in superseded {
            if lost.change.author == self.me {
                debug!("our group change lost a fork; making it again");
                self.remake(id, lost.change.kind);
            }
        }
        self.retry_held_changes(id);
        self.release_group_held(id, None);
    }

    /// Judges again the changes held for `group`, until none applies.
    pub(super) fn retry_held_changes(&mut self, group: &GroupId) {
        loop {
            let held = match self.store.held_changes(group) {
                Ok(held) => held,
                Err(e) => return self.store_error(e),
            };
            let mut progress = false;
            for h in held {
                let judged = self.judge(&h.from, None, &h.change);
                let holds = matches!(judged, Judged::Hold);
                let applied = matches!(judged, Judged::Apply { .. });
                if holds {
                    continue;
                }
                if let Err(e) = self.act_on(
                    &h.from,
                    &h.change,
                    judged,
                    GroupWrite::default(),
                    Some(h.seq),
                ) {
                    return self.store_error(e);
                }
                if applied {
                    // `act_on` judged the rest again already.
                    return;
                }
                progress = true;
            }
            if !progress {
                return;
            }
        }
    }

    /// Judges again, for every group, the changes held for a key (one just arrived).
    pub(super) fn retry_all_held_changes(&mut self) {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            self.retry_held_changes(&id);
        }
    }
}
