//! A circuit breaker for this relay's tally fetches (the pattern of Nygard's *Release
//! It!*: closed, open, half-open).
//!
//! A tally fetch is a stream info request, and nats-server serves those only when its
//! queue of other JetStream API requests is empty (see [`super::tally::TALLY_PATIENCE`]).
//! While a node is busy making consumers for a burst of logins, every fetch is given up
//! after its patience, yet the node keeps the request queued and answers it later, to
//! nobody: left alone, each relay added one such orphan per fetch (32 a second per relay
//! at 30,000 sessions, its whole tally gate), which the node then served before any fetch
//! that still had a waiter. After [`OPEN_AFTER`] fetches in a row fail the breaker opens:
//! for [`OPEN_FOR`] no fetch is sent and sends are judged on the counts known (as after a
//! failed fetch); then one fetch, the probe, is let through (half-open), and its answer
//! closes the breaker or its failure opens it again. A probe that neither answers nor
//! fails within [`PROBE_LOST_AFTER`] (its send was dropped) lets the next fetch probe.
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

    /// Whether a fetch may be sent at `now`; if it may, the caller must report its outcome
    /// ([`Breaker::answered`] or [`Breaker::failed`]). The first asked once an open
    /// breaker's time is up is the probe; the others are refused until it is reported.
    pub fn try_fetch(&mut self, now: Instant) -> bool {
        if self.refuses(now) {
            return false;
        }
        if !matches!(self.0, State::Closed { .. }) {
            self.0 = State::HalfOpen { since: now };
        }
        true
    }

    /// A fetch was answered: the breaker closes.
    pub fn answered(&mut self) {
        self.0 = State::Closed { failures: 0 };
    }

    /// A fetch failed at `now`. A failed probe opens the breaker again; so does the
    /// [`OPEN_AFTER`]th failure in a row while closed. A fetch sent before the breaker
    /// opened that fails while it is open changes nothing.
    pub fn failed(&mut self, now: Instant) {
        self.0 = match self.0 {
            State::Closed { failures } if failures + 1 < OPEN_AFTER => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } | State::HalfOpen { .. } => State::Open {
                until: now + OPEN_FOR,
            },
            open @ State::Open { .. } => open,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_an_answer_between_resets_the_count() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..OPEN_AFTER - 1 {
            assert!(breaker.try_fetch(t0));
            breaker.failed(t0);
        }
        assert!(breaker.try_fetch(t0));
        breaker.answered();
        for _ in 0..OPEN_AFTER - 1 {
            assert!(breaker.try_fetch(t0));
            breaker.failed(t0);
        }
        assert!(!breaker.refuses(t0), "an answer between: still closed");
        breaker.failed(t0);
        assert!(breaker.refuses(t0), "the third in a row");
        assert!(!breaker.try_fetch(t0 + OPEN_FOR - Duration::from_millis(1)));
    }

    #[test]
    fn an_open_breaker_lets_one_probe_through_whose_answer_closes_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..OPEN_AFTER {
            breaker.failed(t0);
        }
        // Fetches sent before it opened fail later: nothing changes.
        breaker.failed(t0 + Duration::from_secs(1));
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.try_fetch(t1), "the probe");
        assert!(!breaker.try_fetch(t1), "only one");
        assert!(breaker.refuses(t1 + Duration::from_secs(1)));
        breaker.answered();
        assert!(
            breaker.try_fetch(t1) && breaker.try_fetch(t1),
            "closed again"
        );
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_lost_one_is_replaced() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..OPEN_AFTER {
            breaker.failed(t0);
        }
        let t1 = t0 + OPEN_FOR;
        assert!(breaker.try_fetch(t1));
        breaker.failed(t1 + Duration::from_secs(1));
        let t2 = t1 + Duration::from_secs(1) + OPEN_FOR;
        assert!(
            !breaker.try_fetch(t2 - Duration::from_millis(1)),
            "open again, from the probe's failure"
        );
        assert!(breaker.try_fetch(t2), "the next probe");
        // Never reported (its sender was dropped): another may probe later.
        assert!(!breaker.try_fetch(t2 + PROBE_LOST_AFTER - Duration::from_millis(1)));
        assert!(breaker.try_fetch(t2 + PROBE_LOST_AFTER));
    }
}
