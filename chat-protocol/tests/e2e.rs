//! End-to-end encryption without sockets: round trips, checked-in test vectors, and a
//! malicious relay that substitutes keys, forges stamps, tampers, replays and reorders.

use chat_protocol::e2e::{
    ACTIVE_EPOCHS, Body, Content, E2E_VERSION, Envelope, Inbound, MAX_TEXT_BYTES, OpenError,
    Outbound, Parties, RotationPolicy, SealError, StateError, unwrap_offer,
};
use chat_protocol::identity::Identity;
use chat_protocol::safety::SafetyNumber;
use chat_protocol::trust::{self, Seen};
use chat_protocol::{Username, frame};
use proptest::prelude::*;
use rand::SeedableRng;
use std::sync::OnceLock;

const T0: u64 = 1_700_000_000_000;

struct User {
    name: Username,
    id: Identity,
}

/// alice and bob have checked-in RSA-3072 keys; mallory is generated.
fn users() -> &'static [User; 3] {
    static USERS: OnceLock<[User; 3]> = OnceLock::new();
    USERS.get_or_init(|| {
        let load = |n: &str, pem: &str| User {
            name: Username::parse(n).unwrap(),
            id: Identity::from_pem(pem, None).unwrap(),
        };
        [
            load("alice", include_str!("vectors/alice.pem")),
            load("bob", include_str!("vectors/bob.pem")),
            User {
                name: Username::parse("mallory").unwrap(),
                id: Identity::generate_with_bits(&mut rand::rng(), 2048).unwrap(),
            },
        ]
    })
}

fn parties<'a>(me: &'a User, peer: &'a User) -> Parties<'a> {
    Parties {
        me: &me.id,
        my_name: &me.name,
        peer_name: &peer.name,
        peer: peer.id.public(),
    }
}

fn text(n: u8, s: &str) -> Content {
    Content {
        id: [n; 16],
        sent_at_ms: T0 + u64::from(n),
        body: Body::Text(s.into()),
    }
}

fn seal(out: &mut Outbound, from: &User, to: &User, content: &Content, now: u64) -> Vec<u8> {
    out.seal(
        &mut rand::rng(),
        parties(from, to),
        content,
        now,
        RotationPolicy::default(),
    )
    .unwrap()
    .bytes
}

fn decode(bytes: &[u8]) -> Envelope {
    frame::decode(bytes).unwrap()
}

fn encode(env: &Envelope) -> Vec<u8> {
    postcard::to_allocvec(env).unwrap()
}

#[test]
fn round_trip_both_ways_with_receipts() {
    let [alice, bob, _] = users();
    let (mut a_out, mut a_in, mut b_out, mut b_in) = Default::default();
    let _: (&Outbound, &Inbound, &Outbound, &Inbound) = (&a_out, &a_in, &b_out, &b_in);

    for n in 0..3 {
        let msg = text(n, &format!("hello bob #{n}"));
        let sealed = seal(&mut a_out, alice, bob, &msg, T0);
        let opened = b_in.open(parties(bob, alice), &sealed).unwrap();
        assert_eq!(opened.content, msg);
        assert_eq!(opened.counter, u64::from(n));
    }
    // Bob acknowledges; Alice stops attaching the offer.
    let epoch = a_out.current_epoch().unwrap();
    let receipt = Content {
        id: [9; 16],
        sent_at_ms: T0,
        body: Body::Receipt {
            epoch,
            ids: vec![[0; 16]],
        },
    };
    let sealed = seal(&mut b_out, bob, alice, &receipt, T0);
    let opened = a_in.open(parties(alice, bob), &sealed).unwrap();
    let Body::Receipt { epoch: acked, .. } = opened.content.body else {
        panic!()
    };
    a_out.acknowledge(acked);
    let with_offer = seal(&mut a_out, alice, bob, &text(3, "x"), T0);
    assert!(decode(&with_offer).offer.is_none());
    assert_eq!(
        b_in.open(parties(bob, alice), &with_offer).unwrap().counter,
        3
    );
}

