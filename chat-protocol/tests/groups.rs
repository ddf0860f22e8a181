//! Groups without sockets: the membership chain (admins only, replays, forks, stale and
//! early changes, joining) and sender keys (sealed once, opened by every holder, never
//! forgeable by another holder, replays refused).

use std::collections::BTreeSet;
use std::sync::OnceLock;

use chat_protocol::e2e::{Body, Content, RotationPolicy};
use chat_protocol::group::{
    ChangeError, ChangeKind, GroupEnvelope, GroupOpenError, GroupState, HISTORY, MemberKeys,
    Membership, PayloadKind, Received, Refusal, SenderKey, SignedChange, payload_kind,
};
use chat_protocol::identity::{Identity, PublicIdentity};
use chat_protocol::username::Username;
use rand::SeedableRng;

const T0: u64 = 1_700_000_000_000;
const MAX: usize = 256;
const GROUP: [u8; 16] = [7; 16];

struct User {
    name: Username,
    id: Identity,
}

/// alice and bob have checked-in keys; carol and mallory are generated (2048 bits).
fn users() -> &'static [User; 4] {
    static USERS: OnceLock<[User; 4]> = OnceLock::new();
    USERS.get_or_init(|| {
        let load = |n: &str, pem: &str| User {
            name: name(n),
            id: Identity::from_pem(pem, None).unwrap(),
        };
        let generate = |n: &str| User {
            name: name(n),
            id: Identity::generate_with_bits(&mut rand::rng(), 2048).unwrap(),
        };
        [
            load("alice", include_str!("vectors/alice.pem")),
            load("bob", include_str!("vectors/bob.pem")),
            generate("carol"),
            generate("mallory"),
        ]
    })
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn user(n: &str) -> &'static User {
    users().iter().find(|u| u.name.as_str() == n).unwrap()
}

/// Pinned keys: everyone's real key.
fn keys(u: &Username) -> Option<PublicIdentity> {
    users()
        .iter()
        .find(|x| x.name == *u)
        .map(|x| x.id.public().clone())
}

fn rng() -> rand_chacha::ChaCha20Rng {
    rand_chacha::ChaCha20Rng::seed_from_u64(7)
}

/// alice creates a group with bob and carol; returns each one's membership and the change.
fn created() -> (Membership, Membership, Membership, SignedChange) {
    let alice = user("alice");
    let (mine, create) = Membership::create(
        &mut rng(),
        &alice.id,
        &alice.name,
        GROUP,
        "Team",
        vec![name("bob"), name("carol")],
        T0,
        MAX,
    )
    .unwrap();
    let bob = Membership::from_create(create.clone(), alice.id.public(), MAX).unwrap();
    let carol = Membership::from_create(create.clone(), alice.id.public(), MAX).unwrap();
    (mine, bob, carol, create)
}

fn make(m: &mut Membership, who: &str, kind: ChangeKind) -> Result<SignedChange, ChangeError> {
    let u = user(who);
    m.make(&mut rng(), &u.id, &u.name, kind, T0 + 1, MAX)
}

fn applied(r: Received) -> (GroupState, Vec<SignedChange>) {
    match r {
        Received::Applied { state, superseded } => (state, superseded),
        other => panic!("not applied: {other:?}"),
    }
}

#[test]
fn creating_gives_every_member_the_same_state() {
    let (alice, bob, carol, _) = created();
    let state = alice.current();
    assert_eq!(state.version, 1);
    assert_eq!(state.name, "Team");
    let members: Vec<&str> = state.members.iter().map(Username::as_str).collect();
    assert_eq!(members, ["alice", "bob", "carol"]);
    assert_eq!(state.admins.keys().collect::<Vec<_>>(), [&name("alice")]);
    assert_eq!(bob.head(), alice.head());
    assert_eq!(carol.current(), state);
    // A create signed by someone else than its author is refused.
    let mallory = user("mallory");
    let (_, forged) = Membership::create(
        &mut rng(),
        &mallory.id,
        &name("alice"),
        GROUP,
        "Team",
        vec![name("bob")],
        T0,
        MAX,
    )
    .unwrap();
    assert_eq!(
        Membership::from_create(forged, user("alice").id.public(), MAX).unwrap_err(),
        ChangeError::BadSignature
    );
}

