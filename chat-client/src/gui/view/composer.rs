//! The composer under a conversation or a group: the draft editor (kept per contact or
//! group), the byte counter near the limit, and Enter to send.

use egui::{Key, Ui};

use crate::api::Command;
use crate::gui::ChatApp;

/// The composer under a history, remembering its height for the next frame's layout.
pub(super) fn composer_below(app: &mut ChatApp, ui: &mut Ui, to: To<'_>, blocked: bool) {
    let top = ui.cursor().top();
    ui.separator();
    composer(app, ui, to, blocked);
    let used = ui.cursor().top() - top;
    if (used - app.view.composer_height).abs() > 0.5 {
        app.view.composer_height = used;
        ui.ctx().request_repaint();
    }
}

/// Whom a composer writes to.
#[derive(Debug, Clone, Copy)]
pub(super) enum To<'a> {
    User(&'a str),
    /// A group, by id.
    Group(&'a str),
}

/// The key of a group's draft (and row heights) among the users' (no username has ':').
pub(crate) fn group_draft_key(group: &str) -> String {
    format!("group:{group}")
}

fn composer(app: &mut ChatApp, ui: &mut Ui, to: To<'_>, blocked: bool) {
    let key = match to {
        To::User(user) => user.to_owned(),
        To::Group(group) => group_draft_key(group),
    };
    let id = ui.make_persistent_id(("composer", &key));
    let focused = ui.memory(|m| m.has_focus(id));
    // Enter or Ctrl+Enter sends; Shift+Enter falls through to the editor as a new line.
    let send_key = focused && ui.input_mut(take_send_key);
    let connected_hint = match to {
        To::User(_) if blocked => "Sending is paused: the key changed (see above).",
        To::Group(_) if blocked => "You are not a member of this group any more.",
        _ => "Message — Enter sends, Shift+Enter adds a line",
    };
    let mut send = send_key;
    // The end-to-end limit, or the relay's if its frames carry less.
    let limit = app
        .model
        .max_text
        .map_or(chat_protocol::e2e::MAX_TEXT_BYTES, |relay| {
            relay.min(chat_protocol::e2e::MAX_TEXT_BYTES)
        });
    let over = app
        .view
        .drafts
        .get(&key)
        .is_some_and(|d| d.trim_end().len() > limit);
    ui.horizontal(|ui| {
        let draft = app.view.drafts.entry(key.clone()).or_default();
        let label = ui.label("Message");
        // The editor scrolls inside a bounded height (about 8 lines), so a long paste
        // never pushes the Send button away.
        let line = ui.text_style_height(&egui::TextStyle::Body);
        let button_width = ui.spacing().interact_size.x.max(line * 4.0);
        let edit = egui::ScrollArea::vertical()
            .id_salt(("composer-scroll", &key))
            .max_height(line * 8.0 + 12.0)
            .show(ui, |ui| {
                ui.add_enabled(
                    !blocked,
                    egui::TextEdit::multiline(draft)
                        .id(id)
                        .hint_text(connected_hint)
                        .desired_rows(2)
                        .desired_width(ui.available_width() - button_width - 16.0),
                )
            })
            .inner;
        edit.labelled_by(label.id);
        let button = ui.add_enabled(
            !blocked && !over && !draft.trim().is_empty(),
            egui::Button::new("Send").min_size(egui::vec2(button_width, 0.0)),
        );
        send |= button.clicked();
        if !focused
            && !blocked
            && app.view.safety_for.is_none()
            && !app.view.settings_open
            && app.view.composer_focused_for.as_deref() != Some(key.as_str())
        {
            // Opening a conversation puts the cursor in its composer, once per opening
            // (every frame would keep an unfocused window repainting).
            app.view.composer_focused_for = Some(key.clone());
            ui.memory_mut(|m| m.request_focus(id));
        }
    });
    // Near and over the limit: a counter; over it nothing is sent and the text stays.
    let used = app.view.drafts.get(&key).map_or(0, |d| d.trim_end().len());
    let over = used > limit;
    if used * 10 >= limit * 9 {
        let counter = format!("{used} / {limit} bytes");
        if over {
            ui.colored_label(
                ui.visuals().error_fg_color,
                format!("{counter}: too long to send; shorten it or split it in two"),
            );
        } else {
            ui.weak(counter);
        }
    }
    if send && !blocked && !over {
        let draft = app.view.drafts.entry(key.clone()).or_default();
        let text = draft.trim_end().to_owned();
        if !text.trim().is_empty() {
            app.view.last_sent = Some((key.clone(), text.clone()));
            let draft = app.view.drafts.entry(key.clone()).or_default();
            draft.clear();
            match to {
                To::User(user) => {
                    app.model.contact(user).unread = 0;
                    app.send(Command::Send {
                        to: user.to_owned(),
                        text,
                    });
                }
                To::Group(group) => {
                    app.model.groups.read(group);
                    app.send(Command::GroupSend {
                        group: group.to_owned(),
                        text,
                    });
                }
            }
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