#[test]
fn padding_hides_exact_length() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let short = decode(&seal(&mut out, alice, bob, &text(1, "hi"), T0));
    let longer = decode(&seal(&mut out, alice, bob, &text(2, &"x".repeat(150)), T0));
    assert_eq!(short.ciphertext.len(), longer.ciphertext.len());
    let too_long = "x".repeat(MAX_TEXT_BYTES + 1);
    assert_eq!(
        out.seal(
            &mut rand::rng(),
            parties(alice, bob),
            &text(3, &too_long),
            T0,
            RotationPolicy::default()
        )
        .unwrap_err(),
        SealError::TooLong(MAX_TEXT_BYTES + 1)
    );
    // The largest text still fits a default 64 KiB frame with its offer.
    let max = seal(
        &mut out,
        alice,
        bob,
        &text(4, &"x".repeat(MAX_TEXT_BYTES)),
        T0,
    );
    assert!(
        max.len() + 64 < chat_protocol::DEFAULT_MAX_FRAME,
        "{}",
        max.len()
    );
}

#[test]
fn rotation_by_count_time_and_reconnect() {
    let [alice, bob, _] = users();
    let policy = RotationPolicy {
        max_messages: 2,
        max_age_ms: 1000,
    };
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    let mut epochs = Vec::new();
    let mut send = |out: &mut Outbound, n: u8, now: u64| {
        let s = out
            .seal(
                &mut rand::rng(),
                parties(alice, bob),
                &text(n, "m"),
                now,
                policy,
            )
            .unwrap();
        inb.open(parties(bob, alice), &s.bytes).unwrap();
        s.epoch
    };
    epochs.push(send(&mut out, 0, T0));
    epochs.push(send(&mut out, 1, T0)); // same epoch
    epochs.push(send(&mut out, 2, T0)); // count limit: new epoch
    epochs.push(send(&mut out, 3, T0 + 5000)); // age limit: new epoch
    out.rotate(); // reconnect
    epochs.push(send(&mut out, 4, T0 + 5000)); // new epoch although time did not move
    assert_eq!(epochs[0], epochs[1]);
    let distinct: std::collections::HashSet<_> = epochs[1..].iter().collect();
    assert_eq!(distinct.len(), 4, "{epochs:?}");
    // A clock that went back ends the epoch too (its age is unknowable).
    epochs.push(send(&mut out, 5, T0));
    assert_ne!(epochs[5], epochs[4]);
}

// ---- checked-in test vectors -------------------------------------------------------------

