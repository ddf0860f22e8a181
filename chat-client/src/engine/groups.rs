//! Groups, the sending side: the user's group commands (create, add, remove, leave,
//! rename, send, list, history), sending keys, and handing group envelopes to the relay
//! (the membership changes themselves are made in `group_changes`).
//!
//! Membership changes and sending keys go to each member as 1:1 control messages
//! through the outbox (sealed, receipted and sent again like texts); a group message is
//! sealed once under our sending key (`chat_protocol::group`) and the same envelope is
//! sent to each member with its own `Send` (see docs/PROTOCOL.md, "Groups", for why).

use std::collections::{BTreeSet, HashMap};

use chat_protocol::e2e::{Body, Content};
use chat_protocol::group::{ChangeKind, GroupId, GroupState, SenderKey};
use chat_protocol::username::Username;
use tracing::warn;

use super::{Engine, now_ms, random_id};
use crate::api::{Event, GroupInfo, id_hex};
use crate::store::{GroupLine, GroupRecord, GroupWrite, OutboxItem, OutgoingGroupMessage};

/// A group envelope and a `SendMany` frame naming one member add to the padded text: the
/// tag, the sender's signature (up to RSA-4096), the group id, names, counters and
/// lengths. (Frames naming more members are split to fit: see `send_group_copies`.)
const GROUP_ENVELOPE_OVERHEAD: usize = 16 + 512 + 16 + 2 * 33 + 16 + 16 + 1;

/// Groups in memory: a cache of what the store holds.
pub(super) type Groups = HashMap<GroupId, GroupRecord>;

impl Engine {
    pub(super) fn group_command(&mut self, cmd: crate::api::Command) {
        use crate::api::Command;
        match cmd {
            Command::GroupCreate {
                ref name,
                ref members,
            } => {
                if let Some(users) = self.user_names(members)
                    && self.may_create(name, &users)
                    && self.members_exist(&users, &cmd)
                {
                    self.create_group(name, members);
                }
            }
            Command::GroupAdd {
                ref group,
                ref users,
            } => {
                if self.admin_of(group)
                    && let Some(users) = self.user_names(users)
                    && self.may_change(
                        group,
                        ChangeKind::Add {
                            users: users.clone(),
                        },
                    )
                    && self.members_exist(&users, &cmd)
                {
                    self.change_group(group, ChangeKind::Add { users });
                }
            }
            Command::GroupRemove { group, users } => {
                if self.admin_of(&group)
                    && let Some(users) = self.user_names(&users)
                {
                    self.change_group(&group, ChangeKind::Remove { users });
                }
            }
            Command::GroupPromote { group, users } => {
                if self.admin_of(&group)
                    && let Some(users) = self.user_names(&users)
                {
                    self.change_group(&group, ChangeKind::Promote { users });
                }
            }
            Command::GroupLeave { group } => self.change_group(&group, ChangeKind::Leave),
            Command::GroupRename { group, name } => {
                if let Some(problem) = group_name_problem(&name) {
                    return self.sink.emit(Event::error(
                        "invalid_group_change",
                        format!("nothing changed: {problem}"),
                    ));
                }
                self.change_group(
                    &group,
                    ChangeKind::Rename {
                        name: name.trim().to_owned(),
                    },
                )
            }
            Command::GroupSend { group, text } => {
                let queued = self.enqueue_group(&group, text);
                self.flush_due |= queued;
            }
            Command::Groups => {
                let mut items: Vec<GroupInfo> =
                    self.groups.keys().map(|id| self.group_info(id)).collect();
                items.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                self.sink.emit(Event::Groups { items });
            }
            Command::GroupHistory { group } => {
                let Some(id) = self.find_group(&group) else {
                    return;
                };
                if let Err(e) = self.store.mark_group_read(&id) {
                    return self.store_error(e);
                }
                if let Some(g) = self.groups.get_mut(&id) {
                    g.unread = 0;
                }
                match self.store.group_history(&id, 10_000) {
                    Ok(items) => self.sink.emit(Event::GroupHistory {
                        group: id_hex(&id),
                        items,
                    }),
                    Err(e) => self.store_error(e),
                }
            }
            _ => {}
        }
    }

