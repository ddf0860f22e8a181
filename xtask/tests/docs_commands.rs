//! The docs' `cargo run` commands run as written: each names (with `-p`) a package that
//! `cargo run` can pick a binary of without `--bin` — one binary, or a `default-run`.
//! (`cargo run -p chat-server` once stopped at "could not determine which binary to run"
//! after the bench binary was added beside the relay.)

use std::process::Command;

#[test]
fn every_cargo_run_in_the_docs_picks_its_binary() {
    let root = xtask::project_root();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let mut checked = 0;
    for doc in [
        "README.md",
        "docs/CLUSTER.md",
        "docs/PERFORMANCE.md",
        "docs/SECURITY.md",
    ] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for line in text.lines().filter(|l| l.contains("cargo run")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.contains(&"--bin") {
                continue;
            }
            let Some(at) = words.iter().position(|w| *w == "-p") else {
                continue;
            };
            let name = words[at + 1].trim_matches('`');
            let package = packages
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{doc}: no package {name} for {line:?}"));
            let bins = package["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .count();
            assert!(
                bins == 1 || package["default_run"].is_string(),
                "{doc}: `{line}` cannot pick one of {name}'s {bins} binaries: give it \
                 --bin, or the package a default-run"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} cargo run lines found");
}
