//! Drawing. Reads the model, turns clicks and keys into commands.
//!
//! This file holds the main window's frame (status bar, contact list); `signin`,
//! `conversation` and `dialogs` the rest.

mod composer;
mod conversation;
mod dialogs;
mod group_dialogs;
mod groups;
mod people;
mod side_list;
mod signin;

use egui::{Align, Color32, Key, Layout, Modifiers, RichText, Sense, Ui, Vec2};

use super::ChatApp;
use super::theme;
use crate::api::{Command, ConnectionState};
use crate::gui::model::{Contact, NOTE_TO_SELF};
pub(crate) use composer::group_draft_key;
use conversation::conversation;
pub use dialogs::relay_key_dialog;
use dialogs::{remove_dialog, safety_dialog, settings_dialog};
pub use signin::sign_in;

/// How long an error stays in the status bar unless dismissed (key and storage errors
/// stay until dismissed).
const ERROR_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// A key changed (white text on it).
const WARN_BG: Color32 = theme::DARK.warn_banner;
/// A verified contact's key changed: louder than an unverified one.
const DANGER_BG: Color32 = theme::DARK.danger_banner;

pub fn main(app: &mut ChatApp, ui: &mut Ui) {
    shortcuts(app, ui);
    status_bar(app, ui);
    contacts_panel(app, ui);
    groups::member_panel(app, ui);
    let open = (app.model.open.clone(), app.model.open_group.clone());
    egui::CentralPanel::default_margins().show(ui, |ui| match open {
        (_, Some(group)) => groups::group_conversation(app, ui, &group),
        (Some(user), None) => conversation(app, ui, &user),
        (None, None) => empty_state(
            ui,
            "No conversation open",
            "Pick a contact on the left, or type a name in the search box and start a new chat (Ctrl+K).",
        ),
    });
    group_dialogs::new_group_dialog(app, ui);
    group_dialogs::add_members_dialog(app, ui);
    group_dialogs::leave_dialog(app, ui);
    safety_dialog(app, ui);
    remove_dialog(app, ui);
    people::people_dialog(app, ui);
    settings_dialog(app, ui);
}

fn shortcuts(app: &mut ChatApp, ui: &Ui) {
    let (find, people, escape) = ui.input_mut(|i| {
        (
            i.consume_key(Modifiers::COMMAND, Key::K) || i.consume_key(Modifiers::COMMAND, Key::F),
            i.consume_key(Modifiers::COMMAND, Key::P),
            i.key_pressed(Key::Escape),
        )
    });
    if find {
        app.view.focus_filter = true;
    }
    if people {
        people::open(app);
    }
    // Alt+Up / Alt+Down walk the contact list, opening each conversation.
    let (previous, next) = ui.input_mut(|i| {
        (
            i.consume_key(Modifiers::ALT, Key::ArrowUp),
            i.consume_key(Modifiers::ALT, Key::ArrowDown),
        )
    });
    if previous || next {
        let names: Vec<String> = app
            .model
            .listed("")
            .iter()
            .map(|(n, _)| (*n).to_owned())
            .collect();
        let at = app
            .model
            .open
            .as_ref()
            .and_then(|o| names.iter().position(|n| n == o));
        let to = match (at, next) {
            (None, _) => names.first(),
            (Some(i), true) => names.get((i + 1).min(names.len() - 1)),
            (Some(i), false) => names.get(i.saturating_sub(1)),
        };
        if let Some(name) = to.cloned() {
            app.open(&name);
        }
    }
    if escape && app.view.people.open {
        app.view.people.open = false;
    }
    if escape && (app.view.safety_for.is_some() || app.view.settings_open) {
        app.view.safety_for = None;
        app.view.settings_open = false;
        app.view.composer_focused_for = None;
    }
}

