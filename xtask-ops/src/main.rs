//! The heavier developer and operator tasks, run through `cargo xtask <task>` (the xtask
//! binary passes them here, so they build only when first used):
//!
//! - `bench`: the relay against Redis pub/sub, figures and a chart in target/bench.
//! - `deploy`, `logs`, `status`, `ssh`, `destroy`: the relay on AWS EC2.

mod bench;
mod deploy;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Secure Chat developer tasks (bench and AWS)"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
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
    /// One load process of `bench --connections-only --backend nats` (started by it)
    #[command(hide = true)]
    IdleWorker(bench::IdleWorkerArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Bench(args) => bench::run(args),
        Task::Deploy(args) => deploy::deploy(args),
        Task::Logs(args) => deploy::logs(args),
        Task::Status(args) => deploy::status(args),
        Task::Ssh(args) => deploy::ssh(args),
        Task::Destroy(args) => deploy::destroy(args),
        Task::IdleWorker(args) => bench::idle_worker(args),
    }
}
