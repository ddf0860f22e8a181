//! Groups: what a command must pass before it changes anything. Each check either
//! lets the command go on or emits the error that says why not; nothing is asked of the
//! relay for a command that fails one (except whether new members exist, which only the
//! relay can say: the command waits for its answers).

use std::collections::BTreeSet;

use chat_protocol::group::{ChangeError, ChangeKind, Membership};
use chat_protocol::username::Username;

use super::Engine;
use super::groups::group_name_problem;
use crate::api::Event;

/// A create or add of users whose keys we do not hold, waiting for the relay to say
/// they exist.
pub(super) struct AwaitingMembers {
    cmd: crate::api::Command,
    /// Those not answered for yet.
    unknown: BTreeSet<String>,
}

impl Engine {
    /// Whether we may create a group `name` with `users`; if not, an error says why (before
    /// anything is asked of the relay).
    pub(super) fn may_create(&self, name: &str, users: &[Username]) -> bool {
        let name = name.trim();
        let checked = match group_name_problem(name) {
            Some(problem) => Err(problem),
            None => Membership::check_create(&self.me, name, users.to_vec(), self.max_members())
                .map_err(|e| e.to_string()),
        };
        match checked {
            Ok(()) => true,
            Err(e) => {
                self.sink.emit(Event::error(
                    "invalid_group_change",
                    format!("the group was not created: {e}"),
                ));
                false
            }
        }
    }

    /// Whether we are an admin of `group` (a member first); if not, an error says so.
    pub(super) fn admin_of(&self, group: &str) -> bool {
        let Some(id) = self.find_group(group) else {
            return false;
        };
        let state = self.groups[&id].membership.current();
        if !state.is_member(&self.me) {
            self.sink.emit(Event::error(
                "not_a_member",
                format!("you are no longer a member of “{}”", state.name),
            ));
            return false;
        }
        if !state.is_admin(&self.me) {
            self.sink.emit(Event::error(
                "invalid_group_change",
                format!(
                    "nothing changed in “{}”: {}",
                    state.name,
                    ChangeError::NotAdmin(self.me.clone())
                ),
            ));
            return false;
        }
        true
    }

    /// Whether our change `kind` to `group` would be accepted; if not, an error says why
    /// (before anything is asked of the relay).
    pub(super) fn may_change(&self, group: &str, kind: ChangeKind) -> bool {
        let Some(id) = self.find_group(group) else {
            return false;
        };
        let membership = &self.groups[&id].membership;
        match membership.check(&self.me, kind, self.max_members()) {
            Ok(()) => true,
            Err(e) => {
                self.sink.emit(Event::error(
                    "invalid_group_change",
                    format!("nothing changed in “{}”: {e}", membership.current().name),
                ));
                false
            }
        }
    }

    /// Whether every one of `users` is known to exist (we hold their key). If not, asks the
    /// relay for the keys of the others and keeps `cmd` (a create or an add) until every
    /// answer is in ([`Engine::member_checked`]): a group never gains a member that does
    /// not exist. Offline, nothing can be checked: an error, nothing changes.
    pub(super) fn members_exist(&mut self, users: &[Username], cmd: &crate::api::Command) -> bool {
        let unknown: BTreeSet<String> = users
            .iter()
            .map(Username::to_string)
            .filter(|u| self.pin(u).is_none())
            .collect();
        if unknown.is_empty() {
            return true;
        }
        if !self.online {
            let names: Vec<&str> = unknown.iter().map(String::as_str).collect();
            self.sink.emit(Event::error(
                "offline",
                format!(
                    "cannot check with the relay that {} exist(s) while not connected; nothing \
                     changed: try again once connected",
                    names.join(", ")
                ),
            ));
            return false;
        }
        for user in &unknown {
            self.member_lookups.insert(user.clone());
            self.fetch_key(user, None);
        }
        self.awaiting_members.push(AwaitingMembers {
            cmd: cmd.clone(),
            unknown,
        });
        false
    }

    /// The relay answered for `user`: `Ok` (its key is pinned now) or why not. A create
    /// or add waiting on it goes ahead once all its new members are known, and is dropped
    /// with an error (nothing changed) if one is not.
    /// Returns whether `user` was looked up for such a check (its failure is then told
    /// once, by the command's error).
    pub(super) fn member_checked(&mut self, user: &str, answer: Result<(), String>) -> bool {
        let asked = self.member_lookups.remove(user);
        let mut ready = Vec::new();
        let mut i = 0;
        while i < self.awaiting_members.len() {
            let waiting = &mut self.awaiting_members[i];
            if !waiting.unknown.contains(user) {
                i += 1;
                continue;
            }
            match &answer {
                Err(why) => {
                    self.awaiting_members.remove(i);
                    self.sink.emit(Event::error(
                        "unknown_user",
                        format!("{why}: the group was not changed"),
                    ));
                }
                Ok(()) => {
                    waiting.unknown.remove(user);
                    if waiting.unknown.is_empty() {
                        ready.push(self.awaiting_members.remove(i).cmd);
                    } else {
                        i += 1;
                    }
                }
            }
        }
        for cmd in ready {
            self.group_command(cmd);
        }
        asked
    }

    /// The connection ended before the relay answered: creates and adds still waiting
    /// for their members to be checked are dropped, with an error each.
    pub(super) fn forget_member_checks(&mut self) {
        self.member_lookups.clear();
        for waiting in std::mem::take(&mut self.awaiting_members) {
            let names: Vec<&str> = waiting.unknown.iter().map(String::as_str).collect();
            self.sink.emit(Event::error(
                "offline",
                format!(
                    "the connection dropped before the relay said whether {} exist(s); the \
                     group was not changed: try again",
                    names.join(", ")
                ),
            ));
        }
    }
}
