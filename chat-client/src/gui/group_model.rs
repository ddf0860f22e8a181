//! What the window knows of groups, built only from core events: each group's members
//! and admins, its lines (texts and system lines) with "delivered to k of n", unread
//! counts. No drawing, no I/O.

use std::collections::BTreeMap;

use super::model::now_ms;
use crate::api::{Event, GroupHistoryItem, GroupInfo, Status};

/// One line of a group conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLine {
    pub id: String,
    pub from: String,
    pub outgoing: bool,
    /// A membership line ("alice added dave").
    pub system: bool,
    pub text: String,
    pub sent_at: u64,
    /// Our clock when stored (written or arrived), ms since the Unix epoch: the day it is
    /// listed under.
    pub stored_at: u64,
    pub status: Status,
    /// Ours: members whose client stored it, of `recipients`.
    pub delivered_to: usize,
    pub recipients: usize,
}

impl From<GroupHistoryItem> for GroupLine {
    fn from(h: GroupHistoryItem) -> Self {
        Self {
            id: h.id,
            from: h.from,
            outgoing: h.outgoing,
            system: h.system,
            text: h.text,
            sent_at: h.sent_at,
            stored_at: h.stored_at,
            status: h.status,
            delivered_to: h.delivered_to,
            recipients: h.recipients,
        }
    }
}

/// One group as the window shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub info: GroupInfo,
    pub lines: Vec<GroupLine>,
    pub unread: usize,
    /// History has been requested from the store.
    pub history_requested: bool,
}

impl GroupView {
    /// When its newest line was stored (ms since the Unix epoch; 0: none yet), from the
    /// loaded history or, before it is loaded, the list's preview.
    pub fn activity(&self) -> u64 {
        self.lines
            .last()
            .map(|l| l.stored_at)
            .or(self.info.last.as_ref().map(|l| l.stored_at))
            .unwrap_or(0)
    }
}

/// All groups, by id (32 hex digits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Groups {
    pub by_id: BTreeMap<String, GroupView>,
    /// A change refused, for the status line: (group, message).
    pub refused: Option<(String, String)>,
}

impl Groups {
    fn view(&mut self, info: GroupInfo) -> &mut GroupView {
        let id = info.id.clone();
        let unread = info.unread as usize;
        let view = self.by_id.entry(id).or_insert_with(|| GroupView {
            info: info.clone(),
            lines: Vec::new(),
            unread,
            history_requested: false,
        });
        view.info = GroupInfo {
            change: None,
            by: None,
            users: vec![],
            ..info
        };
        view
    }

    /// Applies a group event; `looking` is the group id the user has open and focused.
    /// Returns false for an event that is not about groups.
    pub fn apply(&mut self, event: &Event, looking: Option<&str>) -> bool {
        match event {
            Event::Groups { items } => {
                for info in items {
                    self.view(info.clone());
                }
            }
            Event::Group(info) => {
                let line = info.change.as_ref().map(|change| system_text(info, change));
                let view = self.view(info.as_ref().clone());
                if let Some(text) = line {
                    view.lines.push(GroupLine {
                        id: format!("{}-{}", info.version, view.lines.len()),
                        from: info.by.clone().unwrap_or_default(),
                        outgoing: false,
                        system: true,
                        text,
                        sent_at: 0,
                        stored_at: now_ms(),
                        status: Status::Delivered,
                        delivered_to: 0,
                        recipients: 0,
                    });
                }
            }
            Event::GroupHistory { group, items } => {
                if let Some(view) = self.by_id.get_mut(group) {
                    view.lines = items.iter().cloned().map(GroupLine::from).collect();
                    view.unread = 0;
                    view.history_requested = true;
                }
            }
            Event::GroupMessage {
                group,
                from,
                id,
                text,
                sent_at,
            } => {
                let Some(view) = self.by_id.get_mut(group) else {
                    return true;
                };
                if view.lines.iter().any(|l| l.id == *id && l.from == *from) {
                    return true;
                }
                view.lines.push(GroupLine {
                    id: id.clone(),
                    from: from.clone(),
                    outgoing: false,
                    system: false,
                    text: text.clone(),
                    sent_at: *sent_at,
                    stored_at: now_ms(),
                    status: Status::Delivered,
                    delivered_to: 0,
                    recipients: 0,
                });
                if looking != Some(group.as_str()) {
                    view.unread += 1;
                }
            }
            Event::GroupQueued {
                group,
                id,
                text,
                sent_at,
                recipients,
            } => {
                if let Some(view) = self.by_id.get_mut(group) {
                    view.lines.push(GroupLine {
                        id: id.clone(),
                        from: String::new(),
                        outgoing: true,
                        system: false,
                        text: text.clone(),
                        sent_at: *sent_at,
                        stored_at: now_ms(),
                        status: Status::Sending,
                        delivered_to: 0,
                        recipients: *recipients,
                    });
                }
            }
            Event::GroupSent { group, id } => {
                if let Some(line) = self.ours(group, id)
                    && line.status == Status::Sending
                {
                    line.status = Status::Sent;
                }
            }
            // A copy stored, or withdrawn (its member left): the counts change.
            Event::GroupDelivered {
                group,
                id,
                delivered_to,
                recipients,
                ..
            }
            | Event::GroupWithdrawn {
                group,
                id,
                delivered_to,
                recipients,
                ..
            } => {
                if let Some(line) = self.ours(group, id) {
                    line.delivered_to = *delivered_to;
                    line.recipients = *recipients;
                    if delivered_to == recipients && *recipients > 0 {
                        line.status = Status::Delivered;
                    }
                }
            }
            Event::GroupFailed { group, id, .. } => {
                if let Some(line) = self.ours(group, id) {
                    line.status = Status::Failed;
                }
            }
            Event::GroupRefused { group, message, .. } => {
                self.refused = Some((group.clone(), message.clone()));
            }
            _ => return false,
        }
        true
    }

