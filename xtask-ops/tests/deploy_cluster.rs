//! `cargo xtask deploy --instances 3`, end to end, against stand-ins on loopback: moto as
//! the EC2 API, and OpenSSH sshds as the instances, each on a loopback address of its own
//! (127.X.Y.1–4): three nodes, grown to four and shrunk back to three while clients chat. The ssh_config maps each made-up public IP to a stand-in the
//! first time ssh is asked for it (tests/fake-host/route.py); the systemctl stand-in really
//! runs the uploaded relay and NATS binaries, with the installed configs rewritten to the
//! stand-ins' addresses. Nothing ever connects to a made-up address.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// The next `n` messages' texts `peer` receives, each within a minute of the one before
/// (a client that lost its relay may be waiting out its reconnection backoff).
fn texts(peer: &mut Peer, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match peer.next_event(Duration::from_secs(60)) {
            Some(chat_client::Event::Message { text, .. }) => got.push(text),
            Some(_) => {}
            None => panic!(
                "only {} of {n} messages came; the last: {:?}",
                got.len(),
                got.last()
            ),
        }
    }
    got
}

/// An instance's node index tag.
fn node_tag(instance: &serde_json::Value) -> &str {
    instance["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["Key"] == "secure-chat-node")
        .and_then(|t| t["Value"].as_str())
        .unwrap()
}

/// The JetStream meta group's size as the NATS node on stand-in host `addr` reports it
/// (its monitoring port, `/jsz`).
fn meta_group_size(addr: &str) -> u64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect((addr, 8222)).unwrap();
    conn.write_all(b"GET /jsz HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let jsz: serde_json::Value = serde_json::from_str(body).unwrap();
    jsz["meta_cluster"]["cluster_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no meta group in {jsz}"))
}

/// What a deploy run printed, and what was sent while it ran.
struct Deployed {
    text: String,
    sent: Vec<String>,
}

