//! The shares of a recipient's mailbox, held per cluster.
//!
//! Envelopes are stored under `<prefix>.inbox.<recipient>.<address>.<sender>`: the
//! stream's per-subject limit (discard-new per subject) caps what one sender holds from
//! one address group atomically, on every relay alike. What JetStream cannot count in one
//! step — the recipient's total, one sender's envelopes from all its addresses, one
//! address's envelopes from all its senders — each relay checks against a tally of the
//! recipient's mailbox: the per-subject counts JetStream gives for
//! `<prefix>.inbox.<recipient>.>` (a stream info request with a subjects filter), plus
//! this relay's publishes stored since and those still in flight. A tally is fetched again
//! after [`FAR_FOR`], and before every publish once one of the counts it adds to is at half
//! its limit (so a nearly full mailbox costs a request per envelope, an ordinary one a
//! request per [`FAR_FOR`]). Counting is conservative (a publish whose outcome comes while
//! a fetch is under way may be counted twice until the next fetch), so a limit is passed
//! only by what other relays store for the same recipient between this relay's fetch and
//! its publish; JetStream's per-subject cap holds regardless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;

use crate::store::{Enqueued, QueueLimits};

/// A tally far from every limit is fetched again after this long.
pub const FAR_FOR: Duration = Duration::from_secs(5);
/// Recipients tallied at most; past it stale tallies are dropped.
const MAX_TALLIES: usize = 100_000;

/// Who holds what of one recipient's mailbox: envelopes in total, by sender token and by
/// address name. Counts may be negative in a difference of two.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    total: i64,
    by_sender: HashMap<String, i64>,
    by_address: HashMap<String, i64>,
}

impl Counts {
    /// Counts from `(subject, envelopes)` pairs of the recipient's subjects, each after
    /// the recipient's own prefix (`<address>.<sender>`). Anything else (an envelope of an
    /// earlier layout, `<prefix>.inbox.<recipient>` alone) counts toward the total only.
    pub fn from_subjects<'a>(subjects: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut counts = Self::default();
        for (rest, n) in subjects {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            match rest.split_once('.') {
                Some((address, sender)) => counts.add(address, sender, n),
                None => counts.total += n,
            }
        }
        counts
    }

    /// Adds `n` (may be negative) envelopes from `sender` at `address`.
    pub fn add(&mut self, address: &str, sender: &str, n: i64) {
        self.total += n;
        *self.by_sender.entry(sender.to_owned()).or_default() += n;
        *self.by_address.entry(address.to_owned()).or_default() += n;
    }

    /// Adds every count of `other` times `sign` (1 or -1).
    fn merge(&mut self, other: &Counts, sign: i64) {
        self.total += sign * other.total;
        for (sender, n) in &other.by_sender {
            *self.by_sender.entry(sender.clone()).or_default() += sign * n;
        }
        for (address, n) in &other.by_address {
            *self.by_address.entry(address.clone()).or_default() += sign * n;
        }
        self.by_sender.retain(|_, n| *n != 0);
        self.by_address.retain(|_, n| *n != 0);
    }

    /// The three counts one more envelope from `sender` at `address` adds to, each with
    /// its limit.
    fn affected(&self, address: &str, sender: &str, limits: &QueueLimits) -> [(i64, u64); 3] {
        let of = |map: &HashMap<String, i64>, key: &str| map.get(key).copied().unwrap_or(0);
        [
            (self.total, limits.max_envelopes),
            (of(&self.by_sender, sender), limits.max_sender_envelopes),
            (of(&self.by_address, address), limits.max_sender_envelopes),
        ]
    }

    /// Whether one more envelope from `sender` at `address` is over a limit, and which:
    /// the recipient's total (`Full`), the sender's or the address's share
    /// (`SenderShareFull`).
    pub fn verdict(&self, address: &str, sender: &str, limits: &QueueLimits) -> Option<Enqueued> {
        let over = |(n, limit): (i64, u64)| n >= 0 && n as u64 >= limit;
        let [total, by_sender, by_address] = self.affected(address, sender, limits);
        if over(total) {
            Some(Enqueued::Full)
        } else if over(by_sender) || over(by_address) {
            Some(Enqueued::SenderShareFull)
        } else {
            None
        }
    }

    /// Whether any count that one more envelope from `sender` at `address` adds to is at
    /// half its limit or more.
    pub fn near(&self, address: &str, sender: &str, limits: &QueueLimits) -> bool {
        self.affected(address, sender, limits)
            .into_iter()
            .any(|(n, limit)| n >= 0 && n as u64 * 2 >= limit)
    }
}