    /// Canonical names of user-typed ones (ourselves left out); an error event if any is
    /// not a valid name or none is left.
    pub(super) fn user_names(&self, raw: &[String]) -> Option<Vec<Username>> {
        let mut names = BTreeSet::new();
        for r in raw {
            let name = Username::parse(self.contact_name(r)?.as_str()).ok()?;
            if name != self.me {
                names.insert(name);
            }
        }
        if names.is_empty() {
            self.sink.emit(Event::error(
                "invalid_command",
                "name at least one other user",
            ));
            return None;
        }
        Some(names.into_iter().collect())
    }

    /// The group `raw` names: its 32-hex id, or a name unique among our groups (those we
    /// are in first). An error event otherwise.
    pub(super) fn find_group(&self, raw: &str) -> Option<GroupId> {
        let raw = raw.trim();
        if let Some(id) = parse_group_id(raw)
            && self.groups.contains_key(&id)
        {
            // Another member may have named a group after this one's id.
            if !self
                .groups
                .iter()
                .any(|(other, g)| *other != id && g.membership.current().name == raw)
            {
                return Some(id);
            }
            self.sink.emit(Event::error(
                "ambiguous_group",
                format!("{raw:?} is the id of one of your groups and the name of another; give the other's id instead (/groups lists them)"),
            ));
            return None;
        }
        let named = |active: bool| -> Vec<GroupId> {
            self.groups
                .iter()
                .filter(|(_, g)| g.membership.current().name == raw)
                .filter(|(_, g)| !active || g.membership.current().is_member(&self.me))
                .map(|(id, _)| *id)
                .collect()
        };
        let mut found = named(true);
        if found.is_empty() {
            found = named(false);
        }
        match found.as_slice() {
            [id] => Some(*id),
            [] => {
                self.sink.emit(Event::error(
                    "unknown_group",
                    format!("you have no group {raw:?}; /groups lists yours (by name and id)"),
                ));
                None
            }
            _ => {
                self.sink.emit(Event::error(
                    "ambiguous_group",
                    format!("{} of your groups are named {raw:?}; give its id instead (/groups lists them)", found.len()),
                ));
                None
            }
        }
    }

    /// How the group looks to the user now.
    pub(super) fn group_info(&self, id: &GroupId) -> GroupInfo {
        let Some(g) = self.groups.get(id) else {
            return GroupInfo {
                id: id_hex(id),
                ..GroupInfo::default()
            };
        };
        let state = g.membership.current();
        GroupInfo {
            id: id_hex(id),
            name: state.name.clone(),
            members: state.members.iter().map(|u| u.to_string()).collect(),
            admins: state.admins.keys().map(|u| u.to_string()).collect(),
            version: state.version,
            active: state.is_member(&self.me),
            excluded: self
                .excluded(state)
                .into_iter()
                .map(|u| u.to_string())
                .collect(),
            unread: g.unread,
            last: match self.store.group_history(id, 1) {
                Ok(mut newest) => newest.pop(),
                Err(e) => {
                    warn!("store error: {e}");
                    None
                }
            },
            ..GroupInfo::default()
        }
    }

    /// Members whose key changed and is not accepted yet.
    pub(super) fn excluded(&self, state: &GroupState) -> Vec<Username> {
        state
            .members
            .iter()
            .filter(|m| **m != self.me)
            .filter(|m| matches!(self.store.pin(m.as_str()), Ok(Some(p)) if !p.usable()))
            .cloned()
            .collect()
    }

    /// Members a group message (and our sending key) goes to: all but us and the excluded.
    fn recipients(&self, state: &GroupState) -> BTreeSet<Username> {
        let excluded = self.excluded(state);
        state
            .members
            .iter()
            .filter(|m| **m != self.me && !excluded.contains(m))
            .cloned()
            .collect()
    }

