//! Harness: the real `chat-server` binary and real headless `chat-client` processes on
//! loopback, plus a recording (and optionally corrupting) TCP proxy between them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../../../chat-server/tests/common/disk.rs"]
pub mod disk;
pub mod fence_probe;
pub mod impostor;
pub mod inproc;
#[path = "../../../chat-server/tests/common/nats.rs"]
pub mod nats;
pub mod rogue;

#[allow(unused_imports)]
pub use impostor::TamperProxy;
pub mod window;

pub const PATIENCE: Duration = Duration::from_secs(30);

/// The `chat-server` binary, built once per test run so it is never stale.
pub fn server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "chat-server",
                "--bin",
                "chat-server",
            ])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building chat-server failed");
        let target = std::env::current_exe().unwrap();
        let dir = target.parent().unwrap().parent().unwrap();
        dir.join("chat-server")
    })
}

/// A running relay process. Killed on drop.
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
    /// Its key fingerprint, from `listening on ADDR (fingerprint FP)`.
    pub fingerprint: String,
    pub data_dir: PathBuf,
    pub log: Arc<Mutex<String>>,
}

impl Relay {
    /// Starts on `addr` (use port 0 for a fresh one) with `data_dir`.
    pub fn start(addr: &str, data_dir: &Path) -> Self {
        Self::start_with_config(addr, data_dir, "()")
    }

    /// Starts with the given RON settings (flags still set address and data dir).
    pub fn start_with_config(addr: &str, data_dir: &Path, ron: &str) -> Self {
        Self::start_under(addr, data_dir, ron, &[])
    }

    /// Starts with extra environment variables (e.g. [`clock_shifted`]).
    pub fn start_under(addr: &str, data_dir: &Path, ron: &str, env: &[(String, String)]) -> Self {
        std::fs::create_dir_all(data_dir).unwrap();
        let config = data_dir.with_extension("ron");
        std::fs::write(&config, ron).unwrap();
        let mut child = Command::new(server_bin())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--listen", addr, "--data-dir", data_dir.to_str().unwrap()])
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, a)) = line.split_once("listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (addr, fingerprint) = match rx.recv_timeout(PATIENCE) {
            Ok(line) => {
                let (addr, fp) = line
                    .split_once(" (fingerprint ")
                    .unwrap_or_else(|| panic!("no fingerprint in `listening on {line}`"));
                (addr.parse().unwrap(), fp.trim_end_matches(')').to_owned())
            }
            Err(e) => {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "relay never logged `listening on` ({e}):\n{}",
                    log.lock().unwrap()
                )
            }
        };
        Self {
            child,
            addr,
            fingerprint,
            data_dir: data_dir.to_owned(),
            log,
        }
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill(mut self) -> (SocketAddr, PathBuf) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.addr, self.data_dir.clone())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what the relay had to say (not its trace lines).
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [" INFO ", " WARN ", " ERROR "]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect();
            eprintln!(
                "relay {} said (last 100 lines of info and above):\n{}",
                self.addr,
                notable[notable.len().saturating_sub(100)..].join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless client process.
pub struct Client {
    pub name: String,
    pub home: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Every event seen so far, in order.
    pub seen: Vec<Value>,
    /// Events received but not yet matched by `expect`, in order.
    backlog: std::collections::VecDeque<Value>,
    /// Everything written to stderr, when captured (see [`Options::stderr`]).
    pub stderr: Arc<Mutex<String>>,
}

/// How to start a client process.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A command to run the client under (e.g. `faketime -f +2d`).
    pub wrapper: Vec<String>,
    /// Capture stderr into [`Client::stderr`] (else it is discarded).
    pub stderr: bool,
    /// Write stderr to this file instead (e.g. `/dev/full`).
    pub stderr_to: Option<PathBuf>,
    /// `RUST_LOG` (default `debug`).
    pub log: Option<String>,
    /// The `--server` value, instead of the address given (e.g. `HOST:PORT#FINGERPRINT`).
    pub server: Option<String>,
}

impl Client {
    pub fn start(server: SocketAddr, name: &str, home: &Path) -> Self {
        Self::start_with(server, name, home, &[])
    }

    /// Like `start`, with extra command-line arguments.
    pub fn start_with(server: SocketAddr, name: &str, home: &Path, extra: &[&str]) -> Self {
        let options = Options {
            args: extra.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        };
        Self::start_opts(server, name, home, &options)
    }

