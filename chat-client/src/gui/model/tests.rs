use super::*;
use crate::api::{Event, HistoryItem, Listing};

fn history_item(id: &str, at: u64) -> HistoryItem {
    HistoryItem {
        id: id.into(),
        outgoing: false,
        text: format!("text {id}"),
        sent_at: at,
        stored_at: at,
        status: Status::Delivered,
        undelivered: false,
        reason: None,
    }
}

fn msg(from: &str, id: &str, at: u64) -> Event {
    Event::Message {
        from: from.into(),
        id: id.into(),
        text: format!("text {id}"),
        sent_at: at,
    }
}

#[test]
fn unread_counts_and_ordering() {
    let mut m = Model::default();
    m.apply(Event::Ready {
        user: "me".into(),
        fingerprint: "f".into(),
    });
    m.apply(msg("bob", "b", 20));
    m.apply(msg("bob", "a", 10));
    m.apply(msg("bob", "a", 10)); // duplicate
    assert_eq!(
        m.contacts["bob"].unread, 3,
        "each event counts; duplicates are rare"
    );
    let ids: Vec<&str> = m.contacts["bob"]
        .lines
        .iter()
        .map(|l| l.id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["b", "a"],
        "in arrival order, whatever the sender's clock said"
    );
    // History from the store puts lines where the store has them.
    m.apply(Event::History {
        user: "bob".into(),
        items: vec![history_item("a", 1), history_item("old", 0)],
    });
    let ids: Vec<&str> = m.contacts["bob"]
        .lines
        .iter()
        .map(|l| l.id.as_str())
        .collect();
    assert_eq!(ids, ["old", "a", "b"]);
    assert!(m.open("bob"));
    assert!(!m.open("bob"), "history is requested once");
    assert_eq!(m.contacts["bob"].unread, 0);
    m.apply(msg("bob", "c", 30));
    assert_eq!(m.contacts["bob"].unread, 0, "open and focused: read");
    m.focused = false;
    m.apply(msg("bob", "d", 40));
    assert_eq!(m.contacts["bob"].unread, 1);
}

#[test]
fn status_moves_forward_only() {
    let mut m = Model::default();
    m.apply(Event::Queued {
        to: "bob".into(),
        id: "x".into(),
        text: "hi".into(),
        sent_at: 1,
    });
    m.apply(Event::Delivered {
        to: "bob".into(),
        id: "x".into(),
    });
    m.apply(Event::Sent {
        to: "bob".into(),
        id: "x".into(),
    });
    assert_eq!(m.contacts["bob"].lines[0].status, Status::Delivered);
    m.apply(Event::Queued {
        to: "bob".into(),
        id: "y".into(),
        text: "to nobody".into(),
        sent_at: 2,
    });
    m.apply(Event::Failed {
        to: "bob".into(),
        id: "y".into(),
        reason: "unknown_user".into(),
        message: "no such user".into(),
    });
    assert_eq!(m.contacts["bob"].lines[1].status, Status::Failed);
    assert_eq!(
        m.contacts["bob"].lines[1].reason.as_deref(),
        Some("no such user")
    );
}

#[test]
fn late_requeued_and_failed_messages_are_marked() {
    let mut m = Model::default();
    let (to, id) = ("bob".to_string(), "x".to_string());
    m.apply(Event::Queued {
        to: to.clone(),
        id: id.clone(),
        text: "hi".into(),
        sent_at: 1,
    });
    m.apply(Event::Sent {
        to: to.clone(),
        id: id.clone(),
    });
    m.apply(Event::Undelivered {
        to: to.clone(),
        id: id.clone(),
        since: 1,
    });
    assert!(
        m.contacts["bob"].lines[0].undelivered,
        "the clock mark shows"
    );
    // The recipient lost its key: sent again, so back to sending and unmarked.
    m.apply(Event::Requeued {
        to: to.clone(),
        id: id.clone(),
        reason: "recipient_lost_key".into(),
    });
    let line = &m.contacts["bob"].lines[0];
    assert_eq!((line.status, line.undelivered), (Status::Sending, false));
    m.apply(Event::Delivered { to, id });
    assert_eq!(m.contacts["bob"].lines[0].status, Status::Delivered);
}