#[test]
fn every_kind_of_change_applies_in_order_for_every_member() {
    let (mut alice, mut bob, _, _) = created();
    let changes = [
        make(
            &mut alice,
            "alice",
            ChangeKind::Add {
                users: vec![name("mallory")],
            },
        )
        .unwrap(),
        make(
            &mut alice,
            "alice",
            ChangeKind::Rename {
                name: "Team 2".into(),
            },
        )
        .unwrap(),
        make(
            &mut alice,
            "alice",
            ChangeKind::Promote {
                users: vec![name("bob")],
            },
        )
        .unwrap(),
        make(
            &mut alice,
            "alice",
            ChangeKind::Remove {
                users: vec![name("mallory")],
            },
        )
        .unwrap(),
    ];
    for change in &changes {
        let (state, superseded) = applied(bob.receive(change, keys, MAX));
        assert!(superseded.is_empty());
        assert_eq!(state.version, change.change.prev_version + 1);
    }
    assert_eq!(bob.head(), alice.head());
    let state = bob.current();
    assert_eq!(state.name, "Team 2");
    assert!(!state.is_member(&name("mallory")));
    assert_eq!(
        state.admins.keys().collect::<Vec<_>>(),
        [&name("alice"), &name("bob")]
    );
    // bob, now an admin, may change it; alice follows.
    let rename = make(&mut bob, "bob", ChangeKind::Rename { name: "B".into() }).unwrap();
    assert_eq!(applied(alice.receive(&rename, keys, MAX)).0.name, "B");
}

#[test]
fn members_refuse_changes_by_non_admins_forged_replayed_and_stale() {
    let (mut alice, mut bob, mut carol, create) = created();
    // carol is a member but not an admin: her "add mallory" is refused by everyone.
    let mut carols_view = carol.clone();
    let sneaky = make(
        &mut carols_view,
        "carol",
        ChangeKind::Add {
            users: vec![name("mallory")],
        },
    );
    assert_eq!(sneaky.unwrap_err(), ChangeError::NotAdmin(name("carol")));
    let sneaky = chat_protocol::group::Change {
        group: GROUP,
        prev: bob.head(),
        prev_version: 1,
        author: name("carol"),
        created_ms: T0,
        kind: ChangeKind::Add {
            users: vec![name("mallory")],
        },
    }
    .sign(&mut rng(), &user("carol").id)
    .unwrap();
    for m in [&mut alice, &mut bob] {
        assert_eq!(
            m.receive(&sneaky, keys, MAX),
            Received::Refused(Refusal::Invalid(ChangeError::NotAdmin(name("carol"))))
        );
    }
    // mallory signs a change claiming to be alice: the signature does not verify.
    let forged = chat_protocol::group::Change {
        author: name("alice"),
        ..sneaky.change.clone()
    }
    .sign(&mut rng(), &user("mallory").id)
    .unwrap();
    assert_eq!(
        bob.receive(&forged, keys, MAX),
        Received::Refused(Refusal::Invalid(ChangeError::BadSignature))
    );
    // A real removal, then its replay, and the replayed create.
    let remove = make(
        &mut alice,
        "alice",
        ChangeKind::Remove {
            users: vec![name("carol")],
        },
    )
    .unwrap();
    applied(bob.receive(&remove, keys, MAX));
    applied(carol.receive(&remove, keys, MAX));
    assert!(
        !carol.current().is_member(&name("carol")),
        "carol learns she was removed"
    );
    let head = bob.head();
    assert_eq!(
        bob.receive(&remove, keys, MAX),
        Received::Refused(Refusal::Replayed)
    );
    assert_eq!(
        bob.receive(&create, keys, MAX),
        Received::Refused(Refusal::Replayed)
    );
    assert_eq!(bob.head(), head, "refusals change nothing");
    // Re-adding carol, then replaying the old removal: still a replay, carol stays.
    let add = make(
        &mut alice,
        "alice",
        ChangeKind::Add {
            users: vec![name("carol")],
        },
    )
    .unwrap();
    applied(bob.receive(&add, keys, MAX));
    assert_eq!(
        bob.receive(&remove, keys, MAX),
        Received::Refused(Refusal::Replayed)
    );
    assert!(bob.current().is_member(&name("carol")));
    // After more than HISTORY changes the old ones are stale.
    for i in 0..HISTORY {
        let c = make(
            &mut alice,
            "alice",
            ChangeKind::Rename {
                name: format!("n{i}"),
            },
        )
        .unwrap();
        applied(bob.receive(&c, keys, MAX));
    }
    assert_eq!(
        bob.receive(&remove, keys, MAX),
        Received::Refused(Refusal::Stale)
    );
    assert_eq!(
        bob.receive(&create, keys, MAX),
        Received::Refused(Refusal::Stale)
    );
}

