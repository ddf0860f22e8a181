//! The desktop app driven through its UI with egui_kittest, against a real relay and a
//! second, headless client core — no fakes.

use std::time::Duration;

use chat_client::gui::ChatApp;
use chat_client::home::Home;
use chat_client::{Command, Event};
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};

mod common;

use common::inproc::{Peer, start_relay, stop_relay};
use common::window::{
    alice_signed_in, app, app_unpinned, harness, retype, sign_in, wait, wait_presence,
};

#[test]
fn sign_in_chat_verify_and_key_change() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let addr = relay.addr;
    let mut bob = Peer::start(&rt, addr, "bob", &dir.path().join("bob"));

    let mut h = harness(app(&rt, addr, &dir.path().join("alice")));
    // First run: sign in; key generation and login happen in the background.
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());

    // A first run has no contacts: start a chat with bob from the search box.
    h.get_by_label_contains("No contacts yet");
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("bob".into()));
    h.step();
    h.get_by_label("+ New chat with bob").click();
    wait(&mut h, "conversation open", |h| {
        h.state().model.open.as_deref() == Some("bob")
    });
    // Opening the chat follows bob's presence: he is shown online.
    wait_presence(&mut h, "bob", true);
    h.get_by_label_contains("No messages yet");

    // Type and send with Enter.
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("hi bob, it's alice");
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
    let got = bob.expect(|e| matches!(e, Event::Message { .. }));
    let Event::Message { from, text, .. } = got else {
        unreachable!()
    };
    assert_eq!(
        (from.as_str(), text.as_str()),
        ("alice", "hi bob, it's alice")
    );
    wait(&mut h, "delivered tick", |h| {
        h.query_by_label_contains("delivered").is_some()
    });
    assert!(h.state().view.drafts["bob"].is_empty(), "composer cleared");

    // Shift+Enter adds a line; Enter then sends both lines as one message.
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("line one");
    h.step();
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::Enter);
    h.step();
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("line two");
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
    let Event::Message { text, .. } = bob.expect(|e| matches!(e, Event::Message { .. })) else {
        unreachable!()
    };
    assert_eq!(text, "line one\nline two");

    // A received message appears.
    bob.send(Command::Send {
        to: "alice".into(),
        text: "hello alice, bob here".into(),
    });
    wait(&mut h, "received message shown", |h| {
        h.query_by_label_contains("hello alice, bob here").is_some()
    });

    // The safety dialog shows the same number bob computes.
    h.get_by_label("Safety number").click();
    wait(&mut h, "safety number fetched", |h| {
        h.state().model.contacts["bob"].safety.is_some()
    });
    bob.send(Command::Safety {
        user: "alice".into(),
    });
    let Event::Safety { number, .. } = bob.expect(|e| matches!(e, Event::Safety { .. })) else {
        unreachable!()
    };
    let groups: Vec<&str> = number.split(' ').collect();
    assert_eq!(groups.len(), 12);
    h.get_by_label_contains(&groups[..4].join("  "));
    h.get_by_label_contains("mark as verified").click();
    wait(&mut h, "verified", |h| {
        h.state().model.contacts["bob"].verified
    });
    h.key_press(egui::Key::Escape);
    h.step();
    assert!(h.state().view.safety_for.is_none(), "Esc closes the dialog");
    h.get_by_label_contains("Verified");

    // A fresh server where "bob" has a new key: the banner appears and blocks sending.
    // It is the same relay (same TLS identity, so the pinned address still holds) with its
    // accounts wiped, as if the operator had freed the name.
    drop(bob);
    stop_relay(&rt, relay);
    std::fs::create_dir_all(dir.path().join("relay2")).unwrap();
    for file in [chat_server::tls::KEY_FILE, chat_server::tls::CERT_FILE] {
        std::fs::copy(
            dir.path().join("relay").join(file),
            dir.path().join("relay2").join(file),
        )
        .unwrap();
    }
    let _relay2 = start_relay(&rt, &addr.to_string(), &dir.path().join("relay2"));
    let mut new_bob = Peer::start(&rt, addr, "bob", &dir.path().join("bob2"));
    wait(&mut h, "reconnected", |h| {
        h.state().model.link.state == chat_client::ConnectionState::Connected
    });
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("still you?");
    h.step();
    h.key_press(egui::Key::Enter);
    // Bob was verified: the louder banner, which says so.
    wait(&mut h, "key change banner", |h| {
        h.query_by_label_contains("you had verified the old one")
            .is_some()
    });
    // Sending is disabled while the banner shows, and so is accepting until the new
    // safety number has been shown.
    assert!(
        h.get_by_label("Send").accesskit_node().is_disabled(),
        "send button must be disabled"
    );
    assert!(
        h.get_by_label("Accept new key")
            .accesskit_node()
            .is_disabled()
    );
    h.get_by_label("Compare safety number").click();
    wait(&mut h, "new safety number", |h| {
        h.state().model.contacts["bob"].safety.is_some()
    });
    h.key_press(egui::Key::Escape);
    h.step();
    // Accepting passes the fingerprint whose number was shown.
    h.get_by_label("Accept new key").click();
    h.step();
    let Event::Message { text, .. } = new_bob.expect(|e| matches!(e, Event::Message { .. })) else {
        unreachable!()
    };
    assert_eq!(text, "still you?");
    wait(&mut h, "banner gone", |h| {
        h.query_by_label_contains("key changed").is_none()
    });
}

