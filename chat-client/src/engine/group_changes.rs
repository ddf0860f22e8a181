//! Group membership changes, the sending side: creating a group, making a change (add,
//! remove, leave, rename, promote) as its author, sending it to every member as a 1:1
//! control message, and the history lines and `group` events changes leave.

use chat_protocol::e2e::Body;
use chat_protocol::group::{
    ChangeError, ChangeKind, GroupId, GroupState, Membership, SignedChange,
};
use chat_protocol::username::Username;
use tracing::warn;

use super::{Engine, now_ms, random_id};
use crate::api::Event;
use crate::store::{GroupLine, GroupRecord, GroupWrite, OutboxItem};

/// The line a change leaves in the group's history, and its `group` event name.
pub(super) fn describe(change: &SignedChange) -> (String, &'static str, Vec<String>) {
    let by = change.change.author.as_str();
    let names = |users: &[Username]| users.iter().map(|u| u.to_string()).collect::<Vec<_>>();
    match &change.change.kind {
        ChangeKind::Create { name, .. } => (
            format!("{by} created the group “{name}”"),
            "created",
            vec![],
        ),
        ChangeKind::Add { users } => (
            format!("{by} added {}", names(users).join(", ")),
            "added",
            names(users),
        ),
        ChangeKind::Remove { users } => (
            format!("{by} removed {}", names(users).join(", ")),
            "removed",
            names(users),
        ),
        ChangeKind::Leave => (format!("{by} left"), "left", vec![]),
        ChangeKind::Rename { name } => (
            format!("{by} renamed the group to “{name}”"),
            "renamed",
            vec![],
        ),
        ChangeKind::Promote { users } => (
            format!("{by} made {} admin", names(users).join(", ")),
            "promoted",
            names(users),
        ),
    }
}

/// The history line of a change (its id: the change id's first 16 bytes).
pub(super) fn change_line(group: GroupId, change: &SignedChange, me: &str) -> GroupLine {
    let id = change.id();
    let author = change.change.author.to_string();
    GroupLine {
        group,
        outgoing: author == me,
        sender: author,
        id: id[..16].try_into().expect("16 of 32 bytes"),
        system: true,
        text: describe(change).0,
        sent_at: change.change.created_ms,
    }
}

/// The history line saying `lost` was undone: it crossed `winner`, which counts first
/// (its id: the last 16 bytes of `lost`'s change id).
pub(super) fn undone_line(group: GroupId, lost: &SignedChange, winner: &SignedChange) -> GroupLine {
    let id = lost.id();
    GroupLine {
        group,
        outgoing: false,
        sender: lost.change.author.to_string(),
        id: id[16..].try_into().expect("16 of 32 bytes"),
        system: true,
        text: format!(
            "undone: “{}” — it crossed {}'s change, which counts first",
            describe(lost).0,
            winner.change.author
        ),
        sent_at: winner.change.created_ms,
    }
}

impl Engine {
    pub(super) fn create_group(&mut self, name: &str, raw: &[String]) {
        let Some(members) = self.user_names(raw) else {
            return;
        };
        let mut id = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
        let created = Membership::create(
            &mut rand::rng(),
            &self.identity,
            &self.me,
            id,
            name.trim(),
            members,
            now_ms(),
            self.max_members(),
        );
        let (membership, change) = match created {
            Ok(created) => created,
            Err(e) => {
                return self.sink.emit(Event::error(
                    "invalid_group_change",
                    format!("the group was not created: {e}"),
                ));
            }
        };
        let to: Vec<Username> = membership
            .current()
            .members
            .iter()
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        self.send_change(id, membership, &change, &to, None);
    }

