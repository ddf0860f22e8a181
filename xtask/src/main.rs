//! Developer and operator tasks: `cargo xtask <task>`.
//!
//! - `demo`: a local relay and two desktop windows, the quickest way to see it work.
//! - `screenshot`: a live conversation in the real desktop window under Xvfb, saved as PNG.
//!
//! This crate is kept out of the workspace's default members so a plain `cargo build`
//! never compiles what only these tasks need.

mod demo;
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(args) => demo::run(args),
        Task::Screenshot(args) => screenshot::run(args),
    }
}

/// The workspace root, from this crate's manifest directory.
fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Builds the workspace binaries and returns the directory holding them.
fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(project_root())
        .args(["build", "-p", "chat-server", "-p", "chat-client"]);
    if release {
        cmd.arg("--release");
    }
    anyhow::ensure!(cmd.status()?.success(), "building the binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}