#[test]
fn sign_in_errors_are_shown_in_place() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let _owner = Peer::start(&rt, relay.addr, "carol", &dir.path().join("carol"));

    let mut h = harness(app(&rt, relay.addr, &dir.path().join("imposter")));
    sign_in(&mut h, "bad name!");
    h.get_by_label_contains("may only contain");
    assert!(!h.state().is_main());

    // Fix the name: select all, type over it.
    retype(&mut h, "Username", "carol");
    assert_eq!(h.state().signin.username, "carol");
    h.get_by_label("Sign in").click();
    wait(&mut h, "username_taken shown", |h| {
        h.query_by_label_contains("another name").is_some()
    });
    assert!(!h.state().signin.busy, "the form is usable again");

    // An unreachable server says so and keeps retrying.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut h = harness(app(&rt, unused, &dir.path().join("lonely")));
    sign_in(&mut h, "dave");
    wait(&mut h, "unreachable shown", |h| {
        h.query_by_label_contains("cannot reach the server")
            .is_some()
    });
    h.get_by_label_contains("Retrying in");
    // The fields stay editable: fixing the port stops the attempt (no Cancel needed).
    retype(&mut h, "Server", "65432");
    assert!(!h.state().signin.busy, "editing a field stops the attempt");
    h.step();
    h.get_by_label("Sign in").click();
    h.step();
    h.get_by_label_contains("HOST:PORT");
    assert!(!h.state().signin.busy, "a port alone is refused in place");
    retype(&mut h, "Server", &unused.to_string());
    h.get_by_label("Sign in").click();
    wait(&mut h, "unreachable again", |h| {
        h.query_by_label_contains("cannot reach the server")
            .is_some()
    });
    h.get_by_label("Cancel").click();
    h.step();
    assert!(!h.state().signin.busy);
}

