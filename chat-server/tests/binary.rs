//! The real `chat-server` binary: flags, config file, logs and SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_chat-server");

/// The running binary; killed if a test fails before it exits.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary and waits for its `listening on ADDR` log line.
fn spawn(args: &[&str]) -> (Server, SocketAddr, mpsc::Receiver<String>) {
    let mut child = Server(
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server never logged `listening on`");
        if let Some((_, addr)) = line.split_once("listening on ") {
            // "listening on ADDR (fingerprint FP)"
            let addr = addr.split(" (").next().unwrap();
            return (child, addr.trim().parse().unwrap(), rx);
        }
    }
}

fn sigterm(Server(child): &Server) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(Server(child): &mut Server) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("server did not exit within 10 s of SIGTERM");
}

#[test]
fn serves_then_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, addr, logs) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(addr.ip().is_loopback());
    // A connection is accepted while running.
    let stream = std::net::TcpStream::connect(addr).unwrap();
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
    drop(stream);
    let all: Vec<String> = logs.try_iter().collect();
    assert!(all.iter().any(|l| l.contains("stopped")), "{all:#?}");
    assert!(data.join("chat-server.sqlite3").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "data dir must be private, is {mode:o}");
    }
}

/// `chat-server fingerprint` (flags after the subcommand) creates the identity once,
/// private, and prints exactly the fingerprint the running relay logs, every time.
#[test]
fn the_fingerprint_command_prints_the_relays_key_once_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let print = || {
        let out = Command::new(env!("CARGO_BIN_EXE_chat-server"))
            .args(["fingerprint", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = print();
    assert_eq!(first.lines().count(), 1, "{first:?}");
    let fingerprint = first.trim().to_owned();
    assert!(
        fingerprint
            .parse::<chat_protocol::relay_id::RelayFingerprint>()
            .is_ok()
    );
    assert_eq!(print().trim(), fingerprint, "the same key on every run");
    #[cfg(unix)]
    for file in ["relay-key.pem", "relay-cert.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("listening on"));
    let _ = child.kill();
    let _ = child.wait();
    let listening = listening.expect("the relay never logged `listening on`");
    assert!(
        listening.ends_with(&format!("(fingerprint {fingerprint})")),
        "{listening}"
    );
}

/// On a cluster node systemd hands the relay the cluster's shared identity as credentials
/// (`LoadCredential=`, infra/chat-server-cluster.conf): with both files in
/// `$CREDENTIALS_DIRECTORY` and no `tls:` configured, the relay presents that key, not one
/// of its data directory's; with one file missing it keeps its own.
#[test]
fn a_relay_takes_its_identity_from_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let fingerprint = |data: &std::path::Path, credentials: Option<&std::path::Path>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["fingerprint", "--data-dir", data.to_str().unwrap()]);
        match credentials {
            Some(c) => cmd.env("CREDENTIALS_DIRECTORY", c),
            None => cmd.env_remove("CREDENTIALS_DIRECTORY"),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let cluster_key = fingerprint(&shared, None);
    let own = dir.path().join("own");
    let own_key = fingerprint(&own, None);
    assert_ne!(cluster_key, own_key);
    assert_eq!(fingerprint(&own, Some(&shared)), cluster_key);
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(shared.join("relay-key.pem"), partial.join("relay-key.pem")).unwrap();
    assert_eq!(fingerprint(&own, Some(&partial)), own_key);
}

#[test]
fn config_file_sets_options_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.ron");
    let from_file = dir.path().join("from-file");
    let from_flag = dir.path().join("from-flag");
    std::fs::write(
        &config,
        format!(
            "(listen: \"127.0.0.1:0\", data_dir: {:?}, max_frame_bytes: 8192)",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("max_frame_bytes: 8192"), "{printed}");

    let (mut child, _, _) = spawn(&[
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        from_flag.to_str().unwrap(),
    ]);
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
    assert!(from_flag.exists() && !from_file.exists());
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.ron");
    std::fs::write(&config, "(listen: \"not an address\")").unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.ron"), "{err}");
    // A wrong type deep in the file: the line (so the field) is named, the cause once.
    std::fs::write(
        &config,
        "(\n    queue: (\n        max_envelopes_per_user: \"ten\",\n    ),\n)\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("max_envelopes_per_user: \"ten\""),
        "{err}"
    );
    let first = err.lines().next().unwrap_or_default();
    assert!(
        !err[first.len()..].contains(first.rsplit(": ").next().unwrap()),
        "the cause is said once: {err}"
    );
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--config",
        "0.0.0.0:65432",
        "RUST_LOG",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "--listen",
            &addr,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn admin_stats_and_remove_user() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = |args: &[&str]| {
        Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "admin"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = admin(&["stats"]);
    assert!(!out.status.success(), "no database yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));

    {
        use chat_protocol::Username;
        let store = chat_server::store::Store::open(&data).unwrap();
        let (bob, alice) = (
            Username::parse("bob").unwrap(),
            Username::parse("alice").unwrap(),
        );
        store.bind(&bob, b"key").unwrap();
        store.bind(&alice, b"key2").unwrap();
        let limits = chat_server::Config::default().queue.limits();
        store
            .enqueue(&bob, (&alice, 1), &[0; 100], 1, &limits)
            .unwrap();
    }
    let out = admin(&["stats"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stat(&text, "users"), 2, "{text}");
    assert_eq!(stat(&text, "queued envelopes"), 1, "{text}");
    assert_eq!(stat(&text, "queued bytes"), 100, "{text}");
    assert!(text.contains("of 1073741824"), "the bound is shown: {text}");
    assert_eq!(stat(&text, "refused, server full"), 0, "{text}");
    // Flags work after the subcommand too.
    let out = Command::new(BIN)
        .args(["admin", "stats", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stat(&String::from_utf8(out.stdout).unwrap(), "users"), 2);

    let out = admin(&["remove-user", "BOB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(admin(&["stats"]).stdout).unwrap();
    assert_eq!(stat(&text, "users"), 1, "{text}");
    assert_eq!(stat(&text, "queued envelopes"), 0, "{text}");

    let out = admin(&["remove-user", "bob"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user named bob"));
}

#[test]
fn an_admin_command_whose_reader_has_gone_still_does_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = chat_server::store::Store::open(&data).unwrap();
        let bob = chat_protocol::Username::parse("bob").unwrap();
        store.bind(&bob, b"key").unwrap();
    }
    // Standard output is a pipe whose reader is already closed (as `| head -2` leaves
    // it once it has read its lines): every write to it fails with a broken pipe.
    let admin = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "admin"])
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    for args in [&["stats"][..], &["remove-user", "bob"]] {
        let out = admin(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The removal was done, though nobody read that it was.
    let users = || {
        let out = Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "admin", "stats"])
            .output()
            .unwrap();
        stat(&String::from_utf8(out.stdout).unwrap(), "users")
    };
    assert_eq!(users(), 0);
    // Output and its warning both unwritable (`> log 2>&1` on a full disk): the work is
    // still done, and the command ends as it would have.
    {
        let store = chat_server::store::Store::open(&data).unwrap();
        let carol = chat_protocol::Username::parse("carol").unwrap();
        store.bind(&carol, b"key").unwrap();
    }
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for args in [&["stats"][..], &["remove-user", "carol"]] {
        let status = Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "admin"])
            .args(args)
            .stdout(full())
            .stderr(full())
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}: {status:?}");
    }
    assert_eq!(users(), 0);
}

/// The number after `label:` in `admin stats` output.
fn stat(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
}

#[test]
fn the_shipped_host_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/server.ron");
    let config = chat_server::Config::load(&path).unwrap();
    assert_eq!(config.listen.port(), chat_protocol::DEFAULT_PORT);
    assert_eq!(
        config.data_dir,
        std::path::Path::new("/var/lib/secure-chat")
    );
}
