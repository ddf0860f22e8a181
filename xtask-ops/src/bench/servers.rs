//! The systems under test: the release relay (over TLS, plaintext, guarded, or with one
//! setting changed) and Redis over TLS, started on 127.0.0.1 for a bench run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use xtask::procs::Processes;

pub(super) struct Relay {
    pub(super) addr: String,
    pub(super) pid: u32,
}

pub(super) fn start_relay(procs: &mut Processes, bin: &Path, data: &Path) -> anyhow::Result<Relay> {
    // Bench settings: no rate limit and room for every connection and account (the load
    // comes from a few addresses); otherwise as shipped.
    start_relay_config(procs, bin, data, &bench_config())
}

/// Waits (up to 60 s) until `pids` use under 5 % of a core over 200 ms.
pub(super) fn settle(pids: &[u32]) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut before = super::cluster::cpu_seconds(pids)?;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        let now = super::cluster::cpu_seconds(pids)?;
        if now - before < 0.01 {
            return Ok(());
        }
        before = now;
    }
    eprintln!("the systems under test were still busy after 60 s");
    Ok(())
}

/// `--relay-set`: fields added to the bench relays' configuration.
pub(super) static RELAY_SET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// [`BENCH_CONFIG`] with the fields of `--relay-set`, if any.
pub(super) fn bench_config() -> String {
    match RELAY_SET.get() {
        Some(extra) => format!(
            "{}, {extra})",
            BENCH_CONFIG.strip_suffix(')').expect("a RON struct")
        ),
        None => BENCH_CONFIG.to_string(),
    }
}

/// No rate limit and room for every connection and account.
pub(super) const BENCH_CONFIG: &str = "(max_connections: 120000, \
    rate_limit: (per_second: 100000000.0, burst: 100000000.0), \
    login_timeout_secs: 120.0, pre_login: (max_connections: 120000, max_per_address: 120000), \
    connect_rate: (per_second: 1000000.0, burst: 1000000.0), \
    registrations: (per_hour: 100000000.0, burst: 100000000.0))";

/// A relay with per-connection rate limits on (10,000 tokens/s each: an echo connection
/// at the 50k msg/s load spends about 6,000), for the quiet and under-attack latency rows.
pub(super) fn start_relay_guarded(
    procs: &mut Processes,
    bin: &Path,
    data: &Path,
) -> anyhow::Result<Relay> {
    start_relay_config(
        procs,
        bin,
        data,
        "(rate_limit: (per_second: 10000.0, burst: 20000.0), \
         registrations: (per_hour: 100000.0, burst: 100000.0))",
    )
}

/// Builds the benchmark-only plaintext relay (`chat-server`'s `bench-plaintext` feature,
/// a binary of its own so the shipped one is untouched) and returns its path.
pub(super) fn build_plaintext_relay() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(xtask::project_root())
        .args(["build", "--release", "-p", "chat-server"])
        .args(["--features", "bench-plaintext"])
        .args(["--bin", "chat-server-plaintext-bench"])
        .status()?;
    anyhow::ensure!(
        status.success(),
        "building the plaintext bench relay failed"
    );
    Ok(xtask::target_dir()
        .join("release")
        .join("chat-server-plaintext-bench"))
}

/// The plaintext relay with the bench settings of [`start_relay`].
pub(super) fn start_relay_exe(
    procs: &mut Processes,
    exe: &Path,
    data: &Path,
) -> anyhow::Result<Relay> {
    let config = data.join("bench.ron");
    std::fs::write(&config, bench_config())?;
    let addr = procs.start_relay_exe(exe, data, &["--config", config.to_str().unwrap()])?;
    let pid = procs.last_pid();
    Ok(Relay { addr, pid })
}

pub(super) fn start_relay_config(
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

pub(super) struct Redis {
    pub(super) url: String,
    pub(super) port: u16,
    pub(super) pid: u32,
    /// Its certificate and key (self-signed ECDSA P-256, as the relay's).
    _tls: tempfile::TempDir,
}

/// Redis serving TLS 1.3 only (its `--tls-port`; the plaintext port is off), with a
/// self-signed certificate the load generators accept without checking (`#insecure`):
/// the comparison is of the work per message, the relay's clients check its key.
pub(super) fn start_redis(procs: &mut Processes) -> anyhow::Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tls = tempfile::tempdir()?;
    let key_pem = chat_protocol::tls::RelayIdentity::generate_key_pem()?;
    let cert_pem = chat_protocol::tls::RelayIdentity::self_signed_pem(&key_pem)?;
    let (key, cert) = (tls.path().join("redis.key"), tls.path().join("redis.crt"));
    std::fs::write(&key, key_pem)?;
    std::fs::write(&cert, cert_pem)?;
    procs
        .spawn(
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", "0"])
                .arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .args(["--tls-auth-clients", "no", "--tls-protocols", "TLSv1.3"])
                .args(["--save", "", "--appendonly", "no"])
                // Protected mode would refuse (`-DENIED`) the memory test's connections from
                // loopback sources other than 127.0.0.1; it listens on 127.0.0.1 only.
                .args(["--maxclients", "120000", "--protected-mode", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context(
            "redis-server with TLS is needed for the baseline (apt install redis-server; \
             Debian's build serves TLS)",
        )?;
    let pid = procs.last_pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline && procs.running(&[pid]) == 1,
            "redis-server did not start with TLS (was it built without TLS support?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Redis {
        url: format!("rediss://127.0.0.1:{port}/#insecure"),
        port,
        pid,
        _tls: tls,
    })
}

pub(super) fn rss_bytes(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024.0)
}
