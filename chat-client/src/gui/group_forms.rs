//! The window's state for groups that is not the model: the "New group" and "Add
//! members" pickers, the member panel, renaming and leaving. No drawing, no I/O.

use std::collections::BTreeSet;

use chat_protocol::Username;

/// Choosing people: a name for a new group (unused when adding), a search box, and who
/// is ticked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberPicker {
    pub name: String,
    pub filter: String,
    pub picked: BTreeSet<String>,
    /// Put the cursor in the first field once.
    pub focus: bool,
}

impl MemberPicker {
    pub fn new() -> Self {
        Self {
            focus: true,
            ..Self::default()
        }
    }

    /// Whom the list offers: `contacts` (without `me` and those `excluded`, e.g. members
    /// already in) whose name contains the search text, then the search text itself when
    /// it is a valid username nobody listed has — so people who are not contacts yet can
    /// be added by name. Ticked people always stay in the list.
    pub fn candidates<'a>(
        &self,
        contacts: impl IntoIterator<Item = &'a str>,
        me: Option<&str>,
        excluded: &[String],
    ) -> Vec<String> {
        let filter = self.filter.trim().to_lowercase();
        let mut list: Vec<String> = contacts
            .into_iter()
            .filter(|c| Some(*c) != me && !excluded.iter().any(|e| e == c))
            .filter(|c| c.contains(&filter) || self.picked.contains(*c))
            .map(str::to_owned)
            .collect();
        for picked in &self.picked {
            if !list.contains(picked) {
                list.push(picked.clone());
            }
        }
        if !filter.is_empty()
            && Username::parse(&filter).is_ok()
            && Some(filter.as_str()) != me
            && !excluded.contains(&filter)
            && !list.contains(&filter)
        {
            list.push(filter);
        }
        list.sort();
        list
    }

    /// Why "Add" cannot be pressed yet, for a group of `members` (us included): nobody
    /// picked, or more than a group of at most `max` has room for.
    pub fn add_blocker(&self, members: usize, max: usize) -> Option<String> {
        let room = max.saturating_sub(members);
        if self.picked.is_empty() {
            Some("Pick at least one person.".into())
        } else if self.picked.len() > room {
            Some(format!(
                "A group can have at most {max} members; this one has room for {room} more."
            ))
        } else {
            None
        }
    }

    /// Why "Create" cannot be pressed yet, if it cannot (a new group needs a name and
    /// somebody besides us; at most `max` members, us included).
    pub fn create_blocker(&self, max: usize) -> Option<String> {
        if self.name.trim().is_empty() {
            Some("Give the group a name.".into())
        } else if let Some(problem) = crate::engine::group_name_problem(&self.name) {
            Some(capitalised(&problem))
        } else if self.picked.is_empty() {
            Some("Pick at least one member.".into())
        } else if self.picked.len() + 1 > max {
            Some(format!(
                "A group can have at most {max} members, you included."
            ))
        } else {
            None
        }
    }
}

/// "A group name…" from "a group name…": the core's wording, as a sentence.
pub fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect::<String>() + ".",
        None => String::new(),
    }
}

/// Group dialogs and panels open in the window.
#[derive(Debug, Clone, Default)]
pub struct GroupUi {
    /// "New group" is open.
    pub new_group: Option<MemberPicker>,
    /// "Add members" to this group (its id) is open.
    pub add_to: Option<(String, MemberPicker)>,
    /// The member panel beside an open group.
    pub members_open: bool,
    /// The new name being typed for the open group.
    pub rename: Option<String>,
    /// Asking whether to leave this group (its id).
    pub confirm_leave: Option<String>,
    /// A group we asked to create (its name): opened when the core says it exists.
    pub creating: Option<String>,
    /// The member chosen in the member panel (whose actions are shown).
    pub chosen: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_filter_contacts_and_offer_a_typed_name() {
        let contacts = ["alice", "bob", "carol", "dave"];
        let mut p = MemberPicker::new();
        assert_eq!(
            p.candidates(contacts, Some("alice"), &["dave".into()]),
            ["bob", "carol"]
        );
        p.filter = "CA".into();
        assert_eq!(p.candidates(contacts, Some("alice"), &[]), ["ca", "carol"]);
        p.picked.insert("bob".into());
        p.filter = "erin".into();
        assert_eq!(
            p.candidates(contacts, Some("alice"), &[]),
            ["bob", "erin"],
            "ticked people stay; a valid new name is offered"
        );
        p.filter = "alice".into();
        assert_eq!(p.candidates(contacts, Some("alice"), &[]), ["bob"]);
        p.filter = "no spaces".into();
        assert_eq!(p.candidates(contacts, Some("alice"), &[]), ["bob"]);
    }

    #[test]
    fn create_needs_a_name_and_a_member_within_the_limit() {
        let mut p = MemberPicker::new();
        assert!(p.create_blocker(256).unwrap().contains("name"));
        p.name = "Team".into();
        assert!(p.create_blocker(256).unwrap().contains("member"));
        p.picked.extend(["bob".to_owned(), "carol".to_owned()]);
        assert_eq!(p.create_blocker(256), None);
        assert!(p.create_blocker(2).unwrap().contains("at most 2"));
        p.name = "x".repeat(65);
        assert!(
            p.create_blocker(256)
                .unwrap()
                .starts_with("A group name is 1 to 64")
        );
        p.name = "0123456789abcdef0123456789abcdef".into();
        assert!(p.create_blocker(256).unwrap().contains("hex"));
        p.name = "Team".into();
        assert_eq!(p.add_blocker(3, 5), None);
        assert!(p.add_blocker(4, 5).unwrap().contains("room for 1 more"));
        assert!(
            MemberPicker::new()
                .add_blocker(3, 5)
                .unwrap()
                .contains("Pick")
        );
    }
}