    fn ours(&mut self, group: &str, id: &str) -> Option<&mut GroupLine> {
        self.by_id
            .get_mut(group)?
            .lines
            .iter_mut()
            .find(|l| l.outgoing && l.id == id)
    }

    /// The group the user opened: nothing unread.
    pub fn read(&mut self, group: &str) {
        if let Some(view) = self.by_id.get_mut(group) {
            view.unread = 0;
        }
    }

    /// Opens `group`: nothing unread; returns true if its history still needs loading.
    pub fn open(&mut self, group: &str) -> bool {
        match self.by_id.get_mut(group) {
            Some(view) => {
                view.unread = 0;
                !std::mem::replace(&mut view.history_requested, true)
            }
            None => false,
        }
    }

    /// Groups for the side list: those whose name contains `filter` (case-insensitive),
    /// the ones we are in first, then the most recently active (newest line) first, then
    /// by name.
    pub fn listed(&self, filter: &str) -> Vec<&GroupView> {
        let filter = filter.trim().to_lowercase();
        let mut list: Vec<&GroupView> = self
            .by_id
            .values()
            .filter(|g| g.info.name.to_lowercase().contains(&filter))
            .collect();
        list.sort_by_cached_key(|g| {
            (
                !g.info.active,
                std::cmp::Reverse(g.activity()),
                g.info.name.to_lowercase(),
                g.info.id.clone(),
            )
        });
        list
    }

    /// Unread texts in every group.
    pub fn unread(&self) -> usize {
        self.by_id.values().map(|g| g.unread).sum()
    }
}

impl GroupView {
    /// The newest line for the side list: (text, when stored, ours), a text prefixed
    /// with its sender.
    /// Before the history is loaded, the newest line the group's info carries.
    pub fn preview(&self) -> Option<(String, u64, bool)> {
        let line = match self.lines.last() {
            Some(line) => line.clone(),
            None => GroupLine::from(self.info.last.clone()?),
        };
        let text = line.text.lines().next().unwrap_or("");
        let text = if line.system || line.outgoing {
            text.to_owned()
        } else {
            format!("{}: {text}", line.from)
        };
        // A membership line names its author itself ("carol created …"): no "You:".
        Some((text, line.stored_at, line.outgoing && !line.system))
    }
}

/// "alice added dave", as the core's own history lines say it.
fn system_text(info: &GroupInfo, change: &str) -> String {
    let by = info.by.as_deref().unwrap_or("someone");
    let users = info.users.join(", ");
    match change {
        "created" => format!("{by} created the group “{}”", info.name),
        "added" => format!("{by} added {users}"),
        "removed" => format!("{by} removed {users}"),
        "left" => format!("{by} left"),
        "renamed" => format!("{by} renamed the group to “{}”", info.name),
        "promoted" => format!("{by} made {users} admin"),
        "undone" => format!(
            "undone: a change by {by} (it crossed another admin's change, which counts first)"
        ),
        other => format!("{by}: {other}"),
    }
}

