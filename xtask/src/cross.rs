//! Release builds for other machines with `cargo zigbuild`: Linux x86_64 against an old
//! glibc (so the binaries start on every distribution still supported, and on Amazon
//! Linux), and Windows x86_64 (MinGW). Used by `dist` and by `deploy` (in xtask-ops).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// Rust's target for Linux on x86-64.
pub const LINUX_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The glibc Linux builds link against: 2.28 (Debian 10, Ubuntu 20.04 has 2.31, RHEL 8,
/// Amazon Linux 2023 has 2.34).
pub const BUILD_GLIBC: (u32, u32) = (2, 28);
/// Rust's target for Windows on x86-64 with the MinGW ABI (what zig can link).
pub const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";

/// Builds `package` in release mode for `target` with `cargo zigbuild` (for Linux, pinned
/// to [`BUILD_GLIBC`]) and returns the directory holding the binaries. One package per
/// call, so each is built with exactly its own features (as `deploy` builds the relay, so
/// the two share the build).
///
/// Errors: cargo-zigbuild or zig missing (the message says how to install them), or the
/// build failing.
pub fn zigbuild(package: &str, target: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let triple = if target == LINUX_TARGET {
        format!("{target}.{}.{}", BUILD_GLIBC.0, BUILD_GLIBC.1)
    } else {
        target.to_owned()
    };
    let status = Command::new(&cargo)
        .current_dir(crate::project_root())
        .args([
            "zigbuild",
            "--release",
            "--locked",
            "-p",
            package,
            "--target",
        ])
        .arg(&triple)
        .status()
        .context("cannot run cargo")?;
    anyhow::ensure!(
        status.success(),
        "building {package} for {triple} failed. The cross build needs cargo-zigbuild and \
         zig (`pip install cargo-zigbuild ziglang`) and the Rust target (`rustup target add \
         {target}`)"
    );
    Ok(crate::target_dir().join(target).join("release"))
}

/// Checks that `path` is an x86-64 Linux executable and returns the newest glibc version
/// it needs (from readelf's version-needs section; (2, 0) if it names none).
///
/// Errors: not an x86-64 ELF file, or readelf (binutils) missing or failing.
pub fn glibc_needed(path: &Path) -> anyhow::Result<(u32, u32)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        is_x86_64_elf(&bytes),
        "{} is not an x86-64 Linux executable",
        path.display()
    );
    let out = Command::new("readelf")
        .args(["--version-info", "--wide"])
        .arg(path)
        .output()
        .context("cannot run readelf (from binutils) to check the binary's glibc needs")?;
    anyhow::ensure!(out.status.success(), "readelf failed on {}", path.display());
    Ok(newest_glibc(&String::from_utf8_lossy(&out.stdout)).unwrap_or((2, 0)))
}

/// ELF, 64-bit, little-endian, machine x86-64 (62).
fn is_x86_64_elf(bytes: &[u8]) -> bool {
    bytes.len() > 20
        && bytes[..4] == *b"\x7fELF"
        && bytes[4] == 2
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 62
}

/// The newest `GLIBC_x.y` in readelf's version-needs section.
fn newest_glibc(readelf: &str) -> Option<(u32, u32)> {
    readelf
        .split(|c: char| c.is_whitespace())
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(str::parse::<u32>);
            Some((parts.next()?.ok()?, parts.next().unwrap_or(Ok(0)).ok()?))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_glibc_is_compared_numerically() {
        let out = "  0x0010:   Name: GLIBC_2.9  Flags: none  Version: 9\n  \
                   0x0020:   Name: GLIBC_2.28  Flags: none  Version: 4\n  \
                   0x0030:   Name: GLIBC_2.3.4  Flags: none  Version: 3\n  \
                   0x0040:   Name: GLIBC_PRIVATE  Flags: none  Version: 2\n";
        assert_eq!(newest_glibc(out), Some((2, 28)));
        assert_eq!(newest_glibc("no versions"), None);
    }

    /// The real readelf output of the binary running this test is parsed; a script is
    /// refused as not an executable.
    #[test]
    fn the_check_reads_a_real_binary() {
        let me = std::env::current_exe().unwrap();
        let needed = glibc_needed(&me).unwrap();
        assert!(needed >= (2, 2), "{needed:?}");
        let script = std::env::temp_dir().join(format!("xtask-cross-{}", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = glibc_needed(&script).unwrap_err().to_string();
        std::fs::remove_file(&script).unwrap();
        assert!(err.contains("not an x86-64 Linux executable"), "{err}");
    }
}
