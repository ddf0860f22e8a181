//! Child processes for tasks: started together, all killed when the task ends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a task waits for any one thing to happen.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Kills its processes on drop, whatever happened.
#[derive(Default)]
pub struct Processes(Vec<Child>);

impl Processes {
    pub fn spawn(&mut self, cmd: &mut Command) -> anyhow::Result<&mut Child> {
        let program = format!("{:?}", cmd.get_program());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {program}; is it installed?"))?;
        self.0.push(child);
        Ok(self.0.last_mut().expect("just pushed"))
    }
}

impl Processes {
    /// Starts `chat-server` from `bin` on a free loopback port with `data_dir`, and returns
    /// the address clients use, `ADDR#FINGERPRINT` (so they pin its key from the start).
    /// Its log is drained so the pipe never fills; its `ERROR` lines go to our stderr.
    pub fn start_relay(
        &mut self,
        bin: &std::path::Path,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<String> {
        self.start_relay_with(bin, data_dir, &[])
    }

    /// As [`Self::start_relay`], with extra arguments (e.g. `--config FILE`).
    pub fn start_relay_with(
        &mut self,
        bin: &std::path::Path,
        data_dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        self.start_relay_exe(&bin.join("chat-server"), data_dir, extra)
    }

    /// [`Self::start_relay_with`] for any relay executable: `HOST:PORT#FINGERPRINT`, or
    /// `HOST:PORT` alone from the benchmark-only plaintext relay (which logs
    /// `listening on ADDR (plaintext)`).
    pub fn start_relay_exe(
        &mut self,
        exe: &std::path::Path,
        data_dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let relay = self.spawn(
            Command::new(exe)
                .args(extra)
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(data_dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped()),
        )?;
        let log = lines(relay.stderr.take().expect("piped"));
        // "listening on ADDR (fingerprint FP)" or "listening on ADDR (plaintext)"
        let addr = wait_line(&log, "the relay to listen", |l| {
            let (_, rest) = l.split_once("listening on ")?;
            if let Some(addr) = rest.trim_end().strip_suffix(" (plaintext)") {
                return Some(addr.trim().to_owned());
            }
            let (addr, fp) = rest.split_once(" (fingerprint ")?;
            Some(format!(
                "{}#{}",
                addr.trim(),
                fp.trim().trim_end_matches(')')
            ))
        })?;
        // Its errors (a storage failure behind a refused request) are shown, not lost.
        std::thread::spawn(move || {
            for line in log {
                if line.split_whitespace().nth(1) == Some("ERROR") {
                    eprintln!("relay: {line}");
                }
            }
        });
        Ok(addr)
    }

    /// The process id of the last process started.
    pub fn last_pid(&self) -> u32 {
        self.0.last().map_or(0, Child::id)
    }

    /// Kills the last process started and waits for it to end (it is no longer managed).
    pub fn stop_last(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.0.pop() {
            child.kill().context("cannot stop a child process")?;
            child.wait()?;
        }
        Ok(())
    }

    /// How many of the processes with these ids are still running.
    /// How many of the processes `ids` failed (ended with a non-zero status, or by a
    /// signal) so far.
    pub fn failed(&mut self, ids: &[u32]) -> usize {
        self.0
            .iter_mut()
            .filter(|c| ids.contains(&c.id()))
            .filter_map(|c| c.try_wait().ok().flatten())
            .filter(|status| !status.success())
            .count()
    }

    pub fn running(&mut self, ids: &[u32]) -> usize {
        self.0
            .iter_mut()
            .filter(|c| ids.contains(&c.id()))
            .filter_map(|c| c.try_wait().ok())
            .filter(Option::is_none)
            .count()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of `stream`, read on a thread.
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line for which `pick` finds something, within [`PATIENCE`].
fn wait_line<T>(
    rx: &mpsc::Receiver<String>,
    what: &str,
    pick: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<T> {
    recv_until(rx, what, |line| Ok(pick(&line)))
}

/// Receives from `rx` until `pick` finds something (or fails), within [`PATIENCE`].
pub fn recv_until<I, T>(
    rx: &mpsc::Receiver<I>,
    what: &str,
    mut pick: impl FnMut(I) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let item = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("timed out waiting for {what}"))?;
        if let Some(found) = pick(item)? {
            return Ok(found);
        }
    }
}
