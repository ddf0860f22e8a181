use super::*;

/// The owned message a queued one stands for (a `Deliver`'s name and payload copied).
fn owned(routed: Routed) -> ServerMessage {
    match routed {
        Routed::Deliver(d) => d.into(),
        Routed::Message(m) => m,
    }
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

#[test]
fn presence_route_and_replace() {
    let router = Router::default();
    let mut alice = router.join(&name("alice"), 1, OutboxBound::messages(8));
    assert_eq!(
        router.watch(&name("alice"), 1, vec![name("bob"), name("carol")], 8),
        Ok(vec![])
    );
    let mut bob = router.join(&name("bob"), 2, OutboxBound::messages(8));
    assert_eq!(
        owned(alice.inbox.try_next().unwrap()),
        ServerMessage::Presence {
            username: "bob".into(),
            online: true
        }
    );
    assert_eq!(router.online(), vec!["alice", "bob"]);

    // Bob logs in again: the old session is kicked, nobody sees him go offline.
    let _bob2 = router.join(&name("bob"), 3, OutboxBound::messages(8));
    assert_eq!(bob.inbox.kicked(), Some(ErrorCode::SessionReplaced));
    router.leave(&name("bob"), 2);
    assert_eq!(router.online(), vec!["alice", "bob"]);
    assert!(alice.inbox.try_next().is_none());

    router.leave(&name("bob"), 3);
    assert_eq!(router.online(), vec!["alice"]);
    assert_eq!(
        owned(alice.inbox.try_next().unwrap()),
        ServerMessage::Presence {
            username: "bob".into(),
            online: false
        }
    );
    // Bob watched nobody, so he never heard of alice.
    assert!(bob.inbox.try_next().is_none());
}

#[test]
fn watching_is_bounded_and_forgotten_with_the_session() {
    let router = Router::default();
    let _alice = router.join(&name("alice"), 1, OutboxBound::messages(8));
    let mut bob = router.join(&name("bob"), 2, OutboxBound::messages(8));
    let many: Vec<Username> = (0..5).map(|i| name(&format!("u{i}"))).collect();
    assert_eq!(
        router.watch(&name("alice"), 1, many.clone(), 4),
        Err(WatchError::Limit(4))
    );
    assert_eq!(router.watch_count(), 0, "all or nothing");
    assert_eq!(
        router.watch(&name("alice"), 1, many[..4].to_vec(), 4),
        Ok(vec![])
    );
    // Names already watched do not count twice.
    assert!(
        router
            .watch(&name("alice"), 1, many[..2].to_vec(), 4)
            .is_ok()
    );
    assert_eq!(router.watch_count(), 4);
    assert_eq!(
        router.watch(&name("alice"), 9, vec![name("bob")], 4),
        Err(WatchError::NotJoined),
        "a stale connection id is not the session"
    );
    assert_eq!(
        router.watch(&name("bob"), 2, vec![name("alice"), name("alice")], 4),
        Ok(vec!["alice".to_string()])
    );
    // Alice leaves: bob hears it, and her watches are gone.
    router.leave(&name("alice"), 1);
    assert_eq!(router.watch_count(), 1);
    assert_eq!(
        owned(bob.inbox.try_next().unwrap()),
        ServerMessage::Presence {
            username: "alice".into(),
            online: false
        }
    );
    // A replaced session's watches are dropped with it.
    let _bob2 = router.join(&name("bob"), 3, OutboxBound::messages(8));
    assert_eq!(router.watch_count(), 0);
}

fn deliver(envelope_id: u64) -> SharedDeliver<Bytes> {
    SharedDeliver {
        envelope_id,
        from: name("alice"),
        payload: Bytes::from_static(&[1]),
    }
}

/// Alice sends `[1]` to `to`: (id, the id the store was given, delivered at once).
fn accept(router: &Router, to: &str) -> (u64, (u64, bool), bool) {
    let (stored, delivered) = router.accept(
        &name(to),
        &name("alice"),
        Bytes::from_static(&[1]),
        |id, d, payload| {
            assert_eq!(payload, [1][..]);
            (id, d)
        },
    );
    (stored.0, stored, delivered)
}

#[test]
fn envelopes_go_direct_only_when_nothing_earlier_is_still_on_its_way() {
    let router = Router::new(10);
    let mut bob = router.join(&name("bob"), 1, OutboxBound::messages(8));
    // Not live yet (reading its backlog): through the store, in id order.
    let (_, stored, delivered) = accept(&router, "bob");
    assert_eq!((stored, delivered), ((10, false), false));
    router.set_live(&name("bob"), 1);
    // Live, but envelope 10 is still on its way through the store: 11 must follow it.
    let (id, _, delivered) = accept(&router, "bob");
    assert_eq!((id, delivered), (11, false));
    assert!(bob.inbox.try_next().is_none());
    router.settle(&name("bob"), Some(deliver(10)));
    router.settle(&name("bob"), Some(deliver(11)));
    // Nothing left on its way: the next one goes straight to bob, after 10 and 11.
    let (id, _, delivered) = accept(&router, "bob");
    assert_eq!((id, delivered), (12, true));
    let got: Vec<Routed> = std::iter::from_fn(|| bob.inbox.try_next()).collect();
    assert_eq!(got, [10, 11, 12].map(|id| Routed::Deliver(deliver(id))));
    // Offline recipients: through the store; settling without a session is harmless.
    let (_, _, delivered) = accept(&router, "carol");
    assert!(!delivered);
    router.settle(&name("carol"), Some(deliver(13)));
    // A stale connection id does not make the new session live.
    let _bob2 = router.join(&name("bob"), 2, OutboxBound::messages(8));
    router.set_live(&name("bob"), 1);
    assert!(!accept(&router, "bob").2);
}

#[test]
fn a_session_reading_its_backlog_is_not_kicked_for_envelopes_the_store_has() {
    let router = Router::default();
    let mut bob = router.join(&name("bob"), 1, OutboxBound::messages(1));
    for id in [1, 2] {
        accept(&router, "bob");
        router.settle(&name("bob"), Some(deliver(id)));
    }
    assert_eq!(bob.inbox.kicked(), None, "not kicked while not live");
    // Envelope 2 was left to the store: one more backlog read before going live.
    assert!(!router.set_live(&name("bob"), 1));
    assert!(router.set_live(&name("bob"), 1));
    assert_eq!(bob.inbox.try_next().unwrap(), Routed::Deliver(deliver(1)));
}

#[test]
fn on_a_cluster_a_session_here_is_online_before_the_bucket_says_so() {
    let router = Router::clustered();
    let _alice = router.join(&name("alice"), 1, OutboxBound::messages(8));
    let _bob = router.join(&name("bob"), 2, OutboxBound::messages(8));
    assert_eq!(router.online(), vec!["alice", "bob"]);
    assert_eq!(
        router.watch(&name("alice"), 1, vec![name("bob"), name("carol")], 8),
        Ok(vec!["bob".to_string()])
    );
    // Carol is on another relay: only the bucket tells.
    router.cluster_presence(&name("carol"), true);
    router.cluster_presence(&name("alice"), true);
    assert_eq!(router.online(), vec!["alice", "bob", "carol"]);
    router.leave(&name("bob"), 2);
    router.cluster_presence(&name("carol"), false);
    assert_eq!(router.online(), vec!["alice"]);
}

#[test]
fn full_queue_kicks_the_slow_reader() {
    let router = Router::default();
    let slow = router.join(&name("slow"), 1, OutboxBound::messages(2));
    router.set_live(&name("slow"), 1);
    assert!(accept(&router, "slow").2);
    assert!(accept(&router, "slow").2);
    assert!(!accept(&router, "slow").2);
    assert_eq!(slow.inbox.kicked(), Some(ErrorCode::SlowConsumer));
}
