//! Groups in the window: the open group's conversation (system lines, senders' names,
//! "delivered to k of n" on hover) and the member panel (presence, safety numbers, admin
//! actions, leaving). The dialogs that create, add to and leave a group are in
//! `group_dialogs`.

use egui::{Align, Layout, RichText, Ui, Vec2};

use super::composer::{To, composer_below};
use super::conversation::{Bubble, bubble, day_heading, history};
use super::{WARN_BG, empty_state, presence_dot};
use crate::api::{Command, Status};
use crate::gui::ChatApp;
use crate::gui::group_forms::MemberPicker;
use crate::gui::group_model::{GroupLine, GroupView, delivery_text};
use crate::gui::theme;

/// The open group: header, history and composer.
pub(super) fn group_conversation(app: &mut ChatApp, ui: &mut Ui, id: &str) {
    let Some(group) = app.model.groups.by_id.get(id).cloned() else {
        empty_state(ui, "Group not found", "It may still be loading.");
        return;
    };
    header(app, ui, &group);
    let composer_height = app.view.composer_height.max(60.0);
    let history_height = (ui.available_height() - composer_height).max(60.0);
    ui.allocate_ui(Vec2::new(ui.available_width(), history_height), |ui| {
        ui.set_min_height(history_height);
        if group.lines.is_empty() {
            empty_state(
                ui,
                "No messages yet",
                "Messages here are end-to-end encrypted: only the group's members can read them.",
            );
        } else {
            let key = super::group_draft_key(id);
            history(app, ui, &key, &group.lines, group_row);
        }
    });
    composer_below(app, ui, To::Group(id), !group.info.active);
}

fn header(app: &mut ChatApp, ui: &mut Ui, group: &GroupView) {
    let info = &group.info;
    ui.horizontal(|ui| {
        ui.heading(format!("👥 {}", info.name));
        ui.weak(format!(
            "{} member{}",
            info.members.len(),
            if info.members.len() == 1 { "" } else { "s" }
        ));
        ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
            let open = app.view.group.members_open;
            if ui
                .selectable_label(open, "Members")
                .on_hover_text("Who is in the group; safety numbers; add, remove, rename, leave")
                .clicked()
            {
                app.view.group.members_open = !open;
            }
        });
    });
    if !info.active {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            "You are not a member of this group any more: you can read its history here, but \
             not write, and you get none of its new messages.",
        );
    }
    if !info.excluded.is_empty() {
        let names = info.excluded.join(", ");
        egui::Frame::new()
            .fill(WARN_BG)
            .corner_radius(6.0)
            .inner_margin(8.0)
            .show(ui, |ui| {
                ui.colored_label(
                    egui::Color32::WHITE,
                    format!(
                        "⚠ The key of {names} changed. They get no new group messages from you \
                         until you compare safety numbers and accept the new key (Members → \
                         Safety number)."
                    ),
                );
            });
    }
    ui.separator();
}

/// One line of a group: a system line centred, a text as a bubble (with its sender's name
/// if not ours, and ours with "delivered to k of n" on hover).
fn group_row(ui: &mut Ui, line: &GroupLine, previous: Option<&GroupLine>) {
    day_heading(ui, line.stored_at, previous.map(|p| p.stored_at));
    if line.system {
        ui.vertical_centered(|ui| {
            ui.label(RichText::new(&line.text).small().weak());
        });
        return;
    }
    let time = chrono::TimeZone::timestamp_millis_opt(&chrono::Local, line.sent_at as i64)
        .single()
        .map(|t| t.format("%H:%M").to_string())
        .unwrap_or_default();
    let (status, tooltip) = if line.outgoing {
        let count = format!("{}/{}", line.delivered_to, line.recipients);
        let status = match line.status {
            Status::Sending => " · sending…".to_owned(),
            Status::Failed => " · not sent ⚠".to_owned(),
            Status::Delivered => format!(" · ✔✔ {count}"),
            Status::Sent => format!(" · ✔ {count}"),
        };
        (status, Some(delivery_text(line)))
    } else {
        (String::new(), None)
    };
    bubble(
        ui,
        Bubble {
            text: &line.text,
            meta: format!("{time}{status}"),
            tooltip,
            outgoing: line.outgoing,
            sender: (!line.outgoing).then_some(line.from.as_str()),
        },
    );
}

