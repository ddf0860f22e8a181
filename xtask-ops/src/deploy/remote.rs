//! The instance over SSH: the system `ssh` and `scp`, with the deployment's own key and
//! known_hosts file, and the user's `--ssh-config` (`-F`) when given.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use super::progress::{Patience, Poll, wait_for};

/// How to reach the instance.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub user: String,
    pub host: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub config: Option<PathBuf>,
}

/// The directory in the login user's home where files are uploaded before installing.
pub const UPLOAD_DIR: &str = "secure-chat-upload";

impl Ssh {
    fn options(&self, cmd: &mut Command) {
        if let Some(config) = &self.config {
            cmd.arg("-F").arg(config);
        }
        cmd.arg("-i").arg(&self.key);
        // A new instance's host key is learnt on first contact and then pinned in a
        // known_hosts file of this deployment alone (EC2 reuses IP addresses).
        let known = format!("UserKnownHostsFile={}", self.known_hosts.display());
        for opt in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=accept-new",
            known.as_str(),
            "ConnectTimeout=10",
            "BatchMode=yes",
            "ServerAliveInterval=15",
            "LogLevel=ERROR",
        ] {
            cmd.args(["-o", opt]);
        }
    }

    fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// `ssh … user@host -- <remote>`; `tty` asks for a terminal (interactive use).
    pub fn command(&self, remote: Option<&str>, tty: bool) -> Command {
        let mut cmd = Command::new("ssh");
        self.options(&mut cmd);
        if tty {
            cmd.arg("-t");
        }
        cmd.arg(self.destination());
        if let Some(remote) = remote {
            cmd.arg("--").arg(remote);
        }
        cmd
    }

    /// Runs a command on the instance, failing with its stderr.
    pub fn run(&self, remote: &str) -> anyhow::Result<String> {
        let out = self
            .command(Some(remote), false)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ssh; is the OpenSSH client installed?")?;
        anyhow::ensure!(
            out.status.success(),
            "`{remote}` on {} failed ({}): {}",
            self.host,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// As [`Ssh::run`], with `input` on the command's stdin (a secret kept off command lines).
    pub fn run_with_input(&self, remote: &str, input: &str) -> anyhow::Result<String> {
        let mut child = self
            .command(Some(remote), false)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ssh; is the OpenSSH client installed?")?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "`{remote}` on {} failed ({}): {}",
            self.host,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Copies files into `~/UPLOAD_DIR/` on the instance.
    pub fn upload(&self, files: &[&Path]) -> anyhow::Result<()> {
        self.run(&format!("mkdir -p {UPLOAD_DIR}"))?;
        let mut cmd = Command::new("scp");
        self.options(&mut cmd);
        cmd.arg("-q").args(files);
        cmd.arg(format!("{}:{UPLOAD_DIR}/", self.destination()));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("cannot run scp; is the OpenSSH client installed?")?;
        anyhow::ensure!(
            out.status.success(),
            "copying files to {} failed: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The host name ssh really connects to for this instance (its `HostName` after the
    /// ssh config is applied). The relay check connects there too, so a config that
    /// reaches the instance another way (an alias, a test host) works for both.
    pub fn resolved_host(&self) -> anyhow::Result<String> {
        let mut cmd = Command::new("ssh");
        if let Some(config) = &self.config {
            cmd.arg("-F").arg(config);
        }
        let out = cmd
            .arg("-G")
            .arg(self.destination())
            .stdin(Stdio::null())
            .output()
            .context("cannot run ssh; is the OpenSSH client installed?")?;
        anyhow::ensure!(
            out.status.success(),
            "ssh -G failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(hostname_from_ssh_g(&String::from_utf8_lossy(&out.stdout))
            .unwrap_or_else(|| self.host.clone()))
    }

    /// Waits until the instance accepts our SSH login (sshd starts well after "running").
    pub async fn wait_ready(&self, patience: Patience) -> anyhow::Result<()> {
        wait_for(&format!("SSH on {}", self.host), patience, || async {
            let out = tokio::process::Command::from(self.command(Some("true"), false))
                .stdin(Stdio::null())
                .output()
                .await
                .context("cannot run ssh; is the OpenSSH client installed?")?;
            Ok(ssh_poll(out.status.success(), &out.stderr))
        })
        .await
    }
}

/// Reads one attempt: ready, or why not (ssh's last line of complaint).
fn ssh_poll(success: bool, stderr: &[u8]) -> Poll<()> {
    if success {
        return Poll::Ready(());
    }
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    Poll::Waiting(last.unwrap_or("not answering yet").trim().to_owned())
}

fn hostname_from_ssh_g(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("hostname "))
        .map(|h| h.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_g_hostname_is_read() {
        let out = "user ec2-user\nhostname 127.0.0.1\nport 2222\n";
        assert_eq!(hostname_from_ssh_g(out).as_deref(), Some("127.0.0.1"));
        assert_eq!(hostname_from_ssh_g("port 22\n"), None);
    }

    #[test]
    fn a_failed_attempt_reports_ssh_s_last_complaint() {
        let stderr = b"ssh: connect to host 203.0.113.7 port 22: Connection refused\r\n";
        match ssh_poll(false, stderr) {
            Poll::Waiting(why) => assert!(why.ends_with("Connection refused"), "{why}"),
            Poll::Ready(()) => panic!("a failure is not ready"),
        }
        assert!(matches!(ssh_poll(false, b""), Poll::Waiting(w) if w == "not answering yet"));
        assert!(matches!(ssh_poll(true, b"warning"), Poll::Ready(())));
    }

    /// A real ssh against a loopback port where nothing listens yet, then a listener that
    /// speaks no SSH: both are "not ready" with ssh's own words, and the wait gives up.
    #[tokio::test]
    async fn not_ready_yet_is_retried_until_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.path().join("ssh_config");
        std::fs::write(
            &config,
            format!("Host *\n  HostName 127.0.0.1\n  Port {port}\n"),
        )
        .unwrap();
        let ssh = Ssh {
            user: "ec2-user".into(),
            host: "203.0.113.7".into(),
            key: dir.path().join("no-key"),
            known_hosts: dir.path().join("known_hosts"),
            config: Some(config),
        };
        assert_eq!(ssh.resolved_host().unwrap(), "127.0.0.1");
        let patience = Patience {
            every: std::time::Duration::from_millis(100),
            at_most: std::time::Duration::from_millis(300),
        };
        let err = ssh.wait_ready(patience).await.unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(err.contains("Connection refused"), "{err}");
    }
}
