//! One cluster node's steps in a deploy: its files uploaded and `install.sh` run there,
//! then waiting until its NATS node reports healthy and its relay answers with the
//! cluster's key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::check;
use super::node_files::{nats_config, relay_config};
use super::progress::{Patience, Poll, wait_for};
use super::remote::{Ssh, UPLOAD_DIR};
use super::state::Node;

/// What each node needs uploaded, besides its own configs.
pub(super) struct Upload<'a> {
    pub server: &'a Path,
    pub nats: &'a Path,
    pub host_config: &'a str,
    pub nats_template: &'a str,
    pub identity: PathBuf,
    /// The system account's NKey public key.
    pub system_user: &'a str,
}

/// Uploads node `index`'s files and runs `install.sh mode` there.
pub(super) fn install(
    ssh: &Ssh,
    upload: &Upload<'_>,
    name: &str,
    index: usize,
    private_ips: &[String],
    mode: &str,
) -> anyhow::Result<()> {
    let stage = tempfile::tempdir()?;
    let dir = stage.path();
    let infra = xtask::project_root().join("infra");
    let copy = |from: &Path, to: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(to);
        std::fs::copy(from, &path).with_context(|| format!("cannot read {}", from.display()))?;
        Ok(path)
    };
    let write = |to: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(to);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let paths = [
        copy(upload.server, "chat-server")?,
        copy(upload.nats, "nats-server")?,
        write("server.ron", &relay_config(upload.host_config)?)?,
        write(
            "nats-server.conf",
            &nats_config(
                upload.nats_template,
                name,
                index,
                private_ips,
                upload.system_user,
            ),
        )?,
        copy(&infra.join("chat-server.service"), "chat-server.service")?,
        copy(&infra.join("nats-server.service"), "nats-server.service")?,
        copy(
            &infra.join("chat-server-cluster.conf"),
            "chat-server-cluster.conf",
        )?,
        copy(&upload.identity.join("relay-key.pem"), "relay-key.pem")?,
        copy(&upload.identity.join("relay-cert.pem"), "relay-cert.pem")?,
        copy(&infra.join("install.sh"), "install.sh")?,
    ];
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    eprintln!("node {index}: copying the relay and NATS to {}", ssh.host);
    ssh.upload(&refs)?;
    run_install(ssh, mode)
}

pub(super) fn run_install(ssh: &Ssh, mode: &str) -> anyhow::Result<()> {
    let out = ssh.run(&format!("sh {UPLOAD_DIR}/install.sh {mode}"))?;
    eprint!("{out}");
    Ok(())
}

/// The NATS node's health on the host: `/healthz` on its monitoring address (read from
/// the installed config), which answers OK once JetStream is enabled and current.
pub const NATS_HEALTH_COMMAND: &str = "r=\"${DESTDIR:-}\"; \
     a=$(sed -n 's/^http: *\"\\(.*\\)\"/\\1/p' \"$r/etc/secure-chat/nats-server.conf\"); \
     curl -sS --max-time 5 \"http://${a:-127.0.0.1:8222}/healthz\"";

/// Waits until the node's NATS reports healthy.
pub(super) async fn nats_healthy(ssh: &Ssh, node: &Node) -> anyhow::Result<()> {
    wait_for(
        &format!("NATS on node {}", node.index),
        Patience {
            every: Duration::from_secs(1),
            at_most: Duration::from_secs(120),
        },
        || async {
            Ok(match ssh.run(NATS_HEALTH_COMMAND) {
                Ok(out) if out.contains("\"ok\"") => Poll::Ready(()),
                Ok(out) => Poll::Waiting(out.trim().chars().take(200).collect()),
                Err(e) => Poll::Waiting(format!("{e:#}")),
            })
        },
    )
    .await
}

/// Waits until the node's relay completes a handshake pinned to the cluster's key.
pub(super) async fn relay_answers(ssh: &Ssh, pinned: &str, node: &Node) -> anyhow::Result<()> {
    wait_for(
        &format!("the relay on node {}", node.index),
        Patience {
            every: Duration::from_secs(1),
            at_most: Duration::from_secs(90),
        },
        || async {
            match check::handshake(pinned, Duration::from_secs(5)) {
                Ok(_) => Ok(Poll::Ready(())),
                Err(e) => Ok(Poll::Waiting(format!("{e:#}"))),
            }
        },
    )
    .await
    .map_err(|e| {
        let journal = ssh
            .run(&super::journal_command(30, false))
            .unwrap_or_default();
        e.context(format!(
            "the relay does not answer with the cluster's key; its last log lines:\n{journal}"
        ))
    })
}
