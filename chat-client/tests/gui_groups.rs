//! Groups in the desktop app, driven through its UI with egui_kittest against a real
//! relay and two headless client cores: create a group from the picker, send, see
//! "delivered to 2 of 2", get a member's message, remove a member.

use chat_client::gui::ChatApp;
use chat_client::{Command, Event};
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

mod common;

use common::inproc::{Peer, start_relay};
use common::window::{app, harness, sign_in, wait};

/// Ticks `name` in the open picker after typing it into its search box.
fn pick(h: &mut Harness<'_, ChatApp>, name: &str) {
    let search = h.get_by_role_and_label(Role::TextInput, "Members");
    search.focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    h.get_by_role_and_label(Role::TextInput, "Members")
        .type_text(name);
    h.step();
    let label = format!("{name} (not a contact yet)");
    wait(h, "the name offered", |h| {
        h.query_by_role_and_label(Role::CheckBox, &label).is_some()
    });
    h.get_by_role_and_label(Role::CheckBox, &label).click();
    wait(h, "ticked", |h| {
        h.state()
            .view
            .group
            .new_group
            .as_ref()
            .is_some_and(|p| p.picked.contains(name))
    });
}

/// The open group's line that is ours and says `text`, as the model has it.
fn our_line(h: &Harness<'_, ChatApp>, text: &str) -> Option<(usize, usize)> {
    let app = h.state();
    let group = app.model.groups.by_id.get(app.model.open_group.as_ref()?)?;
    group
        .lines
        .iter()
        .find(|l| l.outgoing && l.text == text)
        .map(|l| (l.delivered_to, l.recipients))
}

#[test]
fn create_a_group_send_see_delivered_to_all_and_remove_a_member() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(&rt, "127.0.0.1:0", &dir.path().join("relay"));
    let mut bob = Peer::start(&rt, relay.addr, "bob", &dir.path().join("bob"));
    let mut carol = Peer::start(&rt, relay.addr, "carol", &dir.path().join("carol"));
    let mut h = harness(app(&rt, relay.addr, &dir.path().join("alice")));
    sign_in(&mut h, "alice");
    wait(&mut h, "main window", |h| h.state().is_main());

    // "New group": a name, two people who are not contacts yet, found by typing.
    h.get_by_label("➕ New group").click();
    wait(&mut h, "the New group dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Group name")
            .is_some()
    });
    h.get_by_role_and_label(Role::TextInput, "Group name")
        .type_text("Team");
    h.step();
    assert!(
        h.query_by_label_contains("Pick at least one member")
            .is_some(),
        "Create waits for members"
    );
    pick(&mut h, "bob");
    pick(&mut h, "carol");
    h.get_by_label_contains("2 chosen: bob, carol");
    h.get_by_label("Create group").click();
    h.step();
    // The group opens once the core made it; both members get it.
    wait(&mut h, "the new group open", |h| {
        h.state()
            .model
            .open_group
            .as_ref()
            .is_some_and(|id| h.state().model.groups.by_id[id].info.members.len() == 3)
    });
    let id = h.state().model.open_group.clone().unwrap();
    for peer in [&mut bob, &mut carol] {
        let Event::Group(info) = peer.expect(|e| matches!(e, Event::Group(_))) else {
            unreachable!()
        };
        assert_eq!(
            (info.id.as_str(), info.name.as_str()),
            (id.as_str(), "Team")
        );
        assert_eq!(info.admins, ["alice"]);
    }
    h.get_by_label_contains("👥 Team");
    h.get_by_label("3 members");
    h.get_by_label_contains("alice created the group");
    // Its row in the side list, with the group icon's avatar.
    assert!(
        h.query_by_label("Team").is_some(),
        "listed in the side list"
    );

    // Send with Enter: both get it once; "delivered to 2 of 2" shows on hover.
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("hello team");
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
    for peer in [&mut bob, &mut carol] {
        let Event::GroupMessage {
            group, from, text, ..
        } = peer.expect(|e| matches!(e, Event::GroupMessage { .. }))
        else {
            unreachable!()
        };
        assert_eq!(
            (group.as_str(), from.as_str(), text.as_str()),
            (id.as_str(), "alice", "hello team")
        );
    }
    wait(&mut h, "delivered to both", |h| {
        our_line(h, "hello team") == Some((2, 2))
    });
    h.get_by_label_contains("✔✔ 2/2").hover();
    wait(&mut h, "\"delivered to 2 of 2\" on hover", |h| {
        h.query_by_label("delivered to 2 of 2").is_some()
    });

    // A member's message shows with her name.
    bob.send(Command::GroupSend {
        group: id.clone(),
        text: "hi from bob".into(),
    });
    wait(&mut h, "bob's message", |h| {
        h.query_by_label("hi from bob").is_some()
    });
    assert!(h.query_by_label("bob").is_some(), "the sender is named");

    // The member panel: carol chosen, removed. Everyone is told; she is out.
    h.get_by_label("Members").click();
    wait(&mut h, "the member panel", |h| {
        h.query_by_label("carol").is_some()
    });
    h.get_by_label("carol").click();
    wait(&mut h, "carol's actions", |h| {
        h.query_by_label("Safety number of carol").is_some()
    });
    h.get_by_label("Remove carol").click();
    h.step();
    wait(&mut h, "carol removed", |h| {
        h.query_by_label_contains("alice removed carol").is_some()
    });
    h.get_by_label("2 members");
    let Event::Group(info) = carol
        .expect(|e| matches!(e, Event::Group(info) if info.change.as_deref() == Some("removed")))
    else {
        unreachable!()
    };
    assert!(!info.active, "carol is told she is out");
    bob.expect(|e| matches!(e, Event::Group(info) if info.change.as_deref() == Some("removed")));

    // The next message goes to bob only: "delivered to 1 of 1".
    // (The member panel had the focus: back to the composer.)
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .focus();
    h.step();
    h.get_by_role_and_label(Role::MultilineTextInput, "Message")
        .type_text("just us now");
    h.step();
    h.get_by_label("Send").click();
    wait(&mut h, "queued", |h| our_line(h, "just us now").is_some());
    bob.expect(|e| matches!(e, Event::GroupMessage { text, .. } if text == "just us now"));
    // (One recipient: carol was not sent a copy.)
    wait(&mut h, "delivered to bob", |h| {
        our_line(h, "just us now") == Some((1, 1))
    });

    // The search box finds groups too: from bob's chat, Ctrl+K, part of the group's name,
    // Enter: the group opens.
    h.state_mut().open("bob");
    h.step();
    assert_eq!(h.state().model.open_group, None);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::K);
    h.step();
    h.event(egui::Event::Text("tea".into()));
    h.step();
    h.key_press(egui::Key::Enter);
    wait(&mut h, "the group opened from the search box", |h| {
        h.state().model.open_group.as_deref() == Some(id.as_str())
    });
    assert!(
        h.state().view.filter.is_empty(),
        "the search box is cleared"
    );
}