fn vector(name: &str) -> String {
    let text = include_str!("vectors/e2e.txt");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .unwrap_or_else(|| panic!("vectors/e2e.txt has no {name}"))
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn safety_number_vector() {
    let [alice, bob, _] = users();
    let number = SafetyNumber::new(
        (&alice.name, alice.id.public()),
        (&bob.name, bob.id.public()),
    );
    assert_eq!(number.to_string(), vector("safety_number_alice_bob"));
    assert_eq!(
        alice.id.fingerprint().to_string(),
        vector("fingerprint_alice")
    );
}

#[test]
fn key_offer_and_message_vector() {
    let [alice, bob, _] = users();
    let msg = Content {
        id: [0x11; 16],
        sent_at_ms: T0,
        body: Body::Text("hello bob".into()),
    };
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([42; 32]);
    let sealed = Outbound::default()
        .seal(
            &mut rng,
            parties(alice, bob),
            &msg,
            T0,
            RotationPolicy::default(),
        )
        .unwrap();
    let expected = vector("envelope_alice_to_bob");
    if hex(&sealed.bytes) != expected {
        panic!(
            "sealing with fixed keys and randomness changed the bytes; if intended, bump \
             E2E_VERSION and update vectors/e2e.txt to:\nenvelope_alice_to_bob = {}",
            hex(&sealed.bytes)
        );
    }
    // And the recorded envelope still opens to the recorded message.
    let opened = Inbound::default()
        .open(parties(bob, alice), &unhex(&expected))
        .unwrap();
    assert_eq!(opened.content, msg);
    assert_eq!(decode(&unhex(&expected)).version, E2E_VERSION);
}

// ---- a malicious relay -------------------------------------------------------------------

#[test]
fn substituted_public_key_is_detected() {
    let [alice, bob, mallory] = users();
    // Alice pinned bob's key; the server later hands her mallory's key as "bob".
    let Seen::New(pin) = trust::observe(None, bob.id.public().der()) else {
        panic!()
    };
    let Seen::Changed { pin, .. } = trust::observe(Some(&pin), mallory.id.public().der()) else {
        panic!("substitution not detected")
    };
    assert!(!pin.usable());
    // Had alice no pin yet (first contact), the safety numbers would differ.
    let real = SafetyNumber::new(
        (&alice.name, alice.id.public()),
        (&bob.name, bob.id.public()),
    );
    let fake = SafetyNumber::new(
        (&alice.name, alice.id.public()),
        (&bob.name, mallory.id.public()),
    );
    assert_ne!(real, fake);
}

#[test]
fn forged_sender_stamp_is_rejected() {
    let [alice, bob, mallory] = users();
    let sealed = seal(&mut Outbound::default(), alice, bob, &text(1, "hi"), T0);
    // The server claims the envelope came from mallory.
    let as_if = Parties {
        me: &bob.id,
        my_name: &bob.name,
        peer_name: &mallory.name,
        peer: mallory.id.public(),
    };
    assert_eq!(
        Inbound::default().open(as_if, &sealed),
        Err(OpenError::SenderMismatch)
    );
    // Rewriting the envelope's sender to match the stamp: the offer names alice's key,
    // not mallory's pinned one; and claiming mallory's fingerprint breaks the signature.
    let mut env = decode(&sealed);
    env.sender = "mallory".into();
    assert_eq!(
        Inbound::default().open(as_if, &encode(&env)),
        Err(OpenError::SenderKeyMismatch)
    );
    env.offer.as_mut().unwrap().sender_fp = mallory.id.fingerprint().0;
    assert_eq!(
        Inbound::default().open(as_if, &encode(&env)),
        Err(OpenError::BadOfferSignature)
    );
}

#[test]
fn mallory_cannot_impersonate_alice_with_her_own_key() {
    let [alice, bob, mallory] = users();
    // Mallory seals as "alice" using her own identity key; bob checks alice's pinned key.
    let forged_sender = User {
        name: alice.name.clone(),
        id: mallory.id.clone(),
    };
    let sealed = seal(
        &mut Outbound::default(),
        &forged_sender,
        bob,
        &text(1, "I am alice"),
        T0,
    );
    assert_eq!(
        Inbound::default().open(parties(bob, alice), &sealed),
        Err(OpenError::SenderKeyMismatch)
    );
    // Even claiming alice's fingerprint, the signature can't verify.
    let mut env = decode(&sealed);
    env.offer.as_mut().unwrap().sender_fp = alice.id.fingerprint().0;
    assert_eq!(
        Inbound::default().open(parties(bob, alice), &encode(&env)),
        Err(OpenError::BadOfferSignature)
    );
}

#[test]
fn tampering_anywhere_is_rejected() {
    let [alice, bob, _] = users();
    let sealed = seal(&mut Outbound::default(), alice, bob, &text(1, "secret"), T0);
    let open = |bytes: &[u8]| Inbound::default().open(parties(bob, alice), bytes);

    let mut env = decode(&sealed);
    env.ciphertext[5] ^= 1;
    assert_eq!(open(&encode(&env)), Err(OpenError::Decrypt));

    let mut env = decode(&sealed);
    env.counter += 1; // AAD and nonce
    assert_eq!(open(&encode(&env)), Err(OpenError::Decrypt));

    let mut env = decode(&sealed);
    env.epoch ^= 1; // the offer's signature covers the epoch
    assert_eq!(open(&encode(&env)), Err(OpenError::BadOfferSignature));

    let mut env = decode(&sealed);
    env.offer.as_mut().unwrap().wrapped_key[0] ^= 1;
    assert_eq!(open(&encode(&env)), Err(OpenError::BadOfferSignature));

    let mut env = decode(&sealed);
    env.offer.as_mut().unwrap().signature[0] ^= 1;
    assert_eq!(open(&encode(&env)), Err(OpenError::BadOfferSignature));

    let mut env = decode(&sealed);
    env.offer.as_mut().unwrap().created_ms += 1;
    assert_eq!(open(&encode(&env)), Err(OpenError::BadOfferSignature));

    let mut env = decode(&sealed);
    env.version = 99;
    assert_eq!(open(&encode(&env)), Err(OpenError::UnsupportedVersion));

    assert_eq!(open(&sealed[..sealed.len() - 1]), Err(OpenError::Malformed));
    assert_eq!(open(b""), Err(OpenError::Malformed));
    assert!(open(&sealed).is_ok(), "the untouched envelope still opens");
}

#[test]
fn tampering_in_an_established_epoch_is_rejected_and_state_is_kept() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    inb.open(
        parties(bob, alice),
        &seal(&mut out, alice, bob, &text(0, "a"), T0),
    )
    .unwrap();
    let next = seal(&mut out, alice, bob, &text(1, "b"), T0);
    let mut env = decode(&next);
    env.offer = None; // the epoch is known: the offer is not needed
    env.ciphertext[0] ^= 0x80;
    assert_eq!(
        inb.open(parties(bob, alice), &encode(&env)),
        Err(OpenError::Decrypt)
    );
    // The failure changed nothing: the genuine message still opens.
    assert_eq!(
        inb.open(parties(bob, alice), &next).unwrap().content,
        text(1, "b")
    );
}

