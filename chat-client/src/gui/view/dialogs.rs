//! Modal dialogs: the safety number and the settings.

use egui::{Align, Layout, RichText, Ui};

use super::WARN_BG;
use crate::api::Command;
use crate::gui::ChatApp;
use crate::home::Theme;

/// A relay key to decide on: on the first connection to a relay, compare its fingerprint
/// with the operator's before trusting it; after a key change (red), nothing is sent until
/// the user deliberately trusts the new key.
pub fn relay_key_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some(prompt) = app.model.relay_key.clone() else {
        return;
    };
    let mut decided = None;
    egui::Modal::new(egui::Id::unique("relay key")).show(ui.ctx(), |ui| {
        ui.set_max_width(520.0);
        match &prompt.mismatch {
            None => {
                ui.heading("Check the relay's key");
                ui.label(format!(
                    "This is the first connection to {}. Its key fingerprint is:",
                    prompt.server
                ));
            }
            Some(why) => {
                egui::Frame::new()
                    .fill(super::DANGER_BG)
                    .inner_margin(8.0)
                    .corner_radius(4.0)
                    .show(ui, |ui| {
                        ui.label(
                            RichText::new("The relay's key has changed")
                                .strong()
                                .color(egui::Color32::WHITE),
                        );
                        ui.label(RichText::new(why).color(egui::Color32::WHITE));
                    });
                ui.label("The key it presents now:");
            }
        }
        ui.add_space(4.0);
        ui.label(RichText::new(&prompt.fingerprint).monospace().size(15.0));
        ui.add_space(4.0);
        ui.label(
            "Compare it with the one your operator gave you (the relay prints it with \
             `chat-server fingerprint`). Trust it only if they match: anyone else could read \
             who you talk to.",
        );
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            let accept = if prompt.mismatch.is_some() {
                "Trust the new key"
            } else {
                "Accept and connect"
            };
            if ui.button(accept).clicked() {
                decided = Some(true);
            }
            if ui.button("Cancel").clicked() {
                decided = Some(false);
            }
        });
    });
    if let Some(trust) = decided {
        app.model.relay_key = None;
        if trust {
            app.model.error = None;
            app.send(Command::TrustServerKey {
                fingerprint: prompt.fingerprint,
            });
        } else if app.screen == crate::gui::Screen::SignIn {
            app.cancel_sign_in();
        }
        // Otherwise the client stays offline, the error in the status bar, until the
        // window is closed.
    }
}

/// Asks before removing a contact: it deletes the conversation from this device.
pub(super) fn remove_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some(user) = app.view.confirm_remove.clone() else {
        return;
    };
    let mut decided = None;
    let response = egui::Modal::new(egui::Id::unique("remove contact")).show(ui.ctx(), |ui| {
        ui.set_max_width(420.0);
        ui.heading(format!("Remove {user}?"));
        ui.label(format!(
            "This deletes your conversation with {user} from this computer. Messages not \
             sent yet are dropped; those the relay already accepted still reach {user} (they \
             cannot be recalled). {user}'s key stays remembered, so a changed key is still \
             flagged. If {user} writes again, the chat comes back."
        ));
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui
                .button(RichText::new("Remove").color(egui::Color32::WHITE))
                .clicked()
            {
                decided = Some(true);
            }
            if ui.button("Cancel").clicked() {
                decided = Some(false);
            }
        });
    });
    if response.should_close() {
        decided.get_or_insert(false);
    }
    if let Some(remove) = decided {
        app.view.confirm_remove = None;
        if remove {
            app.send(Command::Remove { user });
        }
    }
}

