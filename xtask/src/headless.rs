//! Driving headless clients (`chat-client --headless`) from a task: JSON-lines events
//! read on a thread, commands written to stdin, waits with a deadline.

use std::io::{BufRead, BufReader, Write};
use std::process::ChildStdin;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use serde_json::Value;

use crate::procs::PATIENCE;

/// Writes one command line (e.g. `/msg bob hi`) to a headless client.
pub fn say(stdin: &mut ChildStdin, line: &str) -> anyhow::Result<()> {
    writeln!(stdin, "{line}")?;
    stdin.flush()?;
    Ok(())
}

/// The JSON events a headless client prints, one per line, as they come.
pub fn events(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line)
                && tx.send(value).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The first event matching `pred` within [`PATIENCE`]; an `error` event fails the wait.
pub fn wait_event(
    rx: &mpsc::Receiver<Value>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    crate::procs::recv_until(rx, what, |event| {
        if event["event"] == "error" {
            bail!("a client reported an error while waiting for {what}: {event}");
        }
        Ok(pred(&event).then_some(event))
    })
}

/// Polls `ready` every 50 ms until it says true, for at most [`PATIENCE`].
pub fn wait_for(what: &str, mut ready: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !ready()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
