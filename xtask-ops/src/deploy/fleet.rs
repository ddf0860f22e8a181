//! `status`, `logs` and `ssh` across a cluster's nodes (`deploy --instances N`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use super::state::{Deployment, Files, Node};
use super::{Common, LogsArgs, check, cluster, ec2};

/// A node as AWS describes it now.
pub fn node(index: usize, instance: &Instance) -> Node {
    Node {
        index,
        instance_id: instance.instance_id().unwrap_or_default().to_owned(),
        zone: instance
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        public_ip: instance.public_ip_address().map(str::to_owned),
        private_ip: instance.private_ip_address().map(str::to_owned),
    }
}

/// Node `index`'s public address, or why there is none.
pub fn host_of_node(deployment: &Deployment, index: usize) -> anyhow::Result<String> {
    let indexes: Vec<String> = deployment
        .nodes
        .iter()
        .map(|n| n.index.to_string())
        .collect();
    let node = deployment
        .nodes
        .iter()
        .find(|n| n.index == index)
        .with_context(|| {
            format!(
                "the cluster has no node {index}; its nodes are {}",
                indexes.join(", ")
            )
        })?;
    node.public_ip.clone().with_context(|| {
        format!(
            "node {index} ({}) has no address: is it running?",
            node.instance_id
        )
    })
}

/// The journal of the relay and the NATS node on a host (sudo unless already root).
fn journal_command(lines: u32, follow: bool) -> String {
    format!(
        "if [ \"$(id -u)\" -eq 0 ]; then s=; else s='sudo -n'; fi; \
         $s journalctl -u chat-server.service -u nats-server.service --no-pager -o short-iso \
         -n {lines}{}",
        if follow { " -f" } else { "" }
    )
}

/// Prints the logs of one node, or of every node with each line prefixed `[node I]`
/// (with `--follow`, the nodes' streams interleaved as they come).
pub fn logs(args: &LogsArgs, files: &Files, deployment: &Deployment) -> anyhow::Result<()> {
    let nodes: Vec<&Node> = match args.instance {
        Some(i) => {
            host_of_node(deployment, i)?;
            deployment.nodes.iter().filter(|n| n.index == i).collect()
        }
        None => deployment.nodes.iter().collect(),
    };
    let command = journal_command(args.lines, args.follow);
    let mut readers = Vec::new();
    for node in nodes {
        let Some(ip) = node.public_ip.clone() else {
            println!("[node {}] no address: is it running?", node.index);
            continue;
        };
        let ssh = args.common.ssh(deployment, files, &ip);
        let mut child = ssh
            .command(Some(&command), false)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run ssh")?;
        let stdout = child.stdout.take().context("no ssh output")?;
        let (index, prefix) = (node.index, args.instance.is_none());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if prefix {
                    println!("[node {index}] {line}");
                } else {
                    println!("{line}");
                }
            }
            child.wait()
        }));
        if !args.follow {
            // One node after the other, unless following.
            let status = readers
                .pop()
                .expect("just pushed")
                .join()
                .map_err(|_| anyhow::anyhow!("the log reader panicked"))??;
            anyhow::ensure!(
                status.success(),
                "reading node {}'s journal failed ({status})",
                node.index
            );
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    Ok(())
}

/// Prints each node: instance, zone, state, address, whether its relay answers with the
/// cluster's key, its NATS node's health and its services.
pub fn status(
    common: &Common,
    region: &str,
    files: &Files,
    deployment: &Deployment,
    instances: &[Instance],
) -> anyhow::Result<()> {
    println!(
        "deployment  {} ({region}): cluster of {} node(s)",
        deployment.name,
        deployment.nodes.len()
    );
    let pin = deployment
        .fingerprint
        .as_ref()
        .map(|fp| format!("#{fp}"))
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for node in &deployment.nodes {
        let state = instances
            .iter()
            .find(|i| i.instance_id() == Some(node.instance_id.as_str()))
            .map_or(InstanceStateName::Terminated, ec2::state);
        println!(
            "node {}      {} in {}, {state}",
            node.index, node.instance_id, node.zone
        );
        let Some(ip) = node.public_ip.clone() else {
            println!("  address   none");
            continue;
        };
        println!("  address   {ip}:{}", deployment.port);
        addresses.push(format!("{ip}:{}", deployment.port));
        let ssh = common.ssh(deployment, files, &ip);
        let host = ssh.resolved_host().unwrap_or(ip);
        match check::handshake(
            &format!("{host}:{}{pin}", deployment.port),
            Duration::from_secs(5),
        ) {
            Ok(answer) => println!(
                "  relay     answers ({}, protocol v{}){}",
                answer.software,
                answer.version,
                if pin.is_empty() {
                    ""
                } else {
                    " with the cluster's key"
                }
            ),
            Err(e) => println!("  relay     not answering: {e:#}"),
        }
        if !files.key().exists() {
            continue;
        }
        let nats = match ssh.run(cluster::NATS_HEALTH_COMMAND) {
            Ok(out) if out.contains("\"ok\"") => "healthy (JetStream current)".to_owned(),
            Ok(out) => format!("not healthy: {}", out.trim()),
            Err(e) => format!("unknown ({e:#})"),
        };
        println!("  nats      {nats}");
        let services = ssh
            .run(
                "for u in chat-server nats-server; do printf '%s %s  ' $u \
                 \"$(systemctl is-active $u.service || true)\"; done",
            )
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e:#})"));
        println!("  services  {services}");
    }
    if let (Some(first), Some(fp)) = (addresses.first(), &deployment.fingerprint) {
        let rest: String = addresses[1..].iter().map(|a| format!(",{a}")).collect();
        println!("clients     --server {first}#{fp}{rest}");
    }
    Ok(())
}
