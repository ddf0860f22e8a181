//! The server binary for the instance. Amazon Linux 2023 has glibc 2.34; a normal build on
//! a newer distribution links against newer symbol versions and would not start there, so
//! the binary is built with `cargo zigbuild` against glibc 2.28 and then checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The glibc the build links against (older than any supported host).
pub const BUILD_GLIBC: &str = "2.28";
/// The newest glibc symbol version the binary may need: Amazon Linux 2023's.
pub const HOST_GLIBC: (u32, u32) = (2, 34);

/// Builds `chat-server` for the instance and returns its path.
pub fn build_server() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = xtask::project_root();
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "zigbuild",
            "--release",
            "--locked",
            "-p",
            "chat-server",
            "--target",
        ])
        .arg(format!("{TARGET}.{BUILD_GLIBC}"))
        .status()
        .context("cannot run cargo")?;
    anyhow::ensure!(
        status.success(),
        "building the server for Amazon Linux failed. It needs cargo-zigbuild and zig \
         (`pip install cargo-zigbuild ziglang`); or pass --binary PATH to a chat-server \
         built for {TARGET} with glibc <= {}.{}",
        HOST_GLIBC.0,
        HOST_GLIBC.1
    );
    Ok(xtask::target_dir()
        .join(TARGET)
        .join("release")
        .join("chat-server"))
}

/// Checks that `path` is an x86-64 Linux executable needing no newer glibc than the host
/// has. Returns the newest glibc version it needs.
pub fn check_binary(path: &Path) -> anyhow::Result<(u32, u32)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        is_x86_64_elf(&bytes),
        "{} is not an x86-64 Linux executable (the instance is x86_64)",
        path.display()
    );
    let out = Command::new("readelf")
        .args(["--version-info", "--wide"])
        .arg(path)
        .output()
        .context("cannot run readelf (from binutils) to check the binary's glibc needs")?;
    anyhow::ensure!(out.status.success(), "readelf failed on {}", path.display());
    let needed = newest_glibc(&String::from_utf8_lossy(&out.stdout)).unwrap_or((2, 0));
    anyhow::ensure!(
        needed <= HOST_GLIBC,
        "{} needs glibc {}.{}, but Amazon Linux 2023 has {}.{}: build it with `cargo \
         zigbuild --target {TARGET}.{BUILD_GLIBC}` (which deploy does without --binary)",
        path.display(),
        needed.0,
        needed.1,
        HOST_GLIBC.0,
        HOST_GLIBC.1
    );
    Ok(needed)
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

    /// The binary running these tests was built on this machine: if that glibc is newer
    /// than Amazon Linux's, the check must refuse it (Debian 12 already needs 2.34, which
    /// passes; the point here is that the real readelf output is parsed).
    #[test]
    fn the_check_reads_a_real_binary() {
        let me = std::env::current_exe().unwrap();
        match check_binary(&me) {
            Ok(v) => assert!(v >= (2, 2) && v <= HOST_GLIBC, "{v:?}"),
            Err(e) => assert!(e.to_string().contains("needs glibc 2."), "{e}"),
        }
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\n").unwrap();
        let err = check_binary(script.path()).unwrap_err().to_string();
        assert!(err.contains("not an x86-64 Linux executable"), "{err}");
    }
}
