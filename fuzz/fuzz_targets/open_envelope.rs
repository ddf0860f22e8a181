//! Attacker-controlled envelope bytes (a malicious relay) into `Inbound::open`: always an
//! error or a genuine message, never a panic. Mutations of a real envelope are seeded by
//! the corpus; the keys are fixed test vectors.
#![no_main]

use std::sync::OnceLock;

use chat_protocol::Username;
use chat_protocol::e2e::{Inbound, Parties};
use chat_protocol::identity::Identity;
use libfuzzer_sys::fuzz_target;

struct Keys {
    alice: Identity,
    bob: Identity,
    a: Username,
    b: Username,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        alice: Identity::from_pem(
            include_str!("../../chat-protocol/tests/vectors/alice.pem"),
            None,
        )
        .unwrap(),
        bob: Identity::from_pem(
            include_str!("../../chat-protocol/tests/vectors/bob.pem"),
            None,
        )
        .unwrap(),
        a: Username::parse("alice").unwrap(),
        b: Username::parse("bob").unwrap(),
    })
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    let parties = Parties {
        me: &k.bob,
        my_name: &k.b,
        peer_name: &k.a,
        peer: k.alice.public(),
    };
    let _ = Inbound::default().open(parties, data);
});