/// Runs `cargo xtask ARGS`, calling `during` (which sends a message and returns its text)
/// every 300 ms until it ends; fails if the deploy fails or sends fewer than three.
fn deploy_while(xtask: &Xtask, args: &[&str], mut during: impl FnMut() -> String) -> Deployed {
    let mut child = xtask
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let log = std::thread::spawn(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .inspect(|l| eprintln!("deploy: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut sent = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the deploy never finished");
        sent.push(during());
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = child.wait().unwrap();
    let text = log.join().unwrap();
    assert!(status.success(), "deploy {args:?} failed:\n{text}");
    assert!(
        sent.len() >= 3,
        "the deploy was too quick to test: {}",
        sent.len()
    );
    Deployed { text, sent }
}

#[test]
fn a_cluster_deploys_grows_shrinks_one_node_at_a_time_and_goes_away() {
    let Some(tools) = tools(true) else { return };
    let moto = Moto::start(&tools);
    // Four stand-in hosts on a loopback /24 of their own.
    let net = format!(
        "127.{}.{}",
        100 + rand::random::<u8>() % 100,
        rand::random::<u8>()
    );
    let state = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let s = state.path();
    let mut hosts: Vec<Host> = (1..=4)
        .map(|i| {
            Host::at(
                &moto,
                &format!("{net}.{i}"),
                &format!("STANDIN_MAP={}/map.json", s.display()),
            )
        })
        .collect();
    let slots: Vec<serde_json::Value> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| serde_json::json!({"addr": format!("{net}.{}", i + 1), "port": h.sshd_port}))
        .collect();
    std::fs::write(s.join("slots.json"), serde_json::to_string(&slots).unwrap()).unwrap();
    std::fs::write(s.join("hosts.conf"), "").unwrap();
    let route = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-host/route.py");
    let ssh_config = s.join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Match exec \"{} {} %h {} {}\"\nInclude {}/hosts.conf\n",
            tools.python.display(),
            route.display(),
            s.display(),
            moto.endpoint,
            s.display()
        ),
    )
    .unwrap();
    for host in &mut hosts {
        host.start_sshd(&tools.sshd);
    }

    let mut xtask = Xtask::new(&moto.endpoint);
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../deploy-target");
    xtask
        .extra_env
        .push(("CARGO_TARGET_DIR".into(), target.display().to_string()));
    xtask
        .extra_env
        .push(("PYTHON".into(), tools.python.display().to_string()));
    let port = free_port();
    let (port_arg, user) = (port.to_string(), login_user());
    let args = [
        "deploy",
        "--ssh-cidr",
        "127.0.0.1/32",
        "--ssh-user",
        &user,
        "--port",
        &port_arg,
        "--ssh-config",
        ssh_config.to_str().unwrap(),
    ];

    // A second instance count that cannot work is refused before anything is made.
    let err = xtask.run_err(&[&args[..], &["--instances", "2"]].concat());
    assert!(err.contains("3 nodes for a quorum"), "{err}");
    assert_eq!(moto.inventory()["instances"].as_array().unwrap().len(), 0);

    let out = xtask.run(&[&args[..], &["--instances", "3"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "deploy failed");
    let fingerprint = stdout
        .split_once("key fingerprint ")
        .map(|(_, rest)| rest.split(['.', ' ', '\n']).next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no fingerprint in: {stdout}"));
    let command = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("cargo run --release -p chat-client -- --server ")
        })
        .unwrap_or_else(|| panic!("no client command in: {stdout}"));
    let listed: Vec<&str> = command.split(',').collect();
    assert_eq!(listed.len(), 3, "{command}");
    assert!(
        listed[0].ends_with(&format!(":{port}#{fingerprint}")),
        "{command}"
    );

    // Three instances in three zones, numbered; the group opens NATS to itself only.
    let inventory = moto.inventory();
    let instances = inventory["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{inventory}");
    let mut zones: Vec<&str> = instances
        .iter()
        .map(|i| i["Placement"]["AvailabilityZone"].as_str().unwrap())
        .collect();
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), 3, "{zones:?}");
    let mut nodes: Vec<&str> = instances
        .iter()
        .map(|i| {
            assert_eq!(i["InstanceType"], "t3.small");
            node_tag(i)
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["0", "1", "2"]);
    // Each node's root volume has room for NATS's store.
    let sizes: Vec<i64> = inventory["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["Attachments"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|a| instances.iter().any(|i| i["InstanceId"] == a["InstanceId"]))
            })
        })
        .map(|v| v["Size"].as_i64().unwrap())
        .collect();
    assert_eq!(sizes, [16, 16, 16], "{inventory}");
    let groups = inventory["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    let group_id = groups[0]["GroupId"].as_str().unwrap();
    let mut expected = vec![
        "22 127.0.0.1/32".to_owned(),
        format!("{port} 0.0.0.0/0"),
        format!("{port} ::/0"),
        format!("4222 sg:{group_id}"),
        format!("6222 sg:{group_id}"),
    ];
    expected.sort();
    assert_eq!(group_rules(&groups[0]), expected);

    // Every host runs a relay and a NATS node from the uploaded files, and every relay
    // presents the one key the deploy printed.
    for (i, host) in hosts.iter().enumerate().take(3) {
        assert!(
            host.service_pid("nats-server").is_some(),
            "host {i}: no NATS"
        );
        assert!(host.relay_pid().is_some(), "host {i}: no relay");
        let conf =
            std::fs::read_to_string(host.root().join("etc/secure-chat/nats-server.conf")).unwrap();
        assert!(conf.contains("sync_interval: always"), "{conf}");
        let addr = format!("{net}.{}", i + 1);
        assert_eq!(
            tls_key_at(&addr, port, Some(&fingerprint)).unwrap(),
            fingerprint
        );
    }

    // Alice on one relay, Bob on another (each knows all three, their own first).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let list = |first: usize| {
        let addrs: Vec<String> = (0..3)
            .map(|k| format!("{net}.{}:{port}", (first + k) % 3 + 1))
            .collect();
        format!("{}#{fingerprint},{}", addrs[0], addrs[1..].join(","))
    };
    let mut bob = Peer::start(&rt, &list(1), "bob");
    let mut alice = Peer::start(&rt, &list(0), "alice");
    chat(&mut alice, &mut bob, "hello across relays");

    // Node 1's NATS hangs (SIGSTOP): a re-deploy restarts nothing, since restarting node 0
    // now could cost the quorum, and says where it stopped and why.
    let hung = hosts[1].service_pid("nats-server").unwrap();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &hung.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let relays: Vec<_> = hosts.iter().map(|h| h.relay_pid()).collect();
    let err = xtask.run_err(&args);
    assert!(
        err.contains("stopped at node 0") && err.contains("node 1's NATS is not healthy"),
        "{err}"
    );
    assert_eq!(
        hosts.iter().map(|h| h.relay_pid()).collect::<Vec<_>>(),
        relays
    );
    signal("-CONT");

    // Growing to four is a rolling re-deploy of the three (their routes change) and a new
    // node, while Alice keeps writing: everything arrives, once, in order.
    let pids: Vec<_> = hosts.iter().map(|h| h.relay_pid()).collect();
    let grow = [&args[..], &["--instances", "4"]].concat();
    let mut n = 0;
    let log = deploy_while(&xtask, &grow, || {
        n += 1;
        let text = format!("while growing {n}");
        alice.send("bob", &text);
        text
    });
    let sent = log.sent;
    for i in 0..4 {
        assert!(log.text.contains(&format!("node {i} (")), "{}", log.text);
    }
    eprintln!("{} messages sent while growing", sent.len());
    assert_eq!(texts(&mut bob, sent.len()), sent);
    for (i, host) in hosts.iter().enumerate().take(3) {
        assert_ne!(
            host.relay_pid(),
            pids[i],
            "host {i}'s relay was not restarted"
        );
    }
    assert_eq!(moto.inventory()["instances"].as_array().unwrap().len(), 4);
    assert!(
        hosts[3].service_pid("nats-server").is_some(),
        "node 3: no NATS"
    );
    assert_eq!(meta_group_size(&format!("{net}.1")), 4);
    chat(&mut alice, &mut bob, "after growing");

    // Carol on the new node (the others are her fallbacks).
    let carol_list =
        format!("{net}.4:{port}#{fingerprint},{net}.1:{port},{net}.2:{port},{net}.3:{port}");
    let mut carol = Peer::start(&rt, &carol_list, "carol");
    chat(&mut alice, &mut carol, "hello, new node");

    // Shrinking needs --allow-shrink; without it nothing changes.
    let err = xtask.run_err(&[&args[..], &["--instances", "3"]].concat());
    assert!(err.contains("--allow-shrink"), "{err}");
    assert_eq!(moto.inventory()["instances"].as_array().unwrap().len(), 4);

    // With it, node 3 leaves while Alice writes to Carol, whose relay goes away: she moves
    // to another and gets everything, once, in order.
    let shrink = [&args[..], &["--instances", "3", "--allow-shrink"]].concat();
    let mut n = 0;
    let log = deploy_while(&xtask, &shrink, || {
        n += 1;
        let text = format!("while shrinking {n}");
        alice.send("carol", &text);
        text
    });
    assert!(
        log.text.contains("node 3 (") && log.text.contains("moving its JetStream replicas"),
        "{}",
        log.text
    );
    assert!(log.text.contains("node 3: removed"), "{}", log.text);
    eprintln!("{} messages sent while shrinking", log.sent.len());
    assert_eq!(texts(&mut carol, log.sent.len()), log.sent);
    let inventory = moto.inventory();
    let left: Vec<&str> = inventory["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(node_tag)
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(!left.contains(&"3"), "{left:?}");
    assert!(
        hosts[3].service_pid("nats-server").is_none(),
        "node 3's NATS runs"
    );
    assert!(hosts[3].relay_pid().is_none(), "node 3's relay runs");
    assert_eq!(meta_group_size(&format!("{net}.1")), 3);
    for host in &hosts[..3] {
        let conf =
            std::fs::read_to_string(host.root().join("etc/secure-chat/nats-server.conf")).unwrap();
        // The cluster's listen address and a route to each of the three nodes.
        assert_eq!(conf.matches(":6222\"").count(), 1 + 3, "{conf}");
    }
    chat(&mut alice, &mut carol, "after shrinking");
    chat(&mut alice, &mut bob, "bob still here");
    drop(carol);
    // Memory of each node's services after this (for the README's sizing).
    for host in &hosts[..3] {
        for unit in ["nats-server", "chat-server"] {
            let pid = host.service_pid(unit).unwrap();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap_or("?");
            eprintln!("{unit} on {}: {rss}", host.root().display());
        }
    }

    // status, logs and ssh, per node.
    let status = xtask.run_ok(&["status", "--ssh-config", ssh_config.to_str().unwrap()]);
    assert!(status.contains("cluster of 3 node(s)"), "{status}");
    assert_eq!(
        status.matches("healthy (JetStream current)").count(),
        3,
        "{status}"
    );
    assert_eq!(
        status.matches("with the cluster's key").count(),
        3,
        "{status}"
    );
    let logs = xtask.run_ok(&[
        "logs",
        "--instance",
        "1",
        "-n",
        "500",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
    ]);
    assert!(
        logs.contains(&format!("listening on {net}.2:{port}")),
        "{logs}"
    );
    let logs = xtask.run_ok(&[
        "logs",
        "-n",
        "5",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
    ]);
    for i in 0..3 {
        assert!(logs.contains(&format!("[node {i}] ")), "{logs}");
    }
    let out = xtask.run_ok(&[
        "ssh",
        "--instance",
        "2",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
        "--",
        "echo",
        "on:$HOST_ADDR",
    ]);
    assert_eq!(out.trim(), format!("on:{net}.3"));
    let err = xtask.run_err(&[&args[..], &["--instances", "1"]].concat());
    assert!(err.contains("going back to one host"), "{err}");

    // destroy leaves nothing: no instance, group or key pair in AWS, no local key or
    // relay identity.
    drop((alice, bob));
    let out = xtask.run_ok(&["destroy", "--yes"]);
    assert!(out.contains("destroyed"), "{out}");
    let inventory = moto.inventory();
    for kind in ["instances", "groups", "keys"] {
        assert_eq!(
            inventory[kind].as_array().unwrap().len(),
            0,
            "{kind}: {inventory}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(xtask.state_dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
