//! Opening the window: eframe's options, the first frame's setup, and the glue that
//! draws a [`ChatApp`] each frame and persists what it asks to keep.

use std::path::PathBuf;

use anyhow::Context as _;

use super::{ChatApp, fonts, placement};
use crate::api::ConnectionState;
use crate::home::{Home, Settings};

/// eframe glue: frame drawing, placement and persistence.
struct EframeApp {
    app: ChatApp,
    /// A half of the monitor still to move to (once its size is known).
    half: Option<placement::Half>,
}

impl eframe::App for EframeApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if let Some(half) = self.half
            && let Some(monitor) = ui.ctx().input(|i| i.viewport().monitor_size)
        {
            let (position, size) = placement::place(monitor, half);
            ui.ctx()
                .send_viewport_cmd(egui::ViewportCommand::InnerSize(size));
            ui.ctx()
                .send_viewport_cmd(egui::ViewportCommand::OuterPosition(position));
            self.half = None;
        }
        self.app.ui(ui);
        // Keep the "reconnecting in Ns" countdown moving.
        if self.app.model.link.state == ConnectionState::Reconnecting {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(500));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.app.persisted);
    }
}

/// Options for opening the window, from the command line.
#[derive(Debug, Default)]
pub struct Launch {
    pub server: Option<String>,
    pub user: Option<String>,
    pub passphrase: Option<String>,
    /// Sign in right away with the given values (used by demos and screenshots).
    pub auto_sign_in: bool,
    /// Open the conversation with this user once signed in.
    pub chat_with: Option<String>,
    /// Where the window first appears (screen pixels), before any saved position.
    pub position: Option<[f32; 2]>,
    /// Take this half of the monitor once its size is known (overrides `position`).
    pub half: Option<placement::Half>,
    /// Shown once the window is up (e.g. a damaged settings file was ignored).
    pub warning: Option<String>,
    /// Extra certificate authorities (PEM) for relays without a pinned key.
    pub ca_file: Option<std::path::PathBuf>,
    /// Most members a group may have.
    pub max_group_members: usize,
}

/// Opens the window and runs until it is closed.
pub fn run(home: Home, mut settings: Settings, launch: Launch) -> anyhow::Result<()> {
    #[cfg(all(unix, not(target_os = "macos")))]
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        anyhow::bail!(
            "no display: the window needs a desktop session (neither DISPLAY nor \
             WAYLAND_DISPLAY is set). Without a window, run `chat-client --headless --user NAME`"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    if let Some(server) = launch.server {
        settings.server = server;
    }
    if let Some(user) = launch.user {
        settings.username = Some(user);
    }
    let title = match &settings.username {
        Some(user) if launch.auto_sign_in => format!("Secure Chat — {user}"),
        _ => "Secure Chat".to_owned(),
    };
    let mut viewport = egui::ViewportBuilder::default()
        .with_title(title)
        // The desktop entry's StartupWMClass and icon name (target/dist's .deb installs both).
        .with_app_id("secure-chat")
        .with_inner_size([960.0, 680.0])
        .with_min_inner_size(placement::MIN_SIZE);
    if let Some(position) = launch.position {
        viewport = viewport.with_position(position);
    }
    match eframe::icon_data::from_png_bytes(include_bytes!("../../../assets/secure-chat.png")) {
        Ok(icon) => viewport = viewport.with_icon(std::sync::Arc::new(icon)),
        Err(e) => tracing::warn!("the window icon cannot be read: {e}"),
    }
    let options = eframe::NativeOptions {
        viewport,
        persistence_path: Some(gui_state_path(&home)),
        ..Default::default()
    };
    let handle = runtime.handle().clone();
    eframe::run_native(
        "Secure Chat",
        options,
        Box::new(move |cc| {
            let persisted = cc
                .storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default();
            let (fonts, missing) = fonts::with_system_fallbacks();
            if !missing.is_empty() {
                tracing::warn!("no installed font for {missing:?}; such text shows as boxes");
            }
            cc.egui_ctx.set_fonts(fonts);
            let mut app = ChatApp::new(handle, home, settings, persisted);
            if let Some(warning) = launch.warning {
                app.model.error = Some(("settings_unreadable".into(), warning.clone()));
                app.signin.error = Some(warning);
            }
            if let Some(passphrase) = launch.passphrase {
                app.signin.passphrase = passphrase;
            }
            app.ca_file = launch.ca_file;
            app.max_group_members = launch.max_group_members;
            if let Some(user) = launch.chat_with {
                app.persisted.last_open = Some(user);
            }
            if launch.auto_sign_in {
                app.sign_in(&cc.egui_ctx);
            }
            Ok(Box::new(EframeApp {
                app,
                half: launch.half,
            }))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))?;
    drop(runtime);
    Ok(())
}

fn gui_state_path(home: &Home) -> PathBuf {
    home.dir().join("gui-state.ron")
}