#[test]
fn a_change_that_arrives_early_waits_and_an_unknown_author_needs_a_key() {
    let (mut alice, mut bob, _, _) = created();
    let first = make(
        &mut alice,
        "alice",
        ChangeKind::Rename { name: "one".into() },
    )
    .unwrap();
    let second = make(
        &mut alice,
        "alice",
        ChangeKind::Rename { name: "two".into() },
    )
    .unwrap();
    assert_eq!(bob.receive(&second, keys, MAX), Received::Ahead);
    assert_eq!(
        bob.receive(&first, |_| None, MAX),
        Received::NeedKey(name("alice"))
    );
    applied(bob.receive(&first, keys, MAX));
    assert_eq!(applied(bob.receive(&second, keys, MAX)).0.name, "two");
}

/// Two admins change the same state at once. Whatever order each member gets the two
/// changes in, all end in the same state: the smaller change id wins, the other is undone.
#[test]
fn concurrent_admin_changes_converge_for_everyone() {
    let (mut alice, mut bob, mut carol, _) = created();
    let promote = make(
        &mut alice,
        "alice",
        ChangeKind::Promote {
            users: vec![name("bob")],
        },
    )
    .unwrap();
    applied(bob.receive(&promote, keys, MAX));
    applied(carol.receive(&promote, keys, MAX));
    let mut alice_fork = alice.clone();
    let mut bob_fork = bob.clone();
    let a = make(
        &mut alice_fork,
        "alice",
        ChangeKind::Rename {
            name: "by alice".into(),
        },
    )
    .unwrap();
    let b = make(
        &mut bob_fork,
        "bob",
        ChangeKind::Add {
            users: vec![name("mallory")],
        },
    )
    .unwrap();
    let (winner, loser) = if a.id() < b.id() { (&a, &b) } else { (&b, &a) };

    let mut heads = Vec::new();
    for order in [[&a, &b], [&b, &a]] {
        let mut m = carol.clone();
        let first = applied(m.receive(order[0], keys, MAX));
        assert!(first.1.is_empty());
        match m.receive(order[1], keys, MAX) {
            Received::Applied { superseded, .. } => {
                assert!(std::ptr::eq(order[1], winner));
                assert_eq!(superseded, vec![loser.clone()]);
            }
            Received::Refused(Refusal::Forked) => assert!(std::ptr::eq(order[1], loser)),
            other => panic!("{other:?}"),
        }
        heads.push(m.head());
    }
    // The two authors converge too.
    for (m, other) in [(&mut alice_fork, &b), (&mut bob_fork, &a)] {
        let _ = m.receive(other, keys, MAX);
        heads.push(m.head());
    }
    assert!(heads.windows(2).all(|w| w[0] == w[1]), "all members agree");
    // The loser re-made on the winning state applies everywhere.
    alice = alice_fork;
    bob = bob_fork;
    let (author, mut maker) = if std::ptr::eq(loser, &a) {
        ("alice", alice.clone())
    } else {
        ("bob", bob.clone())
    };
    let again = make(&mut maker, author, loser.change.kind.clone()).unwrap();
    let mut m = carol.clone();
    applied(m.receive(winner, keys, MAX));
    applied(m.receive(&again, keys, MAX));
    assert_eq!(m.head(), maker.head());
    // A member who applied the loser and gets the re-made change before the winner (the
    // relay's order): it waits, then applies after the winner.
    let mut m = carol.clone();
    applied(m.receive(loser, keys, MAX));
    assert_eq!(m.receive(&again, keys, MAX), Received::Ahead);
    let (_, superseded) = applied(m.receive(winner, keys, MAX));
    assert_eq!(superseded, vec![loser.clone()]);
    applied(m.receive(&again, keys, MAX));
    assert_eq!(m.head(), maker.head());
}

