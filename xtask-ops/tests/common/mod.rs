//! What the deploy tests share: moto as the EC2 API, sshd hosts, xtask runs, and real
//! clients.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The stand-ins' programs, or None (with a note) when this machine lacks them.
pub struct Tools {
    pub moto_server: PathBuf,
    /// The Python next to moto (has boto3).
    pub python: PathBuf,
    pub sshd: PathBuf,
}

pub fn tools(need_sshd: bool) -> Option<Tools> {
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

#[path = "../../../chat-server/tests/common/ports.rs"]
mod ports;
pub use ports::free_port;

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a child process on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// moto serving the EC2 and SSM APIs on a loopback port.
pub struct Moto {
    pub _proc: Proc,
    pub endpoint: String,
    pub python: PathBuf,
}

impl Moto {
    pub fn start(tools: &Tools) -> Self {
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
    pub fn inventory(&self) -> serde_json::Value {
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
pub struct Xtask {
    pub state_dir: tempfile::TempDir,
    pub endpoint: String,
    pub extra_env: Vec<(String, String)>,
}

impl Xtask {
    pub fn new(endpoint: &str) -> Self {
        Self {
            state_dir: tempfile::tempdir().unwrap(),
            endpoint: endpoint.to_owned(),
            extra_env: Vec::new(),
        }
    }

    /// `xtask <args>` with fake static credentials and nothing that could reach AWS.
    pub fn command(&self, args: &[&str]) -> Command {
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

    pub fn run(&self, args: &[&str]) -> Output {
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

    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "xtask {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn run_err(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "xtask {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
}

/// The stand-in EC2 host: sshd on loopback, started when asked.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub sshd_port: u16,
    pub sshd: Option<Proc>,
}

impl Host {
    pub fn new(moto: &Moto) -> Self {
        Self::at(moto, "127.0.0.1", "")
    }

    /// A host whose only address is the loopback address `addr` (sshd listens there, and
    /// the systemctl stand-in puts the services there); `env` adds `SetEnv` pairs.
    pub fn at(moto: &Moto, addr: &str, env: &str) -> Self {
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
            "ListenAddress {addr}\n\
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
             SetEnv PATH={d}/bin:/usr/local/bin:/usr/bin:/bin DESTDIR={d}/root HOST_ADDR={addr} {env}\n\
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

    pub fn start_sshd(&mut self, sshd: &Path) {
        let proc = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(self.dir.path().join("sshd_config"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start sshd");
        self.sshd = Some(Proc(proc));
        let deadline = Instant::now() + PATIENCE;
        let addr = self.listen_addr();
        while TcpStream::connect((addr.as_str(), self.sshd_port)).is_err() {
            assert!(Instant::now() < deadline, "sshd never listened on {addr}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn listen_addr(&self) -> String {
        let config = std::fs::read_to_string(self.dir.path().join("sshd_config")).unwrap();
        config
            .lines()
            .find_map(|l| l.strip_prefix("ListenAddress "))
            .unwrap()
            .to_owned()
    }

    /// The pid of a service the systemctl stand-in started (`chat-server`, `nats-server`).
    /// The pid of `unit`'s process as the systemctl stand-in started it, if it runs (a
    /// zombie, stopped but not yet reaped, does not).
    pub fn service_pid(&self, unit: &str) -> Option<u32> {
        let pid: u32 =
            std::fs::read_to_string(self.root().join(format!("run/standin/{unit}.service.pid")))
                .ok()
                .and_then(|s| s.trim().parse().ok())?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        (state != "Z").then_some(pid)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn relay_pid(&self) -> Option<u32> {
        self.service_pid("chat-server")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The services were started detached by the systemctl stand-in.
        for unit in ["chat-server", "nats-server"] {
            if let Some(pid) = self.service_pid(unit) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// The inventory's security group rules as "PORT SOURCE" lines (a group as `sg:ID`).
pub fn group_rules(group: &serde_json::Value) -> Vec<String> {
    let mut rules: Vec<String> = group["IpPermissions"]
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
            let groups = p["UserIdGroupPairs"].as_array().unwrap().iter().map(|g| {
                serde_json::Value::String(format!("sg:{}", g["GroupId"].as_str().unwrap()))
            });
            v4.chain(v6)
                .chain(groups)
                .map(move |c| format!("{port} {}", c.as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    rules.sort();
    rules
}

pub fn login_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A real client core (the engine the desktop and headless clients run) on `addr`.
pub struct Peer {
    pub name: String,
    pub handle: chat_client::ClientHandle,
    pub _home: tempfile::TempDir,
}

impl Peer {
    pub fn start(rt: &tokio::runtime::Runtime, addr: &str, name: &str) -> Self {
        let home = tempfile::tempdir().unwrap();
        let mut config = chat_client::ClientConfig::new(
            chat_client::home::Home::resolve(Some(home.path().to_owned())).unwrap(),
            addr.to_owned(),
            chat_protocol::Username::parse(name).unwrap(),
        );
        config.identity_bits = 2048;
        let _guard = rt.enter();
        let mut peer = Self {
            name: name.to_owned(),
            handle: chat_client::spawn(config, || {}),
            _home: home,
        };
        peer.expect(|e| matches!(e, chat_client::Event::Ready { .. }));
        peer
    }

    /// The next event within `patience`, if one comes.
    pub fn next_event(&mut self, patience: Duration) -> Option<chat_client::Event> {
        let deadline = Instant::now() + patience;
        loop {
            match self.handle.events.try_recv() {
                Ok(e) => return Some(e),
                Err(_) if Instant::now() >= deadline => return None,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn expect(&mut self, pred: impl Fn(&chat_client::Event) -> bool) -> chat_client::Event {
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

    pub fn send(&self, to: &str, text: &str) {
        let cmd = chat_client::Command::Send {
            to: to.into(),
            text: text.into(),
        };
        self.handle.commands.send(cmd).unwrap();
    }
}

/// Alice sends Bob (any recipient) `text`; Bob reads it, Alice sees it delivered.
pub fn chat(alice: &mut Peer, bob: &mut Peer, text: &str) {
    alice.send(&bob.name, text);
    let got = bob.expect(|e| matches!(e, chat_client::Event::Message { .. }));
    let chat_client::Event::Message {
        from, text: body, ..
    } = got
    else {
        unreachable!()
    };
    assert_eq!((from.as_str(), body.as_str()), (alice.name.as_str(), text));
    alice.expect(|e| matches!(e, chat_client::Event::Delivered { .. }));
}

/// The TLS handshake with the relay on 127.0.0.1:`port`, pinned to `pin` if given; returns
/// the key it presented, or the handshake's error.
pub fn tls_key(port: u16, pin: Option<&str>) -> Result<String, String> {
    tls_key_at("127.0.0.1", port, pin)
}

/// As [`tls_key`], with the relay on `addr`:`port`.
pub fn tls_key_at(addr: &str, port: u16, pin: Option<&str>) -> Result<String, String> {
    let expected = pin.map(|p| p.parse().unwrap());
    let verifier = chat_protocol::tls::PinVerifier::new(expected);
    let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    let conn = rustls::ClientConnection::new(verifier.client_config().unwrap(), name).unwrap();
    let tcp = std::net::TcpStream::connect((addr, port)).map_err(|e| e.to_string())?;
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
