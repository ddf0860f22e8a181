//! The open conversation: header, key-change banner, message list and composer.

use chrono::{Local, TimeZone};
use egui::{Align, Color32, Layout, RichText, Sense, Ui, UiBuilder, Vec2};

use super::composer::{To, composer_below};
use super::side_list::contact_menu;
use super::{DANGER_BG, WARN_BG, empty_state, presence_dot_in};
use crate::api::{Command, Status};
use crate::gui::ChatApp;
use crate::gui::model::{Contact, Line};
use crate::gui::theme;

/// Assumed height of a row not measured yet.
const ROW_GUESS: f32 = 44.0;

pub(super) fn conversation(app: &mut ChatApp, ui: &mut Ui, user: &str) {
    let contact = app.model.contacts.get(user).cloned().unwrap_or_default();
    // Header.
    if app.model.me.as_deref() == Some(user) {
        ui.horizontal(|ui| {
            ui.heading(format!("📝 {}", crate::gui::model::NOTE_TO_SELF));
            ui.weak("only you can read these; kept on this computer");
        });
        ui.separator();
    } else {
        conversation_header(app, ui, user, &contact);
    }
    conversation_body(app, ui, user, &contact);
}

fn conversation_header(app: &mut ChatApp, ui: &mut Ui, user: &str, contact: &Contact) {
    ui.horizontal(|ui| {
        let height = ui.text_style_height(&egui::TextStyle::Heading);
        presence_dot_in(ui, contact.online, height);
        ui.heading(user);
        if contact.verified {
            ui.label(RichText::new("✔ Verified").color(theme::palette(ui.visuals()).online))
                .on_hover_text("You compared safety numbers.");
        } else if !contact.key_changed {
            ui.weak("not verified");
        }
        ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
            let mut action = None;
            ui.menu_button("…", |ui| {
                action = contact_menu(ui, contact.archived, true)
            })
            .response
            .on_hover_text("Archive or remove this chat");
            if let Some(action) = action {
                app.contact_action(action, user);
            }
            if ui.button("Safety number").clicked() {
                app.view.safety_for = Some(user.to_owned());
                app.send(Command::Safety {
                    user: user.to_owned(),
                });
            }
        });
    });
    if contact.key_changed {
        key_change_banner(app, ui, user, contact);
    }
    ui.separator();
}

fn conversation_body(app: &mut ChatApp, ui: &mut Ui, user: &str, contact: &Contact) {
    // Composer at the bottom (as tall as its text, up to its bound, as measured last
    // frame), history above it.
    let composer_height = app.view.composer_height.max(60.0);
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
            history(app, ui, user, &contact.lines, row);
        }
    });
    composer_below(app, ui, To::User(user), contact.key_changed);
}

/// A contact's key changed: say what it may mean, louder if the old key was verified, and
/// offer to compare, accept (exactly the key shown) or reject.
fn key_change_banner(app: &mut ChatApp, ui: &mut Ui, user: &str, contact: &Contact) {
    let (fill, text) = if contact.key_changed_was_verified {
        (
            DANGER_BG,
            format!(
                "⛔ {user}'s key changed, and you had verified the old one. Unless {user} told you \
                 they reinstalled or changed devices, someone may be trying to intercept your \
                 messages. Nothing is sent to {user}, and their new messages are held unread, \
                 until you compare the new safety number with {user} and decide."
            ),
        )
    } else {
        (
            WARN_BG,
            format!(
                "⚠ {user}'s security key changed. This happens when they reinstall or use a new \
                 device — or when someone is trying to intercept your messages. Sending is paused \
                 and their new messages are held until you compare the new safety number with \
                 {user} and accept or reject the key."
            ),
        )
    };
    egui::Frame::new()
        .fill(fill)
        .corner_radius(6.0)
        .inner_margin(10.0)
        .show(ui, |ui| {
            ui.colored_label(Color32::WHITE, text);
            ui.horizontal(|ui| {
                if ui.button("Compare safety number").clicked() {
                    app.view.safety_for = Some(user.to_owned());
                    app.send(Command::Safety {
                        user: user.to_owned(),
                    });
                }
                // Accepting names the key whose number was shown: if the relay swapped it
                // since, the core refuses.
                let shown = contact
                    .safety_fingerprint
                    .clone()
                    .filter(|_| contact.safety.is_some());
                let accept = ui
                    .add_enabled(shown.is_some(), egui::Button::new("Accept new key"))
                    .on_disabled_hover_text("Compare the safety number first.");
                if accept.clicked() {
                    app.send(Command::AcceptKey {
                        user: user.to_owned(),
                        fingerprint: shown,
                    });
                }
                if ui
                    .button("Reject")
                    .on_hover_text("Keep the old key; messages under the new key are discarded.")
                    .clicked()
                {
                    app.send(Command::RejectKey {
                        user: user.to_owned(),
                    });
                }
            });
        });
}

/// The message list of conversation `key`, each line drawn by `draw(ui, line, previous)`.
/// Only rows inside the viewport are laid out; the others take their last measured
/// height.
pub(super) fn history<T>(
    app: &mut ChatApp,
    ui: &mut Ui,
    key: &str,
    lines: &[T],
    draw: impl Fn(&mut Ui, &T, Option<&T>),
) {
    let heights = app.view.row_heights.entry(key.to_owned()).or_default();
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
                    draw(&mut child, line, previous);
                    let measured = child.min_rect().height() + ui.spacing().item_spacing.y;
                    if (measured - heights[i]).abs() > 0.5 {
                        // A guess was wrong: the content's height and, stuck to the
                        // bottom, the scroll offset change — draw again at once rather
                        // than at the next input (the newest lines would stay cut off).
                        ui.ctx().request_repaint();
                    }
                    heights[i] = measured;
                }
                y += heights[i];
            }
            ui.allocate_rect(
                egui::Rect::from_min_size(origin, Vec2::new(width, y)),
                Sense::hover(),
            );
        });
}

