//! The desktop window (eframe/egui). A thin front end over the client core: it sends
//! [`Command`]s and draws what the [`Model`] built from [`Event`]s says. It never does
//! network or crypto itself and never waits on the core: the core calls
//! `ctx.request_repaint()` after each event, and each frame drains the event channel.

pub mod fonts;
pub mod group_forms;
pub mod group_model;
pub mod model;
pub mod notify;
pub mod placement;
pub mod theme;
mod view;
mod window;

pub use window::{Launch, run};

use chat_protocol::Username;
use serde::{Deserialize, Serialize};

use crate::api::{Command, ConnectionState, Event};
use crate::engine::{ClientConfig, ClientHandle};
use crate::home::{Home, Settings, Theme};
use model::Model;

/// What eframe persists for us between runs (besides window size and position).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub last_open: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    SignIn,
    Main,
}

/// The sign-in form.
#[derive(Debug, Clone, Default)]
pub struct SignInForm {
    pub username: String,
    pub server: String,
    pub passphrase: String,
    /// A sign-in is under way (key generation, connecting).
    pub busy: bool,
    /// Why the last attempt failed, with what to do.
    pub error: Option<String>,
    /// The username field got its initial focus.
    pub focus_requested: bool,
    /// While the sign-in waits to try again: why, and when the next try is.
    pub retry: Option<(String, std::time::Instant)>,
}

/// State of the "People online" dialog.
#[derive(Debug, Default)]
pub struct PeopleView {
    pub open: bool,
    pub filter: String,
    /// Index into the filtered list: what Enter opens.
    pub highlight: usize,
    /// When the list was last asked for (`None`: not yet since opening).
    pub asked: Option<std::time::Instant>,
    /// Put the cursor in the filter once.
    pub focus: bool,
}

/// Transient view state.
#[derive(Debug, Default)]
pub struct ViewState {
    pub filter: String,
    /// Which match of the search box Enter opens (index into the filtered list).
    pub highlight: usize,
    pub focus_filter: bool,
    /// Draft per conversation.
    pub drafts: std::collections::HashMap<String, String>,
    /// The text last sent from a composer (to whom), until the core says it is queued:
    /// if it refuses it instead (e.g. too long for the relay), the text goes back.
    pub last_sent: Option<(String, String)>,
    pub safety_for: Option<String>,
    pub settings_open: bool,
    /// The "People online" dialog.
    pub people: PeopleView,
    /// The window title last set.
    pub title: String,
    /// Height of the composer (with its counter) as last laid out, in points.
    pub composer_height: f32,
    /// The status bar's error (code, message) and since when it is shown.
    pub error_since: Option<((String, String), std::time::Instant)>,
    pub settings_draft: Option<Settings>,
    /// Measured row heights per conversation, for laying out only the visible rows.
    pub row_heights: std::collections::HashMap<String, Vec<f32>>,
    pub copied: Option<std::time::Instant>,
    /// The conversation whose composer last got the initial focus.
    pub composer_focused_for: Option<String>,
    pub applied_style: Option<(Theme, u32)>,
    /// The side list shows archived contacts instead of the others.
    pub show_archived: bool,
    /// Asking whether to remove this contact (and delete the conversation).
    pub confirm_remove: Option<String>,
    /// Group dialogs and the member panel.
    pub group: group_forms::GroupUi,
}

pub struct ChatApp {
    runtime: tokio::runtime::Handle,
    home: Home,
    pub settings: Settings,
    pub model: Model,
    pub screen: Screen,
    pub signin: SignInForm,
    pub view: ViewState,
    pub persisted: Persisted,
    client: Option<ClientHandle>,
    /// Identity key size for new identities (tests use a smaller one).
    pub identity_bits: usize,
    /// Extra certificate authorities for relays without a pinned key (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// `--max-group-members`.
    pub max_group_members: usize,
    /// The core's reconnect delays (shortest, longest) instead of its defaults (tests use
    /// long ones to see "Retry now" work).
    pub reconnect_backoff: Option<(std::time::Duration, std::time::Duration)>,
}

impl ChatApp {
    pub fn new(
        runtime: tokio::runtime::Handle,
        home: Home,
        settings: Settings,
        persisted: Persisted,
    ) -> Self {
        let signin = SignInForm {
            username: settings.username.clone().unwrap_or_default(),
            server: settings.server.clone(),
            ..SignInForm::default()
        };
        Self {
            runtime,
            home,
            settings,
            model: Model::default(),
            screen: Screen::SignIn,
            signin,
            view: ViewState::default(),
            persisted,
            client: None,
            identity_bits: chat_protocol::identity::IDENTITY_BITS,
            ca_file: None,
            max_group_members: chat_protocol::group::DEFAULT_MAX_MEMBERS,
            reconnect_backoff: None,
        }
    }

    /// Signed in and showing the main window.
    pub fn is_main(&self) -> bool {
        self.screen == Screen::Main
    }

