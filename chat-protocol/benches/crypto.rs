//! Client-side crypto cost: `cargo bench -p chat-protocol --bench crypto`.
//!
//! Identity generation, key offer create/open (a message that starts an epoch) and
//! steady-state message seal/open at 100 B, 1 KiB and 16 KiB.

use chat_protocol::Username;
use chat_protocol::e2e::{Body, Content, Inbound, Outbound, Parties, RotationPolicy};
use chat_protocol::identity::Identity;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const NOW: u64 = 1_700_000_000_000;

fn content(len: usize) -> Content {
    Content {
        id: [7; 16],
        sent_at_ms: NOW,
        body: Body::Text("x".repeat(len)),
    }
}

fn benches(c: &mut Criterion) {
    let mut rng = rand::rng();
    let mut group = c.benchmark_group("identity");
    group.sample_size(10);
    group.bench_function("generate_rsa3072", |b| {
        b.iter(|| Identity::generate(&mut rng).unwrap())
    });
    group.finish();

    let alice = Identity::generate(&mut rng).unwrap();
    let bob = Identity::generate(&mut rng).unwrap();
    let (a, b) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
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

    let mut group = c.benchmark_group("key_offer");
    group.bench_function("create", |bench| {
        bench.iter(|| {
            Outbound::default()
                .seal(&mut rand::rng(), to_bob, &content(100), NOW, policy)
                .unwrap()
        })
    });
    let first = Outbound::default()
        .seal(&mut rand::rng(), to_bob, &content(100), NOW, policy)
        .unwrap();
    group.bench_function("open", |bench| {
        bench.iter(|| {
            Inbound::default()
                .open(from_alice, black_box(&first.bytes))
                .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("message");
    for len in [100, 1024, 16 * 1024] {
        let msg = content(len);
        group.throughput(Throughput::Bytes(len as u64));
        let mut out = Outbound::default();
        let mut inb = Inbound::default();
        let first = out
            .seal(&mut rand::rng(), to_bob, &msg, NOW, policy)
            .unwrap();
        inb.open(from_alice, &first.bytes).unwrap();
        out.acknowledge(first.epoch);
        group.bench_function(format!("seal_{len}B"), |bench| {
            bench.iter(|| {
                out.seal(&mut rand::rng(), to_bob, black_box(&msg), NOW, policy)
                    .unwrap()
            })
        });
        group.bench_function(format!("open_{len}B"), |bench| {
            bench.iter_batched(
                || {
                    out.seal(&mut rand::rng(), to_bob, &msg, NOW, policy)
                        .unwrap()
                        .bytes
                },
                |bytes| inb.open(from_alice, &bytes).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(crypto, benches);
criterion_main!(crypto);
