//! What the running relay refused or ignored, for operators. Counted in memory and added
//! to the database's `counters` table every minute and at shutdown, so
//! `chat-server admin stats` shows totals across restarts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of refusals and pacing. Each is a total since the process started.
/// How many counters [`Metrics`] keeps.
const COUNTERS: usize = 9;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Ack ids that named no envelope delivered to that session (or were over the cap).
    pub acks_ignored: AtomicU64,
    /// Sends refused because the whole queue is at `queue.max_total_bytes` (or the disk
    /// is full).
    pub refused_server_full: AtomicU64,
    /// Sends refused because the sender holds its share of the recipient's queue.
    pub refused_sender_share: AtomicU64,
    /// Sends refused because senders from that address hold their share of the whole
    /// queue (`queue.max_source_share`).
    pub refused_source_share: AtomicU64,
    /// Sends refused because the recipient's queue is full.
    pub refused_queue_full: AtomicU64,
    /// New accounts refused by the per-address registration limit.
    pub registrations_refused: AtomicU64,
    /// Connections refused before login (connection rate, pre-login budget, per address).
    pub connections_refused: AtomicU64,
    /// Times a connection was paced because the store writer had no room.
    pub paced: AtomicU64,
    /// Sends (and `SendMany`s) refused with `server_busy` while the relay was saturated
    /// (see [`crate::overload`]).
    pub shed: AtomicU64,
    /// What was last added to the database, per counter.
    flushed: [AtomicU64; COUNTERS],
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn all(&self) -> [(&'static str, &AtomicU64); COUNTERS] {
        [
            ("acks_ignored", &self.acks_ignored),
            ("refused_server_full", &self.refused_server_full),
            ("refused_sender_share", &self.refused_sender_share),
            ("refused_source_share", &self.refused_source_share),
            ("refused_queue_full", &self.refused_queue_full),
            ("registrations_refused", &self.registrations_refused),
            ("connections_refused", &self.connections_refused),
            ("paced", &self.paced),
            ("shed", &self.shed),
        ]
    }

    /// What changed since the last call, as (counter name, increase); the caller adds it
    /// to the database (and calls [`Metrics::unflush`] if that failed).
    pub fn take_deltas(&self) -> Vec<(&'static str, u64)> {
        self.all()
            .iter()
            .zip(&self.flushed)
            .filter_map(|((name, value), flushed)| {
                let now = value.load(Ordering::Relaxed);
                let before = flushed.swap(now, Ordering::Relaxed);
                (now > before).then_some((*name, now - before))
            })
            .collect()
    }

    /// Puts deltas back after a failed flush, so the next flush carries them.
    pub fn unflush(&self, deltas: &[(&'static str, u64)]) {
        for (name, delta) in deltas {
            if let Some(i) = self.all().iter().position(|(n, _)| n == name) {
                self.flushed[i].fetch_sub(*delta, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_taken_once_and_put_back_on_failure() {
        let m = Metrics::default();
        Metrics::add(&m.acks_ignored, 5);
        Metrics::inc(&m.paced);
        let d = m.take_deltas();
        assert_eq!(d, vec![("acks_ignored", 5), ("paced", 1)]);
        assert!(m.take_deltas().is_empty());
        m.unflush(&d);
        Metrics::inc(&m.paced);
        assert_eq!(m.take_deltas(), vec![("acks_ignored", 5), ("paced", 2)]);
    }
}