#[test]
fn keyboard_new_chat_and_settings() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let home = dir.path().join("alice");
    let mut h = harness(app(&rt, relay.addr, &home));
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());

    // Ctrl+K, type a name, Enter: the conversation opens.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("Bob".into()));
    h.step();
    h.key_press(egui::Key::Enter);
    wait(&mut h, "conversation with bob", |h| {
        h.state().model.open.as_deref() == Some("bob")
    });
    assert!(
        h.state().view.filter.is_empty(),
        "the search box is cleared"
    );
    // Ctrl+K, part of a name, Enter: the highlighted match opens, not a chat with "bo".
    h.state_mut().model.open = None;
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("bo".into()));
    h.step();
    h.key_press(egui::Key::Enter);
    wait(&mut h, "bob opened from a partial name", |h| {
        h.state().model.open.as_deref() == Some("bob")
    });
    assert!(!h.state().model.contacts.contains_key("bo"));
    // A paste far over the limit: the composer keeps it (bounded in height, with a
    // counter), and neither Enter nor Send erases it or sends it.
    let huge = "x".repeat(40_000);
    let draft_len =
        |h: &Harness<'_, ChatApp>| h.state().view.drafts.get("bob").map_or(0, String::len);
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .focus();
    h.step();
    h.event(egui::Event::Paste(huge));
    h.step();
    assert_eq!(draft_len(&h), 40_000, "pasted into the composer");
    h.get_by_label_contains("too long to send");
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Send").click();
    h.step();
    assert_eq!(draft_len(&h), 40_000, "the text stays");
    assert!(
        h.state().model.contacts["bob"]
            .lines
            .iter()
            .all(|l| l.text.len() < 40_000)
    );
    h.state_mut().view.drafts.clear();
    h.step();
    // Bob leaves: his dot goes grey.
    wait_presence(&mut h, "bob", true);
    drop(bob);
    wait_presence(&mut h, "bob", false);

    // Settings: switch to the dark theme and a bigger font; saved to settings.ron.
    h.get_by_label_contains("Settings").click();
    wait(&mut h, "settings dialog", |h| {
        h.query_by_label("Dark").is_some()
    });
    h.get_by_label("Dark").click();
    h.step();
    h.get_by_label("Save").click();
    h.step();
    assert_eq!(h.state().settings.theme, chat_client::home::Theme::Dark);
    assert!(!h.state().view.settings_open);
    let saved = Home::resolve(Some(home)).unwrap().load_settings().0;
    assert_eq!(saved.theme, chat_client::home::Theme::Dark);
    assert_eq!(saved.username.as_deref(), Some("alice"));
}

#[test]
fn a_long_history_lays_out_only_the_visible_rows() {
    let (_rt, _dir, _relay, mut h) = alice_signed_in();
    // 5000 stored messages arrive as one history event, as from the store.
    let items = (0..5000u64)
        .map(|n| chat_client::api::HistoryItem {
            id: format!("{n:032x}"),
            outgoing: n % 3 == 0,
            text: format!("history line {n}"),
            // The last one comes from a clock an hour ahead (item 3 of the field reports).
            sent_at: 1_700_000_000_000 + n * 60_000 + if n == 4999 { 3_600_000 } else { 0 },
            stored_at: 1_700_000_000_000 + n * 60_000,
            status: chat_client::api::Status::Delivered,
            undelivered: false,
            reason: None,
        })
        .collect();
    h.state_mut().model.apply(Event::History {
        user: "bob".into(),
        items,
    });
    h.state_mut().open("bob");
    h.run_steps(4);
    // The newest line is on screen (the view sticks to the bottom) …
    h.get_by_label_contains("history line 4999");
    // … and only a screenful of rows exists in the UI tree.
    let shown = h.query_all_by_label_contains("history line").count();
    assert!((1..100).contains(&shown), "{shown} rows laid out");
    // The clock an hour ahead is flagged, on that message only; it stays where it arrived.
    assert_eq!(h.query_all_by_label_contains("sender's clock").count(), 1);
    let lines = &h.state().model.contacts["bob"].lines;
    assert_eq!(lines.last().unwrap().text, "history line 4999");
}