    /// Starts a client with every option.
    pub fn start_opts(server: SocketAddr, name: &str, home: &Path, options: &Options) -> Self {
        let server = options.server.clone().unwrap_or_else(|| server.to_string());
        let bin = env!("CARGO_BIN_EXE_chat-client");
        let mut command = match options.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .args(["--headless", "--server", &server, "--user", name])
            .args(["--home", home.to_str().unwrap()])
            .args(&options.args)
            .env("RUST_LOG", options.log.as_deref().unwrap_or("debug"))
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(match (&options.stderr_to, options.stderr) {
                (Some(path), _) => {
                    Stdio::from(std::fs::OpenOptions::new().write(true).open(path).unwrap())
                }
                (None, true) => Stdio::piped(),
                (None, false) => Stdio::null(),
            })
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                assert!(value.get("event").is_some(), "no event field: {line}");
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            name: name.into(),
            home: home.to_owned(),
            child,
            stdin,
            events,
            seen: Vec::new(),
            backlog: Default::default(),
            stderr,
        }
    }

    /// SIGKILL: no goodbye, no flush. The events seen stay readable.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's exit code if it has exited.
    pub fn exited(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .unwrap()
            .map(|s| s.code().unwrap_or(-1))
    }

    /// Starts and waits until connected.
    pub fn ready(server: SocketAddr, name: &str, home: &Path) -> Self {
        let mut c = Self::start(server, name, home);
        c.expect("ready", |e| e["event"] == "ready");
        c.connected();
        c
    }

    /// Writes raw bytes to stdin (e.g. a line that is not UTF-8).
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Every event of kind `event` seen so far (matched or not), in order.
    pub fn seen_of(&self, event: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|e| e["event"] == event)
            .cloned()
            .collect()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The first not-yet-matched event matching `pred`, waiting for it if needed. Events
    /// it passes over stay available to later calls, in order.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_within(what, PATIENCE, pred)
    }

    /// [`Client::expect`] with its own patience, for what waits on a timer of the client.
    pub fn expect_within(
        &mut self,
        what: &str,
        patience: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(at) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(at).unwrap();
        }
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                    self.backlog.push_back(ev);
                }
                Err(_) => panic!(
                    "{}: no {what} event within {patience:?}; saw {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    pub fn connected(&mut self) {
        self.expect("connected", |e| {
            e["event"] == "connection" && e["state"] == "connected"
        });
    }

    pub fn message_from(&mut self, from: &str) -> Value {
        self.expect("message", |e| e["event"] == "message" && e["from"] == from)
    }

    /// The texts of the next `n` messages from `from`, in order.
    pub fn texts_from(&mut self, from: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| self.message_from(from)["text"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Asserts no further `message` event arrives (within a quiet spell of `quiet`).
    pub fn assert_no_more_messages(&mut self, quiet: Duration) {
        let extra: Vec<Value> = self
            .drain(quiet)
            .into_iter()
            .filter(|e| e["event"] == "message")
            .collect();
        assert!(
            extra.is_empty(),
            "{}: unexpected (duplicate?) messages: {extra:#?}",
            self.name
        );
    }

    /// The unmatched backlog plus all events that arrive until a gap of `quiet`.
    pub fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut got: Vec<Value> = self.backlog.drain(..).collect();
        while let Ok(ev) = self.events.recv_timeout(quiet) {
            self.seen.push(ev.clone());
            got.push(ev);
        }
        got
    }

    /// Closes stdin and waits for the exit code.
    pub fn quit(mut self) -> i32 {
        drop(self.stdin.take());
        self.wait_exit()
    }

    /// Waits for the process to exit by itself and returns its exit code.
    pub fn wait_exit(mut self) -> i32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on 127.0.0.1 that records every byte clients send to the relay and the
/// relay sends back (TLS records: what anyone on the path sees), and can flip a byte in
/// what the relay sends next.
pub struct Proxy {
    pub addr: SocketAddr,
    pub upstream_bytes: Arc<Mutex<Vec<u8>>>,
    pub downstream_bytes: Arc<Mutex<Vec<u8>>>,
    corrupt_deliver: Arc<AtomicUsize>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            upstream_bytes: Default::default(),
            downstream_bytes: Default::default(),
            corrupt_deliver: Arc::new(AtomicUsize::new(0)),
        };
        let (up, down, corrupt) = (
            proxy.upstream_bytes.clone(),
            proxy.downstream_bytes.clone(),
            proxy.corrupt_deliver.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = up.clone();
                std::thread::spawn(move || pump(client, server, &up, None));
                let (down, corrupt) = (down.clone(), corrupt.clone());
                std::thread::spawn(move || pump(s2, c2, &down, Some(&corrupt)));
            }
        });
        proxy
    }

    /// Flip the last byte of the next `count` server→client reads of more than 64 bytes
    /// (inside a TLS record: TLS must notice).
    pub fn corrupt_next_deliveries(&self, count: usize) {
        self.corrupt_deliver.store(count, Ordering::SeqCst);
    }
}

