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
            egui::Grid::new("signin")
                .num_columns(2)
                .spacing([12.0, 10.0])
                .show(ui, |ui| {
                    let label = ui.label("Username");
                    let name = ui.add_enabled(
                        !busy,
                        egui::TextEdit::singleline(&mut form.username)
                            .hint_text("e.g. alice")
                            .desired_width(220.0),
                    );
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
                        .add_enabled(
                            !busy,
                            egui::TextEdit::singleline(&mut form.server).desired_width(220.0),
                        )
                        .labelled_by(label.id);
                    submit |= server.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                    ui.end_row();
                    let label = ui.label("Passphrase");
                    let pass = ui
                        .add_enabled(
                            !busy,
                            egui::TextEdit::singleline(&mut form.passphrase)
                                .password(true)
                                .hint_text("optional: protects your key file")
                                .desired_width(220.0),
                        )
                        .labelled_by(label.id);
                    submit |= pass.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
                    ui.end_row();
                });
            ui.add_space(12.0);
            if busy {
                ui.spinner();
                let status = app.model.status.clone();
                let status = status.unwrap_or_else(|| "Connecting…".into());
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
