//! A circuit breaker for this relay's tally fetches (the pattern of Nygard's *Release
//! It!*: closed, open, half-open).
//!
//! A tally fetch is a stream info request, and nats-server serves those only when its
//! queue of other JetStream API requests is empty (see [`super::tally::TALLY_PATIENCE`]).
//! While a node is busy making consumers for a burst of logins, every fetch is given up
//! after its patience, yet the node keeps the request queued and answers it later, to
//! nobody: left alone, each relay added one such orphan per fetch (up to 32 a second per
//! relay, its whole tally gate), which the node then served before any fetch
//! that still had a waiter. After [`OPEN_AFTER`] fetches in a row fail the breaker opens:
//! for [`OPEN_FOR`] no fetch is sent and sends are judged on the counts known (as after a
//! failed fetch); then one fetch, the probe, is let through (half-open), and its answer
//! closes the breaker or its failure opens it again. A probe that neither answers nor
//! fails within [`PROBE_LOST_AFTER`] (its send was dropped) lets the next fetch probe.
//! Only the probe's outcome moves an open or half-open breaker: a fetch sent while it was
//! closed and reported late (the others in flight when it opened) changes nothing.
//!
//! Pure: the caller passes the time.

use std::time::{Duration, Instant};

/// Fetches failed in a row that open the breaker.
pub const OPEN_AFTER: u32 = 3;

/// How long an open breaker sends no fetch (a tally is fetched again after
/// [`super::tally::FAR_FOR`] anyway, so a recipient's counts are at most this much staler
/// than usual).
pub const OPEN_FOR: Duration = Duration::from_secs(5);

/// A probe not reported within this is taken as lost (the fetch it guards gives up after
/// [`super::tally::TALLY_PATIENCE`], 1 s).
pub const PROBE_LOST_AFTER: Duration = Duration::from_secs(5);

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Fetches are sent; this many failed in a row.
    Closed { failures: u32 },
    /// No fetch is sent before `until`.
    Open { until: Instant },
    /// One fetch, let through at `since`, decides.
    HalfOpen { since: Instant },
}

/// A fetch the breaker let through, to report its outcome with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Sent while the breaker was closed.
    Closed,
    /// The probe of a half-open breaker.
    Probe,
}

/// The breaker of one relay's tally fetches. Starts closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker(State);

impl Default for Breaker {
    fn default() -> Self {
        Self(State::Closed { failures: 0 })
    }
}

impl Breaker {
    /// Whether a fetch would be refused at `now` (a cheap look before waiting for a place
    /// to send one; [`Breaker::try_fetch`] decides).
    pub fn refuses(&self, now: Instant) -> bool {
        match self.0 {
            State::Closed { .. } => false,
            State::Open { until } => now < until,
            State::HalfOpen { since } => now.saturating_duration_since(since) < PROBE_LOST_AFTER,
        }
    }

    /// Whether a fetch may be sent at `now`: `Some` if it may, and the caller then reports
    /// its outcome with it ([`Breaker::answered`] or [`Breaker::failed`]). The first asked
    /// once an open breaker's time is up is the probe; the others are refused until it is
    /// reported.
    pub fn try_fetch(&mut self, now: Instant) -> Option<Fetch> {
        if self.refuses(now) {
            return None;
        }
        if matches!(self.0, State::Closed { .. }) {
            return Some(Fetch::Closed);
        }
        self.0 = State::HalfOpen { since: now };
        Some(Fetch::Probe)
    }

    /// `fetch` was answered: a closed breaker's count of failures starts again, and a
    /// probe's answer closes an open one.
    pub fn answered(&mut self, fetch: Fetch) {
        if self.moved_by(fetch) {
            self.0 = State::Closed { failures: 0 };
        }
    }

    /// `fetch` failed at `now`: the [`OPEN_AFTER`]th failure in a row while closed opens
    /// the breaker, and so does a failed probe.
    pub fn failed(&mut self, fetch: Fetch, now: Instant) {
        if !self.moved_by(fetch) {
            return;
        }
        self.0 = match self.0 {
            State::Closed { failures } if failures + 1 < OPEN_AFTER => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: now + OPEN_FOR,
            },
        };
    }

    /// Whether `fetch`'s outcome moves the breaker as it stands: a closed breaker's fetch's
    /// while it is closed, the probe's while it is half-open.
    fn moved_by(&self, fetch: Fetch) -> bool {
        matches!(
            (self.0, fetch),
            (State::Closed { .. }, Fetch::Closed) | (State::HalfOpen { .. }, Fetch::Probe)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `breaker` at `t0` with failures of fetches sent while it was closed.
    fn open(breaker: &mut Breaker, t0: Instant) {
        for _ in 0..OPEN_AFTER {
            let fetch = breaker.try_fetch(t0).expect("closed");
            breaker.failed(fetch, t0);
        }
    }

    #[test]
    fn opens_after_failures_in_a_row_and_an_answer_between_resets_the_count() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        let fetches: Vec<_> = (0..OPEN_AFTER + 1)
            .map(|_| breaker.try_fetch(t0).expect("closed"))
            .collect();
        for fetch in &fetches[..OPEN_AFTER as usize - 1] {
            breaker.failed(*fetch, t0);
        }
        breaker.answered(fetches[OPEN_AFTER as usize - 1]);
        assert!(!breaker.refuses(t0), "an answer between: still closed");
        open(&mut breaker, t0);
        assert!(breaker.refuses(t0));
        assert_eq!(
            breaker.try_fetch(t0 + OPEN_FOR - Duration::from_millis(1)),
            None
        );
        // A fetch sent while it was closed and answered late does not close it.
        breaker.answered(fetches[OPEN_AFTER as usize]);
        assert!(breaker.refuses(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn an_open_breaker_lets_one_probe_through_whose_answer_closes_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        let late = breaker.try_fetch(t0).expect("closed");
        open(&mut breaker, t0);
        let t1 = t0 + OPEN_FOR;
        let probe = breaker.try_fetch(t1);
        assert_eq!(probe, Some(Fetch::Probe));
        assert_eq!(breaker.try_fetch(t1), None, "only one");
        // One sent before it opened fails (or is answered) late: it moves nothing.
        breaker.failed(late, t1);
        assert!(
            breaker.refuses(t1 + Duration::from_secs(1)),
            "still half-open"
        );
        breaker.answered(late);
        assert!(
            breaker.refuses(t1 + Duration::from_secs(1)),
            "still half-open"
        );
        breaker.answered(Fetch::Probe);
        assert_eq!(breaker.try_fetch(t1), Some(Fetch::Closed), "closed again");
        assert_eq!(breaker.try_fetch(t1), Some(Fetch::Closed));
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_lost_one_is_replaced() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        open(&mut breaker, t0);
        let t1 = t0 + OPEN_FOR;
        let probe = breaker.try_fetch(t1).expect("the probe");
        breaker.failed(probe, t1 + Duration::from_secs(1));
        let t2 = t1 + Duration::from_secs(1) + OPEN_FOR;
        assert_eq!(
            breaker.try_fetch(t2 - Duration::from_millis(1)),
            None,
            "open again, from the probe's failure"
        );
        assert_eq!(breaker.try_fetch(t2), Some(Fetch::Probe), "the next probe");
        // Never reported (its sender was dropped): another may probe later.
        assert_eq!(
            breaker.try_fetch(t2 + PROBE_LOST_AFTER - Duration::from_millis(1)),
            None
        );
        assert_eq!(breaker.try_fetch(t2 + PROBE_LOST_AFTER), Some(Fetch::Probe));
    }
}
