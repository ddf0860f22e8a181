//! Per-connection request rate limit.
//!
//! Over the rate, the server does not drop requests (that would reorder a client's
//! pipelined sends): it waits before handling the next one, so a flooding connection is
//! slowed to the configured rate and TCP pushes back on the client.

use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Classic token bucket; time is passed in so it is testable without sleeping.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            rate: limit.per_second,
            burst: limit.burst,
            tokens: limit.burst,
            last: now,
        }
    }

    /// Takes one token and returns how long to wait before using it (zero while within
    /// the burst). The balance may go negative: the wait repays it.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_paced() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(
            RateLimit {
                per_second: 10.0,
                burst: 3.0,
            },
            t0,
        );
        assert!((0..3).all(|_| bucket.take(t0).is_zero()));
        // Over the burst: each request waits one more tenth of a second.
        assert_eq!(bucket.take(t0), Duration::from_millis(100));
        assert_eq!(bucket.take(t0), Duration::from_millis(200));
        // Time repays the debt, then refills, but only up to the burst.
        let t1 = t0 + Duration::from_millis(500);
        assert!(bucket.take(t1).is_zero());
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(t2).is_zero()).count(), 3);
    }
}
