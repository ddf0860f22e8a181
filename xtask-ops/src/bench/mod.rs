//! `cargo xtask bench`: the release relay against Redis pub/sub on this machine, loopback
//! only. Prints a table and writes `target/bench/bench.json` and `target/bench/throughput.svg`.

mod attack;
mod load;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use load::Counter;
use xtask::procs::Processes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run (under 30 s): fewer rows, 1,000 connections
    #[arg(long)]
    quick: bool,
    /// Idle connections for the memory test (default 10,000; 1,000 with --quick)
    #[arg(long)]
    connections: Option<usize>,
    /// Messages/s offered in the latency test (default: half the relay's best 10-pair
    /// throughput)
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Where the JSON and the chart go (default target/bench)
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One throughput row, for both systems.
struct Row {
    pairs: usize,
    payload: usize,
    mode: &'static str,
    relay: (f64, f64),
    redis: (f64, f64),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Room for 10,000+ connections on both ends (children inherit the limit).
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    // Above the hard limit only with privilege (root, CAP_SYS_RESOURCE); else the hard limit.
    let want = 1 << 20;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want).is_err() {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).ok();
    }
    let fds = rlimit::getrlimit(rlimit::Resource::NOFILE)?.0;
    eprintln!("fd limit {soft} -> {fds}");

    let bin = xtask::build_binaries(&["chat-server"], true)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| xtask::target_dir().join("bench"));
    std::fs::create_dir_all(&out)?;
    let data = tempfile::tempdir()?;
    let mut procs = Processes::default();
    let relay = start_relay(&mut procs, &bin, data.path())?;
    let redis = start_redis(&mut procs)?;
    let rt = tokio::runtime::Runtime::new()?;
    // One 2048-bit key signs every bench login (accounts are per name, not per key).
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    let (run_for, pair_counts, payloads): (Duration, &[usize], &[usize]) = if args.quick {
        (Duration::from_millis(1000), &[1, 10], &[256])
    } else {
        (Duration::from_secs(3), &[1, 10, 100], &[256, 1024])
    };

    let mut rows = Vec::new();
    let mut tag = 0;
    for &payload in payloads {
        for &pairs in pair_counts {
            for (mode, window) in [("acked", 1), ("pipelined", 64)] {
                tag += 1;
                let pattern = load::Pattern {
                    tag: format!("t{tag}"),
                    pairs,
                    payload,
                    window,
                };
                let relay_rate = rt.block_on(measure(run_for, |c, s| {
                    let (addr, key, p) = (relay.addr.clone(), key.clone(), pattern.clone());
                    async move { load::relay_pairs(&addr, &key, p, c, s).await }
                }))?;
                let redis_rate = rt.block_on(measure(run_for, |c, s| {
                    let (url, p) = (redis.url.clone(), pattern.clone());
                    async move { load::redis_pairs(&url, p, c, s).await }
                }))?;
                let row = Row {
                    pairs,
                    payload,
                    mode,
                    relay: relay_rate,
                    redis: redis_rate,
                };
                eprintln!(
                    "throughput {pairs:>3} pairs {payload:>4} B {mode:<9}: relay {:>9.0} msg/s, redis {:>9.0} msg/s",
                    row.relay.0, row.redis.0
                );
                rows.push(row);
            }
        }
    }

    // Latency at half the relay's peak (its best pipelined 10-pair row), the same offered
    // load for both systems.
    let payload = payloads[0];
    let peak = rows
        .iter()
        .filter(|r| r.payload == payload && r.pairs == 10)
        .map(|r| r.relay.0)
        .fold(0.0, f64::max);
    let load_rate = args.latency_rate.unwrap_or(peak / 2.0).max(20.0);
    let load_basis = if args.latency_rate.is_some() {
        "as asked"
    } else {
        "50 % of the relay's peak"
    };
    let pairs = 10;
    // Each round trip is two messages.
    let per_pair = load_rate / 2.0 / pairs as f64;
    let latency_run = if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let relay_lat = percentiles(rt.block_on(load::relay_echo(
        &relay.addr,
        &key,
        "lat",
        pairs,
        payload,
        per_pair,
        latency_run,
    ))?);
    let redis_lat = percentiles(rt.block_on(load::redis_echo(
        &redis.url,
        "lat",
        pairs,
        payload,
        per_pair,
        latency_run,
    ))?);
    eprintln!("latency at {load_rate:.0} msg/s: relay {relay_lat:?} µs, redis {redis_lat:?} µs");

    // The same load on a relay with per-connection limits on, quiet and then with an Ack
    // flood and an offer replay running (see `attack`).
    let data3 = tempfile::tempdir()?;
    let guarded = start_relay_guarded(&mut procs, &bin, data3.path())?;
    let echo = |tag: &'static str| {
        load::relay_echo(
            &guarded.addr,
            &key,
            tag,
            pairs,
            payload,
            per_pair,
            latency_run,
        )
    };
    let quiet_lat = percentiles(rt.block_on(echo("q"))?);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = rt.block_on(attack::start(&guarded.addr, &key, stop.clone()))?;
    let attacked_lat = percentiles(rt.block_on(echo("u"))?);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for t in attack {
            t.abort();
        }
    });
    let attacked_rss = rss_bytes(guarded.pid)?;
    eprintln!(
        "latency at {load_rate:.0} msg/s with limits on: quiet {quiet_lat:?} µs, under attack {attacked_lat:?} µs"
    );

    // Idle connections: a fresh relay and the same Redis, RSS before and after.
    let n = args
        .connections
        .unwrap_or(if args.quick { 1000 } else { 10_000 });
    let data2 = tempfile::tempdir()?;
    let relay2 = start_relay(&mut procs, &bin, data2.path())?;
    let relay_conn = rt.block_on(relay_connections(&relay2, &key, n))?;
    let redis_conn = rt.block_on(redis_connections(&redis, n))?;
    eprintln!("idle connections: relay {relay_conn:.0} B each, redis {redis_conn:.0} B each");

    let crypto = crypto_cost(payloads)?;

    let machine = machine();
    report(
        &rows,
        (load_rate, load_basis),
        &relay_lat,
        &redis_lat,
        (&quiet_lat, &attacked_lat, attacked_rss),
        n,
        relay_conn,
        redis_conn,
        &crypto,
        &machine,
    );
    let json = json!({
        "machine": machine,
        "quick": args.quick,
        "seconds_per_row": run_for.as_secs_f64(),
        "throughput": rows.iter().map(|r| json!({
            "pairs": r.pairs, "payload": r.payload, "mode": r.mode,
            "relay_msgs_per_s": r.relay.0, "relay_mb_per_s": r.relay.1,
            "redis_msgs_per_s": r.redis.0, "redis_mb_per_s": r.redis.1,
            "ratio": r.relay.0 / r.redis.0,
        })).collect::<Vec<_>>(),
        "latency": {
            "offered_msgs_per_s": load_rate, "pairs": pairs, "payload": payload,
            "relay_us": {"p50": relay_lat[0], "p99": relay_lat[1], "p999": relay_lat[2]},
            "redis_us": {"p50": redis_lat[0], "p99": redis_lat[1], "p999": redis_lat[2]},
            "relay_limits_on_quiet_us": {"p50": quiet_lat[0], "p99": quiet_lat[1], "p999": quiet_lat[2]},
            "relay_under_attack_us": {"p50": attacked_lat[0], "p99": attacked_lat[1], "p999": attacked_lat[2]},
            "relay_under_attack_rss_bytes": attacked_rss,
        },
        "connections": {"count": n, "relay_bytes_each": relay_conn, "redis_bytes_each": redis_conn},
        "crypto_us": crypto.iter().map(|(len, seal, open)| json!({"payload": len, "seal": seal, "open": open})).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&json)?)?;
    chart(&rows, &out.join("throughput.svg"))?;
    println!(
        "wrote {} and {}",
        out.join("bench.json").display(),
        out.join("throughput.svg").display()
    );
    Ok(())
}

