//! The bench's printed tables and its chart.

use std::path::Path;

use super::echo::Latency;
use super::throughput::Row;

/// Everything one `cargo xtask bench` run measured. Latencies are round trips in µs with
/// the share the relay shed; memory in bytes per idle authenticated connection.
pub struct Report<'a> {
    pub rows: &'a [Row],
    /// Offered msgs/s in the latency rows, and how it was chosen.
    pub load: (f64, &'a str),
    /// Offered msgs/s past saturation, and the relay's and Redis's latency there.
    /// Offered msg/s; the relay as configured, the relay with `shed_when_full: false`, Redis.
    pub overload: (f64, Latency, Latency, Latency),
    pub relay_lat: Latency,
    pub plain_lat: Latency,
    pub redis_lat: Latency,
    pub quiet_lat: Latency,
    pub attacked_lat: Latency,
    pub attacked_rss: f64,
    pub connections: usize,
    pub relay_conn: f64,
    pub plain_conn: f64,
    pub redis_conn: f64,
    /// (payload bytes, seal µs, open µs)
    pub crypto: &'a [(usize, f64, f64)],
    /// The client's outbox drained at each size (a small one first: the baseline).
    pub outbox: &'a [super::outbox::OutboxDrain],
    /// A text to a group, sender keys against pairwise 1:1.
    pub group: &'a super::group::GroupFigures,
    pub machine: &'a str,
}

/// The outbox drain rows, each against the first (smallest) as the baseline.
pub fn outbox_lines(drains: &[super::outbox::OutboxDrain]) {
    let Some(base) = drains.first() else {
        return;
    };
    println!();
    println!(
        "client outbox drain (texts queued at once to an offline contact, store passphrase on; timed until the relay accepted the last):"
    );
    println!(
        "| queued | seconds | µs per text | against {} queued |",
        base.queued
    );
    println!("|-------:|--------:|------------:|------:|");
    for d in drains {
        println!(
            "| {} | {:.2} | {:.0} | {:.2}× |",
            d.queued,
            d.seconds,
            d.us_per_message,
            d.us_per_message / base.us_per_message
        );
    }
}

