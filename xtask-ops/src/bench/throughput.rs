//! The throughput rows: N sender→receiver pairs per system, acked or pipelined, on the
//! relay over TLS, the same relay without TLS and Redis over TLS, one after another.

use std::time::Duration;

use super::load::{self, measure};
use super::servers::{Redis, Relay};

/// One throughput row, for the three systems: (messages/s, MB/s) each.
pub(super) struct Row {
    pub pairs: usize,
    pub payload: usize,
    pub mode: &'static str,
    /// The relay over TLS.
    pub relay: (f64, f64),
    /// The same relay code without TLS (the benchmark-only binary).
    pub relay_plain: (f64, f64),
    /// Redis over TLS.
    pub redis: (f64, f64),
}

/// Which rows to run: every combination of the lists, each row `run_for` long per system.
pub(super) struct Plan<'a> {
    pub run_for: Duration,
    pub pair_counts: &'a [usize],
    pub payloads: &'a [usize],
    /// `acked` (one send in flight per sender) and/or `pipelined` (64 in flight).
    pub modes: &'a [&'static str],
}

/// Sends in flight per sender in a mode: `acked` 1, `pipelined` 64.
fn window_of(mode: &str) -> usize {
    if mode == "acked" { 1 } else { 64 }
}

/// Runs the rows of `plan`, printing each as it is measured. Each row (and system) has
/// its own accounts, so no backlog of an earlier row is delivered in a later one.
pub(super) fn rows(
    rt: &tokio::runtime::Runtime,
    key: &rsa::PrivateKey,
    (relay, relay_plain, redis): (&Relay, &Relay, &Redis),
    plan: &Plan<'_>,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut tag = 0;
    for &payload in plan.payloads {
        for &pairs in plan.pair_counts {
            for &mode in plan.modes {
                tag += 1;
                let pattern = load::Pattern {
                    tag: format!("t{tag}"),
                    pairs,
                    payload,
                    window: window_of(mode),
                };
                let relay_rate = rt.block_on(measure(plan.run_for, |c, s| {
                    let (addr, key, p) = (relay.addr.clone(), key.clone(), pattern.clone());
                    async move { load::relay_pairs(&addr, &key, p, c, s).await }
                }))?;
                let plain_rate = rt.block_on(measure(plan.run_for, |c, s| {
                    let (addr, key, p) = (relay_plain.addr.clone(), key.clone(), pattern.clone());
                    async move { load::relay_pairs(&addr, &key, p, c, s).await }
                }))?;
                let redis_rate = rt.block_on(measure(plan.run_for, |c, s| {
                    let (url, p) = (redis.url.clone(), pattern.clone());
                    async move { load::redis_pairs(&url, p, c, s).await }
                }))?;
                let row = Row {
                    pairs,
                    payload,
                    mode,
                    relay: relay_rate,
                    relay_plain: plain_rate,
                    redis: redis_rate,
                };
                eprintln!(
                    "throughput {pairs:>3} pairs {payload:>4} B {mode:<9}: relay {:>9.0} msg/s (no TLS {:>9.0}), redis {:>9.0} msg/s, relay/Redis {:.2}",
                    row.relay.0,
                    row.relay_plain.0,
                    row.redis.0,
                    row.relay.0 / row.redis.0
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}
