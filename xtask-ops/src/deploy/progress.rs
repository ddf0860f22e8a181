//! Waiting with visible progress: poll something until it is ready, retry something until
//! it works, and show the elapsed time while doing so.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

/// One look at the thing being waited for.
pub enum Poll<T> {
    Ready(T),
    /// Not yet; the text says what it is doing ("pending", "connection refused").
    Waiting(String),
}

/// How long to wait and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub every: Duration,
    pub at_most: Duration,
}

/// Calls `look` every `patience.every` until it is ready, fails, or `patience.at_most`
/// has passed. Progress goes to stderr, on one updating line on a terminal.
pub async fn wait_for<T, F, Fut>(what: &str, patience: Patience, mut look: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    let start = Instant::now();
    let mut line = ProgressLine::new();
    loop {
        let status = match look().await? {
            Poll::Ready(value) => {
                line.finish(&format!("{what}: done ({})", elapsed(start)));
                return Ok(value);
            }
            Poll::Waiting(status) => status,
        };
        if start.elapsed() >= patience.at_most {
            line.finish(&format!("{what}: gave up ({})", elapsed(start)));
            anyhow::bail!(
                "timed out after {} waiting for {what} (last seen: {status})",
                elapsed(start)
            );
        }
        line.show(&format!("{what}: {status} ({})", elapsed(start)));
        tokio::time::sleep(patience.every).await;
    }
}

fn elapsed(start: Instant) -> String {
    format!("{} s", start.elapsed().as_secs())
}

/// A status line on stderr: rewritten in place on a terminal, one line per change otherwise
/// (logs stay readable).
struct ProgressLine {
    tty: bool,
    last: String,
}

impl ProgressLine {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }

    fn show(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{text}");
            let _ = err.flush();
        } else {
            // Print when the status (not just the seconds) changes.
            let status = text.rsplit_once(" (").map_or(text, |(s, _)| s);
            if status != self.last {
                let _ = writeln!(err, "{text}");
                self.last = status.to_owned();
            }
        }
    }

    fn finish(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const FAST: Patience = Patience {
        every: Duration::from_millis(20),
        at_most: Duration::from_millis(600),
    };

    /// A scripted sequence of looks, recording how many were taken.
    fn script(states: Vec<&'static str>) -> RefCell<std::vec::IntoIter<&'static str>> {
        RefCell::new(states.into_iter())
    }

    #[tokio::test]
    async fn polls_until_ready_then_returns_the_value() {
        let states = script(vec!["pending", "pending", "running"]);
        let calls = RefCell::new(0);
        let start = Instant::now();
        let ip = wait_for("instance", FAST, || async {
            *calls.borrow_mut() += 1;
            match states.borrow_mut().next().expect("polled past the script") {
                "running" => Ok(Poll::Ready("203.0.113.7")),
                other => Ok(Poll::Waiting(other.to_owned())),
            }
        })
        .await
        .unwrap();
        assert_eq!(ip, "203.0.113.7");
        assert_eq!(*calls.borrow(), 3);
        // Two waits of `every` between three looks.
        assert!(start.elapsed() >= Duration::from_millis(40));
    }

    #[tokio::test]
    async fn an_error_stops_the_wait_at_once() {
        let calls = RefCell::new(0);
        let err = wait_for::<(), _, _>("instance", FAST, || async {
            *calls.borrow_mut() += 1;
            if *calls.borrow() < 2 {
                Ok(Poll::Waiting("pending".into()))
            } else {
                anyhow::bail!("instance went to terminated: Server.InternalError")
            }
        })
        .await
        .unwrap_err();
        assert_eq!(*calls.borrow(), 2);
        assert!(err.to_string().contains("terminated"), "{err}");
    }

    #[tokio::test]
    async fn gives_up_after_the_limit_naming_the_last_status() {
        let calls = RefCell::new(0u32);
        let err = wait_for::<(), _, _>("SSH on 203.0.113.7", FAST, || async {
            *calls.borrow_mut() += 1;
            Ok(Poll::Waiting("Connection refused".into()))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("timed out after"), "{err}");
        assert!(err.contains("Connection refused"), "{err}");
        // A look every 20 ms for 600 ms, and one at the end: never more (a busy machine
        // may manage fewer).
        let calls = *calls.borrow();
        assert!((2..=31).contains(&calls), "{calls} looks");
    }
}