fn status_bar(app: &mut ChatApp, ui: &mut Ui) {
    egui::Panel::bottom("status").show(ui, |ui| {
        ui.horizontal(|ui| {
            let link = &app.model.link;
            let (dot, text) = match link.state {
                ConnectionState::Connected => {
                    (theme::palette(ui.visuals()).online, "Connected".to_owned())
                }
                ConnectionState::Connecting => (
                    theme::palette(ui.visuals()).offline,
                    "Connecting…".to_owned(),
                ),
                ConnectionState::Reconnecting => {
                    let left = link
                        .retry_in_ms
                        .map(|ms| {
                            std::time::Duration::from_millis(ms)
                                .saturating_sub(link.since.elapsed())
                        })
                        .unwrap_or_default();
                    (WARN_BG, format!("Reconnecting in {} s", left.as_secs() + 1))
                }
                ConnectionState::Offline => (Color32::RED, "Offline".to_owned()),
            };
            let (rect, _) = ui.allocate_exact_size(Vec2::splat(10.0), Sense::hover());
            ui.painter().circle_filled(rect.center(), 4.5, dot);
            let status = ui.label(text);
            if let Some(server) = &link.server {
                status.on_hover_text(format!("Relay {server}"));
            }
            if link.state == ConnectionState::Reconnecting
                && ui
                    .small_button("Retry now")
                    .on_hover_text("Connect again now instead of waiting")
                    .clicked()
            {
                app.send(Command::Reconnect);
            }
            // Messages not yet accepted by the relay: those written this session count at
            // once (the core's figure comes with its next connection event).
            let sending = app
                .model
                .contacts
                .values()
                .flat_map(|c| &c.lines)
                .filter(|l| l.outgoing && l.status == crate::api::Status::Sending)
                .count();
            let queued = if link.state == ConnectionState::Connected {
                sending
            } else {
                link.queued.max(sending)
            };
            if queued > 0 {
                ui.separator();
                ui.label(format!("{queued} queued"));
            }
            if let (Some(me), Some(fp)) = (&app.model.me, &app.model.fingerprint) {
                ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
                    if ui.small_button("⚙ Settings").clicked() {
                        app.view.settings_open = true;
                    }
                    ui.label(RichText::new(me).strong())
                        .on_hover_text(format!("Your key fingerprint:\n{fp}"));
                });
            }
        });
        if let Some((code, message)) = app.model.error.clone() {
            // Shown in full (wrapped), and gone by itself after a while unless it is about
            // keys or storage, which need the user.
            let now = std::time::Instant::now();
            let since = match &app.view.error_since {
                Some((shown, at)) if *shown == (code.clone(), message.clone()) => *at,
                _ => {
                    app.view.error_since = Some(((code.clone(), message.clone()), now));
                    now
                }
            };
            let sticky =
                code.contains("key") || code.contains("store") || code.contains("fingerprint");
            if !sticky && now.duration_since(since) >= ERROR_SHOWN_FOR {
                app.model.error = None;
                app.view.error_since = None;
            } else {
                if !sticky {
                    ui.ctx().request_repaint_after(ERROR_SHOWN_FOR);
                }
                ui.horizontal(|ui| {
                    if ui.small_button("Dismiss").clicked() {
                        app.model.error = None;
                    }
                    ui.add(
                        egui::Label::new(
                            RichText::new(format!("⚠ {message}"))
                                .color(ui.visuals().error_fg_color),
                        )
                        .wrap(),
                    )
                    .on_hover_text(code);
                });
            }
        }
    });
}

