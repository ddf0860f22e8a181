//! The desktop app under egui_kittest: building it against a relay, stepping it until
//! something shows, signing in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_client::gui::ChatApp;
use chat_client::home::{Home, Settings};
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

use super::PATIENCE;
use super::inproc::start_relay;

/// The window for `home`, set to the relay at `addr` with its fingerprint (as an operator
/// hands it out), so no first-use dialog comes up; see [`app_unpinned`].
pub fn app(rt: &tokio::runtime::Runtime, addr: SocketAddr, home: &std::path::Path) -> ChatApp {
    app_for(rt, super::inproc::pinned_address(addr), home)
}

/// The window set to the bare `HOST:PORT` (trust on first use: the dialog asks).
pub fn app_unpinned(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    home: &std::path::Path,
) -> ChatApp {
    app_for(rt, addr.to_string(), home)
}

fn app_for(rt: &tokio::runtime::Runtime, server: String, home: &std::path::Path) -> ChatApp {
    let settings = Settings {
        server,
        ..Settings::default()
    };
    let mut app = ChatApp::new(
        rt.handle().clone(),
        Home::resolve(Some(home.to_owned())).unwrap(),
        settings,
        Default::default(),
    );
    app.identity_bits = 2048;
    app
}

pub fn harness(app: ChatApp) -> Harness<'static, ChatApp> {
    Harness::builder()
        .with_size([900.0, 640.0])
        .build_ui_state(|ui, app: &mut ChatApp| app.ui(ui), app)
}

/// Steps the UI until `cond` holds (the core works in the background).
pub fn wait(
    h: &mut Harness<'_, ChatApp>,
    what: &str,
    cond: impl Fn(&Harness<'_, ChatApp>) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        h.step();
        if cond(h) {
            h.step();
            return;
        }
        assert!(Instant::now() < deadline, "UI never reached: {what}");
        std::thread::sleep(Duration::from_millis(15));
    }
}

/// Waits until `user`'s presence dot shows `online`.
pub fn wait_presence(h: &mut Harness<'_, ChatApp>, user: &str, online: bool) {
    let what = format!("{user} shown {}", if online { "online" } else { "offline" });
    wait(h, &what, |h| {
        h.state()
            .model
            .contacts
            .get(user)
            .is_some_and(|c| c.online == Some(online))
    });
}

/// A runtime, a temporary directory, an in-process relay in it and alice's window, signed
/// in and showing the main screen.
pub fn alice_signed_in() -> (
    tokio::runtime::Runtime,
    tempfile::TempDir,
    super::inproc::Relay,
    Harness<'static, ChatApp>,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let mut h = harness(app(&rt, relay.addr, &dir.path().join("alice")));
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());
    (rt, dir, relay, h)
}

/// Selects all of the text field labelled `label` and types `text` over it.
pub fn retype(h: &mut Harness<'_, ChatApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    h.get_by_role_and_label(Role::TextInput, label)
        .type_text(text);
    h.step();
}

pub fn sign_in(h: &mut Harness<'_, ChatApp>, name: &str) {
    h.get_by_role_and_label(Role::TextInput, "Username")
        .type_text(name);
    h.step();
    h.get_by_label("Sign in").click();
    h.step();
}