#[test]
fn list_filters_and_puts_online_first() {
    let mut m = Model::default();
    m.apply(Event::Ready {
        user: "me".into(),
        fingerprint: "f".into(),
    });
    m.apply(Event::Contacts {
        users: vec!["zed".into(), "amy".into()],
        verified: vec!["amy".into()],
        last: vec![crate::api::LastMessage {
            user: "zed".into(),
            text: "see you".into(),
            outgoing: false,
            stored_at: 5,
        }],
        archived: vec![],
    });
    assert_eq!(m.contacts["zed"].preview(), Some(("see you", 5, false)));
    assert_eq!(m.contacts["amy"].preview(), None);
    assert!(
        m.contacts["amy"].verified,
        "the badge is known from the start"
    );
    assert!(!m.contacts["zed"].verified);
    m.apply(Event::Users {
        online: vec!["me".into(), "zed".into()],
    });
    let names: Vec<&str> = m.listed("").iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["zed", "amy"]);
    // A note to yourself: listed first, found by "note" too.
    m.contact("me");
    let names: Vec<&str> = m.listed("").iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["me", "zed", "amy"]);
    let names: Vec<&str> = m.listed("note").iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["me"]);
    m.contacts.remove("me");
    let names: Vec<&str> = m.listed(" AM").iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["amy"]);
    m.apply(Event::KeyChanged {
        user: "amy".into(),
        fingerprint: "ab cd".into(),
        was_verified: true,
    });
    assert!(m.contacts["amy"].key_changed && m.contacts["amy"].key_changed_was_verified);
    assert!(!m.contacts["amy"].verified);
    // The relay is gone: nobody's presence is known, none stays green.
    m.apply(Event::Connection {
        state: ConnectionState::Reconnecting,
        retry_in_ms: Some(2000),
        reason: Some("connection lost".into()),
        queued: 0,
        max_text_bytes: None,
        server: None,
    });
    assert_eq!(m.contacts["zed"].online, None);
    assert_eq!(m.contacts["amy"].online, None);
    m.apply(Event::Connection {
        state: ConnectionState::Connected,
        retry_in_ms: None,
        reason: None,
        queued: 0,
        max_text_bytes: Some(4072),
        server: Some("relay.example:65432".into()),
    });
    assert_eq!(m.max_text, Some(4072));
    m.apply(Event::Presence {
        user: "zed".into(),
        online: false,
    });
    assert_eq!(m.contacts["zed"].online, Some(false));
    assert_eq!(
        m.contacts["amy"].pending_fingerprint.as_deref(),
        Some("ab cd")
    );
}

/// Archived contacts leave the list but not search, and come back with a new message;
/// a removed one leaves the model (and closes if open).
#[test]
fn archived_and_removed_contacts() {
    let mut m = Model::default();
    m.apply(Event::Contacts {
        users: vec!["amy".into(), "bob".into(), "cy".into()],
        verified: vec![],
        last: vec![],
        archived: vec!["cy".into()],
    });
    let names = |m: &Model, f: &str| -> Vec<String> {
        m.listed(f).iter().map(|(n, _)| n.to_string()).collect()
    };
    assert_eq!(names(&m, ""), ["amy", "bob"]);
    assert_eq!(names(&m, "c"), ["cy"], "search finds archived contacts");
    m.apply(Event::ContactListing {
        user: "amy".into(),
        listing: Listing::Archived,
    });
    assert_eq!(names(&m, ""), ["bob"]);
    let archived: Vec<&str> = m.archived().iter().map(|(n, _)| *n).collect();
    assert_eq!(archived, ["amy", "cy"]);
    m.apply(Event::Message {
        from: "cy".into(),
        id: "01".into(),
        text: "back".into(),
        sent_at: 1,
    });
    assert_eq!(names(&m, ""), ["bob", "cy"]);
    m.open("bob");
    m.apply(Event::ContactListing {
        user: "bob".into(),
        listing: Listing::Removed,
    });
    assert_eq!(names(&m, ""), ["cy"]);
    assert_eq!(m.open, None);
    // Presence (still followed this session) and a stale verified mark bring no row back.
    m.apply(Event::Presence {
        user: "bob".into(),
        online: false,
    });
    m.apply(Event::Contacts {
        users: vec![],
        verified: vec!["bob".into()],
        last: vec![],
        archived: vec![],
    });
    assert_eq!(names(&m, ""), ["cy"]);
}
