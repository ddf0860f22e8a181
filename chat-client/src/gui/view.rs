//! Drawing. Reads the model, turns clicks and keys into commands.

use chrono::{Local, TimeZone};
use egui::{Align, Color32, Key, Layout, Modifiers, RichText, Sense, Ui, UiBuilder, Vec2};

use super::{ChatApp, Screen};
use crate::api::{Command, ConnectionState, Status};
use crate::gui::model::{Contact, Line};
use crate::home::Theme;

const ONLINE: Color32 = Color32::from_rgb(0x2e, 0xa0, 0x43);
const OFFLINE: Color32 = Color32::from_gray(0x90);
const WARN_BG: Color32 = Color32::from_rgb(0x8a, 0x5a, 0x00);
/// Assumed height of a row not measured yet.
const ROW_GUESS: f32 = 44.0;

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

pub fn main(app: &mut ChatApp, ui: &mut Ui) {
    shortcuts(app, ui);
    status_bar(app, ui);
    contacts_panel(app, ui);
    egui::CentralPanel::default_margins().show(ui, |ui| match app.model.open.clone() {
        Some(user) => conversation(app, ui, &user),
        None => empty_state(
            ui,
            "No conversation open",
            "Pick a contact on the left, or type a name in the search box and start a new chat (Ctrl+K).",
        ),
    });
    safety_dialog(app, ui);
    settings_dialog(app, ui);
}

fn shortcuts(app: &mut ChatApp, ui: &Ui) {
    let (find, escape) = ui.input_mut(|i| {
        (
            i.consume_key(Modifiers::COMMAND, Key::K) || i.consume_key(Modifiers::COMMAND, Key::F),
            i.key_pressed(Key::Escape),
        )
    });
    if find {
        app.view.focus_filter = true;
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
                ConnectionState::Connected => (ONLINE, "Connected".to_owned()),
                ConnectionState::Connecting => (OFFLINE, "Connecting…".to_owned()),
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
            presence_dot(ui, dot);
            ui.label(text);
            if link.queued > 0 {
                ui.separator();
                ui.label(format!("{} queued", link.queued));
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
            ui.horizontal(|ui| {
                ui.colored_label(ui.visuals().error_fg_color, format!("⚠ {message}"))
                    .on_hover_text(code);
                if ui.small_button("Dismiss").clicked() {
                    app.model.error = None;
                }
            });
        }
    });
}

fn contacts_panel(app: &mut ChatApp, ui: &mut Ui) {
    egui::Panel::left("contacts")
        .default_size(230.0)
        .size_range(180.0..=400.0)
        .show(ui, |ui| {
            ui.add_space(6.0);
            let filter = ui.add(
                egui::TextEdit::singleline(&mut app.view.filter)
                    .hint_text("Search or new chat (Ctrl+K)")
                    .desired_width(f32::INFINITY),
            );
            if std::mem::take(&mut app.view.focus_filter) {
                filter.request_focus();
            }
            let typed = app.view.filter.trim().to_lowercase();
            let listed: Vec<(String, Contact)> = app
                .model
                .listed(&typed)
                .into_iter()
                .map(|(n, c)| (n.to_owned(), c.clone()))
                .collect();
            let exact = listed.iter().any(|(n, _)| *n == typed);
            let valid = chat_protocol::Username::parse(&typed).is_ok();
            let enter = filter.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
            if !typed.is_empty() && valid && Some(typed.as_str()) != app.model.me.as_deref() {
                let start = ui.button(format!("+ New chat with {typed}"));
                if start.clicked() || (enter && !exact) {
                    app.view.filter.clear();
                    app.open(&typed);
                }
            }
            if enter && exact {
                app.view.filter.clear();
                app.open(&typed);
            }
            ui.separator();
            if listed.is_empty() {
                ui.add_space(12.0);
                ui.weak(if typed.is_empty() {
                    "No contacts yet. Type a username above to start a conversation."
                } else {
                    "No matching contacts."
                });
            }
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    for (name, contact) in &listed {
                        let selected = app.model.open.as_deref() == Some(name.as_str());
                        let row = ui
                            .horizontal(|ui| {
                                presence_dot(ui, if contact.online { ONLINE } else { OFFLINE });
                                let label = ui.selectable_label(selected, name);
                                if contact.key_changed {
                                    ui.colored_label(WARN_BG, "⚠").on_hover_text("Key changed");
                                } else if contact.verified {
                                    ui.label("✔").on_hover_text("Verified");
                                }
                                if contact.unread > 0 {
                                    ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
                                        ui.label(
                                            RichText::new(format!(" {} ", contact.unread))
                                                .background_color(ui.visuals().selection.bg_fill)
                                                .strong(),
                                        )
                                        .on_hover_text("unread");
                                    });
                                }
                                label
                            })
                            .inner;
                        if row.clicked() {
                            app.open(name);
                        }
                    }
                });
        });
}