    /// Draws one frame.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.apply_style(ui.ctx());
        self.poll();
        // The user is looking if the window has focus or they are interacting with it
        // (some X setups never report focus).
        let (focused, active) = ui.ctx().input(|i| (i.focused, !i.events.is_empty()));
        self.model.focused = focused;
        if focused || active {
            if let Some(open) = self.model.open.clone() {
                self.model.contact(&open).unread = 0;
            }
            if let Some(group) = self.model.open_group.clone() {
                self.model.groups.read(&group);
            }
        }
        match self.screen {
            Screen::SignIn => view::sign_in(self, ui),
            Screen::Main => view::main(self, ui),
        }
        view::relay_key_dialog(self, ui);
        let title = self.title();
        if self.view.title != title {
            ui.ctx()
                .send_viewport_cmd(egui::ViewportCommand::Title(title.clone()));
            self.view.title = title;
        }
    }

    /// The window title: who is signed in, and how many messages are unread, e.g.
    /// "(3) Secure Chat — alice".
    pub fn title(&self) -> String {
        let unread: usize = self
            .model
            .contacts
            .values()
            .map(|c| c.unread)
            .sum::<usize>()
            + self.model.groups.unread();
        let name = match &self.model.me {
            Some(me) => format!("Secure Chat — {me}"),
            None => "Secure Chat".to_owned(),
        };
        if unread > 0 {
            format!("({unread}) {name}")
        } else {
            name
        }
    }

    /// Starts the core with the sign-in form's values.
    pub fn sign_in(&mut self, ctx: &egui::Context) {
        let form = &mut self.signin;
        form.error = None;
        let username = match Username::parse(form.username.trim()) {
            Ok(u) => u,
            Err(e) => {
                form.error = Some(format!("{e}. Use 1–32 letters, digits, '_', '-' or '.'."));
                return;
            }
        };
        let server = form.server.trim().to_owned();
        if server.is_empty() {
            form.error = Some("Enter the server address, e.g. 127.0.0.1:65432.".into());
            return;
        }
        if let Err(e) = crate::net::check_server_address(&server) {
            form.error = Some(e);
            return;
        }
        form.busy = true;
        let mut config = ClientConfig::new(self.home.clone(), server, username);
        config.identity_bits = self.identity_bits;
        config.ca_file = self.ca_file.clone();
        config.max_group_members = self.max_group_members;
        if let Some((min, max)) = self.reconnect_backoff {
            (config.backoff_min, config.backoff_max) = (min, max);
        }
        // A relay key seen for the first time is shown to the user before it is trusted.
        config.confirm_new_relay_keys = true;
        config.passphrase = Some(form.passphrase.clone()).filter(|p| !p.is_empty());
        let ctx = ctx.clone();
        let _guard = self.runtime.enter();
        self.client = Some(crate::engine::spawn(config, move || ctx.request_repaint()));
    }

    pub fn send(&self, cmd: Command) {
        if let Some(client) = &self.client {
            let _ = client.commands.send(cmd);
        }
    }

    /// Opens a conversation (loading its history the first time).
    pub fn open(&mut self, user: &str) {
        if self.model.open(user) {
            self.send(Command::History {
                user: user.to_owned(),
            });
            self.send(Command::Watch {
                users: vec![user.to_owned()],
            });
        }
        self.persisted.last_open = Some(user.to_owned());
    }

    /// Opens group `id` (loading its history the first time) and follows its members'
    /// presence.
    pub fn open_group(&mut self, id: &str) {
        if self.model.open_group(id) {
            self.send(Command::GroupHistory {
                group: id.to_owned(),
            });
        }
        if let Some(view) = self.model.groups.by_id.get(id) {
            self.send(Command::Watch {
                users: view.info.members.clone(),
            });
        }
        self.view.group.rename = None;
    }

    /// Applies every event that has arrived.
    pub fn poll(&mut self) {
        let Some(client) = &mut self.client else {
            return;
        };
        let mut events = Vec::new();
        while let Ok(event) = client.events.try_recv() {
            events.push(event);
        }
        for event in events {
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: Event) {
        // A group we just created, to open once the model has it.
        let mut created = None;
        match &event {
            Event::Message { from, text, .. }
                if self.settings.notifications
                    && !(self.model.focused
                        && self.model.open.as_deref() == Some(from.as_str())) =>
            {
                notify::show(
                    &self.runtime,
                    notify::Notice::message(from, text, self.settings.notification_previews),
                );
            }
            Event::GroupMessage {
                group, from, text, ..
            } if self.settings.notifications
                && !(self.model.focused
                    && self.model.open_group.as_deref() == Some(group.as_str())) =>
            {
                let name = self
                    .model
                    .groups
                    .by_id
                    .get(group)
                    .map_or("a group", |g| g.info.name.as_str());
                notify::show(
                    &self.runtime,
                    notify::Notice::message(
                        &format!("{from} in {name}"),
                        text,
                        self.settings.notification_previews,
                    ),
                );
            }
            Event::GroupQueued { group, text, .. }
                if self
                    .view
                    .last_sent
                    .as_ref()
                    .is_some_and(|(to, t)| *to == view::group_draft_key(group) && t == text) =>
            {
                self.view.last_sent = None;
            }
            Event::Group(info)
                if info.change.as_deref() == Some("created")
                    && info.by == self.model.me
                    && self.view.group.creating.as_deref() == Some(info.name.as_str()) =>
            {
                self.view.group.creating = None;
                created = Some(info.id.clone());
            }
            Event::Queued { to, text, .. }
                if self
                    .view
                    .last_sent
                    .as_ref()
                    .is_some_and(|(u, t)| u == to && t == text) =>
            {
                self.view.last_sent = None;
            }
            Event::Error { code, .. } if code == "message_too_long" => {
                if let Some((to, text)) = self.view.last_sent.take() {
                    let draft = self.view.drafts.entry(to).or_default();
                    if draft.is_empty() {
                        *draft = text;
                    }
                }
            }
            Event::Ready { user, .. } => {
                self.screen = Screen::Main;
                self.signin.busy = false;
                self.signin.retry = None;
                self.signin.passphrase.clear();
                self.settings.username = Some(user.clone());
                self.settings.server = self.signin.server.trim().to_owned();
                if let Err(e) = self.home.save_settings_if_changed(&self.settings) {
                    self.model.error = Some((
                        "settings_not_saved".into(),
                        format!("{e}; the server and name were not remembered"),
                    ));
                }
                if let Some(last) = self.persisted.last_open.clone() {
                    self.open(&last);
                }
            }
            Event::Error { message, .. } if self.screen == Screen::SignIn => {
                self.signin.error = Some(message.clone());
            }
            Event::Connection {
                state: ConnectionState::Reconnecting,
                reason,
                retry_in_ms,
                ..
            } if self.screen == Screen::SignIn => {
                let wait = std::time::Duration::from_millis(retry_in_ms.unwrap_or(0));
                self.signin.error = None;
                self.signin.retry = Some((
                    reason
                        .clone()
                        .unwrap_or_else(|| "Cannot reach the server".into()),
                    std::time::Instant::now() + wait,
                ));
            }
            Event::Connection {
                state: ConnectionState::Offline,
                ..
            } if self.screen == Screen::SignIn && self.model.relay_key.is_none() => {
                // The core gave up (e.g. name taken): let the user change something.
                self.signin.busy = false;
                self.signin.retry = None;
                self.client = None;
            }
            _ => {}
        }
        self.model.apply(event);
        if let Some(id) = created {
            self.open_group(&id);
        }
    }

    /// Cancels a sign-in that is still trying.
    pub fn cancel_sign_in(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.commands.send(Command::Shutdown {
                flush_for: std::time::Duration::ZERO,
            });
        }
        self.signin.busy = false;
        self.signin.retry = None;
    }

    fn apply_style(&mut self, ctx: &egui::Context) {
        let key = (self.settings.theme, (self.settings.font_size * 10.0) as u32);
        if self.view.applied_style == Some(key) {
            return;
        }
        self.view.applied_style = Some(key);
        ctx.set_theme(match self.settings.theme {
            Theme::System => egui::ThemePreference::System,
            Theme::Light => egui::ThemePreference::Light,
            Theme::Dark => egui::ThemePreference::Dark,
        });
        ctx.style_mut_of(egui::Theme::Dark, |s| {
            theme::apply(&mut s.visuals, &theme::DARK)
        });
        ctx.style_mut_of(egui::Theme::Light, |s| {
            theme::apply(&mut s.visuals, &theme::LIGHT)
        });
        let scale = self.settings.font_size / 15.0;
        ctx.all_styles_mut(|style| {
            use egui::{FontFamily, FontId, TextStyle};
            style.text_styles = [
                (
                    TextStyle::Small,
                    FontId::new(11.0 * scale, FontFamily::Proportional),
                ),
                (
                    TextStyle::Body,
                    FontId::new(15.0 * scale, FontFamily::Proportional),
                ),
                (
                    TextStyle::Button,
                    FontId::new(15.0 * scale, FontFamily::Proportional),
                ),
                (
                    TextStyle::Heading,
                    FontId::new(21.0 * scale, FontFamily::Proportional),
                ),
                (
                    TextStyle::Monospace,
                    FontId::new(14.0 * scale, FontFamily::Monospace),
                ),
            ]
            .into();
        });
    }

    pub fn save_settings(&mut self, settings: Settings) {
        self.settings = settings;
        if let Err(e) = self.home.save_settings(&self.settings) {
            self.model.error = Some(("settings".into(), e.to_string()));
        }
    }
}

impl Drop for ChatApp {
    fn drop(&mut self) {
        // Give the outbox a moment to reach the server; it is on disk regardless.
        if let Some(client) = self.client.take() {
            let _ = client.commands.send(Command::Shutdown {
                flush_for: std::time::Duration::from_secs(2),
            });
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(3), client.task).await
            });
        }
    }
}
