//! Requests that keep trying through a NATS disturbance instead of failing at once.
//!
//! When a node dies, the streams it led elect a new leader among their other replicas:
//! for one to ten seconds JetStream answers a write (and, for a stream whose replicas are
//! all out of reach, a read) with "no responders", a 503, or nothing. Account lookups and
//! writes used to try once and answer the client `internal` for that whole time; a login
//! or registration started in it failed, and the client backed off. They now try again
//! every [`PAUSE`] until their deadline: a login's own (at most [`super::LOGIN_WINDOW`]
//! after the connection was accepted), or [`PATIENCE`] for a logged-in session's request.
//! (Session writes have their own loop, `sessions::login`, with the same [`TRY`], and
//! publishes theirs, the outbox's [`super::RETRY_FOR`].)
//!
//! Each try is given [`TRY`]: a request that reaches a stream while it has no leader is
//! not answered at all, not even once the new leader is elected, so waiting out the
//! client's own timeout (5 s) for it could use up a login's whole window in two tries.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};
use tracing::debug;

use crate::store::StoreError;

/// The pause between two tries.
pub(super) const PAUSE: Duration = Duration::from_millis(250);

/// How long a logged-in session's account request (a key lookup) keeps trying: longer
/// than the elections seen on a three-node cluster (up to about 10 s when a node dies,
/// counted from its death, which is usually before the request).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long one try waits for its answer: a healthy cluster answers in milliseconds (an
/// fsynced write in tens), an election takes 4-9 s, and a try lost in it costs this much
/// past the election's end. The first try is given this much even when `deadline` is
/// closer: a request with no time left is still made once.
pub(super) const TRY: Duration = Duration::from_secs(1);

/// Runs `attempt` until it answers `Ok`, again after [`PAUSE`] each time it fails, each
/// try given at most [`TRY`], and no longer than `deadline` (but the first try all of
/// [`TRY`]). `what` names the request for the log and the error.
///
/// `attempt` is told whether an earlier try's outcome is unknown (it failed without an
/// answer, so its write may have landed): `bind` uses it to tell its own account from
/// someone else's.
///
/// # Errors
/// [`StoreError::Cluster`] with the last failure, once `deadline` passed.
pub(super) async fn until<T, F, Fut>(
    deadline: Instant,
    what: &str,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut tried = false;
    loop {
        let this_try = Instant::now() + TRY;
        let bound = if tried {
            this_try.min(deadline)
        } else {
            this_try
        };
        let failure = match timeout_at(bound, attempt(tried)).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => e,
            Err(_) => "NATS did not answer in time".to_owned(),
        };
        tried = true;
        let next = Instant::now() + PAUSE;
        if next >= deadline {
            return Err(StoreError::Cluster(format!("{what}: {failure}")));
        }
        debug!("{what} failed ({failure}); trying again");
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tries_until_an_answer_and_tells_an_unknown_outcome() {
        let started = Instant::now();
        let mut seen = Vec::new();
        let done = until(started + Duration::from_secs(5), "a read", |tried| {
            seen.push(tried);
            let n = seen.len();
            async move {
                if n < 3 {
                    Err(format!("no responders {n}"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(done.unwrap(), 3);
        assert_eq!(seen, [false, true, true]);
        assert_eq!(started.elapsed(), 2 * PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_with_the_last_failure() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(2500);
        let done: Result<(), _> = until(deadline, "a write", |_| async {
            Err("no responders".to_owned())
        })
        .await;
        let e = done.unwrap_err().to_string();
        assert!(e.contains("a write: no responders"), "{e}");
        assert!(
            started.elapsed() <= Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() > Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_that_hangs_is_cut_at_the_deadline_and_a_late_one_still_runs_once() {
        let started = Instant::now();
        let done: Result<(), _> = until(started, "a lookup", |_| std::future::pending()).await;
        assert!(done.unwrap_err().to_string().contains("in time"));
        assert_eq!(started.elapsed(), TRY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_that_hangs_is_given_up_and_made_again() {
        // The first try is lost (sent while the stream had no leader); the next answers.
        let started = Instant::now();
        let mut tries = 0;
        let done = until(started + Duration::from_secs(10), "a write", |_| {
            tries += 1;
            let lost = tries == 1;
            async move {
                if lost {
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(tries)
            }
        })
        .await;
        assert_eq!(done.unwrap(), 2);
        assert_eq!(started.elapsed(), TRY + PAUSE);
    }
}
