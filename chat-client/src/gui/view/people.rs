//! "People online": everyone the relay says is online now (not only contacts), refreshed
//! while the dialog is open, filtered as you type; Enter or a click starts a chat.

use std::time::{Duration, Instant};

use egui::{Key, Ui};

use super::presence_dot;
use crate::api::Command;
use crate::gui::ChatApp;

/// How often the list is asked for again while the dialog is open.
const REFRESH: Duration = Duration::from_secs(3);

/// The button that opens the dialog (in the contacts panel).
pub(super) fn people_button(app: &mut ChatApp, ui: &mut Ui) {
    if ui
        .button("👥 People online")
        .on_hover_text("Everyone online now (Ctrl+P)")
        .clicked()
    {
        open(app);
    }
}

/// Opens the dialog and asks for the list at once.
pub(super) fn open(app: &mut ChatApp) {
    app.view.people.open = true;
    app.view.people.filter.clear();
    app.view.people.highlight = 0;
    app.view.people.asked = None;
    app.view.people.focus = true;
}

pub(super) fn people_dialog(app: &mut ChatApp, ui: &mut Ui) {
    if !app.view.people.open {
        return;
    }
    // Live while open: ask again every few seconds (the answer updates the model).
    if app
        .view
        .people
        .asked
        .is_none_or(|at| at.elapsed() >= REFRESH)
    {
        app.send(Command::ListUsers);
        app.view.people.asked = Some(Instant::now());
    }
    ui.ctx().request_repaint_after(REFRESH);
    let me = app.model.me.clone().unwrap_or_default();
    let filter = app.view.people.filter.trim().to_lowercase();
    let people: Vec<String> = app
        .model
        .online_users
        .iter()
        .filter(|u| **u != me && u.contains(&filter))
        .cloned()
        .collect();
    let mut chosen = None;
    let response = egui::Modal::new(egui::Id::unique("people")).show(ui.ctx(), |ui| {
        ui.set_width(320.0);
        ui.heading("People online");
        let search = ui.add(
            egui::TextEdit::singleline(&mut app.view.people.filter)
                .hint_text("Filter by name")
                .desired_width(f32::INFINITY),
        );
        if std::mem::take(&mut app.view.people.focus) {
            search.request_focus();
        }
        if search.changed() {
            app.view.people.highlight = 0;
        }
        let (up, down, enter) = ui.input(|i| {
            (
                i.key_pressed(Key::ArrowUp),
                i.key_pressed(Key::ArrowDown),
                i.key_pressed(Key::Enter),
            )
        });
        if down && !people.is_empty() {
            app.view.people.highlight = (app.view.people.highlight + 1).min(people.len() - 1);
        }
        if up {
            app.view.people.highlight = app.view.people.highlight.saturating_sub(1);
        }
        let highlight = app
            .view
            .people
            .highlight
            .min(people.len().saturating_sub(1));
        if enter {
            chosen = people.get(highlight).cloned();
        }
        ui.add_space(6.0);
        if app.view.people.asked.is_some() && app.model.online_users.is_empty() {
            ui.weak("Asking the relay…");
        } else if people.is_empty() {
            ui.weak(if filter.is_empty() {
                "Nobody else is online right now."
            } else {
                "Nobody online matches."
            });
        }
        egui::ScrollArea::vertical()
            .max_height(360.0)
            .show(ui, |ui| {
                for (i, name) in people.iter().enumerate() {
                    ui.horizontal(|ui| {
                        presence_dot(ui, Some(true));
                        if ui.selectable_label(i == highlight, name).clicked() {
                            chosen = Some(name.clone());
                        }
                    });
                }
            });
        ui.add_space(6.0);
        ui.weak("Enter or a click starts a chat · Esc closes");
    });
    if let Some(name) = chosen {
        app.view.people.open = false;
        app.open(&name);
    } else if response.should_close() {
        app.view.people.open = false;
    }
}
