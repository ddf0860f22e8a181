//! The first screen: username, server, passphrase.

use egui::{Align, Key, Layout, Ui, UiBuilder, Vec2};

use crate::gui::ChatApp;

pub fn sign_in(app: &mut ChatApp, ui: &mut Ui) {
    egui::CentralPanel::default_margins().show(ui, |ui| {
        ui.vertical_centered(|ui| {
            ui.add_space((ui.available_height() * 0.15).min(80.0));
            ui.heading("Secure Chat");
            ui.label("End-to-end encrypted. The server only ever sees ciphertext.");
            ui.add_space(16.0);
        });
        // A centred column: status and error lines wrap inside it.
        let width = ui.available_width().min(400.0);
        let avail = ui.available_rect_before_wrap();
        let column = egui::Rect::from_min_size(
            egui::pos2(avail.center().x - width / 2.0, avail.top()),
            Vec2::new(width, avail.height()),
        );
        let builder = UiBuilder::new()
            .max_rect(column)
            .layout(Layout::top_down(Align::Center));
        ui.scope_builder(builder, |ui| {
            let busy = app.signin.busy;
            let form = &mut app.signin;
            let mut submit = false;
            let mut edited = false;
            egui::Grid::new("signin")
                .num_columns(2)
                .spacing([12.0, 10.0])
                .show(ui, |ui| {
                    let label = ui.label("Username");
                    // Fields stay editable while it tries: changing one stops the attempt
                    // (fixing a wrong port should not need Cancel first).
                    let name = ui.add(
                        egui::TextEdit::singleline(&mut form.username)
                            .hint_text("e.g. alice")
                            .desired_width(220.0),
                    );
                    edited |= name.changed();
                    let name = name.labelled_by(label.id);
                    // Once, not every frame: a window without focus would repaint forever.
                    if !std::mem::replace(&mut form.focus_requested, true)
                        && form.username.is_empty()
                    {
                        name.request_focus();
                    }
                    submit |= name.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                    ui.end_row();
                    let label = ui.label("Server");
                    let server = ui
                        .add(egui::TextEdit::singleline(&mut form.server).desired_width(220.0))
                        .labelled_by(label.id);
                    edited |= server.changed();
                    submit |= server.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                    ui.end_row();
                    let label = ui.label("Passphrase");
                    let pass = ui
                        .add(
                            egui::TextEdit::singleline(&mut form.passphrase)
                                .password(true)
                                .hint_text("optional: protects your key file")
                                .desired_width(220.0),
                        )
                        .labelled_by(label.id);
                    edited |= pass.changed();
                    submit |= pass.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                    ui.end_row();
                });
            ui.add_space(12.0);
            if busy && edited {
                app.cancel_sign_in();
            } else if busy {
                ui.spinner();
                let status = match &app.signin.retry {
                    Some((reason, at)) => {
                        let left = at.saturating_duration_since(std::time::Instant::now());
                        ui.ctx()
                            .request_repaint_after(std::time::Duration::from_millis(250));
                        format!(
                            "{reason}. Retrying in {} s — check the server address, or wait.",
                            left.as_secs() + u64::from(left.subsec_millis() > 0)
                        )
                    }
                    None => app
                        .model
                        .status
                        .clone()
                        .unwrap_or_else(|| "Connecting…".into()),
                };
                ui.add(egui::Label::new(status).wrap());
                if ui.button("Cancel").clicked() {
                    app.cancel_sign_in();
                }
            } else if ui
                .add(egui::Button::new("Sign in").min_size(Vec2::new(120.0, 0.0)))
                .clicked()
                || submit
            {
                app.sign_in(ui.ctx());
            }
            if let Some(error) = &app.signin.error {
                ui.add_space(8.0);
                ui.colored_label(ui.visuals().error_fg_color, error);
            }
            ui.add_space(16.0);
            ui.small(
                "First sign-in creates your identity key and registers the name on the server.",
            );
        });
    });
}
