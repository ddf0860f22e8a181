//! What every developer task shares: the workspace root, the target directory, building
//! the workspace's binaries, and child processes killed when a task ends. Used by the
//! `xtask` binary (demo, screenshot) and by `xtask-ops` (bench, deploy and the rest).

pub mod cross;
pub mod headless;
pub mod procs;

use std::path::PathBuf;

/// The workspace root: the parent of the running package's manifest directory, as cargo
/// sets it when it runs a task (`cargo xtask …`, `cargo test`), else as it was when this
/// crate was built. At run time first: checkouts sharing one target directory (as CI's
/// cache does) reuse a binary built in another checkout, whose build-time path may be gone
/// or hold other code.
pub fn project_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Builds the given workspace binaries and returns the directory holding them.
pub fn build_binaries(packages: &[&str], release: bool) -> anyhow::Result<PathBuf> {
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
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
}