/// Copies `from` → `to`, recording bytes; with `corrupt`, flips the last byte of a read of
/// more than 64 bytes while the counter is positive.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    record: &Mutex<Vec<u8>>,
    corrupt: Option<&AtomicUsize>,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        record.lock().unwrap().extend_from_slice(&buf[..n]);
        if let Some(corrupt) = corrupt
            && n > 64
            && corrupt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok()
        {
            buf[n - 1] ^= 0x01;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Environment that runs a process with its wall clock moved by `shift` (libfaketime's
/// syntax, e.g. `+2d`; the monotonic clock is left alone). Preloaded directly rather than
/// through the `faketime` wrapper, so killing the process kills it, not a wrapper. `None`
/// (the test skips) where libfaketime is not installed, unless under CI.
pub fn clock_shifted(shift: &str) -> Option<Vec<(String, String)>> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists());
    let Some(lib) = lib else {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is not installed (CI installs the faketime package: see .ci/run)"
        );
        eprintln!("SKIPPED: libfaketime is not installed");
        return None;
    };
    Some(vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), shift.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ])
}

/// Whether a tool the test needs is installed. Outside CI a missing tool skips the test
/// (with a note); under CI (`CI` set) it fails it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is not installed (CI installs it: see .ci/run)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// Runs `chat-server --data-dir DIR admin ARGS…` and returns its stdout; panics on failure.
pub fn admin(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(server_bin())
        .args(["--data-dir", data_dir.to_str().unwrap(), "admin"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, concatenated.
pub fn all_file_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_file_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

/// A temporary directory with the paths of a relay's data dir and two homes (alice, bob),
/// none created yet.
pub fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, alice, bob) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
    );
    (dir, relay, alice, bob)
}

/// The `items` of `/history WITH`.
pub fn history(client: &mut Client, with: &str) -> Vec<serde_json::Value> {
    client.send(&format!("/history {with}"));
    let h = client.expect("history", |e| e["event"] == "history" && e["user"] == with);
    h["items"].as_array().unwrap().clone()
}

/// Gives the relay data directory `to` the TLS identity of `from`: the same relay (and
/// address pin) with a fresh database, as after an operator wiped its accounts.
pub fn copy_relay_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in [chat_server::tls::KEY_FILE, chat_server::tls::CERT_FILE] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// Where the relays of a test keep accounts and queues.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// One relay with its SQLite file: alice and bob on the same relay.
    Sqlite,
    /// Two relays on one NATS JetStream node: alice on one, bob on the other, so every
    /// message, receipt and acknowledgement crosses relays.
    Nats,
}

/// The relays of a test on `Backend`: `alice` is the address alice uses, `bob` bob's.
pub struct Relays {
    pub alice: SocketAddr,
    pub bob: SocketAddr,
    /// Dropped (killed) before the NATS node.
    pub relays: Vec<Relay>,
    _nats: Option<nats::Nats>,
}

impl Relays {
    /// Starts them, with state under `dir` (created).
    pub fn start(backend: Backend, dir: &Path) -> Self {
        match backend {
            Backend::Sqlite => {
                let relay = Relay::start("127.0.0.1:0", dir);
                Self {
                    alice: relay.addr,
                    bob: relay.addr,
                    relays: vec![relay],
                    _nats: None,
                }
            }
            Backend::Nats => {
                let nats = nats::Nats::single();
                let config = format!(
                    "(backend: Nats(urls: [{:?}], stream_replicas: 1))",
                    nats.urls()[0]
                );
                let a = Relay::start_with_config("127.0.0.1:0", &dir.join("a"), &config);
                let b = Relay::start_with_config("127.0.0.1:0", &dir.join("b"), &config);
                Self {
                    alice: a.addr,
                    bob: b.addr,
                    relays: vec![a, b],
                    _nats: Some(nats),
                }
            }
        }
    }
}

/// The first of `clients` creates group `name` with the others, and each of them joins:
/// returns its id.
pub fn create_group(name: &str, clients: &mut [&mut Client]) -> String {
    let (creator, members) = clients.split_first_mut().unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    creator.send(&format!("/group-create {name} {}", names.join(" ")));
    let id = creator.expect("created", |e| {
        e["event"] == "group" && e["change"] == "created"
    })["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for m in members.iter_mut() {
        m.expect("joined", |e| {
            e["event"] == "group" && e["id"] == id.as_str()
        });
    }
    id
}
