//! `cargo xtask bench --connections-only --backend nats --connections N`: more idle
//! authenticated connections than one process may hold (the machine's hard fd limit),
//! spread over as many relays of one cluster as that takes: a three-node NATS JetStream
//! cluster (`sync_interval: always`, every stream R3) and relays that each hold at most
//! `--per-process` connections, each relay's share opened and held by a load process of
//! its own (`cargo xtask idle-worker`, not listed in help). Once its share is open, each
//! load process sends one message to [`PROBES`] of its accounts, spread over it, and
//! checks that each was delivered (a connection can stay open while its session cannot
//! read its mail: "Concurrent sessions" in docs/CLUSTER.md). Records the relays' and the
//! NATS nodes' RSS growth per connection, the CPU the servers spend keeping them idle (over
//! [`IDLE_CPU_WINDOW`]) and how long it took to open them all, and fails if a probe was not
//! delivered or any connection was closed before the memory and CPU were read.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use xtask::procs::Processes;

use super::cluster;
use super::idle;
use super::servers::rss_bytes;

/// Descriptors each relay or load process keeps for itself (runtime, NATS, store, logs).
const OWN_FDS: usize = 1000;

/// How long one run may take in all: logins, probes and the closing count.
const RUN_PATIENCE: Duration = Duration::from_secs(3600);

/// The most connections a relay of the bench admits (`max_connections` in its settings).
const RELAY_MOST: usize = 120_000;

/// How each load process logs in: 16 at once (six processes on two cores starve one
/// another's TLS handshakes at 64), and a failed login tried again up to 4 times, as a
/// client does (at 90,000 sessions here NATS sometimes answered a login's session write too
/// late, 2026-12-06).
const LOGINS: idle::Logins = idle::Logins {
    at_once: 16,
    retries: 4,
};

/// Accounts of each load process sent one message once its share is open.
const PROBES: usize = 100;

/// How long a probe's answer, and then its delivery, may take.
const PROBE_PATIENCE: Duration = Duration::from_secs(30);

/// How long the servers' CPU is counted while every session is held idle: several of the
/// relays' pings, and a third of a waiting mailbox reader's period between checks (every
/// 120 s ± 30 s); logins spread over minutes spread the sessions' checks, so the window
/// sees about their steady rate.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(40);

/// The hidden `idle-worker` task: one load process of [`run`].
#[derive(Debug, clap::Args)]
pub struct IdleWorkerArgs {
    /// The relay's address, `HOST:PORT#FINGERPRINT`
    #[arg(long)]
    relay: String,
    /// The first account's number (accounts are `idle{N}`, from the loopback source of N)
    #[arg(long)]
    first: usize,
    /// How many accounts to log in and hold
    #[arg(long)]
    count: usize,
}

/// One load process: logs in and holds its accounts, prints `open SECONDS RETRIES` once all are
/// open, sends the probes and prints `delivered D P50 MAX` (how many of them arrived, and
/// the median and longest wait in milliseconds for the relay's `Ok` to a send), then waits
/// for its stdin to close and prints `still K` (how many were still open) before it exits.
/// Its key is its own (2048-bit RSA): accounts are per name.
///
/// # Errors
/// The first login that failed; stdin or stdout unusable.
pub fn idle_worker(args: IdleWorkerArgs) -> anyhow::Result<()> {
    let _ =
        rustls::crypto::CryptoProvider::install_default((*chat_protocol::tls::provider()).clone());
    let key = rsa::PrivateKey::new(&mut rand::rng(), 2048)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let range = args.first..args.first + args.count;
        let held = idle::hold(&args.relay, &key, range.clone(), 0, LOGINS).await?;
        let mut out = std::io::stdout();
        writeln!(out, "open {:.1} {}", held.secs, held.retried)?;
        out.flush()?;
        let (delivered, mut waits) = probe(&args.relay, &key, range, &held).await?;
        waits.sort_unstable();
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let (p50, max) = (ms(waits.get(waits.len() / 2)), ms(waits.last()));
        writeln!(out, "delivered {delivered} {p50:.1} {max:.1}")?;
        out.flush()?;
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        writeln!(out, "still {}", held.close())?;
        Ok(())
    })
}