/// One recipient's tally.
#[derive(Debug)]
struct Tally {
    /// As JetStream counted at the last fetch.
    fetched: Counts,
    /// This relay's publishes stored since (or while) it was fetched.
    stored: Counts,
    /// This relay's publishes admitted and not yet answered.
    in_flight: Counts,
    fetched_at: Option<Instant>,
    /// Ticks whenever one of this relay's publishes to the recipient is answered.
    answered: tokio::sync::watch::Sender<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            fetched: Counts::default(),
            stored: Counts::default(),
            in_flight: Counts::default(),
            fetched_at: None,
            answered: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Tally {
    fn estimate(&self) -> Counts {
        let mut counts = self.fetched.clone();
        counts.merge(&self.stored, 1);
        counts.merge(&self.in_flight, 1);
        counts
    }
}

/// This relay's tallies, by recipient subject prefix (`<prefix>.inbox.<recipient>.`).
#[derive(Debug, Default)]
pub struct Tallies(Mutex<HashMap<String, Tally>>);

/// An admitted publish, counted in flight until it is answered: [`Held::stored`] if
/// JetStream stored it; dropped otherwise.
#[derive(Debug)]
pub struct Held {
    tallies: Arc<Tallies>,
    prefix: String,
    address: String,
    sender: String,
    stored: bool,
}

impl Held {
    /// JetStream stored the envelope: it is counted as this relay's until the next fetch.
    pub fn stored(mut self) {
        self.stored = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut tallies = self.tallies.lock();
        if let Some(tally) = tallies.get_mut(&self.prefix) {
            tally.in_flight.add(&self.address, &self.sender, -1);
            if self.stored {
                tally.stored.add(&self.address, &self.sender, 1);
            }
            tally.answered.send_modify(|n| *n += 1);
        }
    }
}

impl Tallies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tally>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides whether one more envelope from `sender` at `address` fits in the mailbox
    /// whose subjects start with `prefix` (ending in `.`), fetching the counts from
    /// `mailbox` first when they are stale or near a limit. `Ok(held)`: it fits (also when
    /// the counts cannot be fetched: JetStream's per-subject cap still holds), and is
    /// counted in flight while `held` lives. `Err(refusal)`: the limit it is over.
    ///
    /// A fetch waits until this relay's publishes to the recipient in flight are answered,
    /// so that it neither misses nor double-counts them: counted twice, an envelope could
    /// be refused while a later one of the same sender is then accepted, and the sender's
    /// retry would arrive out of order.
    pub async fn admit(
        self: &Arc<Self>,
        mailbox: &async_nats::jetstream::stream::Stream,
        prefix: &str,
        address: &str,
        sender: &str,
        limits: &QueueLimits,
    ) -> Result<Held, Enqueued> {
        let now = Instant::now();
        let fresh = self.lock().get(prefix).is_some_and(|tally| {
            tally
                .fetched_at
                .is_some_and(|t| now.duration_since(t) < FAR_FOR)
                && !tally.estimate().near(address, sender, limits)
        });
        if !fresh {
            self.settle(prefix).await;
            // What this relay counted as stored when the fetch began: the fetch includes it.
            let before = self
                .lock()
                .get(prefix)
                .map(|tally| tally.stored.clone())
                .unwrap_or_default();
            let began = Instant::now();
            match fetch(mailbox, prefix).await {
                Ok(fetched) => {
                    let mut tallies = self.lock();
                    if !tallies.contains_key(prefix) && tallies.len() >= MAX_TALLIES {
                        tallies.retain(|_, t| {
                            t.fetched_at
                                .is_some_and(|f| now.duration_since(f) < FAR_FOR)
                        });
                        if tallies.len() >= MAX_TALLIES {
                            tallies.clear();
                        }
                    }
                    let tally = tallies.entry(prefix.to_owned()).or_default();
                    tally.fetched = fetched;
                    tally.stored.merge(&before, -1);
                    tally.fetched_at = Some(began);
                }
                Err(e) => tracing::debug!("cannot tally {prefix}>: {e}"),
            }
        }
        let mut tallies = self.lock();
        if let Some(tally) = tallies.get_mut(prefix) {
            if let Some(refused) = tally.estimate().verdict(address, sender, limits) {
                return Err(refused);
            }
            tally.in_flight.add(address, sender, 1);
        }
        Ok(Held {
            tallies: self.clone(),
            prefix: prefix.to_owned(),
            address: address.to_owned(),
            sender: sender.to_owned(),
            stored: false,
        })
    }
}

