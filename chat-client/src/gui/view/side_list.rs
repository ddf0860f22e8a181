//! The contact list as people know it from Signal Desktop or Element: per row an avatar
//! (initials on a colour derived from the name, with the presence dot), the name, the
//! newest message's first line and its time, and the unread badge. Only the rows in view
//! are laid out, so a thousand contacts scroll as smoothly as ten.

use chrono::{Local, TimeZone};
use egui::{Align2, FontId, Pos2, Rect, Sense, Stroke, Ui, Vec2};

use super::{WARN_BG, theme};
use crate::gui::ChatApp;
use crate::gui::group_model::GroupView;
use crate::gui::model::{Contact, NOTE_TO_SELF};

/// Height of one row, in points (at the default font size).
const ROW_HEIGHT: f32 = 52.0;
const AVATAR_RADIUS: f32 = 17.0;

/// Draws `groups` (their ids, first) and `listed` (name, contact) as rows; a click opens
/// that conversation. `highlighted` is the search's match, an index into the rows (marked
/// like the open one).
pub(super) fn contact_rows(
    app: &mut ChatApp,
    ui: &mut Ui,
    groups: &[String],
    listed: &[(String, Contact)],
    highlighted: Option<usize>,
) {
    let scale = app.settings.font_size / 15.0;
    let row_height = ROW_HEIGHT * scale.max(0.8);
    let me = app.model.me.clone();
    let mut clicked = None;
    let mut clicked_group = None;
    let mut action = None;
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .show_rows(ui, row_height, groups.len() + listed.len(), |ui, range| {
            for i in range {
                if let Some(id) = groups.get(i) {
                    let Some(group) = app.model.groups.by_id.get(id) else {
                        continue;
                    };
                    let selected = app.model.open_group.as_deref() == Some(id.as_str())
                        || highlighted == Some(i);
                    // Two groups of one name are told apart by their ids' start.
                    let twin = app.model.groups.by_id.values().any(|other| {
                        other.info.id != group.info.id && other.info.name == group.info.name
                    });
                    let content = RowContent::group(group, twin);
                    if row(ui, &content, selected, row_height, scale).clicked() {
                        clicked_group = Some(id.clone());
                    }
                    continue;
                }
                let (name, contact) = &listed[i - groups.len()];
                let selected =
                    app.model.open.as_deref() == Some(name.as_str()) || highlighted == Some(i);
                let is_me = me.as_deref() == Some(name.as_str());
                let content = RowContent::contact(name, contact, is_me);
                let response = row(ui, &content, selected, row_height, scale);
                if response.clicked() {
                    clicked = Some(name.clone());
                }
                response.context_menu(|ui| {
                    // Notes to yourself can be deleted, not archived.
                    if let Some(chosen) = contact_menu(ui, contact.archived, !is_me) {
                        action = Some((chosen, name.clone()));
                    }
                });
            }
        });
    if let Some(name) = clicked {
        app.open(&name);
    }
    if let Some(id) = clicked_group {
        app.open_group(&id);
    }
    if let Some((chosen, name)) = action {
        app.contact_action(chosen, &name);
    }
}

/// What can be done to a contact from its menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ContactAction {
    Archive,
    Unarchive,
    /// Asks first (it deletes the conversation).
    Remove,
}

/// The menu items for a contact (its row's context menu, the conversation's … menu).
pub(super) fn contact_menu(ui: &mut Ui, archived: bool, archivable: bool) -> Option<ContactAction> {
    let mut chosen = None;
    if archivable && archived && ui.button("Unarchive").clicked() {
        chosen = Some(ContactAction::Unarchive);
    }
    if archivable
        && !archived
        && ui
            .button("Archive")
            .on_hover_text("Hide from the list until a new message")
            .clicked()
    {
        chosen = Some(ContactAction::Archive);
    }
    if ui.button("Remove…").clicked() {
        chosen = Some(ContactAction::Remove);
    }
    if chosen.is_some() {
        ui.close();
    }
    chosen
}

