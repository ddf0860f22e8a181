//! The replay window of one receiving epoch: the highest counter seen and a bitmap of the
//! `REPLAY_WINDOW` counters below it (as in IPsec's anti-replay window, RFC 4303 §3.4.3).

use serde::{Deserialize, Serialize};

/// Out-of-order tolerance, in messages.
pub(crate) const REPLAY_WINDOW: u64 = 64;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplayWindow {
    /// `None` until the first message.
    highest: Option<u64>,
    /// Bit i set: counter `highest - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    pub(crate) fn fresh(&self, counter: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if counter > h => true,
            Some(h) => {
                let back = h - counter;
                back < REPLAY_WINDOW && self.seen & (1 << back) == 0
            }
        }
    }

    pub(crate) fn mark(&mut self, counter: u64) {
        match self.highest {
            Some(h) if counter <= h => {
                if h - counter < REPLAY_WINDOW {
                    self.seen |= 1 << (h - counter);
                }
            }
            Some(h) => {
                let shift = counter - h;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.highest = Some(counter);
            }
            None => {
                self.highest = Some(counter);
                self.seen = 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.fresh(5));
        w.mark(5);
        assert!(!w.fresh(5));
        assert!(w.fresh(3), "a little out of order is fine");
        w.mark(3);
        assert!(!w.fresh(3));
        w.mark(100);
        assert!(!w.fresh(5), "fell out of the window");
        assert!(w.fresh(99) && w.fresh(37));
        assert!(!w.fresh(36));
        w.mark(99);
        assert!(!w.fresh(99) && !w.fresh(100) && w.fresh(101));
        // Marking below the window is harmless (never panics, changes nothing).
        let before = w;
        w.mark(0);
        assert_eq!(w, before);
    }
}
