//! `cargo xtask bench --connections-only --backend nats --connections N`: more idle
//! authenticated connections than one process may hold (the machine's hard fd limit),
//! spread over as many relays of one cluster as that takes: a three-node NATS JetStream
//! cluster (`sync_interval: always`, every stream R3) and relays that each hold at most
//! `--per-process` connections, each relay's share opened and held by a load process of
//! its own (`cargo xtask idle-worker`, not listed in help). Records the relays' and the
//! NATS nodes' RSS growth per connection and how long it took to open them all, and fails
//! if any connection was closed before the memory was read.

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

/// How long the logins of one run may take in all.
const OPEN_PATIENCE: Duration = Duration::from_secs(3600);

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

/// One load process: logs in and holds its accounts, prints `open SECONDS` once all are
/// open, then waits for its stdin to close and prints `still K` (how many were still open)
/// before it exits. Its key is its own (2048-bit RSA): accounts are per name.
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
        let held = idle::hold(&args.relay, &key, range, 0).await?;
        let mut out = std::io::stdout();
        writeln!(out, "open {:.1}", held.secs)?;
        out.flush()?;
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        writeln!(out, "still {}", held.close())?;
        Ok(())
    })
}

/// `n` idle connections over `ceil(n / per_process)` relays on a three-node cluster; prints
/// a table and writes `bench-cluster-connections.json` in `out`.
///
/// # Errors
/// nats-server missing, a process that failed to start or died, a login refused, a
/// connection closed before the memory was read.
pub(super) fn run(n: usize, per_process: Option<usize>, out: &Path) -> anyhow::Result<()> {
    let fds = usize::try_from(rlimit::getrlimit(rlimit::Resource::NOFILE)?.0)?;
    let most = fds.saturating_sub(OWN_FDS);
    let per = per_process.unwrap_or(most);
    anyhow::ensure!(
        per > 0 && per <= most,
        "--per-process {per} does not fit this machine's fd limit of {fds} (at most {most})"
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
    let answers = |word: &str, what: &str| -> anyhow::Result<Vec<f64>> {
        let mut got = vec![None; relays];
        while got.iter().any(Option::is_none) {
            let left = OPEN_PATIENCE.saturating_sub(started.elapsed());
            let (w, line) = rx
                .recv_timeout(left)
                .with_context(|| format!("timed out waiting for the load processes {what}"))?;
            let line = line.with_context(|| {
                format!("load process {w} ended before {what} (its error is above)")
            })?;
            if let Some(value) = line.strip_prefix(word) {
                got[w] = Some(value.trim().parse::<f64>()?);
            }
        }
        Ok(got.into_iter().flatten().collect())
    };
    let opened = answers("open ", "had opened their connections")?;
    let secs = started.elapsed().as_secs_f64();
    // Let the servers settle (blocking-pool threads, allocator) before reading RSS.
    std::thread::sleep(Duration::from_secs(2));
    let (relay1, nats1) = (rss(&relay_pids)?, rss(&nodes.pids)?);
    drop(stdins);
    let still: f64 = answers("still ", "had counted their open connections")?
        .iter()
        .sum();
    anyhow::ensure!(
        still as usize == n,
        "only {still} of {n} connections were still open when the servers' memory was read"
    );
    let (relay_each, nats_each) = ((relay1 - relay0) / n as f64, (nats1 - nats0) / n as f64);
    let machine = super::report::machine();
    let slowest = opened.iter().copied().fold(0.0, f64::max);
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
    println!("seconds to open all: {secs:.0} (slowest load process {slowest:.0})");
    let json = json!({
        "machine": machine,
        "connections": n,
        "relays": relays,
        "per_relay": counts,
        "fd_limit": fds,
        "nats_nodes": 3,
        "seconds_to_open": secs,
        "relay_bytes_each": relay_each,
        "nats_bytes_each": nats_each,
        "relay_rss_bytes": {"before": relay0, "after": relay1},
        "nats_rss_bytes": {"before": nats0, "after": nats1},
    });
    let path = out.join("bench-cluster-connections.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
