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
    /// How many of the processes with these ids are still running.
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
pub fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
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
pub fn wait_line<T>(
    rx: &mpsc::Receiver<String>,
    what: &str,
    pick: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("timed out waiting for {what}"))?;
        if let Some(found) = pick(&line) {
            return Ok(found);
        }
    }
}
