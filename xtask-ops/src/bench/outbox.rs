//! The client's outbox drain, the client half of the bench beside the crypto row: `n`
//! texts queued at once to a contact who is offline (the relay stores them), and the time
//! from the first queued until the relay has accepted the last (`sent` events), per
//! message. Measured at a small outbox and at a large one in the same run, with the
//! release `chat-client --headless` (what a script drives) and a store passphrase (every
//! queued body is sealed at rest): the per-message time should not grow with the outbox.
//! A flush that opened every waiting message made it grow linearly (the drain quadratic).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use serde_json::Value;
use xtask::headless::{events, say, wait_event};
use xtask::procs::{PATIENCE, Processes};

use super::servers::{bench_config, start_relay_config};

/// One drain: `queued` texts handed to the relay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxDrain {
    pub queued: usize,
    /// From the first text queued until the relay accepted the last, seconds.
    pub seconds: f64,
    /// `seconds` per text, µs.
    pub us_per_message: f64,
}

/// Drains an outbox of each size in `sizes` through a relay of its own (the bench
/// settings, and room in one offline recipient's queue for the largest size from one
/// sender: by default one sender may fill a quarter of 10,000) with the release relay and
/// headless client in `bin`, each size with accounts of its own.
pub(super) fn measure(bin: &Path, sizes: &[usize]) -> anyhow::Result<Vec<OutboxDrain>> {
    let homes = tempfile::tempdir()?;
    let mut procs = Processes::default();
    let config = format!(
        "{}, queue: (max_envelopes_per_user: {}, max_sender_share: 1.0, max_source_share: 1.0))",
        bench_config().strip_suffix(')').expect("a RON struct"),
        sizes.iter().sum::<usize>() + 100
    );
    let data = homes.path().join("relay");
    std::fs::create_dir_all(&data)?;
    let relay = start_relay_config(&mut procs, bin, &data, &config)?;
    let server = relay.addr.as_str();
    let mut drains = Vec::new();
    for (run, &queued) in sizes.iter().enumerate() {
        let (sender, recipient) = (format!("ob{run}a"), format!("ob{run}b"));
        // The recipient signs up (so its key is known) and goes away.
        let (mut bob_in, bob) = client(&mut procs, bin, server, &recipient, homes.path())?;
        wait_event(&bob, "the recipient to connect", |e| {
            e["event"] == "connection" && e["state"] == "connected"
        })?;
        say(&mut bob_in, "/quit")?;
        // Its output ends once it has quit.
        while bob.recv_timeout(PATIENCE).is_ok() {}
        let (mut alice_in, alice) = client(&mut procs, bin, server, &sender, homes.path())?;
        // One text first, so the recipient's key is fetched and pinned before the clock.
        say(&mut alice_in, &format!("/msg {recipient} first"))?;
        wait_event(&alice, "the first text accepted", is_sent)?;
        let mut lines = String::new();
        for n in 0..queued {
            lines.push_str(&format!("/msg {recipient} queued text {n} of {queued}\n"));
        }
        let start = Instant::now();
        alice_in.write_all(lines.as_bytes())?;
        alice_in.flush()?;
        for n in 0..queued {
            wait_event(&alice, &format!("text {n} of {queued} accepted"), is_sent)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        drains.push(OutboxDrain {
            queued,
            seconds,
            us_per_message: seconds * 1e6 / queued as f64,
        });
    }
    Ok(drains)
}

fn is_sent(event: &Value) -> bool {
    event["event"] == "sent"
}

/// A headless client for `name` (home `homes/name`, a store passphrase), once ready: its
/// stdin and its events.
fn client(
    procs: &mut Processes,
    bin: &Path,
    server: &str,
    name: &str,
    homes: &Path,
) -> anyhow::Result<(std::process::ChildStdin, mpsc::Receiver<Value>)> {
    let child = procs.spawn(
        Command::new(bin.join("chat-client"))
            .args(["--headless", "--server", server, "--user", name, "--home"])
            .arg(homes.join(name))
            .env("CHAT_PASSPHRASE", "bench passphrase")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let stdin = child.stdin.take().context("piped")?;
    let rx = events(child.stdout.take().context("piped")?);
    wait_event(&rx, &format!("{name} ready"), |e| e["event"] == "ready")?;
    Ok((stdin, rx))
}
