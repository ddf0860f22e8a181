//! `cargo xtask bench`: the release relay against Redis pub/sub on this machine, loopback
//! only. Prints a table and writes `target/bench/bench.json` and `target/bench/throughput.svg`.

mod attack;
mod cluster;
mod crowd;
mod crypto;
mod echo;
mod group;
mod idle;
mod load;
mod outbox;
mod report;
mod servers;
mod throughput;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

pub use crowd::{IdleWorkerArgs, idle_worker};
use idle::{connections_only, redis_connections, relay_connections, source};
use load::window;
use servers::{
    BENCH_CONFIG, RELAY_SET, Redis, bench_config, build_plaintext_relay, rss_bytes, settle,
    start_redis, start_relay, start_relay_config, start_relay_exe, start_relay_guarded,
};
use xtask::procs::Processes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run (about a minute plus builds): fewer rows, 1,000 connections
    #[arg(long)]
    quick: bool,
    /// Idle connections for the memory test (default 10,000; 1,000 with --quick)
    #[arg(long)]
    connections: Option<usize>,
    /// Only the memory test: N idle authenticated connections to the relay over TLS, to
    /// the relay without TLS and to Redis over TLS, all held open at once per system
    /// (e.g. `--connections-only --connections 100000`); writes bench-connections.json.
    ///
    /// With `--backend nats`: the connections are spread over as many relays of one
    /// cluster (three NATS nodes) as `--per-process` needs, each relay's share held by a
    /// load process of its own, so N may pass one process's fd limit (e.g.
    /// `--connections-only --backend nats --connections 100000`); writes
    /// bench-cluster-connections.json
    #[arg(long)]
    connections_only: bool,
    /// With `--connections-only --backend nats`: the most connections one relay, and one
    /// load process, holds (default: the fd limit less 1,000, at most 120,000)
    #[arg(long, requires = "connections_only")]
    per_process: Option<usize>,
    /// Only the client's outbox drain: texts queued at once (200 and 20,000; 100 and 2,000
    /// with --quick) handed to a relay of its own, µs per text at each size
    #[arg(long)]
    outbox_only: bool,
    /// Messages/s offered in the latency test (default 50,000, the load issue #20's latency
    /// goal is stated at); the overload rows offer half the relay's best 10-pair throughput
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Only the echo latency test at `--latency-rate` (default 50,000 msg/s), on the relay
    /// over TLS, the relay without TLS and Redis over TLS, `--repeat` times each (for A/B
    /// runs of one setting: the overload rate is unstable run to run)
    #[arg(long)]
    echo_only: bool,
    /// Runs of each system with `--echo-only`
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Extra top-level fields of the relay's RON configuration for this run, on top of
    /// the bench settings (e.g. `--relay-set 'queue: (live_grace_secs: 0.1)'`)
    #[arg(long)]
    relay_set: Option<String>,
    /// Where the JSON and the chart go (default target/bench)
    #[arg(long)]
    out: Option<PathBuf>,
    /// `sqlite`: the relay against Redis (the default). `nats`: the cluster backend (1
    /// relay on 1 NATS node, 2 relays on 3 nodes) beside SQLite and Redis, with CPU time
    /// per message; writes bench-cluster.json
    #[arg(long, value_enum, default_value_t = BenchBackend::Sqlite)]
    backend: BenchBackend,
    /// Only the throughput rows (all of a full run's, or `--quick`'s), narrowed by
    /// `--pairs`, `--payload` and `--mode`, each `--seconds` long per system (for
    /// profiling one row: the relay's pid is printed)
    #[arg(long)]
    throughput_only: bool,
    /// With `--throughput-only`: only rows with this many sender→receiver pairs
    #[arg(long)]
    pairs: Option<usize>,
    /// With `--throughput-only`: only rows with this payload size, bytes
    #[arg(long)]
    payload: Option<usize>,
    /// With `--throughput-only`: only `acked` or only `pipelined` rows
    #[arg(long, value_parser = ["acked", "pipelined"])]
    mode: Option<String>,
    /// With `--throughput-only`: seconds each row runs per system (default 3; 1 with `--quick`)
    #[arg(long)]
    seconds: Option<f64>,
}