/// Item 0 of the field reports: a newcomer finds people to talk to. Ctrl+P lists everyone
/// online (kept fresh while open), typing filters, Enter starts a chat with the highlighted
/// one; people merely online do not become contacts.
#[test]
fn people_online_can_be_found_filtered_and_chatted_with() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let _bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut h = harness(app(&rt, relay.addr, &dir.path().join("alice")));
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::P);
    h.step();
    assert!(h.state().view.people.open);
    wait(&mut h, "bob listed", |h| {
        h.state().model.online_users.iter().any(|u| u == "bob")
    });
    // Carol comes online while the dialog is open: the list follows.
    let _carol = Peer::start(&rt, relay.addr, "carol", &dir.path().join("carol"));
    wait(&mut h, "carol listed while open", |h| {
        h.state().model.online_users.iter().any(|u| u == "carol")
    });
    h.query_by_label("carol").expect("carol shown");
    h.event(egui::Event::Text("ca".into()));
    h.step();
    h.step();
    assert_eq!(h.state().view.people.filter, "ca", "typed into the filter");
    assert!(h.query_by_label("bob").is_none(), "filtered out");
    h.key_press(egui::Key::Enter);
    wait(&mut h, "chat with carol", |h| {
        h.state().model.open.as_deref() == Some("carol")
    });
    assert!(!h.state().view.people.open, "the dialog closed");
    assert!(
        !h.state().model.contacts.contains_key("bob"),
        "being online does not make bob a contact"
    );
}

/// Item 4 of the field reports: a note to yourself is a conversation of its own, listed
/// as "Note to self", with each note once and delivered.
#[test]
fn a_note_to_self_opens_from_the_search_and_is_kept_once() {
    let (_rt, _dir, _relay, mut h) = alice_signed_in();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("alice".into()));
    h.step();
    h.get_by_label_contains("Note to self").click();
    wait(&mut h, "notes open", |h| {
        h.state().model.open.as_deref() == Some("alice")
    });
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("buy milk");
    h.step();
    h.key_press(egui::Key::Enter);
    wait(&mut h, "note delivered", |h| {
        h.state().model.contacts["alice"]
            .lines
            .iter()
            .any(|l| l.text == "buy milk" && l.status == chat_client::api::Status::Delivered)
    });
    h.run_steps(3);
    let notes = &h.state().model.contacts["alice"].lines;
    assert_eq!(notes.len(), 1, "one line per note");
    // In the side list and as the conversation's title.
    assert_eq!(h.query_all_by_label_contains("Note to self").count(), 2);
}

/// Item 11 of the field reports: the side list with 1,000 contacts lays out only the rows
/// in view; each row knows its newest message (from the store at sign-in) and unread count.
#[test]
fn a_thousand_contacts_lay_out_only_the_visible_rows() {
    let (_rt, _dir, _relay, mut h) = alice_signed_in();
    let users: Vec<String> = (0..1000).map(|n| format!("user{n:04}")).collect();
    let last = users
        .iter()
        .map(|u| chat_client::api::LastMessage {
            user: u.clone(),
            text: format!("hello from {u}"),
            outgoing: false,
            stored_at: 1_700_000_000_000,
        })
        .collect();
    h.state_mut().model.apply(Event::Contacts {
        users: users.clone(),
        verified: vec![],
        last,
        archived: vec![],
    });
    h.state_mut().model.contact("user0001").unread = 3;
    h.run_steps(3);
    let rows = h.query_all_by_label_contains("user0").count();
    assert!((1..60).contains(&rows), "{rows} rows laid out");
    h.get_by_label("user0000");
    assert_eq!(
        h.state().model.contacts["user0001"].preview(),
        Some(("hello from user0001", 1_700_000_000_000, false))
    );
    h.get_by_label("user0001").click();
    wait(&mut h, "opened from the list", |h| {
        h.state().model.open.as_deref() == Some("user0001")
    });
    assert_eq!(h.state().model.contacts["user0001"].unread, 0);
    // Alt+Down / Alt+Up walk the list (item 20).
    h.key_press_modifiers(egui::Modifiers::ALT, egui::Key::ArrowDown);
    h.step();
    assert_eq!(h.state().model.open.as_deref(), Some("user0002"));
    h.key_press_modifiers(egui::Modifiers::ALT, egui::Key::ArrowUp);
    h.step();
    assert_eq!(h.state().model.open.as_deref(), Some("user0001"));
    // The title names who is signed in and counts what is unread (items 9 and 20).
    h.state_mut().model.contact("user0500").unread = 2;
    h.step();
    assert_eq!(h.state().view.title, "(2) Secure Chat — alice");
    // A passing error leaves the status bar by itself; one about keys stays.
    h.state_mut().model.error = Some(("rate_limited".into(), "slow down".into()));
    h.step();
    h.get_by_label_contains("slow down");
    let long_ago = std::time::Instant::now() - Duration::from_secs(16);
    h.state_mut().view.error_since = Some((("rate_limited".into(), "slow down".into()), long_ago));
    h.step();
    assert!(h.state().model.error.is_none(), "gone after 15 s");
    h.state_mut().model.error = Some(("key_changed".into(), "bob's key changed".into()));
    h.step();
    h.state_mut().view.error_since =
        Some((("key_changed".into(), "bob's key changed".into()), long_ago));
    h.step();
    assert!(
        h.state().model.error.is_some(),
        "key errors stay until dismissed"
    );
}

