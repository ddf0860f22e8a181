//! `cargo xtask demo`: a local relay and two desktop windows, alice and bob, each with its
//! own home directory under `target/demo/` (kept between runs, so identities and history
//! persist). Closing both windows, or Ctrl-C, stops everything.

use std::process::Command;
use std::time::Duration;

use xtask::procs::Processes;
use xtask::{build_binaries, project_root};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Use release builds
    #[arg(long)]
    release: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        anyhow::bail!(
            "no display: the demo opens two windows and needs a desktop session (neither \
             DISPLAY nor WAYLAND_DISPLAY is set); without one, start the relay and two \
             `chat-client --headless` clients as the README's Quick start shows"
        );
    }
    let bin = build_binaries(&["chat-server", "chat-client"], args.release)?;
    let demo = project_root().join("target/demo");
    std::fs::create_dir_all(&demo)?;
    let mut procs = Processes::default();
    let addr = procs.start_relay(&bin, &demo.join("relay"))?;
    println!(
        "relay listening on {addr} (data in {})",
        demo.join("relay").display()
    );

    let mut windows = Vec::new();
    // Side by side, each on its half of the screen, so both are visible at once.
    for (me, peer, half) in [("alice", "bob", "left"), ("bob", "alice", "right")] {
        let child = procs.spawn(
            Command::new(bin.join("chat-client"))
                .args(["--server", &addr, "--user", me, "--chat-with", peer])
                .args(["--window-half", half, "--home"])
                .arg(demo.join(me)),
        )?;
        windows.push(child.id());
        println!("opened {me}'s window (home {})", demo.join(me).display());
    }
    println!("Chat between the two windows; close both (or press Ctrl-C) to stop.");
    while procs.running(&windows) > 0 {
        std::thread::sleep(Duration::from_millis(200));
    }
    match procs.failed(&windows) {
        0 => Ok(()),
        n => anyhow::bail!("{n} of the two windows failed (their errors are above)"),
    }
}