/// Which backend `cargo xtask bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    Sqlite,
    Nats,
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
    if args.backend == BenchBackend::Nats {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| xtask::target_dir().join("bench"));
        std::fs::create_dir_all(&out)?;
        if args.connections_only {
            let n = args.connections.unwrap_or(10_000);
            return crowd::run(n, args.per_process, &out);
        }
        return cluster::run(args.quick, &out);
    }

    // The redis client's rustls takes the process-wide provider: the relay's (ring).
    let _ =
        rustls::crypto::CryptoProvider::install_default((*chat_protocol::tls::provider()).clone());
    // The relay, and the headless client for the outbox drain.
    let bin = xtask::build_binaries(&["chat-server", "chat-client"], true)?;
    let plain_exe = build_plaintext_relay()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| xtask::target_dir().join("bench"));
    std::fs::create_dir_all(&out)?;
    let data = tempfile::tempdir()?;
    let mut procs = Processes::default();
    let rt = tokio::runtime::Runtime::new()?;
    // One 2048-bit key signs every bench login (accounts are per name, not per key).
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    if args.connections_only {
        let n = args.connections.unwrap_or(10_000);
        return connections_only(&rt, &mut procs, (&bin, &plain_exe), &key, n, &out);
    }
    let outbox_sizes: &[usize] = if args.quick {
        &[100, 2000]
    } else {
        &[200, 20_000]
    };
    if args.outbox_only {
        let drains = outbox::measure(&bin, outbox_sizes)?;
        report::outbox_lines(&drains);
        return Ok(());
    }
    if let Some(extra) = &args.relay_set {
        let _ = RELAY_SET.set(extra.clone());
    }
    let relay = start_relay(&mut procs, &bin, data.path())?;
    let data_plain = tempfile::tempdir()?;
    let relay_plain = start_relay_exe(&mut procs, &plain_exe, data_plain.path())?;
    let redis = start_redis(&mut procs)?;
    if args.echo_only {
        let rate = args.latency_rate.unwrap_or(50_000.0).max(20.0);
        let systems = [
            ("relay", Some(&relay.addr)),
            ("no TLS", Some(&relay_plain.addr)),
            ("redis", None),
        ];
        for run in 1..=args.repeat.max(1) {
            for (name, addr) in systems {
                // Each run its own accounts, so no backlog of an earlier one is delivered.
                let tag = format!("e{run}");
                let per_pair = rate / 2.0 / 10.0;
                let lat = match addr {
                    Some(addr) => rt.block_on(echo::relay_echo(
                        addr,
                        &key,
                        &tag,
                        10,
                        256,
                        per_pair,
                        Duration::from_secs(5),
                    )),
                    None => rt.block_on(echo::redis_echo(
                        &redis.url,
                        &tag,
                        10,
                        256,
                        per_pair,
                        Duration::from_secs(5),
                    )),
                }?
                .latency();
                println!("echo run {run}, {rate:.0} msg/s offered: {name:<6} {lat:?} µs");
                // The next run starts on a quiet machine, not beside this one's backlog.
                settle(&[relay.pid, relay_plain.pid, redis.pid])?;
            }
        }
        return Ok(());
    }
    let (run_for, pair_counts, payloads): (Duration, &[usize], &[usize]) = if args.quick {
        (Duration::from_millis(1000), &[1, 10], &[256])
    } else {
        (Duration::from_secs(3), &[1, 10, 100], &[256, 1024])
    };
    let modes: &[&'static str] = &["acked", "pipelined"];
    if args.throughput_only {
        eprintln!(
            "relay over TLS pid {}, without TLS pid {}, redis pid {}",
            relay.pid, relay_plain.pid, redis.pid
        );
        let pick = |all: &[usize], one: Option<usize>| match one {
            Some(n) => vec![n],
            None => all.to_vec(),
        };
        let modes: Vec<&'static str> = match args.mode.as_deref() {
            Some(m) => modes.iter().copied().filter(|x| *x == m).collect(),
            None => modes.to_vec(),
        };
        let plan = throughput::Plan {
            run_for: args.seconds.map_or(run_for, Duration::from_secs_f64),
            pair_counts: &pick(pair_counts, args.pairs),
            payloads: &pick(payloads, args.payload),
            modes: &modes,
        };
        throughput::rows(&rt, &key, (&relay, &relay_plain, &redis), &plan)?;
        return Ok(());
    }
    let plan = throughput::Plan {
        run_for,
        pair_counts,
        payloads,
        modes,
    };
    let rows = throughput::rows(&rt, &key, (&relay, &relay_plain, &redis), &plan)?;

    // Latency at 50,000 msg/s (or as asked), the same offered load for both systems; then
    // overload: half the relay's peak (its best pipelined 10-pair row), far past what the
    // echo pattern (a write per message at both ends) sustains on this machine.
    let payload = payloads[0];
    let peak = rows
        .iter()
        .filter(|r| r.payload == payload && r.pairs == 10)
        .map(|r| r.relay.0)
        .fold(0.0, f64::max);
    let load_rate = args.latency_rate.unwrap_or(50_000.0).max(20.0);
    let load_basis = if args.latency_rate.is_some() {
        "as asked"
    } else {
        "the issue's 50k msg/s"
    };
    let overload_rate = (peak / 2.0).max(20.0);
    let pairs = 10;
    // Each round trip is two messages.
    let per_pair = load_rate / 2.0 / pairs as f64;
    let latency_run = if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let relay_echo = |addr: &str, tag: &str, per_pair: f64| {
        let run = rt.block_on(echo::relay_echo(
            addr,
            &key,
            tag,
            pairs,
            payload,
            per_pair,
            latency_run,
        ));
        run.map(echo::EchoRun::latency)
    };
    let redis_echo = |tag: &str, per_pair: f64| {
        let run = rt.block_on(echo::redis_echo(
            &redis.url,
            tag,
            pairs,
            payload,
            per_pair,
            latency_run,
        ));
        run.map(echo::EchoRun::latency)
    };
    let relay_lat = relay_echo(&relay.addr, "lat", per_pair)?;
    let plain_lat = relay_echo(&relay_plain.addr, "lat", per_pair)?;
    let redis_lat = redis_echo("lat", per_pair)?;
    eprintln!(
        "latency at {load_rate:.0} msg/s: relay {relay_lat:?} µs (no TLS {plain_lat:?}), redis {redis_lat:?} µs"
    );

    // The same load on a relay with per-connection limits on, quiet and then with an Ack
    // flood and an offer replay running (see `attack`).
    let data3 = tempfile::tempdir()?;
    let guarded = start_relay_guarded(&mut procs, &bin, data3.path())?;
    let echo = |tag: &'static str| {
        echo::relay_echo(
            &guarded.addr,
            &key,
            tag,
            pairs,
            payload,
            per_pair,
            latency_run,
        )
    };
    let quiet_lat = rt.block_on(echo("q"))?.latency();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = rt.block_on(attack::start(&guarded.addr, &key, stop.clone()))?;
    let attacked_lat = rt.block_on(echo("u"))?.latency();
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

    // Overload last of the latency rows, so its backlog cannot load the others.
    let per_pair_over = overload_rate / 2.0 / pairs as f64;
    let relay_over = relay_echo(&relay.addr, "over", per_pair_over)?;
    // The same on a relay that pauses reading a connection with a full pipeline instead
    // of refusing its sends (`shed_when_full: false`; docs/PERFORMANCE.md, "Overload").
    let data4 = tempfile::tempdir()?;
    let pacing = start_relay_config(
        &mut procs,
        &bin,
        data4.path(),
        &format!(
            "{}, shed_when_full: false)",
            bench_config().strip_suffix(')').expect("a RON struct")
        ),
    )?;
    settle(&[relay.pid, pacing.pid, redis.pid])?;
    let paced_over = relay_echo(&pacing.addr, "over", per_pair_over)?;
    settle(&[relay.pid, pacing.pid, redis.pid])?;
    let redis_over = redis_echo("over", per_pair_over)?;
    eprintln!(
        "overload, {overload_rate:.0} msg/s offered: relay {relay_over:?} µs (shed_when_full: false {paced_over:?}), redis {redis_over:?} µs"
    );

    // Idle connections: a fresh relay and a fresh Redis, RSS before and after.
    let n = args
        .connections
        .unwrap_or(if args.quick { 1000 } else { 10_000 });
    let data2 = tempfile::tempdir()?;
    let relay2 = start_relay(&mut procs, &bin, data2.path())?;
    let (relay_conn, _) = rt.block_on(relay_connections(&relay2, &key, n, 0))?;
    let data_plain2 = tempfile::tempdir()?;
    let relay_plain2 = start_relay_exe(&mut procs, &plain_exe, data_plain2.path())?;
    let (plain_conn, _) = rt.block_on(relay_connections(&relay_plain2, &key, n, 1))?;
    // A fresh Redis too: the one the load rows used keeps their memory for reuse (its
    // RSS grew 11 B per connection in the run of 2026-12-05 against ~27 KB fresh).
    let redis2 = start_redis(&mut procs)?;
    let (redis_conn, _) = rt.block_on(redis_connections(&redis2, n, 2))?;
    eprintln!(
        "idle connections: relay {relay_conn:.0} B each (no TLS {plain_conn:.0}), redis {redis_conn:.0} B each"
    );

    let crypto = crypto::crypto_cost(payloads)?;
    let outbox = outbox::measure(&bin, outbox_sizes)?;

    // A text to a group of 100 with sender keys, beside the same text sent 1:1 to each.
    let group_rounds = if args.quick { 3 } else { 10 };
    let group = rt.block_on(group::measure(
        &relay.addr,
        &key,
        100,
        group_rounds,
        payload,
    ))?;
    eprintln!(
        "group of 100: last delivery {:.1} ms with sender keys and SendMany, {:.1} ms with a Send \
         per member, {:.1} ms pairwise",
        group.send_many.last_delivery_ms[0],
        group.sender_keys.last_delivery_ms[0],
        group.pairwise.last_delivery_ms[0]
    );

    let machine = report::machine();
    report::print(&report::Report {
        rows: &rows,
        load: (load_rate, load_basis),
        overload: (overload_rate, relay_over, paced_over, redis_over),
        relay_lat,
        plain_lat,
        redis_lat,
        quiet_lat,
        attacked_lat,
        attacked_rss,
        connections: n,
        relay_conn,
        plain_conn,
        redis_conn,
        crypto: &crypto,
        outbox: &outbox,
        group: &group,
        machine: &machine,
    });
    let json = json!({
        "machine": machine,
        "quick": args.quick,
        "seconds_per_row": run_for.as_secs_f64(),
        "throughput": rows.iter().map(|r| json!({
            "pairs": r.pairs, "payload": r.payload, "mode": r.mode,
            "relay_msgs_per_s": r.relay.0, "relay_mb_per_s": r.relay.1,
            "relay_plaintext_msgs_per_s": r.relay_plain.0,
            "redis_msgs_per_s": r.redis.0, "redis_mb_per_s": r.redis.1,
            "ratio": r.relay.0 / r.redis.0,
        })).collect::<Vec<_>>(),
        "latency": {
            "offered_msgs_per_s": load_rate, "pairs": pairs, "payload": payload,
            "relay_us": relay_lat,
            "relay_plaintext_us": plain_lat,
            "redis_us": redis_lat,
            "relay_limits_on_quiet_us": quiet_lat,
            "relay_under_attack_us": attacked_lat,
            "relay_under_attack_rss_bytes": attacked_rss,
        },
        "overload": {
            "offered_msgs_per_s": overload_rate,
            "relay_us": relay_over,
            "relay_paced_us": paced_over,
            "redis_us": redis_over,
        },
        "tls": "relay and Redis over TLS 1.3; relay_plaintext: the same relay code without TLS",
        "connections": {"count": n, "relay_bytes_each": relay_conn, "relay_plaintext_bytes_each": plain_conn, "redis_bytes_each": redis_conn},
        "group": group,
        "outbox_drain": outbox,
        "crypto_us": crypto.iter().map(|(len, seal, open)| json!({"payload": len, "seal": seal, "open": open})).collect::<Vec<_>>(),
    });
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&json)?)?;
    report::chart(&rows, &out.join("throughput.svg"))?;
    println!(
        "wrote {} and {}",
        out.join("bench.json").display(),
        out.join("throughput.svg").display()
    );
    Ok(())
}