    /// Makes a change of ours to `group` and sends it to everyone concerned.
    pub(super) fn change_group(&mut self, group: &str, kind: ChangeKind) {
        let Some(id) = self.find_group(group) else {
            return;
        };
        let name = self.groups[&id].membership.current().name.clone();
        if !self.groups[&id].membership.current().is_member(&self.me) {
            return self.sink.emit(Event::error(
                "not_a_member",
                format!("you are no longer a member of “{name}”"),
            ));
        }
        if let Err(e) = self.make_change(id, kind) {
            self.sink.emit(Event::error(
                "invalid_group_change",
                format!("nothing changed in “{name}”: {e}"),
            ));
        }
    }

    /// Makes again a change of ours that lost a fork, if it still makes sense.
    pub(super) fn remake(&mut self, id: &GroupId, kind: ChangeKind) {
        if self
            .groups
            .get(id)
            .is_some_and(|g| g.membership.current().is_member(&self.me))
            && let Err(e) = self.make_change(*id, kind)
        {
            tracing::debug!("a change of ours that lost a fork no longer applies: {e}");
        }
    }

    fn make_change(&mut self, id: GroupId, kind: ChangeKind) -> Result<(), ChangeError> {
        let mut membership = self.groups[&id].membership.clone();
        let prior = membership.current().clone();
        let change = membership.make(
            &mut rand::rng(),
            &self.identity,
            &self.me,
            kind,
            now_ms(),
            self.max_members(),
        )?;
        // Everyone before and after hears of it: the removed learn they were removed.
        let to: Vec<Username> = prior
            .members
            .union(&membership.current().members)
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        self.send_change(id, membership, &change, &to, Some(prior));
        Ok(())
    }

    /// Commits our change (membership, history line, a control message per member) and
    /// tells the front end. New members get `prior`, the state the change applies to.
    pub(super) fn send_change(
        &mut self,
        id: GroupId,
        membership: Membership,
        change: &SignedChange,
        to: &[Username],
        prior: Option<GroupState>,
    ) {
        let control = to
            .iter()
            .map(|member| {
                let new = prior.as_ref().is_some_and(|p| !p.is_member(member));
                OutboxItem {
                    id: random_id(),
                    peer: member.to_string(),
                    body: Body::GroupUpdate {
                        prior: if new {
                            prior.clone().map(Box::new)
                        } else {
                            None
                        },
                        change: Box::new(change.clone()),
                    },
                    sent_at: now_ms(),
                }
            })
            .collect();
        let left = !membership.current().is_member(&self.me);
        let write = GroupWrite {
            clear_sender_key: left,
            membership: Some(&membership),
            lines: vec![change_line(id, change, self.me.as_str())],
            control,
            ..GroupWrite::default()
        };
        if let Err(e) = self.store.commit_group(&id, write, now_ms()) {
            warn!("store error: {e}");
            return self.sink.emit(Event::error(
                "store_error",
                format!("the group change was NOT made: {e}; free some disk space and try again"),
            ));
        }
        let record = self.groups.entry(id).or_insert_with(|| GroupRecord {
            membership: membership.clone(),
            sender_key: None,
            unread: 0,
        });
        record.membership = membership;
        if left {
            record.sender_key = None;
        }
        self.watch(to.iter().map(|u| u.to_string()).collect());
        self.emit_change(&id, change);
        self.flush_due = true;
    }

    /// A `group` event for a change just applied.
    pub(super) fn emit_change(&mut self, id: &GroupId, change: &SignedChange) {
        let (_, name, users) = describe(change);
        let mut info = self.group_info(id);
        info.change = Some(name.into());
        info.by = Some(change.change.author.to_string());
        info.users = users;
        self.sink.emit(Event::Group(Box::new(info)));
    }

    /// A `group` event (`change`: `undone`) for a change that lost a fork and no longer
    /// counts; `by` and `users` are the lost change's.
    pub(super) fn emit_undone(&mut self, id: &GroupId, lost: &SignedChange) {
        let (_, _, users) = describe(lost);
        let mut info = self.group_info(id);
        info.change = Some("undone".into());
        info.by = Some(lost.change.author.to_string());
        info.users = users;
        self.sink.emit(Event::Group(Box::new(info)));
    }
}