/// Prints the run as Markdown tables (the form PERFORMANCE.md records).
pub fn print(r: &Report<'_>) {
    let (load_rate, load_basis) = r.load;
    println!("machine: {}", r.machine);
    println!("relay and Redis over TLS 1.3; \"no TLS\": the same relay code over plain TCP");
    println!();
    println!(
        "| pairs | payload | mode      | relay msg/s | relay MB/s | no TLS msg/s | TLS cost | Redis msg/s | Redis MB/s | relay/Redis |"
    );
    println!(
        "|------:|--------:|-----------|------------:|-----------:|-------------:|---------:|------------:|-----------:|------------:|"
    );
    for row in r.rows {
        println!(
            "| {:>5} | {:>5} B | {:<9} | {:>11.0} | {:>10.2} | {:>12.0} | {:>7.0} % | {:>11.0} | {:>10.2} | {:>11.2} |",
            row.pairs,
            row.payload,
            row.mode,
            row.relay.0,
            row.relay.1,
            row.relay_plain.0,
            (1.0 - row.relay.0 / row.relay_plain.0) * 100.0,
            row.redis.0,
            row.redis.1,
            row.relay.0 / row.redis.0
        );
    }
    println!();
    println!("latency, round trip A→B→A, 10 pairs, {load_rate:.0} msg/s offered ({load_basis}):");
    println!("| system | p50 µs | p99 µs | p99.9 µs | shed |");
    println!("|--------|-------:|-------:|---------:|-----:|");
    let line = |name: &str, l: &Latency| {
        println!(
            "| {name} | {:>6} | {:>6} | {:>8} | {:>5.1} % |",
            l.p50,
            l.p99,
            l.p999,
            l.shed * 100.0
        );
    };
    line("relay (TLS)", &r.relay_lat);
    line("relay (no TLS)", &r.plain_lat);
    line("Redis (TLS)", &r.redis_lat);
    let ratio = |redis: u64, relay: u64| redis as f64 / relay.max(1) as f64;
    let (redis, relay) = (&r.redis_lat, &r.relay_lat);
    println!(
        "| Redis/relay (≥ 1: relay faster) | {:.2} | {:.2} | {:.2} | |",
        ratio(redis.p50, relay.p50),
        ratio(redis.p99, relay.p99),
        ratio(redis.p999, relay.p999)
    );
    let (over_rate, relay_over, paced_over, redis_over) = &r.overload;
    println!();
    println!("overload, {over_rate:.0} msg/s offered (half the relay's best 10-pair row):");
    println!("| system | p50 µs | p99 µs | p99.9 µs | shed |");
    println!("|--------|-------:|-------:|---------:|-----:|");
    line("relay (TLS)", relay_over);
    line("relay (TLS), shed_when_full: false", paced_over);
    line("Redis (TLS)", redis_over);
    println!(
        "| relay p99 / Redis p99 (goal ≤ 2) | | {:.2} | | |",
        relay_over.p99 as f64 / redis_over.p99.max(1) as f64
    );
    println!(
        "| relay with shed_when_full: false, p99 / Redis p99 | | {:.2} | | |",
        paced_over.p99 as f64 / redis_over.p99.max(1) as f64
    );
    println!();
    println!("the same load, relay with per-connection limits on (10,000 tokens/s):");
    println!("| relay | p50 µs | p99 µs | p99.9 µs | shed |");
    println!("|-------|-------:|-------:|---------:|-----:|");
    line("quiet", &r.quiet_lat);
    line("under attack (Ack flood ×3, offer replay)", &r.attacked_lat);
    println!("relay RSS after the attack: {:.1} MB", r.attacked_rss / 1e6);
    println!();
    println!(
        "idle authenticated connections: {}; server memory per connection: relay (TLS) {:.0} B, \
         relay (no TLS) {:.0} B, Redis (TLS) {:.0} B",
        r.connections, r.relay_conn, r.plain_conn, r.redis_conn
    );
    println!();
    println!("client crypto per message (RSA-3072 identities, AES-256-GCM):");
    for (len, seal, open) in r.crypto {
        println!("  {len:>5} B: seal {seal:.1} µs, open {open:.1} µs");
    }
    outbox_lines(r.outbox);
    let g = r.group;
    println!();
    println!(
        "a {} B text to a group of {} ({} rounds; from send pressed to the last member's copy):",
        g.text_bytes, g.members, g.rounds
    );
    println!("| design | seal µs | upload bytes | last delivery p50 ms | max ms |");
    println!("|--------|--------:|-------------:|---------------------:|-------:|");
    for (name, d) in [
        ("sender keys: sealed once, one SendMany", &g.send_many),
        (
            "sender keys: sealed once, a Send per member",
            &g.sender_keys,
        ),
        ("pairwise 1:1: sealed per member (baseline)", &g.pairwise),
    ] {
        println!(
            "| {name} | {:.0} | {} | {:.1} | {:.1} |",
            d.seal_us, d.upload_bytes, d.last_delivery_ms[0], d.last_delivery_ms[1]
        );
    }
}

/// Writes the throughput chart (SVG): relay over TLS, relay without TLS, Redis over TLS.
pub fn chart(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .map(|r| r.relay.0.max(r.redis.0).max(r.relay_plain.0))
        .fold(1.0, f64::max)
        * 1.1;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{}p {}B {}", r.pairs, r.payload, &r.mode[..3]))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Messages/s delivered: relay TLS (blue), relay no TLS (grey), Redis pub/sub TLS (red)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| labels.get(x.floor() as usize).cloned().unwrap_or_default())
        .y_desc("messages/s")
        .draw()?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        let bars = [
            (r.relay.0, BLUE),
            (r.relay_plain.0, RGBColor(160, 160, 160)),
            (r.redis.0, RED),
        ];
        for (k, (value, colour)) in bars.into_iter().enumerate() {
            let left = x + 0.08 + k as f64 * 0.28;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(left, 0.0), (left + 0.26, value)],
                colour.filled(),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The CPU model, core count and memory of this machine, for the record.
pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM",
        mem as f64 / 1024.0 / 1024.0
    )
}