/// "delivered to k of n" for one of our lines.
pub fn delivery_text(line: &GroupLine) -> String {
    match line.status {
        Status::Sending => "sending…".into(),
        Status::Failed => "failed".into(),
        _ => format!("delivered to {} of {}", line.delivered_to, line.recipients),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, change: Option<&str>) -> GroupInfo {
        GroupInfo {
            id: id.into(),
            name: "Team".into(),
            members: vec!["alice".into(), "bob".into(), "carol".into()],
            admins: vec!["alice".into()],
            version: 1,
            active: true,
            excluded: vec![],
            unread: 0,
            change: change.map(Into::into),
            by: change.map(|_| "alice".into()),
            users: vec![],
            last: None,
        }
    }

    #[test]
    fn the_list_previews_the_newest_line_before_the_history_is_loaded() {
        let mut g = Groups::default();
        let mut group = info("g1", None);
        group.last = Some(crate::api::GroupHistoryItem {
            id: "m1".into(),
            from: "bob".into(),
            outgoing: false,
            system: false,
            text: "hello\nsecond line".into(),
            sent_at: 5,
            stored_at: 7,
            status: Status::Delivered,
            delivered_to: 0,
            recipients: 0,
        });
        g.apply(&Event::Groups { items: vec![group] }, None);
        assert_eq!(
            g.by_id["g1"].preview(),
            Some(("bob: hello".to_owned(), 7, false))
        );
        // Our own membership line names us already: not "You: alice created …".
        let mut ours = info("g2", None);
        ours.last = Some(crate::api::GroupHistoryItem {
            id: "c1".into(),
            from: "alice".into(),
            outgoing: true,
            system: true,
            text: "alice created the group “Team”".into(),
            sent_at: 1,
            stored_at: 2,
            status: Status::Delivered,
            delivered_to: 0,
            recipients: 0,
        });
        g.apply(&Event::Groups { items: vec![ours] }, None);
        assert_eq!(
            g.by_id["g2"].preview(),
            Some(("alice created the group “Team”".to_owned(), 2, false))
        );
    }

    #[test]
    fn groups_we_are_in_come_first_the_most_recently_active_first() {
        let mut g = Groups::default();
        let last = |stored_at| crate::api::GroupHistoryItem {
            id: "m".into(),
            from: "bob".into(),
            outgoing: false,
            system: false,
            text: "hi".into(),
            sent_at: stored_at,
            stored_at,
            status: Status::Delivered,
            delivered_to: 0,
            recipients: 0,
        };
        let mut items = Vec::new();
        for (id, name, at, active) in [
            ("g1", "Alpha", Some(100), true),
            ("g2", "Beta", Some(300), true),
            ("g3", "Gamma", None, true),
            ("g4", "Delta", Some(900), false),
        ] {
            let mut group = info(id, None);
            group.name = name.into();
            group.last = at.map(last);
            group.active = active;
            items.push(group);
        }
        g.apply(&Event::Groups { items }, None);
        let order = |g: &Groups, filter: &str| -> Vec<String> {
            g.listed(filter).iter().map(|v| v.info.id.clone()).collect()
        };
        assert_eq!(order(&g, ""), ["g2", "g1", "g3", "g4"]);
        // A new line in Alpha moves it up; a search keeps the order among its matches.
        g.by_id.get_mut("g1").unwrap().info.last = Some(last(500));
        assert_eq!(order(&g, ""), ["g1", "g2", "g3", "g4"]);
        assert_eq!(order(&g, "A"), ["g1", "g2", "g3", "g4"]);
        assert_eq!(order(&g, "ta"), ["g2", "g4"]);
    }

    #[test]
    fn delivery_counts_and_unread() {
        let mut g = Groups::default();
        assert!(g.apply(&Event::Group(Box::new(info("g1", Some("created")))), None));
        assert_eq!(
            g.by_id["g1"].lines[0].text,
            "alice created the group “Team”"
        );
        g.apply(
            &Event::GroupQueued {
                group: "g1".into(),
                id: "m1".into(),
                text: "hi".into(),
                sent_at: 1,
                recipients: 2,
            },
            Some("g1"),
        );
        g.apply(
            &Event::GroupSent {
                group: "g1".into(),
                id: "m1".into(),
            },
            None,
        );
        let line = g.by_id["g1"].lines[1].clone();
        assert_eq!(delivery_text(&line), "delivered to 0 of 2");
        for (to, k) in [("bob", 1), ("carol", 2)] {
            g.apply(
                &Event::GroupDelivered {
                    group: "g1".into(),
                    to: to.into(),
                    id: "m1".into(),
                    delivered_to: k,
                    recipients: 2,
                },
                None,
            );
        }
        let line = &g.by_id["g1"].lines[1];
        assert_eq!(delivery_text(line), "delivered to 2 of 2");
        assert_eq!(line.status, Status::Delivered);
        let msg = |id: &str| Event::GroupMessage {
            group: "g1".into(),
            from: "bob".into(),
            id: id.into(),
            text: "yo".into(),
            sent_at: 2,
        };
        g.apply(&msg("b1"), None);
        g.apply(&msg("b1"), None);
        g.apply(&msg("b2"), Some("g1"));
        assert_eq!(
            g.by_id["g1"].unread, 1,
            "a duplicate and a looked-at one do not count"
        );
        assert!(!g.apply(&Event::Users { online: vec![] }, None));
    }
}