/// An admin removed from the group signs changes of the state before her removal, with
/// as many ids as she likes: the removal wins every race, and nothing older than the last
/// step can be forked at all.
#[test]
fn a_removed_admin_cannot_fork_her_way_back() {
    let (mut alice, mut bob, _, _) = created();
    let promote = make(
        &mut alice,
        "alice",
        ChangeKind::Promote {
            users: vec![name("bob")],
        },
    )
    .unwrap();
    applied(bob.receive(&promote, keys, MAX));
    let before_removal = bob.clone();
    let removal = make(
        &mut alice,
        "alice",
        ChangeKind::Remove {
            users: vec![name("bob")],
        },
    )
    .unwrap();
    let mut carol_view = before_removal.clone();
    applied(carol_view.receive(&removal, keys, MAX));
    // bob grinds: many changes of the state he was admin in, some with smaller ids.
    let mut smaller = 0;
    for t in 0..40 {
        let mut b = before_removal.clone();
        let fork = b
            .make(
                &mut rng(),
                &user("bob").id,
                &name("bob"),
                ChangeKind::Remove {
                    users: vec![name("alice")],
                },
                T0 + t,
                MAX,
            )
            .unwrap();
        smaller += usize::from(fork.id() < removal.id());
        assert_eq!(
            carol_view.receive(&fork, keys, MAX),
            Received::Refused(Refusal::Forked)
        );
    }
    assert!(smaller > 0, "some forks had the smaller id and still lost");
    assert!(!carol_view.current().is_member(&name("bob")));
    // One more change on top: now even a winning rival of the removal is too old.
    let rename = make(&mut alice, "alice", ChangeKind::Rename { name: "R".into() }).unwrap();
    applied(carol_view.receive(&rename, keys, MAX));
    let mut a = before_removal.clone();
    let late = make(
        &mut a,
        "alice",
        ChangeKind::Rename {
            name: "late".into(),
        },
    )
    .unwrap();
    assert_eq!(
        carol_view.receive(&late, keys, MAX),
        Received::Refused(Refusal::Forked)
    );
}

/// Two admins removing each other: the senior one stays, whatever the names sort like.
#[test]
fn a_junior_admin_removed_cannot_remove_her_remover_back() {
    let bob = user("bob");
    let (mut bobs, create) = Membership::create(
        &mut rng(),
        &bob.id,
        &bob.name,
        GROUP,
        "B",
        vec![name("alice"), name("carol")],
        T0,
        MAX,
    )
    .unwrap();
    let mut carols = Membership::from_create(create, bob.id.public(), MAX).unwrap();
    let promote = make(
        &mut bobs,
        "bob",
        ChangeKind::Promote {
            users: vec![name("alice")],
        },
    )
    .unwrap();
    applied(carols.receive(&promote, keys, MAX));
    let after_promote = carols.clone();
    let removal = make(
        &mut bobs,
        "bob",
        ChangeKind::Remove {
            users: vec![name("alice")],
        },
    )
    .unwrap();
    applied(carols.receive(&removal, keys, MAX));
    // alice ("alice" < "bob") answers on the state before, with any id she likes.
    for t in 0..8 {
        let mut a = after_promote.clone();
        let back = a
            .make(
                &mut rng(),
                &user("alice").id,
                &name("alice"),
                ChangeKind::Remove {
                    users: vec![name("bob")],
                },
                T0 + t,
                MAX,
            )
            .unwrap();
        assert_eq!(
            carols.receive(&back, keys, MAX),
            Received::Refused(Refusal::Forked)
        );
    }
    // A member that got alice's removal of bob first: bob's removal of her, the senior
    // admin's, wins there too — everyone ends with bob in and alice out.
    let mut alices = after_promote.clone();
    let junior = make(
        &mut alices,
        "alice",
        ChangeKind::Remove {
            users: vec![name("bob")],
        },
    )
    .unwrap();
    let mut other = after_promote.clone();
    applied(other.receive(&junior, keys, MAX));
    let (state, superseded) = applied(other.receive(&removal, keys, MAX));
    assert!(state.is_member(&name("bob")) && !state.is_member(&name("alice")));
    assert_eq!(superseded, vec![junior]);
    assert_eq!(other.head(), carols.head());
}