/// How far after its arrival a received message's time (the sender's clock) may be before
/// the bubble flags the sender's clock: 10 minutes. (A time long *before* arrival is not
/// flagged: the relay may have held the message while we were offline.)
const CLOCK_OFF_MS: u64 = 10 * 60 * 1000;

/// A day heading before the first line stored on a new day (by our clock).
pub(super) fn day_heading(ui: &mut Ui, stored_at: u64, previous_stored_at: Option<u64>) {
    let day = Local
        .timestamp_millis_opt(stored_at as i64)
        .single()
        .map(|t| t.date_naive());
    if previous_stored_at
        .and_then(|p| Local.timestamp_millis_opt(p as i64).single())
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
}

fn row(ui: &mut Ui, line: &Line, previous: Option<&Line>) {
    // Days follow our clock (when stored); the time shown is the sender's.
    day_heading(ui, line.stored_at, previous.map(|p| p.stored_at));
    let stored = Local.timestamp_millis_opt(line.stored_at as i64).single();
    let when = Local.timestamp_millis_opt(line.sent_at as i64).single();
    let time = when
        .map(|t| t.format("%H:%M").to_string())
        .unwrap_or_default();
    // The sender's clock is shown, never trusted: far from when it arrived, say so.
    let clock_off = !line.outgoing
        && line.stored_at != 0
        && line.sent_at > line.stored_at.saturating_add(CLOCK_OFF_MS);
    let status = match (line.outgoing, line.status) {
        (false, _) if clock_off => " · ⏱ sender's clock".into(),
        (false, _) => String::new(),
        (true, Status::Sending) => " · sending…".into(),
        (true, Status::Sent) if line.undelivered => " · not delivered yet 🕓".into(),
        (true, Status::Sent) => " · sent ✔".into(),
        (true, Status::Delivered) => " · delivered ✔✔".into(),
        (true, Status::Failed) => " · not sent ⚠".into(),
    };
    let tooltip = match (line.status, &line.reason) {
        (Status::Failed, Some(reason)) => Some(reason.clone()),
        (Status::Sent, _) if line.undelivered => Some(format!(
            "Sent {}, but not delivered yet: the recipient has not been online since. It stays \
             queued on the relay and arrives when they come back (the relay keeps it for a \
             limited time).",
            when.map(|t| t.format("%-d %B %H:%M").to_string())
                .unwrap_or_default()
        )),
        _ if clock_off => Some(format!(
            "The sender's clock said {}, but it arrived {} (by this computer's clock). It is \
             listed when it arrived.",
            when.map(|t| t.format("%-d %B %H:%M").to_string())
                .unwrap_or_default(),
            stored
                .map(|t| t.format("%-d %B %H:%M").to_string())
                .unwrap_or_default()
        )),
        _ => None,
    };
    bubble(
        ui,
        Bubble {
            text: &line.text,
            meta: format!("{time}{status}"),
            tooltip,
            outgoing: line.outgoing,
            sender: None,
        },
    );
}

/// One message as a bubble.
pub(super) struct Bubble<'a> {
    pub text: &'a str,
    /// The small line under the text (time, delivery).
    pub meta: String,
    /// Shown when hovering `meta`.
    pub tooltip: Option<String>,
    pub outgoing: bool,
    /// Named above the text (group messages from others).
    pub sender: Option<&'a str>,
}

/// Draws a bubble as wide as its text (up to 3/4 of the view); outgoing ones sit right.
pub(super) fn bubble(ui: &mut Ui, b: Bubble<'_>) {
    let margin = egui::Margin::symmetric(10, 6);
    let max = (ui.available_width() * 0.75).max(120.0) - margin.sum().x;
    let painter = ui.painter();
    let text_width = painter
        .layout(
            b.text.to_owned(),
            egui::TextStyle::Body.resolve(ui.style()),
            Color32::WHITE,
            max,
        )
        .size()
        .x;
    let no_wrap = |text: String, style: egui::TextStyle| {
        painter
            .layout_no_wrap(text, style.resolve(ui.style()), Color32::WHITE)
            .size()
            .x
    };
    let meta_width = no_wrap(b.meta.clone(), egui::TextStyle::Small);
    let sender_width = b
        .sender
        .map_or(0.0, |s| no_wrap(s.to_owned(), egui::TextStyle::Body));
    let width = text_width.max(meta_width).max(sender_width).min(max).ceil();
    let p = theme::palette(ui.visuals());
    let fill = if b.outgoing {
        p.bubble_out
    } else {
        p.bubble_in
    };
    let edge = egui::Stroke::new(1.0, p.bubble_edge);
    ui.horizontal(|ui| {
        if b.outgoing {
            ui.add_space(ui.available_width() - width - margin.sum().x);
        }
        egui::Frame::new()
            .fill(fill)
            .stroke(edge)
            .corner_radius(8.0)
            .inner_margin(margin)
            .show(ui, |ui| {
                ui.set_width(width);
                ui.vertical(|ui| {
                    if let Some(sender) = b.sender {
                        ui.label(
                            RichText::new(sender)
                                .strong()
                                .color(theme::name_colour(sender, p, fill)),
                        );
                    }
                    ui.add(egui::Label::new(b.text).wrap().selectable(true));
                    let meta = ui.label(RichText::new(b.meta).small().weak());
                    if let Some(tooltip) = b.tooltip {
                        meta.on_hover_text(tooltip);
                    }
                });
            });
    });
}