impl ChatApp {
    /// Carries out a contact menu choice (removal asks first).
    pub(super) fn contact_action(&mut self, action: ContactAction, user: &str) {
        let user = user.to_owned();
        match action {
            ContactAction::Archive => self.send(crate::api::Command::Archive { user }),
            ContactAction::Unarchive => self.send(crate::api::Command::Unarchive { user }),
            ContactAction::Remove => self.view.confirm_remove = Some(user),
        }
    }
}

/// What one row of the side list shows.
struct RowContent {
    label: String,
    /// Picks the avatar's colour.
    colour_of: String,
    /// Drawn on the avatar.
    avatar: String,
    /// The presence dot (`None`: no dot, as for groups and notes to self).
    presence: Option<Option<bool>>,
    /// After the name: " ✔" verified, " ⚠" key changed.
    mark: &'static str,
    key_changed: bool,
    /// The newest line: (text, when stored, ours).
    preview: Option<(String, u64, bool)>,
    unread: usize,
    /// Greyed (a group we are no longer in).
    inactive: bool,
}

impl RowContent {
    fn contact(name: &str, contact: &Contact, is_me: bool) -> Self {
        Self {
            label: if is_me {
                NOTE_TO_SELF.to_owned()
            } else {
                name.to_owned()
            },
            colour_of: name.to_owned(),
            avatar: if is_me {
                "📝".to_owned()
            } else {
                initials(name)
            },
            presence: (!is_me).then_some(contact.online),
            mark: if contact.key_changed {
                " ⚠"
            } else if contact.verified {
                " ✔"
            } else {
                ""
            },
            key_changed: contact.key_changed,
            preview: contact
                .preview()
                .map(|(text, at, ours)| (text.to_owned(), at, ours)),
            unread: contact.unread,
            inactive: false,
        }
    }

    /// `twin`: another group has the same name (the label then adds the id's start).
    fn group(group: &GroupView, twin: bool) -> Self {
        let id_start = group.info.id.get(..6).unwrap_or_default();
        Self {
            label: if twin {
                format!("{} · {id_start}", group.info.name)
            } else {
                group.info.name.clone()
            },
            colour_of: group.info.id.clone(),
            avatar: "👥".to_owned(),
            presence: None,
            mark: "",
            key_changed: false,
            preview: group.preview(),
            unread: group.unread,
            inactive: !group.info.active,
        }
    }
}