#[test]
fn joining_takes_the_prior_state_only_if_the_signed_change_names_it() {
    let (mut alice, _, _, _) = created();
    let prior = alice.current().clone();
    let add = make(
        &mut alice,
        "alice",
        ChangeKind::Add {
            users: vec![name("mallory")],
        },
    )
    .unwrap();
    let joined =
        Membership::join(prior.clone(), add.clone(), user("alice").id.public(), MAX).unwrap();
    assert_eq!(joined.head(), alice.head());
    assert!(joined.current().is_member(&name("mallory")));
    // A prior state that is not the one signed: refused.
    let mut doctored = prior.clone();
    doctored.admins.insert(name("mallory"), 1);
    assert_eq!(
        Membership::join(doctored, add.clone(), user("alice").id.public(), MAX).unwrap_err(),
        ChangeError::WrongState
    );
    // Persisted and read back, it still follows the chain.
    let mut back = Membership::from_bytes(&joined.to_bytes()).unwrap();
    let rename = make(&mut alice, "alice", ChangeKind::Rename { name: "x".into() }).unwrap();
    applied(back.receive(&rename, keys, MAX));
    assert!(Membership::from_bytes(b"\x09junk").is_err());
}

#[test]
fn leaving_limits_and_names() {
    let (mut alice, mut bob, _, _) = created();
    // The last admin leaves: the first remaining member by name becomes admin.
    let leave = make(&mut alice, "alice", ChangeKind::Leave).unwrap();
    let (state, _) = applied(bob.receive(&leave, keys, MAX));
    assert!(!state.is_member(&name("alice")));
    assert_eq!(state.admins.keys().collect::<Vec<_>>(), [&name("bob")]);
    // Size limit, empty and silly names, removing oneself, adding a member twice.
    let (mut g, ..) = created();
    let too_many = (0..254).map(|i| name(&format!("u{i}"))).collect();
    assert_eq!(
        make(&mut g, "alice", ChangeKind::Add { users: too_many }).unwrap_err(),
        ChangeError::TooManyMembers(MAX)
    );
    for bad in ["", "   ", "a\u{7}b", &"x".repeat(65)] {
        assert_eq!(
            make(&mut g, "alice", ChangeKind::Rename { name: bad.into() }).unwrap_err(),
            ChangeError::BadName,
            "{bad:?}"
        );
    }
    assert_eq!(
        make(
            &mut g,
            "alice",
            ChangeKind::Remove {
                users: vec![name("alice")]
            }
        )
        .unwrap_err(),
        ChangeError::RemovesAuthor
    );
    assert_eq!(
        make(
            &mut g,
            "alice",
            ChangeKind::Add {
                users: vec![name("bob")]
            }
        )
        .unwrap_err(),
        ChangeError::AlreadyMember(name("bob"))
    );
    assert_eq!(g.current().version, 1, "failed changes change nothing");
}

fn text(n: u8, s: &str) -> Content {
    Content {
        id: [n; 16],
        sent_at_ms: T0,
        body: Body::Text(s.into()),
    }
}

#[test]
fn a_group_message_is_sealed_once_and_opened_by_every_holder() {
    let alice = user("alice");
    let members = BTreeSet::from([name("bob"), name("carol")]);
    let mut key = SenderKey::generate(&mut rng(), members.clone(), T0);
    let bytes = key
        .seal(
            &mut rng(),
            &alice.id,
            &alice.name,
            GROUP,
            &text(1, "hi all"),
        )
        .unwrap();
    assert_eq!(payload_kind(&bytes), Some(PayloadKind::Group));
    let envelope = GroupEnvelope::decode(&bytes).unwrap();
    for _member in ["bob", "carol"] {
        let mut held = MemberKeys::default();
        assert_eq!(
            held.open(&envelope, &alice.name, alice.id.public()),
            Err(GroupOpenError::UnknownKey)
        );
        held.add(&key.distribution(GROUP));
        let content = held
            .open(&envelope, &alice.name, alice.id.public())
            .unwrap();
        assert_eq!(content, text(1, "hi all"));
        assert_eq!(
            held.open(&envelope, &alice.name, alice.id.public()),
            Err(GroupOpenError::Replay)
        );
        // Persisted and read back, the replay window holds.
        let mut back = MemberKeys::from_bytes(&held.to_bytes()).unwrap();
        assert_eq!(
            back.open(&envelope, &alice.name, alice.id.public()),
            Err(GroupOpenError::Replay)
        );
    }
    // Stamped as coming from someone else by the relay.
    let mut held = MemberKeys::default();
    held.add(&key.distribution(GROUP));
    assert_eq!(
        held.open(&envelope, &name("bob"), alice.id.public()),
        Err(GroupOpenError::SenderMismatch)
    );
    // Persisted sending state continues the counter.
    let mut back = SenderKey::from_bytes(&key.to_bytes()).unwrap();
    assert_eq!(back.next_counter, 1);
    let next = back
        .seal(&mut rng(), &alice.id, &alice.name, GROUP, &text(2, "again"))
        .unwrap();
    assert_eq!(GroupEnvelope::decode(&next).unwrap().counter, 1);
}