#[test]
fn replays_and_duplicates_are_rejected() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    let m0 = seal(&mut out, alice, bob, &text(0, "a"), T0);
    let m1 = seal(&mut out, alice, bob, &text(1, "b"), T0);
    let m2 = seal(&mut out, alice, bob, &text(2, "c"), T0);
    inb.open(parties(bob, alice), &m0).unwrap();
    assert_eq!(inb.open(parties(bob, alice), &m0), Err(OpenError::Replay));
    // Small reordering is tolerated, each message once.
    inb.open(parties(bob, alice), &m2).unwrap();
    inb.open(parties(bob, alice), &m1).unwrap();
    assert_eq!(inb.open(parties(bob, alice), &m1), Err(OpenError::Replay));
    assert_eq!(inb.open(parties(bob, alice), &m2), Err(OpenError::Replay));
}

#[test]
fn replayed_key_offers_are_refused_without_rsa_work_even_after_a_restart() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    let old = seal(&mut out, alice, bob, &text(0, "old epoch"), T0);
    inb.open(parties(bob, alice), &old).unwrap();
    out.rotate();
    let new = seal(&mut out, alice, bob, &text(1, "new epoch"), T0 + 10);
    inb.open(parties(bob, alice), &new).unwrap();
    // The relay replays the first message of the old epoch, offer and all: its key is
    // still held, so the replay window refuses it, before any RSA work.
    assert_eq!(
        inb.inspect(parties(bob, alice), &old).unwrap_err(),
        OpenError::Replay
    );
    // ... also after bob's client restarted from its persisted state.
    let mut restarted = Inbound::from_bytes(&inb.to_bytes()).unwrap();
    assert_eq!(
        restarted.open(parties(bob, alice), &old),
        Err(OpenError::Replay)
    );
    // Once the epoch is dropped (three newer ones used), its offer is remembered as retired.
    for n in 2..5 {
        out.rotate();
        let m = seal(&mut out, alice, bob, &text(n, "newer"), T0 + 10);
        restarted.open(parties(bob, alice), &m).unwrap();
    }
    assert_eq!(restarted.epochs().count(), ACTIVE_EPOCHS);
    let restarted = Inbound::from_bytes(&restarted.to_bytes()).unwrap();
    assert_eq!(
        restarted.inspect(parties(bob, alice), &old).unwrap_err(),
        OpenError::RetiredEpoch
    );
    // A message of that epoch without the offer: no key is held for it.
    let mut env = decode(&old);
    env.offer = None;
    assert_eq!(
        restarted
            .inspect(parties(bob, alice), &encode(&env))
            .unwrap_err(),
        OpenError::UnknownEpoch
    );
}