    pub(super) fn max_members(&self) -> usize {
        self.config.max_group_members
    }

    /// Seals a text for `group` once and queues it for every recipient, with a new
    /// sending key first if the recipients changed. Returns whether it was queued.
    fn enqueue_group(&mut self, group: &str, text: String) -> bool {
        let Some(id) = self.find_group(group) else {
            return false;
        };
        let record = &self.groups[&id];
        let state = record.membership.current().clone();
        if !state.is_member(&self.me) {
            self.sink.emit(Event::error(
                "not_a_member",
                format!(
                    "you are no longer a member of “{}”; nothing was sent",
                    state.name
                ),
            ));
            return false;
        }
        if let Some(limit) = self.text_limit(&text, GROUP_ENVELOPE_OVERHEAD, "group texts") {
            self.sink.emit(Event::error("message_too_long", limit));
            return false;
        }
        let recipients = self.recipients(&state);
        let now = now_ms();
        let mut key = record.sender_key.clone();
        let mut control = Vec::new();
        if key
            .as_ref()
            .is_none_or(|k| k.needs_rotation(&recipients, now, self.config.rotation))
        {
            let fresh = SenderKey::generate(&mut rand::rng(), recipients.clone(), now);
            control = recipients
                .iter()
                .map(|member| OutboxItem {
                    id: random_id(),
                    peer: member.to_string(),
                    body: Body::SenderKey(fresh.distribution(id)),
                    sent_at: now,
                })
                .collect();
            key = Some(fresh);
        }
        let mut key = key.expect("a key was just ensured");
        let content = Content {
            id: random_id(),
            sent_at_ms: now,
            body: Body::Text(text.clone()),
        };
        let payload = match key.seal(&mut rand::rng(), &self.identity, &self.me, id, &content) {
            Ok(payload) => payload,
            Err(e) => {
                self.sink.emit(Event::error(
                    "encrypt_failed",
                    format!("could not encrypt: {e}"),
                ));
                return false;
            }
        };
        let members: Vec<String> = recipients.iter().map(|u| u.to_string()).collect();
        let write = GroupWrite {
            sender_key: Some(&key),
            lines: vec![GroupLine {
                group: id,
                sender: self.me.to_string(),
                id: content.id,
                outgoing: true,
                system: false,
                text: text.clone(),
                sent_at: now,
            }],
            control,
            outgoing: Some(OutgoingGroupMessage {
                group: id,
                id: content.id,
                payload,
                members: members.clone(),
            }),
            ..GroupWrite::default()
        };
        if let Err(e) = self.store.commit_group(&id, write, now) {
            warn!("store error: {e}");
            self.sink.emit(Event::error(
                "store_error",
                format!("your message to “{}” was NOT queued: {e}; free some disk space and send it again", state.name),
            ));
            return false;
        }
        if let Some(record) = self.groups.get_mut(&id) {
            record.sender_key = Some(key);
        }
        let group = id_hex(&id);
        let msg = id_hex(&content.id);
        self.sink.emit(Event::GroupQueued {
            group: group.clone(),
            id: msg.clone(),
            text,
            sent_at: now,
            recipients: members.len(),
        });
        if members.is_empty() {
            self.sink.emit(Event::GroupSent { group, id: msg });
        }
        true
    }
}

/// Why `name` (trimmed) cannot name a group, for people; `None` if it can. The
/// protocol's rule ([`chat_protocol::group::check_name`]: 1 to 64 characters, no control
/// characters), and not 32 hex digits, which would read as another group's id.
pub fn group_name_problem(name: &str) -> Option<String> {
    let name = name.trim();
    if let Err(e) = chat_protocol::group::check_name(name) {
        return Some(e.to_string());
    }
    parse_group_id(name)
        .map(|_| "a group name may not be 32 hex digits (it would read as a group's id)".into())
}

/// A group id typed as 32 hex digits.
pub(super) fn parse_group_id(raw: &str) -> Option<GroupId> {
    if raw.len() != 32 || !raw.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&raw[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}
