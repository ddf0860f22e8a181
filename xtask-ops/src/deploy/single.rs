//! `cargo xtask deploy` of one relay: build, key pair, security group, instance, install,
//! and the address clients use; `--dry-run` says what it would do.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use super::operate::journal_command;
use super::progress::{Patience, Poll, wait_for};
use super::remote::{Ssh, UPLOAD_DIR};
use super::state::Deployment;
use super::{Aws, DeployArgs, SINGLE_TYPE, STARTING, caller_cidr, newest, runtime, wait_running};
use super::{build, check, cluster, ec2, group};

pub fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    runtime()?.block_on(deploy_async(args))
}

pub(super) async fn deploy_async(args: DeployArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let files = common.files()?;
    let aws = common.aws().await?;
    let name = &common.name;
    eprintln!("region {}, deployment `{name}`", aws.region);

    // One host, or a cluster: from --instances, else what is deployed.
    let found = ec2::find_instances(&aws.ec2, name).await?;
    let nodes = cluster::by_index(found.clone());
    let was_cluster = nodes.iter().any(|(_, i)| ec2::is_node(i));
    let wanted = args.instances.unwrap_or(if was_cluster {
        nodes.len().max(cluster::MIN_NODES)
    } else {
        1
    });
    cluster::check_count(wanted, nodes.len(), was_cluster, args.allow_shrink)?;
    let is_cluster = wanted >= cluster::MIN_NODES;
    let instance_type = args.instance_type.clone().unwrap_or_else(|| {
        if is_cluster {
            cluster::DEFAULT_TYPE.to_owned()
        } else {
            SINGLE_TYPE.to_owned()
        }
    });

    let image = ec2::latest_al2023(&aws.ec2, &aws.ssm).await?;
    eprintln!("image {} ({})", image.id, image.name);
    ec2::check_instance_type(&aws.ec2, &aws.region, &instance_type).await?;

    let ssh_cidr = match &args.ssh_cidr {
        Some(cidr) => cidr.clone(),
        None => caller_cidr()?,
    };
    let key_name = common.resource_name();
    let existing = if is_cluster {
        None
    } else {
        newest(&found, name)
    };
    let key_exists = ec2::key_pair_exists(&aws.ec2, &key_name).await?;
    let have_key_file = files.key().exists();

    if args.dry_run {
        return dry_run(
            &args,
            &aws,
            &image,
            &instance_type,
            (wanted, nodes.len()),
            existing.as_ref(),
            key_exists,
            &ssh_cidr,
        )
        .await;
    }

    // Build first: a failed build should not leave a running (billed) instance behind.
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => build::build_server()?,
    };
    let glibc = build::check_binary(&binary)?;
    eprintln!(
        "server binary {} (needs glibc {}.{})",
        binary.display(),
        glibc.0,
        glibc.1
    );

    // The key pair: AWS only ever gives out the private key at creation.
    let any_instance = existing.as_ref().or(nodes.first().map(|(_, i)| i));
    match (key_exists, have_key_file, any_instance) {
        (true, true, _) => {}
        (_, false, Some(instance)) | (false, _, Some(instance)) => anyhow::bail!(
            "instance {} exists but its SSH key is gone ({} or key pair {key_name} missing), \
             so it cannot be updated. Run `cargo xtask destroy --name {name}` and deploy again",
            instance.instance_id().unwrap_or("?"),
            files.key().display()
        ),
        (exists, _, None) => {
            if exists {
                ec2::delete_key_pair(&aws.ec2, &key_name).await?;
            }
            let pem = ec2::create_key_pair(&aws.ec2, &key_name, name).await?;
            let path = files.save_key(&pem)?;
            eprintln!(
                "created key pair {key_name}; private key in {}",
                path.display()
            );
        }
    }

    let group_id = group::ensure_security_group(&aws.ec2, &key_name, name, |id| {
        group::wanted_rules(args.port, &ssh_cidr, is_cluster.then_some(id))
    })
    .await?;
    eprintln!(
        "security group {group_id}: port {} open to all, SSH from {ssh_cidr}{}",
        args.port,
        if is_cluster {
            ", NATS (4222, 6222) from its own members only"
        } else {
            ""
        }
    );

    let mut deployment = Deployment {
        name: name.clone(),
        region: aws.region.clone(),
        instance_id: None,
        public_ip: None,
        security_group_id: Some(group_id.clone()),
        key_name: key_name.clone(),
        ssh_user: args.ssh_user.clone(),
        port: args.port,
        fingerprint: None,
        nodes: Vec::new(),
    };
    if is_cluster {
        let cluster = cluster::Target {
            wanted,
            instance_type: &instance_type,
            image: &image,
            server: &binary,
        };
        return cluster::deploy(&args, &aws, &files, &mut deployment, nodes, &cluster).await;
    }
    let instance_id = match &existing {
        Some(instance) => {
            let id = instance.instance_id().unwrap_or_default().to_owned();
            eprintln!(
                "instance {id} exists ({}); updating it",
                ec2::state(instance)
            );
            if matches!(
                ec2::state(instance),
                InstanceStateName::Stopped | InstanceStateName::Stopping
            ) {
                wait_stopped(&aws, &id).await?;
                ec2::start(&aws.ec2, &id).await?;
            }
            id
        }
        None => {
            let launch = ec2::Launch {
                name,
                image: &image,
                instance_type: &instance_type,
                key_name: &key_name,
                security_group_id: &group_id,
                node: None,
                dry_run: false,
            };
            let id = ec2::launch(&aws.ec2, &launch)
                .await?
                .context("AWS launched no instance")?;
            eprintln!("launched {id} ({instance_type})");
            files.forget_host()?;
            id
        }
    };
    deployment.instance_id = Some(instance_id.clone());
    files.save(&deployment)?;

    let ip = wait_running(&aws, &instance_id).await?;
    deployment.public_ip = Some(ip.clone());
    files.save(&deployment)?;

    let ssh = common.ssh(&deployment, &files, &ip);
    let ssh_patience = Patience {
        every: Duration::from_secs(3),
        at_most: Duration::from_secs(600),
    };
    ssh.wait_ready(ssh_patience).await?;
    install(&ssh, &binary, args.port)?;

    let relay = format!("{}:{}", ssh.resolved_host()?, args.port);
    let answer = wait_for(
        &format!("the relay on {ip}:{}", args.port),
        Patience {
            every: Duration::from_secs(1),
            at_most: Duration::from_secs(60),
        },
        || async {
            match check::handshake(&relay, Duration::from_secs(5)) {
                Ok(answer) => Ok(Poll::Ready(answer)),
                Err(e) => Ok(Poll::Waiting(format!("{e:#}"))),
            }
        },
    )
    .await
    .map_err(|e| {
        let journal = ssh.run(&journal_command(30, false)).unwrap_or_default();
        e.context(format!(
            "the relay does not answer; its last log lines:\n{journal}"
        ))
    })?;

    // The relay's own fingerprint, read on the host, must be the key it presents over TLS.
    let fingerprint = ssh
        .run(FINGERPRINT_COMMAND)
        .context("cannot read the relay's fingerprint on the host (chat-server fingerprint)")?
        .trim()
        .to_owned();
    let pinned = check::handshake(&format!("{relay}#{fingerprint}"), Duration::from_secs(5))
        .with_context(|| {
            format!(
                "the relay's TLS key is not the one the host reports ({fingerprint}); \
                 something between you and the host answers instead"
            )
        })?;
    anyhow::ensure!(
        pinned.fingerprint == answer.fingerprint,
        "the relay's key changed during the deploy"
    );
    deployment.fingerprint = Some(fingerprint.clone());
    files.save(&deployment)?;
    let address = format!("{ip}:{}#{fingerprint}", args.port);
    println!(
        "Relay is up at {ip}:{} ({}, protocol v{}), key fingerprint {fingerprint}.",
        args.port, answer.software, answer.version
    );
    println!("Connect with (the fingerprint pins the relay's key):");
    println!("  cargo run --release -p chat-client -- --server {address}");
    println!("Logs: cargo xtask logs -f    Shell: cargo xtask ssh    Remove: cargo xtask destroy");
    Ok(())
}