#[test]
fn a_member_holding_the_key_cannot_write_as_another_and_tampering_fails() {
    let alice = user("alice");
    let mallory = user("mallory");
    let mut key = SenderKey::generate(&mut rng(), BTreeSet::from([name("mallory")]), T0);
    let real = GroupEnvelope::decode(
        &key.seal(&mut rng(), &alice.id, &alice.name, GROUP, &text(1, "real"))
            .unwrap(),
    )
    .unwrap();
    // mallory holds alice's sending key and seals a message in alice's name with it,
    // signed with her own key: refused.
    let mut stolen = SenderKey::from_bytes(&key.to_bytes()).unwrap();
    let forged = GroupEnvelope::decode(
        &stolen
            .seal(
                &mut rng(),
                &mallory.id,
                &alice.name,
                GROUP,
                &text(2, "fake"),
            )
            .unwrap(),
    )
    .unwrap();
    let mut held = MemberKeys::default();
    held.add(&key.distribution(GROUP));
    assert_eq!(
        held.open(&forged, &alice.name, alice.id.public()),
        Err(GroupOpenError::BadSignature)
    );
    // Any flipped bit of the ciphertext or of a bound field: refused.
    let mut flipped = real.clone();
    flipped.ciphertext[3] ^= 1;
    assert_eq!(
        held.open(&flipped, &alice.name, alice.id.public()),
        Err(GroupOpenError::BadSignature)
    );
    let mut moved = real.clone();
    moved.group = [8; 16];
    assert_eq!(
        held.open(&moved, &alice.name, alice.id.public()),
        Err(GroupOpenError::BadSignature)
    );
    // Still opens untouched, once.
    assert!(held.open(&real, &alice.name, alice.id.public()).is_ok());
    // Junk is malformed, never a panic.
    for junk in [&b""[..], b"\x03", b"\x03\x01\x02", &[3; 300]] {
        assert!(GroupEnvelope::decode(junk).is_err());
    }
    assert_eq!(payload_kind(b"\x09"), None);
}

#[test]
fn sending_keys_rotate_when_the_recipients_change_or_age() {
    let policy = RotationPolicy {
        max_messages: 3,
        max_age_ms: 1000,
    };
    let members = BTreeSet::from([name("bob"), name("carol")]);
    let mut key = SenderKey::generate(&mut rng(), members.clone(), T0);
    assert!(!key.needs_rotation(&members, T0, policy));
    let fewer = BTreeSet::from([name("bob")]);
    let more = BTreeSet::from([name("bob"), name("carol"), name("dave")]);
    assert!(key.needs_rotation(&fewer, T0, policy), "someone removed");
    assert!(key.needs_rotation(&more, T0, policy), "someone added");
    assert!(key.needs_rotation(&members, T0 + 1000, policy), "old");
    assert!(
        key.needs_rotation(&members, T0 - 1, policy),
        "clock went back"
    );
    for i in 0..3 {
        key.seal(
            &mut rng(),
            &user("alice").id,
            &name("alice"),
            GROUP,
            &text(i, "x"),
        )
        .unwrap();
    }
    assert!(key.needs_rotation(&members, T0, policy), "used up");
    // Only the newest keys of a member are held.
    let mut held = MemberKeys::default();
    let ids: Vec<u32> = (0..5)
        .map(|i| {
            let k = SenderKey::generate(
                &mut rand_chacha::ChaCha20Rng::seed_from_u64(i),
                members.clone(),
                T0,
            );
            held.add(&k.distribution(GROUP));
            k.key_id
        })
        .collect();
    assert!(!held.holds(ids[0]) && !held.holds(ids[1]));
    assert!(ids[2..].iter().all(|id| held.holds(*id)));
}