fn row(
    ui: &mut Ui,
    content: &RowContent,
    selected: bool,
    height: f32,
    scale: f32,
) -> egui::Response {
    let width = ui.available_width();
    let (rect, response) = ui.allocate_exact_size(Vec2::new(width, height), Sense::click());
    let label = &content.label;
    response.widget_info(|| egui::WidgetInfo::selected(egui::Role::Button, true, selected, label));
    if !ui.is_rect_visible(rect) {
        return response;
    }
    let visuals = ui.visuals().clone();
    let palette = theme::palette(&visuals);
    let painter = ui.painter_at(rect);
    if selected {
        painter.rect_filled(rect.shrink(1.0), 6.0, visuals.selection.bg_fill);
    } else if response.hovered() {
        painter.rect_filled(rect.shrink(1.0), 6.0, visuals.widgets.hovered.weak_bg_fill);
    }
    let text_color = if selected {
        visuals.selection.stroke.color
    } else if content.inactive {
        palette.weak_text
    } else {
        palette.text
    };
    let weak_color = if selected {
        visuals.selection.stroke.color
    } else {
        palette.weak_text
    };
    // Avatar: initials on the name's colour; the presence dot on its corner.
    let radius = AVATAR_RADIUS * scale;
    let center = Pos2::new(rect.left() + 8.0 + radius, rect.center().y);
    painter.circle_filled(center, radius, theme::avatar_colour(&content.colour_of));
    painter.text(
        center,
        Align2::CENTER_CENTER,
        &content.avatar,
        FontId::proportional(13.0 * scale),
        egui::Color32::WHITE,
    );
    if let Some(online) = content.presence {
        let dot = center + Vec2::splat(radius * 0.72);
        painter.circle_filled(dot, 5.0, palette.panel);
        match online {
            Some(true) => painter.circle_filled(dot, 3.5, palette.online),
            Some(false) => painter.circle_filled(dot, 3.5, palette.offline),
            None => painter.circle_stroke(dot, 3.0, Stroke::new(1.2, palette.offline)),
        };
    }
    let left = center.x + radius + 10.0;
    let right = rect.right() - 10.0;
    let top = rect.top() + height * 0.18;
    let bottom = rect.bottom() - height * 0.18;
    // Right column: time on top, unread badge below (kept off the panel's edge).
    let mut name_right = right;
    if let Some((_, at, _)) = &content.preview {
        let galley = painter.layout_no_wrap(
            short_time(*at),
            FontId::proportional(11.0 * scale),
            weak_color,
        );
        name_right = right - galley.size().x - 6.0;
        painter.galley(Pos2::new(right - galley.size().x, top), galley, weak_color);
    }
    let mut preview_right = right;
    if content.unread > 0 {
        let text = painter.layout_no_wrap(
            content.unread.to_string(),
            FontId::proportional(11.0 * scale),
            egui::Color32::WHITE,
        );
        let size = Vec2::new((text.size().x + 10.0).max(20.0), text.size().y + 4.0);
        let badge = Rect::from_min_size(Pos2::new(right - size.x, bottom - size.y), size);
        painter.rect_filled(badge, size.y / 2.0, palette.danger_banner);
        painter.galley(
            badge.center() - text.size() / 2.0,
            text,
            egui::Color32::WHITE,
        );
        preview_right = badge.left() - 6.0;
    }
    // Name (with the key marks), then the newest message's first line, each clipped to
    // its room with an ellipsis.
    let name_galley = one_line(
        ui,
        format!("{label}{}", content.mark),
        14.0 * scale,
        name_right - left,
        text_color,
        true,
    );
    painter.galley(Pos2::new(left, top), name_galley, text_color);
    if content.key_changed {
        painter.circle_filled(Pos2::new(left - 4.0, top + 2.0), 2.0, WARN_BG);
    }
    if let Some((text, _, outgoing)) = &content.preview {
        let line = if *outgoing {
            format!("You: {text}")
        } else {
            text.to_owned()
        };
        let galley = one_line(
            ui,
            line,
            12.0 * scale,
            preview_right - left,
            weak_color,
            false,
        );
        painter.galley(
            Pos2::new(left, bottom - galley.size().y),
            galley,
            weak_color,
        );
    }
    response
}

/// `text` laid out on one line of at most `width` points, cut with "…".
fn one_line(
    ui: &Ui,
    text: String,
    size: f32,
    width: f32,
    color: egui::Color32,
    strong: bool,
) -> std::sync::Arc<egui::Galley> {
    let mut job = egui::text::LayoutJob::single_section(
        text,
        egui::TextFormat {
            font_id: FontId::proportional(size),
            color,
            ..Default::default()
        },
    );
    job.wrap = egui::text::TextWrapping::truncate_at_width(width.max(10.0));
    if strong {
        job.sections[0].format.color = color;
    }
    ui.fonts_mut(|f| f.layout_job(job))
}

/// Up to two initials: the first letters of the name's parts (split at `_ - .` and
/// digits), else its first two letters; upper case.
pub fn initials(name: &str) -> String {
    let parts: Vec<&str> = name
        .split(|c: char| c == '_' || c == '-' || c == '.' || c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .collect();
    let letters: String = match parts.as_slice() {
        [first, second, ..] => first
            .chars()
            .take(1)
            .chain(second.chars().take(1))
            .collect(),
        [only] => only.chars().take(2).collect(),
        [] => name.chars().take(2).collect(),
    };
    letters.to_uppercase()
}

/// A message's time for the list: the time today, else the day.
fn short_time(at_ms: u64) -> String {
    match Local.timestamp_millis_opt(at_ms as i64).single() {
        Some(t) if t.date_naive() == Local::now().date_naive() => t.format("%H:%M").to_string(),
        Some(t) => t.format("%-d %b").to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::initials;

    #[test]
    fn initials_come_from_the_names_parts() {
        assert_eq!(initials("alice"), "AL");
        assert_eq!(initials("mary_jane"), "MJ");
        assert_eq!(initials("bob-2"), "BO");
        assert_eq!(initials("j.r.r"), "JR");
        assert_eq!(initials("42"), "42");
        assert_eq!(initials("émile"), "ÉM");
    }
}
