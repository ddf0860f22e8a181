//! The client's seal and open cost per message, the client half of the bench.

use std::time::Instant;

/// Client-side seal and open per message, in microseconds, with RSA-3072 identities.
pub(super) fn crypto_cost(payloads: &[usize]) -> anyhow::Result<Vec<(usize, f64, f64)>> {
    use chat_protocol::Username;
    use chat_protocol::e2e::{Body, Content, Inbound, Outbound, Parties, RotationPolicy};
    use chat_protocol::identity::Identity;
    let mut rng = rand::rng();
    let alice = Identity::generate(&mut rng)?;
    let bob = Identity::generate(&mut rng)?;
    let (a, b) = (Username::parse("alice")?, Username::parse("bob")?);
    let to_bob = Parties {
        me: &alice,
        my_name: &a,
        peer_name: &b,
        peer: bob.public(),
    };
    let from_alice = Parties {
        me: &bob,
        my_name: &b,
        peer_name: &a,
        peer: alice.public(),
    };
    let policy = RotationPolicy {
        max_messages: u64::MAX,
        max_age_ms: u64::MAX,
    };
    let mut results = Vec::new();
    for &len in payloads {
        let content = Content {
            id: [7; 16],
            sent_at_ms: 1,
            body: Body::Text("x".repeat(len)),
        };
        let (mut out, mut inb) = (Outbound::default(), Inbound::default());
        let first = out.seal(&mut rng, to_bob, &content, 1, policy)?;
        inb.open(from_alice, &first.bytes)?;
        out.acknowledge(first.epoch);
        let n = 5000;
        let t = Instant::now();
        let sealed: Vec<_> = (0..n)
            .map(|_| {
                out.seal(&mut rand::rng(), to_bob, &content, 1, policy)
                    .map(|s| s.bytes)
            })
            .collect::<Result<_, _>>()?;
        let seal = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        let t = Instant::now();
        for bytes in &sealed {
            inb.open(from_alice, bytes)?;
        }
        let open = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        results.push((len, seal, open));
    }
    Ok(results)
}