fn conversation(app: &mut ChatApp, ui: &mut Ui, user: &str) {
    let contact = app.model.contacts.get(user).cloned().unwrap_or_default();
    // Header.
    ui.horizontal(|ui| {
        presence_dot(ui, if contact.online { ONLINE } else { OFFLINE });
        ui.heading(user);
        if contact.verified {
            ui.label(RichText::new("✔ Verified").color(ONLINE))
                .on_hover_text("You compared safety numbers.");
        } else if !contact.key_changed {
            ui.weak("not verified");
        }
        ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
            if ui.button("Safety number").clicked() {
                app.view.safety_for = Some(user.to_owned());
                app.send(Command::Safety {
                    user: user.to_owned(),
                });
            }
        });
    });
    if contact.key_changed {
        egui::Frame::new()
            .fill(WARN_BG)
            .corner_radius(6.0)
            .inner_margin(10.0)
            .show(ui, |ui| {
                ui.colored_label(
                    Color32::WHITE,
                    format!(
                        "⚠ {user}'s security key changed. This happens when they reinstall or use a new device — \
                         or when someone is trying to intercept your messages. Sending is paused until you \
                         compare the new safety number with {user} and accept the key."
                    ),
                );
                ui.horizontal(|ui| {
                    if ui.button("Compare safety number").clicked() {
                        app.view.safety_for = Some(user.to_owned());
                        app.send(Command::Safety { user: user.to_owned() });
                    }
                    if ui.button("Accept new key").clicked() {
                        app.send(Command::AcceptKey { user: user.to_owned() });
                    }
                });
            });
    }
    ui.separator();

    // Composer at the bottom, history above it.
    let composer_height = 78.0;
    let history_height = (ui.available_height() - composer_height).max(60.0);
    ui.allocate_ui(Vec2::new(ui.available_width(), history_height), |ui| {
        ui.set_min_height(history_height);
        if contact.lines.is_empty() {
            empty_state(
                ui,
                "No messages yet",
                &format!("Say hi to {user}. Messages are end-to-end encrypted: only you and {user} can read them."),
            );
        } else {
            history(app, ui, user, &contact.lines);
        }
    });
    ui.separator();
    composer(app, ui, user, contact.key_changed);
}

/// The message list. Only rows inside the viewport are laid out; the others take their
/// last measured height.
fn history(app: &mut ChatApp, ui: &mut Ui, user: &str, lines: &[Line]) {
    let heights = app.view.row_heights.entry(user.to_owned()).or_default();
    heights.resize(lines.len(), ROW_GUESS);
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .stick_to_bottom(true)
        .show_viewport(ui, |ui, viewport| {
            let width = ui.available_width();
            let origin = ui.min_rect().min;
            let mut y = 0.0;
            for (i, line) in lines.iter().enumerate() {
                let h = heights[i];
                if y + h >= viewport.min.y && y <= viewport.max.y {
                    let rect = egui::Rect::from_min_size(
                        origin + Vec2::new(0.0, y),
                        Vec2::new(width, f32::INFINITY),
                    );
                    let mut child = ui.new_child(
                        UiBuilder::new()
                            .max_rect(rect)
                            .layout(Layout::top_down(Align::Min)),
                    );
                    let previous = i.checked_sub(1).map(|p| &lines[p]);
                    row(&mut child, line, previous);
                    heights[i] = child.min_rect().height() + ui.spacing().item_spacing.y;
                }
                y += heights[i];
            }
            ui.allocate_rect(
                egui::Rect::from_min_size(origin, Vec2::new(width, y)),
                Sense::hover(),
            );
        });
}

fn row(ui: &mut Ui, line: &Line, previous: Option<&Line>) {
    let when = Local.timestamp_millis_opt(line.sent_at as i64).single();
    let day = when.map(|t| t.date_naive());
    if previous
        .and_then(|p| Local.timestamp_millis_opt(p.sent_at as i64).single())
        .map(|t| t.date_naive())
        != day
    {
        ui.add_space(6.0);
        ui.vertical_centered(|ui| {
            let label = match day {
                Some(d) if d == Local::now().date_naive() => "Today".to_owned(),
                Some(d) => d.format("%A, %-d %B %Y").to_string(),
                None => "Unknown date".to_owned(),
            };
            ui.weak(label);
        });
        ui.add_space(4.0);
    }
    let time = when
        .map(|t| t.format("%H:%M").to_string())
        .unwrap_or_default();
    let status = match (line.outgoing, line.status) {
        (false, _) => String::new(),
        (true, Status::Sending) => " · sending…".into(),
        (true, Status::Sent) => " · sent ✔".into(),
        (true, Status::Delivered) => " · delivered ✔✔".into(),
        (true, Status::Failed) => " · not sent ⚠".into(),
    };
    let meta = format!("{time}{status}");
    // Bubbles are as wide as their text (up to 3/4 of the view); outgoing ones sit right.
    let margin = egui::Margin::symmetric(10, 6);
    let max = (ui.available_width() * 0.75).max(120.0) - margin.sum().x;
    let painter = ui.painter();
    let text_width = painter
        .layout(
            line.text.clone(),
            egui::TextStyle::Body.resolve(ui.style()),
            Color32::WHITE,
            max,
        )
        .size()
        .x;
    let meta_width = painter
        .layout_no_wrap(
            meta.clone(),
            egui::TextStyle::Small.resolve(ui.style()),
            Color32::WHITE,
        )
        .size()
        .x;
    let width = text_width.max(meta_width).min(max).ceil();
    let fill = if line.outgoing {
        ui.visuals().selection.bg_fill.gamma_multiply(0.55)
    } else {
        ui.visuals().faint_bg_color
    };
    ui.horizontal(|ui| {
        if line.outgoing {
            ui.add_space(ui.available_width() - width - margin.sum().x);
        }
        egui::Frame::new()
            .fill(fill)
            .corner_radius(8.0)
            .inner_margin(margin)
            .show(ui, |ui| {
                ui.set_width(width);
                ui.vertical(|ui| {
                    ui.add(egui::Label::new(&line.text).wrap().selectable(true));
                    ui.small(meta);
                });
            });
    });
}

