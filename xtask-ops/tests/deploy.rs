//! `cargo xtask deploy | logs | status | ssh | destroy`, end to end, against stand-ins
//! that run here on loopback:
//! - moto in server mode as the EC2 + SSM API (AMI, instance type and key pair validation
//!   on; fake static credentials; no AWS config file, no instance metadata), and
//! - OpenSSH's sshd as the instance, accepting exactly the key that deploy registered with
//!   moto (AuthorizedKeysCommand asks moto), with `systemctl`/`journalctl` stand-ins
//!   (tests/fake-host/) that really run the uploaded binary, installed under a scratch root.
//!
//! ssh reaches the instance through an ssh_config whose `HostName` is 127.0.0.1: nothing
//! ever connects to the made-up public IP that moto hands out.
//!
//! Needs `moto_server` (pip `moto[ec2,ssm,server]`, found on PATH or through MOTO_SERVER),
//! `/usr/sbin/sshd` (Debian's openssh-server) and `cargo-zigbuild` with zig (pip
//! `cargo-zigbuild ziglang`); `.ci/run` installs them. Without them these tests say so and
//! pass, except under CI (`CI` set), where a missing tool is a failure.

mod common;

use std::io::Write;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn preflight_errors_are_clear_and_dry_run_changes_nothing() {
    let Some(tools) = tools(false) else { return };
    let moto = Moto::start(&tools);
    let xtask = Xtask::new(&moto.endpoint);

    // No credentials anywhere (and no instance metadata to fall back on).
    let err = {
        let mut cmd = xtask.command(&["status"]);
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY");
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(err.contains("no usable AWS credentials"), "{err}");
    assert!(err.contains("aws sso login"), "{err}");

    // No region.
    let err = {
        let out = xtask
            .command(&["status"])
            .env_remove("AWS_REGION")
            .output()
            .unwrap();
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(err.contains("no AWS region is set: pass --region"), "{err}");

    // An endpoint that does not answer.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let err = xtask.run_err(&["status", "--endpoint-url", &dead]);
    assert!(
        err.contains("could not complete ec2:DescribeInstances"),
        "{err}"
    );

    // t2.micro does not exist in Stockholm (as on AWS).
    let err = xtask.run_err(&[
        "deploy",
        "--dry-run",
        "--region",
        "eu-north-1",
        "--ssh-cidr",
        "127.0.0.1/32",
    ]);
    assert!(
        err.contains("instance type t2.micro is not offered in eu-north-1"),
        "{err}"
    );

    // SSH from everywhere is refused outright.
    let err = xtask.run_err(&["deploy", "--dry-run", "--ssh-cidr", "0.0.0.0/0"]);
    assert!(
        err.contains("SSH open to the whole internet is refused"),
        "{err}"
    );

    let out = xtask.run_ok(&["deploy", "--dry-run", "--ssh-cidr", "127.0.0.1/32"]);
    assert!(out.contains("dry run: nothing is changed"), "{out}");
    assert!(
        out.contains("key pair secure-chat-secure-chat: would be created"),
        "{out}"
    );
    let inventory = moto.inventory();
    for kind in ["instances", "groups", "keys"] {
        assert_eq!(
            inventory[kind].as_array().unwrap().len(),
            0,
            "{kind}: {inventory}"
        );
    }
    assert!(!xtask.state_dir.path().join("secure-chat").exists());
}

#[test]
fn deploy_update_inspect_and_destroy() {
    let Some(tools) = tools(true) else { return };
    let moto = Moto::start(&tools);
    let mut host = Host::new(&moto);
    let mut xtask = Xtask::new(&moto.endpoint);
    // The zig build gets a target dir of its own: this test's cargo holds the main one.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../deploy-target");
    xtask
        .extra_env
        .push(("CARGO_TARGET_DIR".into(), target.display().to_string()));
    let port = free_port();
    let ssh_config = host.dir.path().join("ssh_config");
    let user = login_user();
    let port_arg = port.to_string();
    let deploy_args = [
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

    // First deploy, from nothing. sshd starts only once deploy waits for it, as a real
    // instance's sshd comes up well after the instance is "running".
    let mut first: Vec<&str> = deploy_args.to_vec();
    first.extend(["--endpoint-url", &moto.endpoint]);
    let mut child = xtask
        .command(&first)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("deploy: {line}");
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("deploy never waited for SSH");
        if line.starts_with("SSH on ") {
            assert!(
                !line.contains("done"),
                "SSH answered before sshd ran: {line}"
            );
            break;
        }
    }
    host.start_sshd(&tools.sshd);
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    println!("{stdout}");
    assert!(status.success(), "deploy failed:\n{log}");

    // It said where the relay is and how to connect.
    let address = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Relay is up at "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in: {stdout}"))
        .to_owned();
    let public_ip = address.rsplit_once(':').unwrap().0.to_owned();
    assert!(address.ends_with(&format!(":{port}")), "{address}");
    let fingerprint = stdout
        .split_once("key fingerprint ")
        .map(|(_, rest)| rest.split(['.', ' ', '\n']).next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no fingerprint in: {stdout}"));
    assert!(
        stdout.contains(&format!("chat-client -- --server {address}#{fingerprint}")),
        "{stdout}"
    );
    // The printed pin is the key the relay (on loopback here) presents, and another pin
    // is refused.
    assert_eq!(tls_key(port, Some(&fingerprint)).unwrap(), fingerprint);
    let wrong = "b-7MjBbFVR2f6z61934tp3O_aL2e-cUpJ86yyG5WiSs";
    let refused = tls_key(port, Some(wrong)).unwrap_err();
    assert!(refused.contains("mismatch"), "{refused}");
    assert!(
        log.contains("SSH on") && log.contains("Connection refused"),
        "{log}"
    );
    // The binary was built for old glibc and checked.
    let glibc = log
        .lines()
        .find_map(|l| {
            l.split_once("(needs glibc ")
                .map(|(_, v)| v.trim_end_matches(')'))
        })
        .unwrap_or_else(|| panic!("no glibc check in:\n{log}"));
    let (major, minor) = glibc.split_once('.').unwrap();
    assert!(
        (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap()) <= (2, 28),
        "{glibc}"
    );

    // What AWS (moto) now holds: one instance, IMDSv2 only, encrypted disk, tagged; the
    // group opens the relay to all and SSH to us only; one key pair.
    let inventory = moto.inventory();
    let instances = inventory["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{inventory}");
    let instance = &instances[0];
    let instance_id = instance["InstanceId"].as_str().unwrap().to_owned();
    assert_eq!(instance["InstanceType"], "t2.micro");
    assert_eq!(instance["PublicIpAddress"], public_ip.as_str());
    assert_eq!(instance["MetadataOptions"]["HttpTokens"], "required");
    let tags: Vec<(String, String)> = instance["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Key"].as_str().unwrap().into(),
                t["Value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        tags.contains(&("app".into(), "secure-chat".into())),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("Name".into(), "secure-chat".into())),
        "{tags:?}"
    );
    let volumes = inventory["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v["Encrypted"] == true) && !volumes.is_empty(),
        "{volumes:?}"
    );
    let groups = inventory["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    let rules = group_rules(&groups[0]);
    let mut expected = vec![
        "22 127.0.0.1/32".to_owned(),
        format!("{port} 0.0.0.0/0"),
        format!("{port} ::/0"),
    ];
    expected.sort();
    assert_eq!(rules, expected);
    assert_eq!(inventory["keys"].as_array().unwrap().len(), 1);
    let key = xtask.state_dir.path().join("secure-chat/ssh-key.pem");
    let mode = std::fs::metadata(&key).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // The host got the unit from infra/ and runs the relay as a service.
    let unit = std::fs::read_to_string(host.root().join("etc/systemd/system/chat-server.service"))
        .unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/chat-server.service"),
    )
    .unwrap();
    assert_eq!(unit, shipped);
    let first_pid = host.relay_pid().expect("the service runs");

    // Real clients talk through the deployed relay.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = format!("127.0.0.1:{port}");
    let mut bob = Peer::start(&rt, &relay, "bob");
    let mut alice = Peer::start(&rt, &relay, "alice");
    chat(&mut alice, &mut bob, "hello through the deployed relay");

    // Deploy again: the same instance, a new binary copy, the service restarted, the
    // relay's data (the accounts) kept; the clients reconnect by themselves.
    let out = xtask.run(&deploy_args);
    assert!(out.status.success());
    let again = String::from_utf8_lossy(&out.stderr);
    assert!(
        again.contains(&format!("instance {instance_id} exists")),
        "{again}"
    );
    let inventory = moto.inventory();
    assert_eq!(inventory["instances"].as_array().unwrap().len(), 1);
    assert_eq!(
        inventory["instances"][0]["InstanceId"],
        instance_id.as_str()
    );
    assert_eq!(inventory["keys"].as_array().unwrap().len(), 1);
    let second_pid = host.relay_pid().unwrap();
    assert_ne!(first_pid, second_pid, "the service was not restarted");
    chat(&mut alice, &mut bob, "still here after the update");

    // logs: the relay's own output, through journalctl over SSH.
    let logs = xtask.run_ok(&[
        "logs",
        "-n",
        "200",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
    ]);
    assert!(
        logs.contains(&format!("listening on 127.0.0.1:{port}")),
        "{logs}"
    );

    // status: the instance and a live relay.
    let status = xtask.run_ok(&["status", "--ssh-config", ssh_config.to_str().unwrap()]);
    assert!(status.contains(&instance_id), "{status}");
    assert!(status.contains("running (up"), "{status}");
    assert!(
        status.contains(&format!("address     {public_ip}:{port}")),
        "{status}"
    );
    assert!(
        status.contains("relay       answers (chat-server"),
        "{status}"
    );
    assert!(status.contains("service     active"), "{status}");

    // ssh: a command on the instance.
    let out = xtask.run_ok(&[
        "ssh",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
        "--",
        "echo",
        "on-the-host:$DESTDIR",
    ]);
    assert_eq!(out.trim(), format!("on-the-host:{}", host.root().display()));

    // destroy asks first; anything but the name keeps everything.
    let mut child = xtask
        .command(&["destroy"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"no\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was deleted"));
    assert_eq!(moto.inventory()["instances"].as_array().unwrap().len(), 1);

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
    assert!(!key.exists());
    let status = xtask.run_ok(&["status"]);
    assert!(status.contains("nothing deployed"), "{status}");
}

/// The shipped unit passes systemd's own checks (no systemd runs here, but its analyzer
/// does). The binary path must exist for `verify`, so it is checked under a scratch root.
#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let Some(analyze) = find_on_path("systemd-analyze") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing"
        );
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/chat-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // Point ExecStart at a binary that exists here; everything else is verified as shipped.
    let fake_bin = dir.path().join("chat-server");
    std::fs::write(&fake_bin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        &fake_bin,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let text = text.replace("/usr/local/bin/chat-server", fake_bin.to_str().unwrap());
    let copy = dir.path().join("chat-server.service");
    std::fs::write(&copy, text).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("chat-server.service"))
        .collect();
    assert!(out.status.success() && complaints.is_empty(), "{stderr}");
}