/// Starts the load, measures deliveries over `run_for` after a short warm-up, stops it.
/// Returns (messages/s, MB/s).
async fn measure<F, Fut>(run_for: Duration, start: F) -> anyhow::Result<(f64, f64)>
where
    F: FnOnce(Arc<Counter>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>,
{
    let counter = Arc::new(Counter::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start(counter.clone(), stop.clone()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    counter.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(run_for).await;
    counter.measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let msgs = counter.messages.load(Ordering::Relaxed) as f64 / secs;
    let mb = counter.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6;
    Ok((msgs, mb))
}

fn percentiles(mut samples: Vec<u64>) -> [u64; 3] {
    if samples.is_empty() {
        return [0; 3];
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    [at(0.50), at(0.99), at(0.999)]
}

struct Relay {
    addr: String,
    pid: u32,
}

fn start_relay(procs: &mut Processes, bin: &Path, data: &Path) -> anyhow::Result<Relay> {
    // Bench settings: no rate limit and room for every connection and account (the load
    // comes from a few addresses); otherwise as shipped.
    start_relay_config(
        procs,
        bin,
        data,
        "(max_connections: 120000, rate_limit: (per_second: 100000000.0, burst: 100000000.0), \
         login_timeout_secs: 120.0, pre_login: (max_connections: 120000, max_per_address: 120000), \
         connect_rate: (per_second: 1000000.0, burst: 1000000.0), \
         registrations: (per_hour: 100000000.0, burst: 100000000.0))",
    )
}

/// A relay with per-connection rate limits on (high enough for the echo pairs' load,
/// 5000 tokens/s each), for the quiet and under-attack latency rows.
fn start_relay_guarded(procs: &mut Processes, bin: &Path, data: &Path) -> anyhow::Result<Relay> {
    start_relay_config(
        procs,
        bin,
        data,
        "(rate_limit: (per_second: 5000.0, burst: 10000.0), \
         registrations: (per_hour: 100000.0, burst: 100000.0))",
    )
}

fn start_relay_config(
    procs: &mut Processes,
    bin: &Path,
    data: &Path,
    ron: &str,
) -> anyhow::Result<Relay> {
    let config = data.join("bench.ron");
    std::fs::write(&config, ron)?;
    let addr = procs.start_relay_with(bin, data, &["--config", config.to_str().unwrap()])?;
    let pid = procs.last_pid();
    Ok(Relay { addr, pid })
}

struct Redis {
    url: String,
    pid: u32,
}

fn start_redis(procs: &mut Processes) -> anyhow::Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    procs
        .spawn(
            Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--maxclients", "120000", "--protected-mode", "yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("redis-server is needed for the baseline (apt install redis-server)")?;
    let pid = procs.last_pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Redis {
        url: format!("redis://127.0.0.1:{port}/"),
        pid,
    })
}

fn rss_bytes(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024.0)
}

/// Source addresses for connection `i`: 20,000 per loopback address (ports run out at ~28k).
fn source(i: usize) -> [u8; 4] {
    [127, 0, 0, 1 + (i / 20_000) as u8]
}

async fn relay_connections(relay: &Relay, key: &rsa::PrivateKey, n: usize) -> anyhow::Result<f64> {
    let before = rss_bytes(relay.pid)?;
    let mut conns = Vec::with_capacity(n);
    let mut logins = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..n {
        let (addr, key, sem) = (relay.addr.clone(), key.clone(), sem.clone());
        logins.spawn(async move {
            let _p = sem.acquire().await;
            load::relay_login(&addr, &format!("idle{i}"), &key, Some(source(i))).await
        });
    }
    while let Some(conn) = logins.join_next().await {
        conns.push(conn??);
    }
    // Let the server settle (blocking-pool threads, allocator) before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(relay.pid)?;
    drop(conns);
    Ok((after - before) / n as f64)
}

async fn redis_connections(redis: &Redis, n: usize) -> anyhow::Result<f64> {
    let before = rss_bytes(redis.pid)?;
    let port: u16 = redis
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::from(source(i)), 0).into())?;
        let mut s = socket.connect(([127, 0, 0, 1], port).into()).await?;
        // One command so the server has set the client up, as a logged-in relay client.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(redis.pid)?;
    Ok((after - before) / n as f64)
}