/// Item 12 of the field reports: a new name is looked up at once; one that does not exist
/// is refused in place and never stays in the list.
#[test]
fn a_new_chat_with_an_unknown_name_is_refused_in_place() {
    let (_rt, _dir, _relay, mut h) = alice_signed_in();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("nobody".into()));
    h.step();
    h.key_press(egui::Key::Enter);
    wait(&mut h, "refused", |h| {
        h.state().model.unknown.contains("nobody")
    });
    h.run_steps(2);
    assert!(!h.state().model.contacts.contains_key("nobody"));
    assert_eq!(h.state().model.open, None);
    h.get_by_label_contains("There is no user named nobody");
}

/// Item 12 of the field reports: a contact is archived from its row's context menu (it
/// moves under "Archived (1)" and comes back with a new message) and removed from the
/// conversation's … menu after a confirmation (the conversation closes and leaves the list).
#[test]
fn contacts_are_archived_and_removed_from_their_menus() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut h = harness(app(&rt, relay.addr, &dir.path().join("alice")));
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());
    let say = |text: &str| {
        bob.send(Command::Send {
            to: "alice".into(),
            text: text.into(),
        })
    };
    say("hi");
    wait(&mut h, "bob's message", |h| {
        h.state().model.contacts.contains_key("bob")
    });
    h.run_steps(2);
    h.get_by_label("bob").click_secondary();
    h.run_steps(2);
    h.get_by_label("Archive").click();
    wait(&mut h, "bob archived", |h| {
        h.state().model.contacts["bob"].archived
    });
    h.run_steps(2);
    assert!(
        h.query_by_label("bob").is_none(),
        "an archived contact leaves the list"
    );
    h.get_by_label("Archived (1)").click();
    h.run_steps(2);
    h.get_by_label("bob");
    h.get_by_label("Back to chats").click();
    h.run_steps(2);
    say("back again");
    wait(&mut h, "bob unarchived by his message", |h| {
        !h.state().model.contacts["bob"].archived
    });
    h.run_steps(2);
    h.get_by_label("bob").click();
    wait(&mut h, "chat open", |h| {
        h.state().model.open.as_deref() == Some("bob")
    });
    h.run_steps(2);
    h.get_by_label("…").click();
    h.run_steps(2);
    h.get_by_label("Remove…").click();
    h.run_steps(2);
    assert_eq!(
        h.state().view.confirm_remove.as_deref(),
        Some("bob"),
        "asks first"
    );
    h.get_by_label("Remove").click();
    wait(&mut h, "bob removed", |h| {
        !h.state().model.contacts.contains_key("bob")
    });
    assert_eq!(
        h.state().model.open,
        None,
        "the removed conversation closed"
    );
}

