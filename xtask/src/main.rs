//! Developer and operator tasks: `cargo xtask <task>`.
//!
//! - `demo`: a local relay and two desktop windows, the quickest way to see it work.
//! - `screenshot`: a live conversation in the real desktop window under Xvfb, saved as PNG.
//! - `dist`: release artifacts (.tar.gz, .deb, Windows .zip) for people without Rust.
//! - `bench`: the relay against Redis pub/sub, figures and a chart in target/bench.
//! - `deploy`, `logs`, `status`, `ssh`, `destroy`: the relay on AWS EC2.
//!
//! This binary builds only what the demo and the screenshot need. `bench` and the AWS
//! tasks live in the `xtask-ops` package (the AWS SDK, redis and plotters take many
//! minutes to compile on a small machine): they are passed to it unchanged, and it is
//! built the first time one of them is used. The crate is kept out of the workspace's
//! default members so a plain `cargo build` never compiles what only these tasks need.

mod demo;
mod dist;
mod screenshot;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Secure Chat developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The arguments of a task run by `xtask-ops`, passed on unchanged (`--help` included).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
struct Passed {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Start a local relay and two desktop windows (alice and bob) to try it out
    Demo(demo::Args),
    /// Run a relay, a headless bob and the desktop window as alice under Xvfb, chat, and
    /// save a screenshot (needs Xvfb, xdotool and ImageMagick's `import`)
    Screenshot(screenshot::Args),
    /// Build release artifacts of the client and relay into target/dist: a .tar.gz and a
    /// .deb for Linux x86_64 (glibc 2.28), and a Windows x86_64 .zip
    Dist(dist::Args),
    /// Measure the relay against Redis pub/sub on this machine (loopback): throughput,
    /// latency, memory per connection, client crypto cost
    Bench(Passed),
    /// Provision (or update) the relay on an AWS EC2 instance and print its address
    Deploy(Passed),
    /// Show the deployed relay's logs (its systemd journal, over SSH)
    Logs(Passed),
    /// Show the deployed instance and whether the relay answers
    Status(Passed),
    /// Open a shell (or run a command) on the deployed instance
    Ssh(Passed),
    /// Terminate the instance and delete its security group, key pair and local key
    Destroy(Passed),
}

fn main() -> anyhow::Result<()> {
    let (task, passed) = match Cli::parse().task {
        Task::Demo(args) => return demo::run(args),
        Task::Screenshot(args) => return screenshot::run(args),
        Task::Dist(args) => return dist::run(args),
        Task::Bench(p) => ("bench", p),
        Task::Deploy(p) => ("deploy", p),
        Task::Logs(p) => ("logs", p),
        Task::Status(p) => ("status", p),
        Task::Ssh(p) => ("ssh", p),
        Task::Destroy(p) => ("destroy", p),
    };
    ops(task, &passed.args)
}

/// Runs `xtask-ops TASK ARGS…` through cargo (building it if needed) and exits with its
/// status.
fn ops(task: &str, args: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(xtask::project_root())
        .args(["run", "--quiet", "--package", "xtask-ops", "--"])
        .arg(task)
        .args(args)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run cargo to start xtask-ops: {e}"))?;
    std::process::exit(status.code().unwrap_or(1));
}