fn contacts_panel(app: &mut ChatApp, ui: &mut Ui) {
    egui::Panel::left("contacts")
        .default_size(230.0)
        .size_range(180.0..=400.0)
        .show(ui, |ui| {
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                people::people_button(app, ui);
                group_dialogs::new_group_button(app, ui);
            });
            let filter = ui.add(
                egui::TextEdit::singleline(&mut app.view.filter)
                    .hint_text("Search or new chat (Ctrl+K)")
                    .desired_width(f32::INFINITY),
            );
            if std::mem::take(&mut app.view.focus_filter) {
                filter.request_focus();
            }
            let typed = app.view.filter.trim().to_lowercase();
            let archived = app.model.archived().len();
            if archived == 0 {
                app.view.show_archived = false;
            }
            let listed: Vec<(String, Contact)> = if app.view.show_archived && typed.is_empty() {
                app.model.archived()
            } else {
                app.model.listed(&typed)
            }
            .into_iter()
            .map(|(n, c)| (n.to_owned(), c.clone()))
            .collect();
            let groups: Vec<(String, String)> = if app.view.show_archived && typed.is_empty() {
                Vec::new()
            } else {
                app.model
                    .groups
                    .listed(&typed)
                    .iter()
                    .map(|g| (g.info.id.clone(), g.info.name.to_lowercase()))
                    .collect()
            };
            // Matches are the groups, then the contacts, as the rows below list them.
            let matches = groups.len() + listed.len();
            let exact_contact = listed.iter().position(|(n, _)| *n == typed);
            let exact = exact_contact
                .map(|i| groups.len() + i)
                .or_else(|| groups.iter().position(|(_, name)| *name == typed));
            let valid = chat_protocol::Username::parse(&typed).is_ok();
            let enter = filter.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
            // Up/Down in the search box move the highlighted match; Enter opens it. The
            // highlight starts on an exact match, else on the first match.
            if filter.changed() {
                app.view.highlight = exact.unwrap_or(0);
            }
            if filter.has_focus() && matches > 0 {
                let (up, down) =
                    ui.input(|i| (i.key_pressed(Key::ArrowUp), i.key_pressed(Key::ArrowDown)));
                if down {
                    app.view.highlight = (app.view.highlight + 1).min(matches - 1);
                }
                if up {
                    app.view.highlight = app.view.highlight.saturating_sub(1);
                }
            }
            let highlighted =
                (!typed.is_empty() && matches > 0).then(|| app.view.highlight.min(matches - 1));
            if !typed.is_empty() && valid && exact_contact.is_none() {
                let to_self = Some(typed.as_str()) == app.model.me.as_deref();
                let start = ui.button(if to_self {
                    format!("+ {NOTE_TO_SELF}")
                } else {
                    format!("+ New chat with {typed}")
                });
                if start.clicked() || (enter && highlighted.is_none()) {
                    app.view.filter.clear();
                    app.open(&typed);
                    if !to_self {
                        // Look the name up now: an unknown one is refused in place rather
                        // than failing at the first send.
                        app.send(crate::api::Command::Safety {
                            user: typed.clone(),
                        });
                    }
                }
            }
            if enter && let Some(i) = highlighted {
                app.view.filter.clear();
                match groups.get(i) {
                    Some((id, _)) => app.open_group(id),
                    None => app.open(&listed[i - groups.len()].0),
                }
            }
            ui.separator();
            if typed.is_empty() && archived > 0 {
                let label = if app.view.show_archived {
                    "Back to chats".to_owned()
                } else {
                    format!("Archived ({archived})")
                };
                if ui.button(label).clicked() {
                    app.view.show_archived = !app.view.show_archived;
                }
            }
            let groups: Vec<String> = groups.into_iter().map(|(id, _)| id).collect();
            if listed.is_empty() && groups.is_empty() {
                ui.add_space(12.0);
                ui.weak(if typed.is_empty() {
                    "No contacts yet. Type a username above to start a conversation."
                } else {
                    "No matching contacts."
                });
            }
            side_list::contact_rows(app, ui, &groups, &listed, highlighted);
        });
}

/// A contact's presence: a green dot (online), a grey dot (offline) or a grey ring
/// (unknown: we are not connected, so nobody's presence is current).
pub(super) fn presence_dot(ui: &mut Ui, online: Option<bool>) {
    presence_dot_in(ui, online, 10.0);
}

/// [`presence_dot`] centred in a row `height` points tall (beside a heading, say).
pub(super) fn presence_dot_in(ui: &mut Ui, online: Option<bool>, height: f32) {
    let (rect, response) = ui.allocate_exact_size(Vec2::new(10.0, height), Sense::hover());
    let p = theme::palette(ui.visuals());
    let painter = ui.painter();
    match online {
        Some(true) => painter.circle_filled(rect.center(), 4.5, p.online),
        Some(false) => painter.circle_filled(rect.center(), 4.5, p.offline),
        None => painter.circle_stroke(rect.center(), 4.0, egui::Stroke::new(1.5, p.offline)),
    };
    response.on_hover_text(match online {
        Some(true) => "online",
        Some(false) => "offline",
        None => "presence unknown until reconnected",
    });
}

pub(super) fn empty_state(ui: &mut Ui, title: &str, hint: &str) {
    ui.vertical_centered(|ui| {
        ui.add_space((ui.available_height() * 0.3).max(20.0));
        ui.heading(title);
        ui.add_space(6.0);
        ui.weak(hint);
    });
}
