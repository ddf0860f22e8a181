//! Operating a deployed relay: `logs`, `ssh`, `status` and `destroy`.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use super::progress::{Poll, wait_for};
use super::state::{Deployment, Files};
use super::{Aws, Common, DestroyArgs, LogsArgs, STARTING, SshArgs, StatusArgs, newest, runtime};
use super::{check, cluster, ec2, fleet, group};

/// The journal command on the host (sudo unless already root).
pub(super) fn journal_command(lines: u32, follow: bool) -> String {
    format!(
        "if [ \"$(id -u)\" -eq 0 ]; then s=; else s='sudo -n'; fi; \
         $s journalctl -u chat-server.service --no-pager -o short-iso -n {lines}{}",
        if follow { " -f" } else { "" }
    )
}

/// Loads what is needed to reach the host: cache, then tags for the current IP.
pub(super) async fn reach(
    common: &Common,
) -> anyhow::Result<(Aws, Files, Deployment, Option<Instance>)> {
    let files = common.files()?;
    let aws = common.aws().await?;
    let found = ec2::find_instances(&aws.ec2, &common.name).await?;
    let mut deployment = files.load()?.unwrap_or_else(|| Deployment {
        name: common.name.clone(),
        region: aws.region.clone(),
        key_name: common.resource_name(),
        ssh_user: "ec2-user".into(),
        port: chat_protocol::DEFAULT_PORT,
        ..Deployment::default()
    });
    if found.iter().any(ec2::is_node) {
        // A cluster: every node, by index, as AWS sees it now.
        let nodes = cluster::by_index(found);
        deployment.nodes = nodes
            .iter()
            .map(|(i, inst)| fleet::node(*i, inst))
            .collect();
        deployment.public_ip = deployment.nodes[0].public_ip.clone();
        deployment.instance_id = Some(deployment.nodes[0].instance_id.clone());
        let first = nodes.into_iter().next().map(|(_, i)| i);
        return Ok((aws, files, deployment, first));
    }
    let instance = newest(&found, &common.name);
    if let Some(instance) = &instance {
        deployment.instance_id = instance.instance_id().map(str::to_owned);
        deployment.public_ip = instance.public_ip_address().map(str::to_owned);
    }
    Ok((aws, files, deployment, instance))
}

pub(super) fn host_of(deployment: &Deployment, name: &str) -> anyhow::Result<String> {
    deployment.public_ip.clone().with_context(|| {
        format!("deployment `{name}` has no running instance; run `cargo xtask deploy` first")
    })
}

pub fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let (_, files, deployment, _) = runtime()?.block_on(reach(&args.common))?;
    if !deployment.nodes.is_empty() {
        return fleet::logs(&args, &files, &deployment);
    }
    let host = host_of(&deployment, &args.common.name)?;
    let ssh = args.common.ssh(&deployment, &files, &host);
    let status = ssh
        .command(Some(&journal_command(args.lines, args.follow)), false)
        .status()
        .context("cannot run ssh")?;
    anyhow::ensure!(status.success(), "reading the journal failed ({status})");
    Ok(())
}