/// Client-side seal and open per message, in microseconds, with RSA-3072 identities.
fn crypto_cost(payloads: &[usize]) -> anyhow::Result<Vec<(usize, f64, f64)>> {
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

fn machine() -> String {
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

#[allow(clippy::too_many_arguments)]
fn report(
    rows: &[Row],
    (load_rate, load_basis): (f64, &str),
    relay_lat: &[u64; 3],
    redis_lat: &[u64; 3],
    (quiet, attacked, attacked_rss): (&[u64; 3], &[u64; 3], f64),
    n: usize,
    relay_conn: f64,
    redis_conn: f64,
    crypto: &[(usize, f64, f64)],
    machine: &str,
) {
    println!("machine: {machine}");
    println!();
    println!(
        "| pairs | payload | mode      | relay msg/s | relay MB/s | Redis msg/s | Redis MB/s | relay/Redis |"
    );
    println!(
        "|------:|--------:|-----------|------------:|-----------:|------------:|-----------:|------------:|"
    );
    for r in rows {
        println!(
            "| {:>5} | {:>5} B | {:<9} | {:>11.0} | {:>10.2} | {:>11.0} | {:>10.2} | {:>11.2} |",
            r.pairs,
            r.payload,
            r.mode,
            r.relay.0,
            r.relay.1,
            r.redis.0,
            r.redis.1,
            r.relay.0 / r.redis.0
        );
    }
    println!();
    println!("latency, round trip A→B→A, 10 pairs, {load_rate:.0} msg/s offered ({load_basis}):");
    println!("| system | p50 µs | p99 µs | p99.9 µs |");
    println!("|--------|-------:|-------:|---------:|");
    println!(
        "| relay  | {:>6} | {:>6} | {:>8} |",
        relay_lat[0], relay_lat[1], relay_lat[2]
    );
    println!(
        "| Redis  | {:>6} | {:>6} | {:>8} |",
        redis_lat[0], redis_lat[1], redis_lat[2]
    );
    let ratio = |i: usize| redis_lat[i] as f64 / relay_lat[i].max(1) as f64;
    println!(
        "| Redis/relay (≥ 1: relay faster) | {:.2} | {:.2} | {:.2} |",
        ratio(0),
        ratio(1),
        ratio(2)
    );
    println!();
    println!("the same load, relay with per-connection limits on (5000 tokens/s):");
    println!("| relay | p50 µs | p99 µs | p99.9 µs |");
    println!("|-------|-------:|-------:|---------:|");
    println!(
        "| quiet | {:>6} | {:>6} | {:>8} |",
        quiet[0], quiet[1], quiet[2]
    );
    println!(
        "| under attack (Ack flood ×3, offer replay) | {:>6} | {:>6} | {:>8} |",
        attacked[0], attacked[1], attacked[2]
    );
    println!("relay RSS after the attack: {:.1} MB", attacked_rss / 1e6);
    println!();
    println!(
        "idle authenticated connections: {n}; server memory per connection: relay {:.0} B, Redis {:.0} B",
        relay_conn, redis_conn
    );
    println!();
    println!("client crypto per message (RSA-3072 identities, AES-256-GCM):");
    for (len, seal, open) in crypto {
        println!("  {len:>5} B: seal {seal:.1} µs, open {open:.1} µs");
    }
}

fn chart(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .map(|r| r.relay.0.max(r.redis.0))
        .fold(1.0, f64::max)
        * 1.1;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{}p {}B {}", r.pairs, r.payload, &r.mode[..3]))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Messages/s delivered: relay (blue) vs Redis pub/sub (red)",
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
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.1, 0.0), (x + 0.48, r.relay.0)],
            BLUE.filled(),
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.52, 0.0), (x + 0.9, r.redis.0)],
            RED.filled(),
        )))?;
    }
    root.present()?;
    Ok(())
}
