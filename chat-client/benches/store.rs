//! What encryption at rest costs the client store: committing a received message (one
//! transaction, fsync'd) and loading a conversation, plain vs encrypted (per-value
//! AES-256-GCM, see `store::cipher`). Run: `cargo bench -p chat-client --bench store`.

use std::time::Duration;

use chat_client::store::{ReceivedText, RowCipher, Store};
use chat_protocol::e2e::Inbound;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use zeroize::Zeroizing;

fn open(dir: &std::path::Path, encrypt: bool) -> Store {
    Store::open(dir, RowCipher::new(Zeroizing::new([9; 32]), encrypt)).unwrap()
}

fn text() -> String {
    "A typical chat message of about a hundred bytes, give or take a few words here.".repeat(2)
}

fn store(c: &mut Criterion) {
    let state = Inbound::default();
    let body = text();
    let mut group = c.benchmark_group("client store");
    group.measurement_time(Duration::from_secs(5));
    for encrypt in [false, true] {
        let label = if encrypt { "encrypted" } else { "plain" };
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), encrypt);
        let mut n: u128 = 0;
        group.bench_function(BenchmarkId::new("commit a received text", label), |b| {
            b.iter(|| {
                n += 1;
                let id = n.to_be_bytes();
                let msg = ReceivedText {
                    peer: "bob",
                    id: &id,
                    text: &body,
                    sent_at: 1,
                    stored_at: n as u64,
                };
                store.commit_text(msg, &state, None).unwrap()
            })
        });
        // A conversation of 1000 messages, loaded as the window does when opening it.
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), encrypt);
        for n in 0..1000u128 {
            let id = n.to_be_bytes();
            let msg = ReceivedText {
                peer: "amy",
                id: &id,
                text: &body,
                sent_at: 1,
                stored_at: n as u64,
            };
            store.commit_text(msg, &state, None).unwrap();
        }
        group.bench_function(BenchmarkId::new("load 1000 messages", label), |b| {
            b.iter(|| store.history("amy", 10_000).unwrap().len())
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