pub(super) fn safety_dialog(app: &mut ChatApp, ui: &mut Ui) {
    let Some(user) = app.view.safety_for.clone() else {
        return;
    };
    let contact = app.model.contacts.get(&user).cloned().unwrap_or_default();
    let me = app.model.me.clone().unwrap_or_default();
    let response = egui::Modal::new(egui::Id::unique("safety")).show(ui.ctx(), |ui| {
        ui.set_max_width(460.0);
        ui.heading(format!("Safety number with {user}"));
        ui.label(format!(
            "Compare these digits with {user} in person or on a call you trust. If they match, \
             nobody is intercepting your conversation."
        ));
        ui.add_space(8.0);
        match &contact.safety {
            Some(number) => {
                let groups: Vec<&str> = number.split(' ').collect();
                for chunk in groups.chunks(4) {
                    ui.label(RichText::new(chunk.join("  ")).monospace().size(22.0));
                }
                ui.add_space(8.0);
                ui.horizontal(|ui| {
                    if ui.button("Copy").clicked() {
                        ui.ctx().copy_text(number.clone());
                        app.view.copied = Some(std::time::Instant::now());
                    }
                    if app.view.copied.is_some_and(|t| t.elapsed().as_secs() < 2) {
                        ui.weak("Copied");
                    }
                });
                ui.add_space(4.0);
                if contact.key_changed {
                    ui.colored_label(WARN_BG, format!("This is the number for {user}'s new key."));
                    if ui.button("Numbers match — accept new key").clicked() {
                        // Exactly the key this number was computed for.
                        app.send(Command::AcceptKey {
                            user: user.clone(),
                            fingerprint: contact.safety_fingerprint.clone(),
                        });
                    }
                } else {
                    let mut verified = contact.verified;
                    if ui
                        .checkbox(
                            &mut verified,
                            format!("I compared this number with {user}: mark as verified"),
                        )
                        .changed()
                    {
                        app.send(if verified {
                            Command::Verify { user: user.clone() }
                        } else {
                            Command::Unverify { user: user.clone() }
                        });
                    }
                }
            }
            None if app.model.unknown.contains(&user) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!("There is no user named {user}."),
                );
            }
            None => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!("Fetching {user}'s key…"));
                });
            }
        }
        ui.add_space(8.0);
        ui.weak(format!("You are {me}."));
        ui.with_layout(Layout::right_to_left(Align::Min), |ui| {
            ui.button("Close").clicked()
        })
        .inner
    });
    if response.inner || response.should_close() {
        app.view.safety_for = None;
        // Back to typing.
        app.view.composer_focused_for = None;
    }
}

pub(super) fn settings_dialog(app: &mut ChatApp, ui: &mut Ui) {
    if !app.view.settings_open {
        app.view.settings_draft = None;
        return;
    }
    let draft = app
        .view
        .settings_draft
        .get_or_insert_with(|| app.settings.clone());
    let mut save = false;
    let response = egui::Modal::new(egui::Id::unique("settings")).show(ui.ctx(), |ui| {
        ui.set_max_width(420.0);
        ui.heading("Settings");
        egui::Grid::new("settings-grid")
            .num_columns(2)
            .spacing([12.0, 10.0])
            .show(ui, |ui| {
                ui.label("Server");
                ui.text_edit_singleline(&mut draft.server);
                ui.end_row();
                ui.label("Theme");
                ui.horizontal(|ui| {
                    ui.selectable_value(&mut draft.theme, Theme::System, "System");
                    ui.selectable_value(&mut draft.theme, Theme::Light, "Light");
                    ui.selectable_value(&mut draft.theme, Theme::Dark, "Dark");
                });
                ui.end_row();
                ui.label("Font size");
                // Whole points, arrow keys and clicks on the rail move it.
                ui.add(
                    egui::Slider::new(&mut draft.font_size, 11.0..=28.0)
                        .step_by(1.0)
                        .fixed_decimals(0)
                        .suffix(" pt")
                        .clamping(egui::SliderClamping::Always),
                );
                ui.end_row();
                ui.label("");
                ui.label(egui::RichText::new("The quick brown fox, 0123").size(draft.font_size))
                    .on_hover_text("How messages will look at this size");
                ui.end_row();
                ui.label("Notifications");
                ui.checkbox(&mut draft.notifications, "Notify me of new messages");
                ui.end_row();
                ui.label("");
                ui.add_enabled(
                    draft.notifications,
                    egui::Checkbox::new(
                        &mut draft.notification_previews,
                        "Show the text in notifications",
                    ),
                );
                ui.end_row();
            });
        ui.small("A new server address is used the next time you sign in.");
        // Buttons on the right, the main one outermost, as in the safety dialog.
        ui.with_layout(Layout::right_to_left(Align::Min), |ui| {
            save = ui.button("Save").clicked();
            ui.button("Cancel").clicked()
        })
        .inner
    });
    if save {
        let settings = draft.clone();
        app.save_settings(settings);
    }
    if save || response.inner || response.should_close() {
        app.view.settings_open = false;
    }
}