fn composer(app: &mut ChatApp, ui: &mut Ui, user: &str, blocked: bool) {
    let id = ui.make_persistent_id(("composer", user));
    let focused = ui.memory(|m| m.has_focus(id));
    // Enter or Ctrl+Enter sends; Shift+Enter falls through to the editor as a new line.
    let send_key = focused && ui.input_mut(take_send_key);
    let connected_hint = if blocked {
        "Sending is paused: the key changed (see above)."
    } else {
        "Message — Enter sends, Shift+Enter adds a line"
    };
    let mut send = send_key;
    ui.horizontal(|ui| {
        let draft = app.view.drafts.entry(user.to_owned()).or_default();
        let label = ui.label("Message");
        let edit = ui.add_enabled(
            !blocked,
            egui::TextEdit::multiline(draft)
                .id(id)
                .hint_text(connected_hint)
                .desired_rows(2)
                .desired_width(ui.available_width() - 70.0),
        );
        edit.labelled_by(label.id);
        let button = ui.add_enabled(
            !blocked && !draft.trim().is_empty(),
            egui::Button::new("Send"),
        );
        send |= button.clicked();
        if !focused
            && !blocked
            && app.view.safety_for.is_none()
            && !app.view.settings_open
            && app.view.composer_focused_for.as_deref() != Some(user)
        {
            // Opening a conversation puts the cursor in its composer, once per opening
            // (every frame would keep an unfocused window repainting).
            app.view.composer_focused_for = Some(user.to_owned());
            ui.memory_mut(|m| m.request_focus(id));
        }
    });
    if send && !blocked {
        let draft = app.view.drafts.entry(user.to_owned()).or_default();
        let text = draft.trim_end().to_owned();
        if !text.trim().is_empty() {
            draft.clear();
            app.model.contact(user).unread = 0;
            app.send(Command::Send {
                to: user.to_owned(),
                text,
            });
        }
    }
}

/// Consumes Enter / Ctrl+Enter presses; Shift+Enter (and Alt+Enter) stay for the editor
/// as a new line. The modifiers are those of each key event, not of the frame: a fast
/// Shift+Enter can be pressed and released within one frame.
fn take_send_key(input: &mut egui::InputState) -> bool {
    let mut hit = false;
    input.events.retain(|event| {
        let send = matches!(
            event,
            egui::Event::Key { key: Key::Enter, pressed: true, modifiers, .. }
                if !modifiers.shift && !modifiers.alt
        );
        hit |= send;
        !send
    });
    hit
}

fn safety_dialog(app: &mut ChatApp, ui: &mut Ui) {
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
                        app.send(Command::AcceptKey { user: user.clone() });
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

fn settings_dialog(app: &mut ChatApp, ui: &mut Ui) {
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
                ui.add(egui::Slider::new(&mut draft.font_size, 11.0..=28.0).suffix(" pt"));
                ui.end_row();
            });
        ui.small("A new server address is used the next time you sign in.");
        ui.horizontal(|ui| {
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

fn presence_dot(ui: &mut Ui, color: Color32) {
    let (rect, _) = ui.allocate_exact_size(Vec2::splat(10.0), Sense::hover());
    ui.painter().circle_filled(rect.center(), 4.5, color);
}

fn empty_state(ui: &mut Ui, title: &str, hint: &str) {
    ui.vertical_centered(|ui| {
        ui.add_space((ui.available_height() * 0.3).max(20.0));
        ui.heading(title);
        ui.add_space(6.0);
        ui.weak(hint);
    });
}

impl ChatApp {
    pub fn is_main(&self) -> bool {
        self.screen == Screen::Main
    }
}