impl Tallies {
    /// Waits until none of this relay's publishes to `prefix` is in flight.
    async fn settle(&self, prefix: &str) {
        loop {
            let mut answered = {
                let tallies = self.lock();
                match tallies.get(prefix) {
                    Some(tally) if tally.in_flight.total > 0 => tally.answered.subscribe(),
                    _ => return,
                }
            };
            if answered.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The counts of the subjects under `prefix` (one request per page of subjects).
/// Envelopes stored by an earlier layout under the bare recipient subject are not
/// counted: they were capped by that layout's per-subject limit and drain as the
/// recipient reads.
async fn fetch(
    mailbox: &async_nats::jetstream::stream::Stream,
    prefix: &str,
) -> Result<Counts, String> {
    let subjects: Vec<(String, usize)> = mailbox
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Counts::from_subjects(subjects.iter().map(
        |(subject, n)| (subject.strip_prefix(prefix).unwrap_or(""), *n as u64),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QueueLimits {
        QueueLimits {
            max_sender_envelopes: 4,
            ..QueueLimits::per_recipient(10, 1 << 20)
        }
    }

    #[test]
    fn the_total_counts_every_sender_and_old_subjects() {
        let counts =
            Counts::from_subjects([("a1.bob", 3), ("a2.carol", 3), ("a3.dave", 3), ("", 1)]);
        assert_eq!(
            counts.verdict("a4", "erin", &limits()),
            Some(Enqueued::Full)
        );
        let fewer = Counts::from_subjects([("a1.bob", 3), ("a2.carol", 3), ("a3.dave", 3)]);
        assert_eq!(fewer.verdict("a4", "erin", &limits()), None);
    }

    #[test]
    fn a_sender_is_counted_over_its_addresses_and_an_address_over_its_senders() {
        let counts = Counts::from_subjects([("a1.bob", 2), ("a2.bob", 2)]);
        assert_eq!(
            counts.verdict("a3", "bob", &limits()),
            Some(Enqueued::SenderShareFull)
        );
        assert_eq!(counts.verdict("a3", "carol", &limits()), None);
        let counts = Counts::from_subjects([("a1.bob", 2), ("a1.carol", 2)]);
        assert_eq!(
            counts.verdict("a1", "dave", &limits()),
            Some(Enqueued::SenderShareFull)
        );
        assert_eq!(counts.verdict("a2", "dave", &limits()), None);
    }

    #[test]
    fn stored_and_in_flight_publishes_count_until_a_fetch_has_them() {
        let mut tally = Tally {
            fetched: Counts::from_subjects([("a1.bob", 3)]),
            ..Tally::default()
        };
        tally.stored.add("a1", "bob", 1);
        tally.in_flight.add("a2", "bob", 1);
        // 3 fetched + 1 stored + 1 in flight = 5 of bob's 4.
        assert_eq!(
            tally.estimate().verdict("a3", "bob", &limits()),
            Some(Enqueued::SenderShareFull)
        );
        // A fetch that saw the stored one: it no longer counts twice.
        let before = tally.stored.clone();
        tally.fetched = Counts::from_subjects([("a1.bob", 4)]);
        tally.stored.merge(&before, -1);
        tally.in_flight.add("a2", "bob", -1);
        assert_eq!(tally.estimate(), Counts::from_subjects([("a1.bob", 4)]));
    }

    #[test]
    fn near_means_half_a_limit() {
        let mut counts = Counts::default();
        assert!(!counts.near("a1", "bob", &limits()));
        counts.add("a1", "bob", 1);
        assert!(!counts.near("a1", "bob", &limits()));
        counts.add("a1", "bob", 1);
        assert!(counts.near("a1", "bob", &limits()));
        assert!(!counts.near("a2", "carol", &limits()));
    }
}