/// Sends one 64-byte message to each of [`PROBES`] accounts spread over `range` (held in
/// `held`) from an account of its own, each waiting for the relay's `Ok`, then waits up to
/// [`PROBE_PATIENCE`] until as many were delivered: how many were, and how long each send
/// waited for its `Ok` (each is the first send to its recipient since the relay started,
/// so it includes the relay's fetch of the recipient's tally).
///
/// # Errors
/// The prober's login or a send refused, or no answer to a send within [`PROBE_PATIENCE`].
async fn probe(
    addr: &str,
    key: &rsa::PrivateKey,
    range: std::ops::Range<usize>,
    held: &idle::Held,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    use chat_protocol::{ClientMessage, ServerMessage};
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::Ordering;
    let picks = PROBES.min(range.len());
    let name = format!("prober{}", range.start);
    let source = super::source(range.start);
    let mut prober = super::load::relay_login(addr, &name, key, Some(source)).await?;
    let before = held.delivered.load(Ordering::Relaxed);
    let mut waits = Vec::with_capacity(picks);
    for j in 0..picks {
        let to = format!("idle{}", range.start + j * range.len() / picks);
        let id = 100 + j as u32;
        let payload = vec![0x5a; 64];
        let sent = Instant::now();
        prober
            .send(ClientMessage::Send {
                id,
                to: to.clone(),
                payload,
            })
            .await?;
        loop {
            let answer = tokio::time::timeout(PROBE_PATIENCE, prober.next())
                .await
                .with_context(|| format!("no answer to the probe sent to {to}"))?
                .context("the relay closed the prober's connection")??;
            match answer {
                ServerMessage::Ok { id: answered } if answered == id => {
                    waits.push(sent.elapsed());
                    break;
                }
                ServerMessage::Ping { nonce } => prober.send(ClientMessage::Pong { nonce }).await?,
                ServerMessage::Error { code, message, .. } => {
                    anyhow::bail!("the probe to {to} was refused: {code}: {message}")
                }
                _ => {}
            }
        }
    }
    let arrived = || held.delivered.load(Ordering::Relaxed) - before;
    let deadline = Instant::now() + PROBE_PATIENCE;
    while arrived() < picks && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((arrived(), waits))
}

