//! Removing nodes from a cluster (`deploy --instances N --allow-shrink`), highest index
//! first, one at a time, while the others keep serving:
//!
//! 1. every staying node must report healthy;
//! 2. on a node that stays, `chat-server admin evacuate-node NAME`: JetStream places a new
//!    copy of every replica the leaving node holds on another node, and the command waits
//!    until each is current (meanwhile that stream has one up-to-date copy fewer);
//! 3. on the leaving node, its relay and NATS are stopped (their clients move to the next
//!    relay in their address list);
//! 4. on a node that stays, `chat-server admin forget-node NAME` with the system account's
//!    NKey (sent over ssh's stdin, never on a command line): the meta group forgets the
//!    node, so its quorum is a majority of the nodes that are left;
//! 5. the instance is terminated (before step 4 if the node could not be reached).
//!
//! The deploy runs this after it has updated the remaining nodes (routes without the
//! leaving ones, and the system account's key), one at a time as in any re-deploy.

use anyhow::Context;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use super::cluster::{NATS_HEALTH_COMMAND, node_name};
use super::progress::{Poll, wait_for};
use super::remote::Ssh;
use super::state::{Deployment, Files, Node};
use super::{Aws, DeployArgs, ec2};

/// `chat-server … admin ARGS` on a cluster node, with its installed config.
fn admin_command(args: &str) -> String {
    format!(
        "r=\"${{DESTDIR:-}}\"; \"$r/usr/local/bin/chat-server\" --config \
         \"$r/etc/secure-chat/server.ron\" admin {args}"
    )
}

/// Stops and disables a node's relay and NATS (as install.sh does, with sudo unless root).
const STOP_COMMAND: &str = "if [ \"$(id -u)\" -eq 0 ]; then s=; else s='sudo -n'; fi; \
     $s systemctl disable --now chat-server.service nats-server.service";

/// Removes the `leaving` instances (by node index) from the cluster, as the module
/// documentation says, and finishes the removal of `unfinished` nodes (whose instance an
/// earlier run terminated before removing them from the meta group). `staying` reaches
/// the nodes that stay (all updated and healthy). Before each removal every staying node
/// must report healthy. Stops at the first failure, saying which step of which node
/// failed; a deploy with the same `--instances --allow-shrink` continues from there.
pub async fn remove_nodes(
    args: &DeployArgs,
    aws: &Aws,
    files: &Files,
    deployment: &mut Deployment,
    staying: &[Ssh],
    mut leaving: Vec<(usize, Instance)>,
    unfinished: Vec<Node>,
) -> anyhow::Result<()> {
    let name = &args.common.name;
    let seed = files.ensure_system_nkey()?.seed().map_err(|e| {
        anyhow::anyhow!(
            "cannot read the NATS system account's seed ({e}) from {}",
            files.system_nkey().display()
        )
    })?;
    let anchor = staying.first().context("no node stays")?;
    let forget = |index: usize| -> anyhow::Result<()> {
        let node = node_name(name, index);
        let out = anchor.run_with_input(
            &admin_command(&format!("forget-node {node} --system-nkey -")),
            &seed,
        )?;
        eprint!("{out}");
        Ok(())
    };
    for node in unfinished {
        let index = node.index;
        eprintln!("node {index}: its instance is gone; removing it from the meta group");
        forget(index).map_err(|e| {
            e.context(format!(
                "removing node {index} (already terminated) from the JetStream meta group \
                 failed. Run the same deploy again to retry"
            ))
        })?;
        deployment.nodes.retain(|n| n.index != index);
        files.save(deployment)?;
    }
    leaving.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
    for (index, instance) in leaving {
        let node = node_name(name, index);
        let id = instance.instance_id().unwrap_or_default().to_owned();
        let stopped = |step: &str, e: anyhow::Error| {
            e.context(format!(
                "removing node {index} ({id}) stopped at: {step}. Run the same deploy again \
                 to continue"
            ))
        };
        // Every staying node healthy, so that stopping this one cannot cost the quorum.
        for (i, ssh) in staying.iter().enumerate() {
            let health = ssh.run(NATS_HEALTH_COMMAND).unwrap_or_default();
            if !health.contains("\"ok\"") {
                return Err(stopped(
                    "checking the other nodes (nothing changed)",
                    anyhow::anyhow!(
                        "the NATS node on {} is not healthy ({})",
                        staying[i].host,
                        health.trim()
                    ),
                ));
            }
        }
        eprintln!("node {index} ({id}): moving its JetStream replicas to the other nodes");
        let out = anchor
            .run(&admin_command(&format!("evacuate-node {node}")))
            .map_err(|e| {
                stopped(
                    "moving its replicas (those moved stay moved; the node still runs)",
                    e,
                )
            })?;
        eprint!("{out}");
        // Stopped: forget it at once (it no longer counts toward the quorum), then
        // terminate. Unreachable: terminate first, so that it cannot come back.
        let stopped_cleanly = match instance.public_ip_address() {
            Some(ip) => match args.common.ssh(deployment, files, ip).run(STOP_COMMAND) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("node {index}: could not stop its services ({e:#})");
                    false
                }
            },
            None => false,
        };
        if stopped_cleanly {
            forget(index).map_err(|e| stopped("removing it from the JetStream meta group", e))?;
        }
        eprintln!("node {index} ({id}): terminating the instance");
        ec2::terminate(&aws.ec2, &id)
            .await
            .map_err(|e| stopped("terminating the instance", e))?;
        wait_for(
            &format!("instance {id} to terminate"),
            super::STARTING,
            || async {
                let instance = ec2::describe(&aws.ec2, &id).await?;
                Ok(match ec2::state(&instance) {
                    InstanceStateName::Terminated => Poll::Ready(()),
                    other => Poll::Waiting(other.to_string()),
                })
            },
        )
        .await
        .map_err(|e| stopped("waiting for the instance to terminate", e))?;
        if !stopped_cleanly {
            forget(index).map_err(|e| stopped("removing it from the JetStream meta group", e))?;
        }
        deployment.nodes.retain(|n| n.index != index);
        files.save(deployment)?;
        eprintln!("node {index}: removed");
    }
    Ok(())
}
