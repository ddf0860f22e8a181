//! Developer and operator tasks: `cargo xtask <task>`.
//!
//! Tasks are added by later work (deploy, logs, status, bench, demo); this crate is kept out
//! of the workspace's default members so plain `cargo build` never compiles the AWS SDK.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        None | Some("help" | "--help" | "-h") => {
            print_help();
            Ok(())
        }
        Some(other) => {
            print_help();
            anyhow::bail!("unknown task `{other}`")
        }
    }
}

fn print_help() {
    eprintln!(
        "Usage: cargo xtask <task>\n\nTasks:\n  help    this message\n\nProject root: {}",
        project_root().display()
    );
}

/// The workspace root, from this crate's manifest directory.
fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}
