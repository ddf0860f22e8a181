//! Desktop notifications (issue "Field reports", item 9) through a real D-Bus session bus
//! (`dbus-daemon`), with this test serving `org.freedesktop.Notifications` in place of a
//! desktop's notification daemon. A message that arrives while the window is not looked
//! at raises one notification with the sender and a preview; with previews off, only the
//! sender; with the conversation open and looked at, none.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_client::Command as ClientCommand;
use common::PATIENCE;
use common::inproc::Peer;
use common::window::{alice_signed_in, wait};

/// What the fake notification server was asked to show: (summary, body).
type Shown = Arc<Mutex<Vec<(String, String)>>>;

struct Server {
    shown: Shown,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Server {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        let mut shown = self.shown.lock().unwrap();
        shown.push((summary, body));
        shown.len() as u32
    }

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into()]
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "fake".into(),
            "secure-chat tests".into(),
            "1".into(),
            "1.2".into(),
        )
    }

    fn close_notification(&self, _id: u32) {}
}

/// A private session bus; killed on drop.
struct Bus(Child);

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn session_bus(dir: &std::path::Path) -> Option<(Bus, String)> {
    if !common::have("dbus-daemon") {
        return None;
    }
    let address = format!("unix:path={}", dir.join("bus").display());
    let child = Command::new("dbus-daemon")
        .args([
            "--session",
            "--nofork",
            "--nopidfile",
            "--address",
            &address,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon starts");
    let deadline = Instant::now() + PATIENCE;
    while !dir.join("bus").exists() {
        assert!(Instant::now() < deadline, "dbus-daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Bus(child), address))
}

/// Set in the copy of this test that runs on the private bus.
const ON_PRIVATE_BUS: &str = "SECURE_CHAT_TEST_ON_PRIVATE_BUS";

#[test]
fn a_message_to_an_unwatched_window_raises_a_notification() {
    if std::env::var_os(ON_PRIVATE_BUS).is_some() {
        return on_the_private_bus();
    }
    // The client finds the session bus through its environment: run this test again in
    // a process of its own whose environment names a private bus.
    let bus_dir = tempfile::tempdir().unwrap();
    let Some((_bus, address)) = session_bus(bus_dir.path()) else {
        return;
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_message_to_an_unwatched_window_raises_a_notification",
            "--nocapture",
        ])
        .env(ON_PRIVATE_BUS, "1")
        .env("DBUS_SESSION_BUS_ADDRESS", &address)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

fn on_the_private_bus() {
    let (rt, dir, relay, mut h) = alice_signed_in();
    let shown: Shown = Arc::default();
    let _server = rt.block_on(async {
        zbus::connection::Builder::session()
            .unwrap()
            .name("org.freedesktop.Notifications")
            .unwrap()
            .serve_at(
                "/org/freedesktop/Notifications",
                Server {
                    shown: shown.clone(),
                },
            )
            .unwrap()
            .build()
            .await
            .unwrap()
    });
    let bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let count = |shown: &Shown| shown.lock().unwrap().len();

    // The window is not focused: a notification with the sender and the first line.
    h.input_mut().focused = false;
    bob.send(ClientCommand::Send {
        to: "alice".into(),
        text: "lunch at noon?\nthe usual place".into(),
    });
    wait(&mut h, "bob's message", |h| {
        h.state().model.contacts.contains_key("bob")
    });
    let deadline = Instant::now() + PATIENCE;
    while count(&shown) == 0 {
        assert!(Instant::now() < deadline, "no notification");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        shown.lock().unwrap()[0],
        ("bob".to_owned(), "lunch at noon?…".to_owned())
    );
    assert_eq!(h.state().view.title, "(1) Secure Chat — alice");

    // Previews off: only the sender.
    h.state_mut().settings.notification_previews = false;
    bob.send(ClientCommand::Send {
        to: "alice".into(),
        text: "secret plans".into(),
    });
    let deadline = Instant::now() + PATIENCE;
    while count(&shown) < 2 {
        assert!(Instant::now() < deadline, "no second notification");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        shown.lock().unwrap()[1],
        ("bob".to_owned(), "New message".to_owned())
    );

    // Looking at the conversation: nothing is raised.
    h.input_mut().focused = true;
    h.state_mut().open("bob");
    h.step();
    bob.send(ClientCommand::Send {
        to: "alice".into(),
        text: "seen it?".into(),
    });
    wait(&mut h, "third message shown", |h| {
        h.state().model.contacts["bob"]
            .lines
            .iter()
            .any(|l| l.text == "seen it?")
    });
    h.run_steps(5);
    assert_eq!(
        count(&shown),
        2,
        "no notification for a conversation being read"
    );
}