#[test]
fn a_restart_mid_epoch_keeps_opening_messages_without_the_offer() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    let first = seal(&mut out, alice, bob, &text(0, "one"), T0);
    let opened = inb.open(parties(bob, alice), &first).unwrap();
    // Bob's receipt makes alice stop attaching the offer.
    out.acknowledge(opened.epoch);
    let bytes = inb.to_bytes();
    drop(inb);
    let mut inb = Inbound::from_bytes(&bytes).unwrap();
    for n in 1..4 {
        let m = seal(&mut out, alice, bob, &text(n, "after restart"), T0);
        assert!(decode(&m).offer.is_none());
        assert_eq!(
            inb.open(parties(bob, alice), &m).unwrap().content,
            text(n, "after restart")
        );
    }
    assert_eq!(inb.newest_epoch(), Some(opened.epoch));
    // Damaged state is an error, never a panic.
    assert_eq!(Inbound::from_bytes(b"junk").unwrap_err(), StateError);
    let mut truncated = inb.to_bytes().to_vec();
    truncated.pop();
    assert!(Inbound::from_bytes(&truncated).is_err());
}

#[test]
fn offers_are_judged_by_identity_not_by_the_senders_clock() {
    let [alice, bob, _] = users();
    let mut inb = Inbound::default();
    // Alice's clock was two days ahead, then corrected (and her state reset).
    let two_days = 2 * 86_400_000;
    let ahead = seal(
        &mut Outbound::default(),
        alice,
        bob,
        &text(0, "from the future"),
        T0 + two_days,
    );
    inb.open(parties(bob, alice), &ahead).unwrap();
    let now = seal(
        &mut Outbound::default(),
        alice,
        bob,
        &text(1, "back to normal"),
        T0,
    );
    assert_eq!(
        inb.open(parties(bob, alice), &now).unwrap().content,
        text(1, "back to normal")
    );
}

#[test]
fn an_old_offer_replayed_never_displaces_the_epoch_in_use() {
    let [alice, bob, _] = users();
    let mut out = Outbound::default();
    let mut inb = Inbound::default();
    let old = seal(&mut out, alice, bob, &text(0, "old"), T0);
    out.rotate();
    let current_first = seal(&mut out, alice, bob, &text(1, "current"), T0);
    // The relay delivers the newer epoch first, then the older one (reordering).
    inb.open(parties(bob, alice), &current_first).unwrap();
    inb.open(parties(bob, alice), &old).unwrap();
    // The current epoch still opens its later messages, offer or not.
    let epoch = out.current_epoch().unwrap();
    out.acknowledge(epoch);
    let later = seal(&mut out, alice, bob, &text(2, "later"), T0);
    assert!(decode(&later).offer.is_none());
    assert_eq!(
        inb.open(parties(bob, alice), &later).unwrap().content,
        text(2, "later")
    );
}

#[test]
fn a_verified_offer_can_be_cached_so_its_replay_costs_no_rsa() {
    let [alice, bob, _] = users();
    let sealed = seal(&mut Outbound::default(), alice, bob, &text(0, "real"), T0);
    // An attacker keeps the (validly signed) offer and attaches junk ciphertext.
    let mut junk = decode(&sealed);
    junk.ciphertext = vec![0; junk.ciphertext.len()];
    let junk = encode(&junk);
    let mut inb = Inbound::default();
    let inspected = inb.inspect(parties(bob, alice), &junk).unwrap();
    let offer = *inspected.needs_unwrap().expect("a new offer");
    let key = unwrap_offer(parties(bob, alice), &inspected).unwrap();
    assert_eq!(key.offer_id(), &offer);
    let mut cache = std::collections::HashMap::from([(offer, key)]);
    // Every replay: inspect (a hash), the cached key, AES fails; state never changes.
    for _ in 0..3 {
        let inspected = inb.inspect(parties(bob, alice), &junk).unwrap();
        let cached = cache.get(inspected.needs_unwrap().unwrap());
        assert_eq!(
            inb.open_inspected(parties(bob, alice), inspected, cached)
                .unwrap_err(),
            OpenError::Decrypt
        );
        assert_eq!(inb.epochs().count(), 0);
    }
    // The real message still opens with the cached key.
    let inspected = inb.inspect(parties(bob, alice), &sealed).unwrap();
    let cached = cache.remove(inspected.needs_unwrap().unwrap());
    let opened = inb
        .open_inspected(parties(bob, alice), inspected, cached.as_ref())
        .unwrap();
    assert_eq!(opened.content, text(0, "real"));
}