/// The member panel on the right of an open group.
pub(super) fn member_panel(app: &mut ChatApp, ui: &mut Ui) {
    let Some(id) = app.model.open_group.clone() else {
        return;
    };
    if !app.view.group.members_open {
        return;
    }
    let Some(group) = app.model.groups.by_id.get(&id).cloned() else {
        return;
    };
    let info = &group.info;
    let me = app.model.me.clone().unwrap_or_default();
    let admin = info.active && info.admins.contains(&me);
    egui::Panel::right("members")
        .default_size(240.0)
        .size_range(200.0..=360.0)
        .show(ui, |ui| {
            ui.add_space(6.0);
            ui.strong("Members");
            egui::ScrollArea::vertical()
                .max_height(ui.available_height() * 0.55)
                .auto_shrink([false, true])
                .show(ui, |ui| {
                    for member in &info.members {
                        member_row(app, ui, info, member, &me);
                    }
                });
            ui.separator();
            if let Some(chosen) = app.view.group.chosen.clone()
                && info.members.contains(&chosen)
            {
                member_actions(app, ui, &id, info, &chosen, &me, admin);
                ui.separator();
            }
            group_actions(app, ui, &id, info, admin);
        });
}

fn member_row(
    app: &mut ChatApp,
    ui: &mut Ui,
    info: &crate::api::GroupInfo,
    member: &str,
    me: &str,
) {
    ui.horizontal(|ui| {
        let online = if member == me {
            Some(app.model.link.state == crate::api::ConnectionState::Connected)
        } else {
            app.model.online(member)
        };
        presence_dot(ui, online);
        let mut label = member.to_owned();
        if member == me {
            label.push_str(" (you)");
        }
        let chosen = app.view.group.chosen.as_deref() == Some(member);
        if ui.selectable_label(chosen, label).clicked() {
            app.view.group.chosen = (!chosen).then(|| member.to_owned());
        }
        if info.admins.iter().any(|a| a == member) {
            ui.weak("admin");
        }
        let contact = app.model.contacts.get(member);
        if info.excluded.iter().any(|e| e == member) {
            ui.colored_label(WARN_BG, "⚠ key changed")
                .on_hover_text(format!(
                    "{member}'s key changed: they get no new group keys (and cannot read new \
                 messages) until you compare safety numbers and accept the new key."
                ));
        } else if contact.is_some_and(|c| c.verified) {
            ui.label(RichText::new("✔").color(theme::palette(ui.visuals()).online))
                .on_hover_text("Verified: you compared safety numbers.");
        }
    });
}

/// What can be done to one member (chosen in the list).
fn member_actions(
    app: &mut ChatApp,
    ui: &mut Ui,
    id: &str,
    info: &crate::api::GroupInfo,
    member: &str,
    me: &str,
    admin: bool,
) {
    if member == me {
        return;
    }
    ui.strong(member);
    if ui.button(format!("Safety number of {member}")).clicked() {
        app.view.safety_for = Some(member.to_owned());
        app.send(Command::Safety {
            user: member.to_owned(),
        });
    }
    if ui.button(format!("Message {member}")).clicked() {
        app.open(member);
    }
    if admin {
        if !info.admins.iter().any(|a| a == member)
            && ui.button(format!("Make {member} admin")).clicked()
        {
            app.send(Command::GroupPromote {
                group: id.to_owned(),
                users: vec![member.to_owned()],
            });
        }
        if ui
            .button(format!("Remove {member}"))
            .on_hover_text("Everyone changes keys: they cannot read what is sent afterwards.")
            .clicked()
        {
            app.send(Command::GroupRemove {
                group: id.to_owned(),
                users: vec![member.to_owned()],
            });
            app.view.group.chosen = None;
        }
    }
}

/// Add, rename (admins) and leave.
fn group_actions(
    app: &mut ChatApp,
    ui: &mut Ui,
    id: &str,
    info: &crate::api::GroupInfo,
    admin: bool,
) {
    if admin {
        if ui.button("Add members…").clicked() {
            app.view.group.add_to = Some((id.to_owned(), MemberPicker::new()));
        }
        match app.view.group.rename.take() {
            None => {
                if ui.button("Rename…").clicked() {
                    app.view.group.rename = Some(info.name.clone());
                }
            }
            Some(mut name) => {
                let label = ui.label("New name");
                ui.add(egui::TextEdit::singleline(&mut name).desired_width(f32::INFINITY))
                    .labelled_by(label.id);
                let mut keep = true;
                let problem = crate::engine::group_name_problem(&name);
                if let Some(problem) = &problem {
                    ui.colored_label(
                        ui.visuals().error_fg_color,
                        crate::gui::group_forms::capitalised(problem),
                    );
                }
                ui.horizontal(|ui| {
                    let fine = problem.is_none() && name.trim() != info.name;
                    if ui.add_enabled(fine, egui::Button::new("Save")).clicked() {
                        app.send(Command::GroupRename {
                            group: id.to_owned(),
                            name: name.trim().to_owned(),
                        });
                        keep = false;
                    }
                    if ui.button("Cancel").clicked() {
                        keep = false;
                    }
                });
                if keep {
                    app.view.group.rename = Some(name);
                }
            }
        }
    } else if info.active {
        ui.weak("Only admins can add, remove or rename.");
    }
    if info.active && ui.button("Leave group…").clicked() {
        app.view.group.confirm_leave = Some(id.to_owned());
    }
}
