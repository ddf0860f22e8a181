//! Group dialogs in the window: the "New group" button and dialog, "Add members" (both
//! with a member picker over contacts and people we share a group with) and the
//! confirmation before leaving a group.

use egui::Ui;

use super::presence_dot;
use crate::api::Command;
use crate::gui::ChatApp;
use crate::gui::group_forms::MemberPicker;

/// The "New group" button beside "People online".
pub(super) fn new_group_button(app: &mut ChatApp, ui: &mut Ui) {
    if ui
        .button("➕ New group")
        .on_hover_text("Start a group: a name and the people in it")
        .clicked()
    {
        app.view.group.new_group = Some(MemberPicker::new());
    }
}

/// Ticks people from `candidates` in `picker` (name, presence, verified mark).
fn pick_list(app: &ChatApp, ui: &mut Ui, picker: &mut MemberPicker, candidates: &[String]) {
    egui::ScrollArea::vertical()
        .max_height(240.0)
        .auto_shrink([false, true])
        .show(ui, |ui| {
            if candidates.is_empty() {
                ui.weak("Nobody matches. Type a username to add someone who is not a contact.");
            }
            for name in candidates {
                ui.horizontal(|ui| {
                    presence_dot(ui, app.model.online(name));
                    let mut ticked = picker.picked.contains(name);
                    let verified = app.model.contacts.get(name).is_some_and(|c| c.verified);
                    let known = app.model.contacts.contains_key(name);
                    let label = match (verified, known) {
                        (true, _) => format!("{name} ✔"),
                        (false, true) => name.clone(),
                        (false, false) => format!("{name} (not a contact yet)"),
                    };
                    if ui.checkbox(&mut ticked, label).changed() {
                        if ticked {
                            picker.picked.insert(name.clone());
                        } else {
                            picker.picked.remove(name);
                        }
                    }
                });
            }
        });
    if !picker.picked.is_empty() {
        let names: Vec<&str> = picker.picked.iter().map(String::as_str).collect();
        ui.label(format!("{} chosen: {}", names.len(), names.join(", ")));
    }
}

/// Why the dialog cannot be confirmed yet (if so), then `ok` (enabled only without a
/// reason) and Cancel: `Some(true)` confirmed, `Some(false)` cancelled.
fn confirm_row(ui: &mut Ui, blocker: Option<String>, ok: &str) -> Option<bool> {
    if let Some(why) = &blocker {
        ui.weak(why);
    }
    ui.add_space(6.0);
    let mut done = None;
    ui.horizontal(|ui| {
        if ui
            .add_enabled(blocker.is_none(), egui::Button::new(ok))
            .clicked()
        {
            done = Some(true);
        }
        if ui.button("Cancel").clicked() {
            done = Some(false);
        }
    });
    done
}

/// The "Members" search box over [`pick_list`], offering contacts and people we share a
/// group with (and a typed name) not in `excluded`. Returns the search box.
fn choose_members(
    app: &ChatApp,
    ui: &mut Ui,
    picker: &mut MemberPicker,
    excluded: &[String],
) -> egui::Response {
    let known: std::collections::BTreeSet<&str> = app
        .model
        .contacts
        .keys()
        .map(String::as_str)
        .chain(
            app.model
                .groups
                .by_id
                .values()
                .filter(|g| g.info.active)
                .flat_map(|g| g.info.members.iter().map(String::as_str)),
        )
        .collect();
    let candidates = picker.candidates(known, app.model.me.as_deref(), excluded);
    let label = ui.label("Members");
    let search = ui
        .add(
            egui::TextEdit::singleline(&mut picker.filter)
                .hint_text("Search contacts or type a username")
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
    pick_list(app, ui, picker, &candidates);
    search
}

/// "New group": a name, and members picked from contacts (with search).
pub(super) fn new_group_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some(mut picker) = app.view.group.new_group.take() else {
        return;
    };
    let max = app.max_group_members;
    let mut done = None;
    let response = egui::Modal::new(egui::Id::unique("new group")).show(ui.ctx(), |ui| {
        ui.set_width(420.0);
        ui.heading("New group");
        ui.weak(
            "Messages in a group are end-to-end encrypted: only its members can read them. \
             You are its first admin.",
        );
        ui.add_space(6.0);
        let label = ui.label("Group name");
        let name = ui
            .add(
                egui::TextEdit::singleline(&mut picker.name)
                    .hint_text("e.g. Family")
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(label.id);
        if std::mem::take(&mut picker.focus) {
            name.request_focus();
        }
        choose_members(app, ui, &mut picker, &[]);
        done = confirm_row(ui, picker.create_blocker(max), "Create group");
    });
    if response.should_close() {
        done.get_or_insert(false);
    }
    match done {
        Some(true) => {
            let name = picker.name.trim().to_owned();
            app.view.group.creating = Some(name.clone());
            app.send(Command::GroupCreate {
                name,
                members: picker.picked.into_iter().collect(),
            });
        }
        Some(false) => {}
        None => app.view.group.new_group = Some(picker),
    }
}

/// "Add members" to the open group (admins).
pub(super) fn add_members_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some((id, mut picker)) = app.view.group.add_to.take() else {
        return;
    };
    let Some(group) = app.model.groups.by_id.get(&id).cloned() else {
        return;
    };
    let max = app.max_group_members;
    let mut done = None;
    let response = egui::Modal::new(egui::Id::unique("add members")).show(ui.ctx(), |ui| {
        ui.set_width(420.0);
        ui.heading(format!("Add to {}", group.info.name));
        ui.weak("New members cannot read what was sent before they joined.");
        ui.add_space(6.0);
        let search = choose_members(app, ui, &mut picker, &group.info.members);
        if std::mem::take(&mut picker.focus) {
            search.request_focus();
        }
        let blocker = picker.add_blocker(group.info.members.len(), max);
        done = confirm_row(ui, blocker, "Add");
    });
    if response.should_close() {
        done.get_or_insert(false);
    }
    match done {
        Some(true) => app.send(Command::GroupAdd {
            group: id,
            users: picker.picked.into_iter().collect(),
        }),
        Some(false) => {}
        None => app.view.group.add_to = Some((id, picker)),
    }
}

/// Asks before leaving a group.
pub(super) fn leave_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some(id) = app.view.group.confirm_leave.clone() else {
        return;
    };
    let name = app
        .model
        .groups
        .by_id
        .get(&id)
        .map_or_else(String::new, |g| g.info.name.clone());
    let mut decided = None;
    let response = egui::Modal::new(egui::Id::unique("leave group")).show(ui.ctx(), |ui| {
        ui.set_max_width(420.0);
        ui.heading(format!("Leave {name}?"));
        ui.label(
            "The other members are told, and you stop receiving the group's messages: they \
             change their keys, so nothing sent after you left can be read by you. Your copy \
             of the history stays on this computer. Only an admin can add you back.",
        );
        decided = confirm_row(ui, None, "Leave group");
    });
    if response.should_close() {
        decided.get_or_insert(false);
    }
    if let Some(leave) = decided {
        app.view.group.confirm_leave = None;
        if leave {
            app.send(Command::GroupLeave { group: id });
        }
    }
}