#[test]
fn retry_requests_and_retiring_an_epoch() {
    let [alice, bob, _] = users();
    let mut a_out = Outbound::default();
    let mut b_out = Outbound::default();
    let mut a_in = Inbound::default();
    let m = seal(&mut a_out, alice, bob, &text(0, "lost"), T0);
    let lost_epoch = decode(&m).epoch;
    // Bob lost his state: he asks for the epoch again, on his own direction.
    let request = Content {
        id: [7; 16],
        sent_at_ms: T0,
        body: Body::RetryRequest {
            epochs: vec![lost_epoch],
        },
    };
    let sealed = seal(&mut b_out, bob, alice, &request, T0);
    let opened = a_in.open(parties(alice, bob), &sealed).unwrap();
    assert_eq!(opened.content, request);
    // A replay of the request is refused like any replay.
    assert_eq!(
        a_in.open(parties(alice, bob), &sealed),
        Err(OpenError::Replay)
    );
    assert!(a_out.retire(lost_epoch), "the current epoch ends");
    assert!(!a_out.retire(lost_epoch), "only once");
    let again = seal(&mut a_out, alice, bob, &text(0, "lost"), T0);
    let env = decode(&again);
    assert_ne!(env.epoch, lost_epoch);
    assert!(env.offer.is_some(), "a new epoch carries its offer");
}

#[test]
fn message_moved_to_another_recipient_is_rejected() {
    let [alice, bob, mallory] = users();
    let sealed = seal(
        &mut Outbound::default(),
        alice,
        bob,
        &text(0, "for bob"),
        T0,
    );
    // Delivered to mallory as is.
    assert_eq!(
        Inbound::default().open(parties(mallory, alice), &sealed),
        Err(OpenError::WrongRecipient)
    );
    // Readdressed to mallory: the signature covers the recipient.
    let mut env = decode(&sealed);
    env.recipient = "mallory".into();
    assert_eq!(
        Inbound::default().open(parties(mallory, alice), &encode(&env)),
        Err(OpenError::BadOfferSignature)
    );
}

#[test]
fn offer_for_an_old_key_of_ours_is_reported() {
    let [alice, bob, mallory] = users();
    // Alice wrapped to a key bob no longer has (bob re-registered as "mallory's key").
    let sealed = seal(&mut Outbound::default(), alice, bob, &text(0, "x"), T0);
    let bob_new = Parties {
        me: &mallory.id,
        my_name: &bob.name,
        peer_name: &alice.name,
        peer: alice.id.public(),
    };
    assert_eq!(
        Inbound::default().open(bob_new, &sealed),
        Err(OpenError::OfferNotForUs)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_open_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let [alice, bob, _] = users();
        prop_assert!(Inbound::default().open(parties(bob, alice), &bytes).is_err());
    }

    #[test]
    fn any_single_bit_flip_is_rejected(at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let [alice, bob, _] = users();
        static SEALED: OnceLock<Vec<u8>> = OnceLock::new();
        let sealed = SEALED.get_or_init(|| seal(&mut Outbound::default(), &users()[0], &users()[1], &text(0, "flip"), T0));
        let mut bytes = sealed.clone();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        // A flip may still decode to the same envelope (e.g. a non-canonical varint), but
        // it can never yield a message that was not sent.
        if let Ok(opened) = Inbound::default().open(parties(bob, alice), &bytes) {
            prop_assert_eq!(opened.content, text(0, "flip"));
        }
    }
}
