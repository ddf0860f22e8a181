//! Developer and operator tasks: `cargo xtask <task>`.
//!
//! - `demo`: a local relay and two desktop windows, the quickest way to see it work.
//! - `screenshot`: a live conversation in the real desktop window under Xvfb, saved as PNG.
//! - `bench`: the relay against Redis pub/sub, figures and a chart in target/bench.
//! - `deploy`, `logs`, `status`, `ssh`, `destroy`: the relay on AWS EC2.
//!
//! This crate is kept out of the workspace's default members so a plain `cargo build`
//! never compiles what only these tasks need.

mod bench;
mod demo;
mod deploy;
mod procs;
mod screenshot;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Secure Chat developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Start a local relay and two desktop windows (alice and bob) to try it out
    Demo(demo::Args),
    /// Run a relay, a headless bob and the desktop window as alice under Xvfb, chat, and
    /// save a screenshot (needs Xvfb, xdotool and ImageMagick's `import`)
    Screenshot(screenshot::Args),
    /// Measure the relay against Redis pub/sub on this machine (loopback): throughput,
    /// latency, memory per connection, client crypto cost
    Bench(bench::Args),
    /// Provision (or update) the relay on an AWS EC2 instance and print its address
    Deploy(deploy::DeployArgs),
    /// Show the deployed relay's logs (its systemd journal, over SSH)
    Logs(deploy::LogsArgs),
    /// Show the deployed instance and whether the relay answers
    Status(deploy::StatusArgs),
    /// Open a shell (or run a command) on the deployed instance
    Ssh(deploy::SshArgs),
    /// Terminate the instance and delete its security group, key pair and local key
    Destroy(deploy::DestroyArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(args) => demo::run(args),
        Task::Screenshot(args) => screenshot::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Deploy(args) => deploy::deploy(args),
        Task::Logs(args) => deploy::logs(args),
        Task::Status(args) => deploy::status(args),
        Task::Ssh(args) => deploy::ssh(args),
        Task::Destroy(args) => deploy::destroy(args),
    }
}

/// The workspace root, from this crate's manifest directory.
fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Builds the given workspace binaries and returns the directory holding them.
fn build_binaries(packages: &[&str], release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(project_root()).arg("build");
    for package in packages {
        cmd.args(["-p", package]);
    }
    if release {
        cmd.arg("--release");
    }
    anyhow::ensure!(cmd.status()?.success(), "building {packages:?} failed");
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Cargo's target directory (CARGO_TARGET_DIR or `target/`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}