/// What deploy would do, after asking AWS to check the launch (DryRun) where possible.
/// `count` is (instances wanted, instances there).
#[allow(clippy::too_many_arguments)]
pub(super) async fn dry_run(
    args: &DeployArgs,
    aws: &Aws,
    image: &ec2::Image,
    instance_type: &str,
    count: (usize, usize),
    existing: Option<&Instance>,
    key_exists: bool,
    ssh_cidr: &str,
) -> anyhow::Result<()> {
    let key_name = args.common.resource_name();
    let group = group::find_security_group(&aws.ec2, &key_name).await?;
    println!("dry run: nothing is changed");
    println!(
        "  key pair {key_name}: {}",
        if key_exists {
            "exists"
        } else {
            "would be created"
        }
    );
    println!(
        "  security group {key_name}: {}; port {} from anywhere, SSH from {ssh_cidr}",
        group
            .as_deref()
            .map_or("would be created".to_owned(), |g| format!("exists ({g})")),
        args.port
    );
    let (wanted, there) = count;
    if wanted >= cluster::MIN_NODES {
        let zones = ec2::zones_offering(
            &aws.ec2,
            ec2::default_subnets(&aws.ec2).await?,
            instance_type,
        )
        .await?;
        println!("  NATS client (4222) and route (6222) ports: from the group's own members only");
        println!(
            "  cluster of {wanted}: {} node(s) updated one at a time, {} {instance_type} \
             launched from {} across {} zone(s) ({}), each running a relay and a NATS node",
            there.min(wanted),
            wanted.saturating_sub(there),
            image.id,
            zones.len().min(wanted),
            zones
                .iter()
                .take(wanted)
                .map(|z| z.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if there > wanted {
            println!(
                "  then nodes {wanted}..{} removed (--allow-shrink): their replicas moved to \
                 the others, removed from the meta group, their instances terminated",
                there - 1
            );
        }
        return Ok(());
    }
    match (existing, group) {
        (Some(instance), _) => println!(
            "  instance {} ({}): the binary would be updated and the service restarted",
            instance.instance_id().unwrap_or("?"),
            ec2::state(instance)
        ),
        (None, Some(group_id)) if key_exists => {
            let launch = ec2::Launch {
                name: &args.common.name,
                image,
                instance_type,
                key_name: &key_name,
                security_group_id: &group_id,
                node: None,
                dry_run: true,
            };
            ec2::launch(&aws.ec2, &launch).await?;
            println!(
                "  instance: a {instance_type} from {} would be launched (AWS confirmed the \
                 permission)",
                image.id
            );
        }
        (None, _) => println!(
            "  instance: a {instance_type} from {} would be launched",
            image.id
        ),
    }
    Ok(())
}

pub(super) async fn wait_stopped(aws: &Aws, instance_id: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("instance {instance_id} to stop"),
        STARTING,
        || async {
            let instance = ec2::describe(&aws.ec2, instance_id).await?;
            Ok(match ec2::state(&instance) {
                InstanceStateName::Stopped => Poll::Ready(()),
                other => Poll::Waiting(other.to_string()),
            })
        },
    )
    .await
}

/// Prints the relay's fingerprint on the host (root, or sudo; under `$DESTDIR` when the
/// deploy test's stand-in host sets it), from the identity the service created.
pub(super) const FINGERPRINT_COMMAND: &str = "r=\"${DESTDIR:-}\"; if [ \"$(id -u)\" -eq 0 ]; then s=; else s=\"sudo -n\"; fi; \
     $s \"$r/usr/local/bin/chat-server\" fingerprint --config \"$r/etc/secure-chat/server.ron\" \
     --data-dir \"$r/var/lib/secure-chat\"";

/// The host's copy of infra/server.ron, listening on `port` on all addresses (v4 and v6).
pub(super) fn host_config(port: u16) -> anyhow::Result<String> {
    let path = xtask::project_root().join("infra/server.ron");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    listen_on(&text, port).with_context(|| format!("{} has no `listen:` line", path.display()))
}

pub(super) fn listen_on(config: &str, port: u16) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = config
        .lines()
        .map(|line| match line.trim_start().strip_prefix("listen:") {
            Some(_) if !found => {
                found = true;
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}listen: \"[::]:{port}\",")
            }
            _ => line.to_owned(),
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

/// Uploads the binary, unit, config and install script and runs the install.
pub(super) fn install(ssh: &Ssh, binary: &Path, port: u16) -> anyhow::Result<()> {
    let stage = tempfile::tempdir()?;
    let infra = xtask::project_root().join("infra");
    let server = stage.path().join("chat-server");
    std::fs::copy(binary, &server).with_context(|| format!("cannot read {}", binary.display()))?;
    let config = stage.path().join("server.ron");
    std::fs::write(&config, host_config(port)?)?;
    let unit = infra.join("chat-server.service");
    let script = infra.join("install.sh");
    eprintln!("copying the server to {}", ssh.host);
    ssh.upload(&[&server, &config, &unit, &script])?;
    eprintln!("installing and (re)starting the service");
    let out = ssh.run(&format!("sh {UPLOAD_DIR}/install.sh"))?;
    eprint!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_config_listens_on_the_chosen_port_everywhere() {
        let text = host_config(7777).unwrap();
        assert!(text.contains("listen: \"[::]:7777\","), "{text}");
        assert_eq!(text.matches("listen:").count(), 1);
        assert_eq!(listen_on("(data_dir: \"x\")", 1), None);
    }
}