/// `n` idle connections over `ceil(n / per_process)` relays on a three-node cluster; prints
/// a table and writes `bench-cluster-connections.json` in `out`.
///
/// # Errors
/// nats-server missing, a process that failed to start or died, a login refused, a
/// connection closed before the memory was read.
pub(super) fn run(n: usize, per_process: Option<usize>, out: &Path) -> anyhow::Result<()> {
    let fds = usize::try_from(rlimit::getrlimit(rlimit::Resource::NOFILE)?.0)?;
    let most = fds.saturating_sub(OWN_FDS).min(RELAY_MOST);
    let per = per_process.unwrap_or(most);
    anyhow::ensure!(n > 0, "--connections must be at least 1");
    anyhow::ensure!(
        per > 0 && per <= most,
        "--per-process {per} does not fit: at most {most} (this machine's fd limit of {fds} \
         less {OWN_FDS}, and at most {RELAY_MOST} per relay)"
    );
    let relays = n.div_ceil(per);
    let nats_server = cluster::nats_server()?;
    let bin = xtask::build_binaries(&["chat-server"], true)?;
    let exe = bin.join("chat-server");
    let mut procs = Processes::default();
    let dirs = tempfile::tempdir()?;
    let nodes = cluster::nats_nodes(&mut procs, &nats_server, &dirs.path().join("nats"), 3)?;
    let urls = nodes.urls.join(",");
    let mut relay_addrs = Vec::new();
    for r in 0..relays {
        let data = dirs.path().join(format!("relay{r}"));
        std::fs::create_dir_all(&data)?;
        let flags = ["--nats", &urls, "--nats-replicas", "3"];
        relay_addrs.push(cluster::relay(&mut procs, &exe, &data, &flags)?);
    }
    let relay_pids: Vec<u32> = relay_addrs.iter().map(|(_, pid)| *pid).collect();
    let rss = |pids: &[u32]| -> anyhow::Result<f64> { pids.iter().map(|&p| rss_bytes(p)).sum() };
    let (relay0, nats0) = (rss(&relay_pids)?, rss(&nodes.pids)?);
    eprintln!(
        "{n} connections over {relays} relays (at most {per} each; fd limit {fds}) on 3 NATS nodes"
    );

    let me = std::env::current_exe()?;
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let mut stdins = Vec::new();
    let mut counts = Vec::new();
    for (w, (addr, _)) in relay_addrs.iter().enumerate() {
        let first = w * per;
        let count = per.min(n - first);
        counts.push(count);
        let child = procs.spawn(
            Command::new(&me)
                .arg("idle-worker")
                .args(["--relay", addr])
                .args(["--first", &first.to_string(), "--count", &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        stdins.push(child.stdin.take().context("stdin piped")?);
        let stdout = child.stdout.take().context("stdout piped")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((w, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((w, None));
        });
    }
    drop(tx);
    // Each load process's line starting with `word`, its numbers.
    // Lines received but not asked for yet: a quick load process's later line can arrive
    // before a slow one's earlier line.
    let mut unread: Vec<Vec<String>> = vec![Vec::new(); relays];
    let mut ended = vec![false; relays];
    let mut answers = |word: &str, what: &str| -> anyhow::Result<Vec<Vec<f64>>> {
        let numbers = |line: &str| -> anyhow::Result<Vec<f64>> {
            let values = line[word.len()..].split_whitespace().map(str::parse::<f64>);
            values
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("a load process said {line:?}"))
        };
        let mut got: Vec<Option<Vec<f64>>> = vec![None; relays];
        for (w, lines) in unread.iter_mut().enumerate() {
            if ended[w] && !lines.iter().any(|l| l.starts_with(word)) {
                anyhow::bail!("load process {w} ended before {what} (its error is above)");
            }
            if let Some(at) = lines.iter().position(|l| l.starts_with(word)) {
                got[w] = Some(numbers(&lines.remove(at))?);
            }
        }
        while got.iter().any(Option::is_none) {
            let left = RUN_PATIENCE.saturating_sub(started.elapsed());
            let (w, line) = rx
                .recv_timeout(left)
                .with_context(|| format!("timed out waiting for the load processes {what}"))?;
            // A process's output ends after its last line: that is an error only if the
            // line asked for has not come.
            let Some(line) = line else {
                ended[w] = true;
                anyhow::ensure!(
                    got[w].is_some(),
                    "load process {w} ended before {what} (its error is above)"
                );
                continue;
            };
            if line.starts_with(word) && got[w].is_none() {
                got[w] = Some(numbers(&line)?);
            } else {
                unread[w].push(line);
            }
        }
        Ok(got.into_iter().flatten().collect())
    };
    let opened = answers("open ", "had opened their connections")?;
    let secs = started.elapsed().as_secs_f64();
    println!("all {n} open after {secs:.0} s");
    let retried = opened.iter().filter_map(|o| o.get(1)).sum::<f64>() as usize;
    let delivered = answers("delivered ", "had sent their probes")?;
    let highest = |i: usize| {
        delivered
            .iter()
            .filter_map(|d| d.get(i).copied())
            .fold(0.0, f64::max)
    };
    let (answer_p50, answer_max) = (highest(1), highest(2));
    let delivered = delivered.iter().filter_map(|d| d.first()).sum::<f64>() as usize;
    println!(
        "probe sends (each its recipient's first) answered in: median {answer_p50:.1} ms \
         (the highest of the load processes'), longest {answer_max:.1} ms"
    );
    let probes: usize = counts.iter().map(|&c| PROBES.min(c)).sum();
    anyhow::ensure!(
        delivered == probes,
        "{delivered} deliveries of the {probes} probe messages sent to the idle accounts, \
         one each expected: some sessions cannot read their mail, or one was delivered \
         twice (a relay's ERROR lines above may say why)"
    );
    // Let the servers settle (blocking-pool threads, allocator) before reading RSS.
    std::thread::sleep(Duration::from_secs(2));
    let (relay1, nats1) = (rss(&relay_pids)?, rss(&nodes.pids)?);
    // The servers' CPU while nothing happens but what idle sessions cost (the relays'
    // pings, each waiting reader's periodic check): cores over the window.
    let cpu = || -> anyhow::Result<(f64, f64)> {
        let relays = cluster::cpu_seconds(&relay_pids)?;
        Ok((relays + cluster::cpu_seconds(&nodes.pids)?, relays))
    };
    let (all0, relays0) = cpu()?;
    std::thread::sleep(IDLE_CPU_WINDOW);
    let (all1, relays1) = cpu()?;
    let window = IDLE_CPU_WINDOW.as_secs_f64();
    let (idle_all, idle_relays) = ((all1 - all0) / window, (relays1 - relays0) / window);
    drop(stdins);
    let still: f64 = answers("still ", "had counted their open connections")?
        .iter()
        .filter_map(|s| s.first())
        .sum();
    anyhow::ensure!(
        still as usize == n,
        "only {still} of {n} connections were still open when the servers' memory and CPU were read"
    );
    let (relay_each, nats_each) = ((relay1 - relay0) / n as f64, (nats1 - nats0) / n as f64);
    let machine = super::report::machine();
    let slowest = opened
        .iter()
        .filter_map(|o| o.first().copied())
        .fold(0.0, f64::max);
    println!("machine: {machine}");
    println!(
        "idle authenticated connections held open at once: {n}, over {relays} relays \
         (at most {per} each) on a 3-node NATS cluster (R3)"
    );
    println!("| what | bytes per connection | total MB |");
    println!("|------|---------------------:|---------:|");
    println!(
        "| relays' RSS | {relay_each:.0} | {:.0} |",
        (relay1 - relay0) / 1e6
    );
    println!(
        "| NATS nodes' RSS | {nats_each:.0} | {:.0} |",
        (nats1 - nats0) / 1e6
    );
    println!(
        "server CPU to keep them idle ({window:.0} s): {idle_all:.2} cores, of which the \
         relays {idle_relays:.2}"
    );
    println!("seconds to open all: {secs:.0} (slowest load process {slowest:.0})");
    println!("probe messages delivered: {delivered} of {probes}; logins tried again: {retried}");
    let json = json!({
        "machine": machine,
        "connections": n,
        "relays": relays,
        "per_relay": counts,
        "fd_limit": fds,
        "nats_nodes": 3,
        "seconds_to_open": secs,
        "probes_delivered": delivered,
        "logins_retried": retried,
        "probe_answer_ms": {"median_highest": answer_p50, "max": answer_max},
        "relay_bytes_each": relay_each,
        "nats_bytes_each": nats_each,
        "relay_rss_bytes": {"before": relay0, "after": relay1},
        "nats_rss_bytes": {"before": nats0, "after": nats1},
        "idle_cpu_cores": {"servers": idle_all, "relays": idle_relays, "window_s": window},
    });
    let path = out.join("bench-cluster-connections.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