/// TLS (#15): the first connection to a relay given without a fingerprint shows the relay's
/// key and connects only once accepted (and pins it); a relay that then presents another
/// key stops the sign-in in red until the user deliberately trusts the new key.
#[test]
fn a_new_relay_key_is_shown_before_it_is_trusted_and_a_changed_one_blocks() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let pinned = common::inproc::pinned_address(relay.addr);
    let fingerprint = pinned.split_once('#').unwrap().1.to_owned();

    let home = dir.path().join("alice");
    let mut h = harness(app_unpinned(&rt, relay.addr, &home));
    sign_in(&mut h, "alice");
    wait(&mut h, "the key dialog", |h| {
        h.state().model.relay_key.is_some()
    });
    let prompt = h.state().model.relay_key.clone().unwrap();
    assert_eq!(
        prompt.fingerprint, fingerprint,
        "the relay's real key is shown"
    );
    assert!(prompt.mismatch.is_none());
    h.run_steps(2);
    h.get_by_label_contains("first connection");
    assert!(
        !h.state().is_main(),
        "nothing happens before the user decides"
    );
    h.get_by_label("Accept and connect").click();
    wait(&mut h, "signed in", |h| h.state().is_main());
    let known = std::fs::read_to_string(home.join("known-relays")).unwrap();
    assert_eq!(known.trim(), format!("{} {fingerprint}", relay.addr));

    // Another home that pinned a different key for this address: a hard stop.
    let home = dir.path().join("bob");
    std::fs::create_dir_all(&home).unwrap();
    let wrong = "b-7MjBbFVR2f6z61934tp3O_aL2e-cUpJ86yyG5WiSs";
    std::fs::write(
        home.join("known-relays"),
        format!("{} {wrong}\n", relay.addr),
    )
    .unwrap();
    let mut h = harness(app_unpinned(&rt, relay.addr, &home));
    sign_in(&mut h, "bob");
    wait(&mut h, "the changed-key warning", |h| {
        h.state()
            .model
            .relay_key
            .as_ref()
            .is_some_and(|p| p.mismatch.is_some())
    });
    let prompt = h.state().model.relay_key.clone().unwrap();
    assert_eq!(prompt.fingerprint, fingerprint, "the key presented now");
    assert!(
        prompt.mismatch.unwrap().contains(wrong),
        "names the pinned key"
    );
    h.run_steps(2);
    h.get_by_label("The relay's key has changed");
    for _ in 0..20 {
        h.step();
    }
    assert!(!h.state().is_main(), "no login with a changed key");
    h.get_by_label("Trust the new key").click();
    wait(&mut h, "signed in after trusting the new key", |h| {
        h.state().is_main()
    });
    let known = std::fs::read_to_string(home.join("known-relays")).unwrap();
    assert_eq!(known.trim(), format!("{} {fingerprint}", relay.addr));
}

/// While the window waits to reconnect (here minutes, as after a long outage), the status
/// bar offers "Retry now": once the relay is back, one click connects at once.
#[test]
fn retry_now_reconnects_without_waiting_out_the_delay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let relay = start_relay(&rt, "127.0.0.1:0", &data);
    let addr = relay.addr;
    let mut app = app(&rt, addr, &dir.path().join("alice"));
    app.reconnect_backoff = Some((Duration::from_secs(300), Duration::from_secs(600)));
    let mut h = harness(app);
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());
    assert!(
        h.query_by_label("Retry now").is_none(),
        "connected: no retry"
    );

    stop_relay(&rt, relay);
    wait(&mut h, "waiting to reconnect", |h| {
        h.state().model.link.state == chat_client::ConnectionState::Reconnecting
    });
    assert!(
        h.query_by_label_contains("Reconnecting in").is_some(),
        "the countdown is shown"
    );
    let relay = start_relay(&rt, &addr.to_string(), &data);
    h.get_by_label("Retry now").click();
    wait(&mut h, "connected again", |h| {
        h.state().model.link.state == chat_client::ConnectionState::Connected
    });
    assert!(
        h.query_by_label("Retry now").is_none(),
        "connected: no retry"
    );
    stop_relay(&rt, relay);
}
