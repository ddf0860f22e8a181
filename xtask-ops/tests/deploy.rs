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

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(120);

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The stand-ins' programs, or None (with a note) when this machine lacks them.
struct Tools {
    moto_server: PathBuf,
    /// The Python next to moto (has boto3).
    python: PathBuf,
    sshd: PathBuf,
}

fn tools(need_sshd: bool) -> Option<Tools> {
    let moto_server = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| find_on_path("moto_server"));
    let sshd = PathBuf::from("/usr/sbin/sshd");
    let mut missing = Vec::new();
    if moto_server.is_none() {
        missing.push("moto_server (pip install 'moto[ec2,ssm,server]')");
    }
    if need_sshd && !sshd.is_file() {
        missing.push("/usr/sbin/sshd (apt install openssh-server)");
    }
    if need_sshd && find_on_path("cargo-zigbuild").is_none() {
        missing.push("cargo-zigbuild (pip install cargo-zigbuild ziglang)");
    }
    if !missing.is_empty() {
        let msg = format!("deploy test needs: {}", missing.join(", "));
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}; `.ci/run` installs them");
        return None;
    }
    let moto_server = moto_server.unwrap();
    let python = moto_server.with_file_name("python");
    Some(Tools {
        python: if python.is_file() {
            python
        } else {
            PathBuf::from("python3")
        },
        moto_server,
        sshd,
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a child process on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// moto serving the EC2 and SSM APIs on a loopback port.
struct Moto {
    _proc: Proc,
    endpoint: String,
    python: PathBuf,
}

impl Moto {
    fn start(tools: &Tools) -> Self {
        let port = free_port();
        let proc = Command::new(&tools.moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .env("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let proc = Proc(proc);
        wait_for_port(port, "moto");
        Self {
            _proc: proc,
            endpoint: format!("http://127.0.0.1:{port}"),
            python: tools.python.clone(),
        }
    }

    /// What exists in the fake AWS account, as JSON, through boto3.
    fn inventory(&self) -> serde_json::Value {
        let script = r#"
import boto3, json, sys
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] != "terminated"]
volumes = ec2.describe_volumes()["Volumes"]
groups = [g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
keys = ec2.describe_key_pairs()["KeyPairs"]
print(json.dumps({"instances": instances, "volumes": volumes, "groups": groups, "keys": keys}, default=str))
"#;
        let out = Command::new(&self.python)
            .args(["-c", script, &self.endpoint])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Where xtask keeps its local state, and the command line to run it against moto.
struct Xtask {
    state_dir: tempfile::TempDir,
    endpoint: String,
    extra_env: Vec<(String, String)>,
}

impl Xtask {
    fn new(endpoint: &str) -> Self {
        Self {
            state_dir: tempfile::tempdir().unwrap(),
            endpoint: endpoint.to_owned(),
            extra_env: Vec::new(),
        }
    }

    /// `xtask <args>` with fake static credentials and nothing that could reach AWS.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask-ops"));
        for var in [
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_EC2",
            "AWS_ENDPOINT_URL_SSM",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "RUST_BACKTRACE",
            "RUST_LIB_BACKTRACE",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(args)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("SECURE_CHAT_DEPLOY_DIR", self.state_dir.path())
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run xtask");
        eprintln!(
            "$ xtask {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "xtask {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    fn run_err(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "xtask {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
}

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

/// The stand-in EC2 host: sshd on loopback, started when asked.
struct Host {
    dir: tempfile::TempDir,
    sshd_port: u16,
    sshd: Option<Proc>,
}

impl Host {
    fn new(moto: &Moto) -> Self {
        // sshd refuses an AuthorizedKeysCommand under a group/world-writable directory,
        // so no /tmp here.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-host");
        std::fs::create_dir(d.join("bin")).unwrap();
        for tool in ["systemctl", "journalctl"] {
            std::fs::copy(fake.join(tool), d.join("bin").join(tool)).unwrap();
        }
        std::fs::copy(
            fake.join("authorized_keys.py"),
            d.join("authorized_keys.py"),
        )
        .unwrap();
        std::fs::create_dir(d.join("root")).unwrap();
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key"))
            .status()
            .unwrap();
        assert!(status.success());
        let sshd_port = free_port();
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             Port {sshd_port}\n\
             HostKey {d}/host_key\n\
             PidFile none\n\
             AuthorizedKeysFile none\n\
             AuthorizedKeysCommand /usr/bin/env {python} {d}/authorized_keys.py {endpoint}\n\
             AuthorizedKeysCommandUser root\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             Subsystem sftp internal-sftp\n\
             SetEnv PATH={d}/bin:/usr/local/bin:/usr/bin:/bin DESTDIR={d}/root\n\
             LogLevel ERROR\n",
            d = d.display(),
            python = moto.python.display(),
            endpoint = moto.endpoint,
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        std::fs::write(
            d.join("ssh_config"),
            format!("Host *\n  HostName 127.0.0.1\n  Port {sshd_port}\n"),
        )
        .unwrap();
        // sshd's privilege separation directory (Debian creates it at boot).
        let _ = std::fs::create_dir_all("/run/sshd");
        Self {
            dir,
            sshd_port,
            sshd: None,
        }
    }

    fn start_sshd(&mut self, sshd: &Path) {
        let proc = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(self.dir.path().join("sshd_config"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start sshd");
        self.sshd = Some(Proc(proc));
        wait_for_port(self.sshd_port, "sshd");
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn relay_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root().join("run/standin/chat-server.service.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The relay was started detached by the systemctl stand-in.
        if let Some(pid) = self.relay_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn login_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A real client core (the engine the desktop and headless clients run) on `addr`.
struct Peer {
    handle: chat_client::ClientHandle,
    _home: tempfile::TempDir,
}

impl Peer {
    fn start(rt: &tokio::runtime::Runtime, addr: &str, name: &str) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut config = chat_client::ClientConfig::new(
            chat_client::home::Home::resolve(Some(home.path().to_owned())).unwrap(),
            addr.to_owned(),
            chat_protocol::Username::parse(name).unwrap(),
        );
        config.identity_bits = 2048;
        let _guard = rt.enter();
        let mut peer = Self {
            handle: chat_client::spawn(config, || {}),
            _home: home,
        };
        peer.expect(|e| matches!(e, chat_client::Event::Ready { .. }));
        peer
    }

    fn expect(&mut self, pred: impl Fn(&chat_client::Event) -> bool) -> chat_client::Event {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.handle.events.try_recv() {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "expected client event never came"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn send(&self, to: &str, text: &str) {
        let cmd = chat_client::Command::Send {
            to: to.into(),
            text: text.into(),
        };
        self.handle.commands.send(cmd).unwrap();
    }
}

/// Alice sends Bob `text`; Bob reads it, Alice sees it delivered.
fn chat(alice: &mut Peer, bob: &mut Peer, text: &str) {
    alice.send("bob", text);
    let got = bob.expect(|e| matches!(e, chat_client::Event::Message { .. }));
    let chat_client::Event::Message {
        from, text: body, ..
    } = got
    else {
        unreachable!()
    };
    assert_eq!((from.as_str(), body.as_str()), ("alice", text));
    alice.expect(|e| matches!(e, chat_client::Event::Delivered { .. }));
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
    let mut rules: Vec<String> = groups[0]["IpPermissions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let port = p["FromPort"].as_i64().unwrap();
            let v4 = p["IpRanges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["CidrIp"].clone());
            let v6 = p["Ipv6Ranges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["CidrIpv6"].clone());
            v4.chain(v6)
                .map(move |c| format!("{port} {}", c.as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    rules.sort();
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

/// The TLS handshake with the relay on 127.0.0.1:`port`, pinned to `pin` if given; returns
/// the key it presented, or the handshake's error.
fn tls_key(port: u16, pin: Option<&str>) -> Result<String, String> {
    let expected = pin.map(|p| p.parse().unwrap());
    let verifier = chat_protocol::tls::PinVerifier::new(expected);
    let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    let conn = rustls::ClientConnection::new(verifier.client_config().unwrap(), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(verifier.presented().unwrap().to_string())
}