pub fn ssh(args: SshArgs) -> anyhow::Result<()> {
    let (_, files, deployment, _) = runtime()?.block_on(reach(&args.common))?;
    let host = match args.instance {
        Some(i) if !deployment.nodes.is_empty() => fleet::host_of_node(&deployment, i)?,
        _ => host_of(&deployment, &args.common.name)?,
    };
    let ssh = args.common.ssh(&deployment, &files, &host);
    let remote = (!args.command.is_empty()).then(|| args.command.join(" "));
    let tty = remote.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let status = ssh
        .command(remote.as_deref(), tty)
        .status()
        .context("cannot run ssh")?;
    std::process::exit(status.code().unwrap_or(1));
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (aws, files, deployment, instance) = runtime()?.block_on(reach(&args.common))?;
    let name = &args.common.name;
    if !deployment.nodes.is_empty() {
        let rt = runtime()?;
        let instances = rt.block_on(ec2::find_instances(&aws.ec2, name))?;
        return fleet::status(&args.common, &aws.region, &files, &deployment, &instances);
    }
    let Some(instance) = instance else {
        println!("deployment `{name}`: nothing deployed in {}", aws.region);
        return Ok(());
    };
    let state = ec2::state(&instance);
    println!("deployment  {name} ({})", aws.region);
    println!("instance    {}", instance.instance_id().unwrap_or("?"));
    println!(
        "type        {}",
        instance.instance_type().map_or("?", |t| t.as_str())
    );
    let uptime = instance.launch_time().map(|t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        human_duration(now.saturating_sub(t.secs()).max(0) as u64)
    });
    match (&state, uptime) {
        (InstanceStateName::Running, Some(up)) => println!("state       running (up {up})"),
        (other, _) => println!("state       {other}"),
    }
    let Some(ip) = deployment.public_ip.clone() else {
        println!("address     none");
        return Ok(());
    };
    println!("address     {ip}:{}", deployment.port);
    let ssh = args.common.ssh(&deployment, &files, &ip);
    let host = ssh.resolved_host().unwrap_or(ip);
    let pin = deployment
        .fingerprint
        .as_ref()
        .map(|fp| format!("#{fp}"))
        .unwrap_or_default();
    match check::handshake(
        &format!("{host}:{}{pin}", deployment.port),
        Duration::from_secs(5),
    ) {
        Ok(answer) => println!(
            "relay       answers ({}, protocol v{}), key {}{}",
            answer.software,
            answer.version,
            answer.fingerprint,
            if pin.is_empty() {
                " (not pinned: deploy again to record it)"
            } else {
                " as pinned"
            }
        ),
        Err(e) => println!("relay       not answering: {e:#}"),
    }
    if files.key().exists() {
        let service = ssh
            .run("systemctl is-active chat-server.service || true")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e:#})"));
        println!("service     {service}");
    }
    Ok(())
}

pub(super) fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

pub fn destroy(args: DestroyArgs) -> anyhow::Result<()> {
    runtime()?.block_on(destroy_async(args))
}

pub(super) async fn destroy_async(args: DestroyArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let files = common.files()?;
    let aws = common.aws().await?;
    let name = &common.name;
    let key_name = common.resource_name();
    let instances = ec2::find_instances(&aws.ec2, name).await?;
    let group = group::find_security_group(&aws.ec2, &key_name).await?;
    let key_exists = ec2::key_pair_exists(&aws.ec2, &key_name).await?;
    let ids: Vec<String> = instances
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();

    if ids.is_empty() && group.is_none() && !key_exists {
        files.remove_all()?;
        println!("deployment `{name}`: nothing to destroy in {}", aws.region);
        return Ok(());
    }
    println!("This deletes, in {}:", aws.region);
    for id in &ids {
        println!("  instance {id} and its disk (the relay's accounts and queued messages)");
    }
    if let Some(group) = &group {
        println!("  security group {key_name} ({group})");
    }
    if key_exists {
        println!("  key pair {key_name} and {}", files.key().display());
    }
    if !args.yes && !confirm(name)? {
        anyhow::bail!("not confirmed; nothing was deleted");
    }

    for id in &ids {
        ec2::terminate(&aws.ec2, id).await?;
    }
    for id in &ids {
        wait_for(&format!("instance {id} to terminate"), STARTING, || async {
            let instance = ec2::describe(&aws.ec2, id).await?;
            Ok(match ec2::state(&instance) {
                InstanceStateName::Terminated => Poll::Ready(()),
                other => Poll::Waiting(other.to_string()),
            })
        })
        .await?;
    }
    if let Some(group) = &group {
        group::delete_security_group(&aws.ec2, group).await?;
    }
    if key_exists {
        ec2::delete_key_pair(&aws.ec2, &key_name).await?;
    }
    files.remove_all()?;
    println!("deployment `{name}` destroyed");
    Ok(())
}

pub(super) fn confirm(name: &str) -> anyhow::Result<bool> {
    eprint!("Type the deployment name ({name}) to confirm: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(human_duration(2 * 86_400 + 3600), "2 d 1 h");
    }
}
