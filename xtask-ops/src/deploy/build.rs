//! The server binary for the instance. Amazon Linux 2023 has glibc 2.34; a normal build on
//! a newer distribution links against newer symbol versions and would not start there, so
//! the binary is built with `cargo zigbuild` against glibc 2.28 (`xtask::cross`) and then
//! checked.

use std::path::{Path, PathBuf};

use xtask::cross::{self, LINUX_TARGET};

/// The newest glibc symbol version the binary may need: Amazon Linux 2023's.
pub const HOST_GLIBC: (u32, u32) = (2, 34);

/// Builds `chat-server` for the instance and returns its path.
pub fn build_server() -> anyhow::Result<PathBuf> {
    let dir = cross::zigbuild("chat-server", LINUX_TARGET).map_err(|e| {
        e.context(format!(
            "or pass --binary PATH to a chat-server built for {LINUX_TARGET} with glibc <= {}.{}",
            HOST_GLIBC.0, HOST_GLIBC.1
        ))
    })?;
    Ok(dir.join("chat-server"))
}

/// Checks that `path` is an x86-64 Linux executable needing no newer glibc than the host
/// has. Returns the newest glibc version it needs.
pub fn check_binary(path: &Path) -> anyhow::Result<(u32, u32)> {
    let needed = cross::glibc_needed(path)
        .map_err(|e| e.context("the instance is x86_64 Linux (Amazon Linux 2023)"))?;
    anyhow::ensure!(
        needed <= HOST_GLIBC,
        "{} needs glibc {}.{}, but Amazon Linux 2023 has {}.{}: build it with `cargo \
         zigbuild --target {LINUX_TARGET}.{}.{}` (which deploy does without --binary)",
        path.display(),
        needed.0,
        needed.1,
        HOST_GLIBC.0,
        HOST_GLIBC.1,
        cross::BUILD_GLIBC.0,
        cross::BUILD_GLIBC.1,
    );
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary running these tests was built on this machine: if that glibc is newer
    /// than Amazon Linux's, the check must refuse it; a script is refused outright.
    #[test]
    fn the_check_reads_a_real_binary() {
        let me = std::env::current_exe().unwrap();
        match check_binary(&me) {
            Ok(v) => assert!(v >= (2, 2) && v <= HOST_GLIBC, "{v:?}"),
            Err(e) => assert!(e.to_string().contains("needs glibc 2."), "{e}"),
        }
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\n").unwrap();
        let err = format!("{:#}", check_binary(script.path()).unwrap_err());
        assert!(err.contains("not an x86-64 Linux executable"), "{err}");
    }
}
