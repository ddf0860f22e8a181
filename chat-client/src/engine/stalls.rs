//! Deliveries not dealt with now: stalled after a store failure (a full disk) and tried
//! again in order, or left to the relay, unacknowledged, for a renewed connection to
//! deliver again.

use tokio::time::Instant;

use super::{Engine, MAX_STALLED, Source, Waiting};

impl Engine {
    /// The store failed (a full disk): this delivery, and every one after it, waits —
    /// in order — until a retry succeeds, so nothing overtakes it (a later message of its
    /// epoch would move the replay window past it).
    pub(super) fn stall(&mut self, source: Source, from: &str, payload: &[u8]) {
        self.stall_failed = true;
        match source {
            Source::Relay(id) if self.stalled.len() < MAX_STALLED => {
                self.stalled
                    .push_back((id, from.to_owned(), payload.to_vec()));
            }
            // Too many waiting: dropped from memory, unacknowledged. Once the rest is
            // through, the connection is renewed so the relay delivers them again, in order.
            Source::Relay(_) => self.leave_to_relay(source, from),
            // Still held in the store: opened again with the held ones.
            Source::Held(_) | Source::GroupHeld(_) => {}
        }
    }

    /// Leaves a delivery to the relay: dropped from memory, not acknowledged, and with it
    /// every later one from `from` this session (see `left_after`); the connection is
    /// renewed once nothing waits in memory, and the relay delivers them all again, in
    /// order. Envelopes held in our store stay there.
    pub(super) fn leave_to_relay(&mut self, source: Source, from: &str) {
        if let Source::Relay(id) = source {
            self.left_after
                .entry(from.to_owned())
                .and_modify(|first| *first = (*first).min(id))
                .or_insert(id);
        }
    }

    /// Whether a delivery comes after one of its sender's left to the relay this session
    /// (and so is left too, to keep the order).
    pub(super) fn left_behind(&self, source: Source, from: &str) -> bool {
        match source {
            Source::Relay(id) => self.left_after.get(from).is_some_and(|first| id >= *first),
            Source::Held(_) | Source::GroupHeld(_) => false,
        }
    }

    /// Whether to renew the connection now, so the relay delivers again what was left to
    /// it: no delivery waits in memory (for the store, a key, or an offer), so nothing can
    /// overtake them, and some sender left behind can be served now (one whose key change
    /// awaits the user's decision would only be left again).
    pub(super) fn time_to_resync(&mut self) -> bool {
        if self.left_after.is_empty() || !self.nothing_waits_in_memory() {
            return false;
        }
        let senders: Vec<String> = self.left_after.keys().cloned().collect();
        senders
            .iter()
            .any(|s| self.pin(s).is_none_or(|p| p.usable()))
    }

    fn nothing_waits_in_memory(&self) -> bool {
        self.stalled.is_empty()
            && !self.offers.any_blocked()
            && self
                .awaiting_key
                .values()
                .flatten()
                .all(|w| !matches!(w, Waiting::Envelope { .. }))
    }

    /// Tries again the deliveries a store failure stopped (e.g. the disk is free again),
    /// in order, stopping at the first that still fails.
    pub(super) fn retry_stalled(&mut self) {
        let mut waiting = std::mem::take(&mut self.stalled).into_iter();
        self.stall_failed = false;
        while let Some((id, from, payload)) = waiting.next() {
            self.deliver(Source::Relay(id), from, payload, Instant::now());
            if self.stall_failed {
                self.stalled.extend(waiting);
                return;
            }
        }
    }
}
