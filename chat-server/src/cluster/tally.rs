//! The shares of a recipient's mailbox, held per cluster.
//!
//! Envelopes are stored under `<prefix>.inbox.<recipient>.<address>.<sender>`: the
//! stream's per-subject limit (discard-new per subject) caps what one sender holds from
//! one address group atomically, on every relay alike (on a stream made with this layout:
//! see [`super::layout`] for one made earlier). What JetStream cannot count in one step —
//! the recipient's total, one sender's envelopes from all its addresses, one address's
//! envelopes from all its senders — each relay checks against a tally of the recipient's
//! mailbox: the per-subject counts JetStream gives for `<prefix>.inbox.<recipient>.>` (a
//! stream info request with a subjects filter), plus this relay's publishes stored since
//! that fetch began and those still in flight.
//!
//! A tally is fetched again after [`FAR_FOR`], and before every publish once one of the
//! counts the envelope adds to is at half its limit (so an ordinary mailbox costs a request
//! per [`FAR_FOR`], a nearly full one a request per envelope); a fetch first waits for this
//! relay's publishes to that recipient in flight to be answered, so it neither misses nor
//! double-counts them, and for a place in the relay's gate for tally fetches
//! ([`super::api_gate`]: the first sends to many recipients at once, a group's fan-out
//! among them, must not flood a node's JetStream API queue). A limit can therefore be
//! passed only by what *other* relays store meanwhile: one round trip's worth once half a
//! limit is used, and below half, since each relay fills up to half a limit on its own
//! before it fetches again, at worst K/2 times the limit with K relays sending to one
//! recipient at once (none with K ≤ 2). Envelopes of the earlier one-subject-per-recipient
//! layout are not counted (they drain as the recipient reads).
//!
//! A relay whose fetch fails or is not answered within [`TALLY_PATIENCE`], or whose
//! fetches are paused after failing in a row ([`super::breaker`]), judges on what it
//! knows until it fetches again after [`FAR_FOR`] (or near a limit): the counts it last
//! fetched plus what it stored since, or, with none, what it stored since alone. So
//! while fetches fail each relay adds at most a limit's worth to a recipient it had no
//! counts for (JetStream's per-subject cap holds regardless), and a share the recipient
//! freed by reading may be refused until a fetch succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;

use super::breaker::Breaker;
use crate::store::{Enqueued, QueueLimits};

/// A tally far from every limit is fetched again after this long.
pub const FAR_FOR: Duration = Duration::from_secs(5);
/// How long a tally fetch may take before the relay judges on what it knows (see the
/// module's documentation). A healthy cluster answers in about a millisecond, but
/// nats-server answers a stream info request only when its queue of other JetStream API
/// requests is empty (`processJSAPIRoutedRequests` in its `server/jetstream_api.go`
/// serves the info queue only then): while sessions log in by the thousand, each making
/// its mailbox consumer, it waits, and at async-nats's 10 s request timeout every first
/// send to a recipient took 10 s (measured with 30,000 sessions on three relays).
pub const TALLY_PATIENCE: Duration = Duration::from_secs(1);
/// Recipients tallied at most; past it stale tallies are dropped.
const MAX_TALLIES: usize = 100_000;

/// Who holds what of one recipient's mailbox: envelopes in total, by sender token and by
/// address name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    total: i64,
    by_sender: HashMap<String, i64>,
    by_address: HashMap<String, i64>,
}

impl Counts {
    /// Counts from `(subject, envelopes)` pairs of the recipient's subjects, each after
    /// the recipient's own prefix (`<address>.<sender>`). Anything else counts toward the
    /// total only.
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

    /// Adds `n` (may be negative) envelopes from `sender` at `address`; a count back at
    /// zero is forgotten.
    pub fn add(&mut self, address: &str, sender: &str, n: i64) {
        self.total += n;
        for (map, key) in [
            (&mut self.by_sender, sender),
            (&mut self.by_address, address),
        ] {
            let count = map.entry(key.to_owned()).or_default();
            *count += n;
            if *count == 0 {
                map.remove(key);
            }
        }
    }

    /// The three counts one more envelope from `sender` at `address` adds to: the total,
    /// the sender's, the address's.
    fn affected(&self, address: &str, sender: &str) -> [i64; 3] {
        let of = |map: &HashMap<String, i64>, key: &str| map.get(key).copied().unwrap_or(0);
        [
            self.total,
            of(&self.by_sender, sender),
            of(&self.by_address, address),
        ]
    }

    /// [`judge`] on these counts alone.
    #[cfg(test)]
    pub fn verdict(&self, address: &str, sender: &str, limits: &QueueLimits) -> Option<Enqueued> {
        judge(self.affected(address, sender), limits)
    }
}

/// Whether one more envelope is over a limit given the counts it adds to (total, sender's,
/// address's), and which: the recipient's total (`Full`), the sender's or the address's
/// share (`SenderShareFull`).
fn judge([total, by_sender, by_address]: [i64; 3], limits: &QueueLimits) -> Option<Enqueued> {
    let over = |n: i64, limit: u64| n >= 0 && n as u64 >= limit;
    if over(total, limits.max_envelopes) {
        Some(Enqueued::Full)
    } else if over(by_sender, limits.max_sender_envelopes)
        || over(by_address, limits.max_sender_envelopes)
    {
        Some(Enqueued::SenderShareFull)
    } else {
        None
    }
}

/// Whether any of the counts (total, sender's, address's) is at half its limit or more.
fn near([total, by_sender, by_address]: [i64; 3], limits: &QueueLimits) -> bool {
    let half = |n: i64, limit: u64| n >= 0 && n as u64 * 2 >= limit;
    half(total, limits.max_envelopes)
        || half(by_sender, limits.max_sender_envelopes)
        || half(by_address, limits.max_sender_envelopes)
}

/// One recipient's tally.
#[derive(Debug)]
struct Tally {
    /// Tells this entry from one made after it was dropped ([`Held`] answers only to it).
    id: u64,
    /// As JetStream counted in the fetch that began at `fetched_at`.
    fetched: Counts,
    /// `stored` when that fetch began (the fetch saw those).
    base: Counts,
    /// This relay's publishes to the recipient that JetStream stored, since the entry was
    /// made.
    stored: Counts,
    /// This relay's publishes admitted and not yet answered.
    in_flight: Counts,
    fetched_at: Instant,
    /// Ticks whenever one of this relay's publishes to the recipient is answered.
    answered: tokio::sync::watch::Sender<u64>,
}

impl Tally {
    /// The counts one more envelope from `sender` at `address` adds to, as this relay
    /// knows them: fetched, plus stored since the fetch began, plus in flight.
    fn affected(&self, address: &str, sender: &str) -> [i64; 3] {
        let parts = [&self.fetched, &self.stored, &self.base, &self.in_flight]
            .map(|c| c.affected(address, sender));
        [0, 1, 2].map(|i| parts[0][i] + parts[1][i] - parts[2][i] + parts[3][i])
    }
}

/// This relay's tallies, by recipient subject prefix (`<prefix>.inbox.<recipient>.`).
#[derive(Debug, Default)]
pub struct Tallies {
    tallies: Mutex<HashMap<String, Tally>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Fetches pass it (a stream info is a JetStream API request; see
    /// [`super::api_gate`]): the first sends to many recipients at once, a group's
    /// fan-out among them, must not flood a node's API queue.
    api: super::api_gate::ApiGate,
    /// Pauses fetches while they go unanswered (see [`super::breaker`]).
    breaker: Mutex<Breaker>,
}

/// An admitted publish, counted in flight until it is answered: [`Held::stored`] if
/// JetStream stored it; dropped otherwise.
#[derive(Debug)]
pub struct Held {
    tallies: Arc<Tallies>,
    prefix: String,
    address: String,
    sender: String,
    /// The tally it is counted in (none if there was none).
    id: Option<u64>,
    stored: bool,
}

impl Held {
    /// JetStream stored the envelope.
    pub fn stored(mut self) {
        self.stored = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let mut tallies = self.tallies.lock();
        if let Some(tally) = tallies.get_mut(&self.prefix).filter(|t| t.id == id) {
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
        self.tallies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides whether one more envelope from `sender` at `address` fits in the mailbox
    /// whose subjects start with `prefix` (ending in `.`), fetching the counts from
    /// `mailbox` first when they are stale or near a limit (judged on the counts known if
    /// the fetch fails). `Ok(held)`: it fits, and is counted in flight while `held` lives.
    /// `Err(refusal)`: the limit it is over.
    ///
    /// A fetch waits until this relay's publishes to the recipient in flight are answered,
    /// so that it neither misses nor double-counts them: counted twice, an envelope could
    /// be refused while a later one of the same sender is then accepted, and the sender's
    /// retry would arrive out of order. Fetches may overlap: each counts against the stored
    /// publishes as they were when it began, and an older one's result is dropped.
    pub async fn admit(
        self: &Arc<Self>,
        mailbox: &async_nats::jetstream::stream::Stream,
        prefix: &str,
        address: &str,
        sender: &str,
        limits: &QueueLimits,
    ) -> Result<Held, Enqueued> {
        let fresh = self.lock().get(prefix).is_some_and(|tally| {
            tally.fetched_at.elapsed() < FAR_FOR && !near(tally.affected(address, sender), limits)
        });
        if !fresh {
            self.refresh(mailbox, prefix).await;
        }
        let mut tallies = self.lock();
        let Some(tally) = tallies.get_mut(prefix) else {
            return Ok(self.held(prefix, address, sender, None));
        };
        if let Some(refused) = judge(tally.affected(address, sender), limits) {
            return Err(refused);
        }
        tally.in_flight.add(address, sender, 1);
        let id = tally.id;
        drop(tallies);
        Ok(self.held(prefix, address, sender, Some(id)))
    }

    /// Fetches the counts of the mailbox whose subjects start with `prefix` and records
    /// them; records that nothing was learnt (see [`Tallies::record`]) if the fetch fails,
    /// is not answered within [`TALLY_PATIENCE`], or the relay's [`Breaker`] refuses it.
    async fn refresh(&self, mailbox: &async_nats::jetstream::stream::Stream, prefix: &str) {
        // A place in the gate, then nothing in flight: publishes that went out while this
        // waited for its place are waited for again without holding it. Neither is waited
        // for while the breaker is open.
        let through = if self.breaker().refuses(Instant::now()) {
            None
        } else {
            Some(loop {
                self.settle(prefix).await;
                let through = self.api.pass().await;
                if self.settled(prefix) {
                    break through;
                }
            })
        };
        let began = Instant::now();
        let before = self
            .lock()
            .get(prefix)
            .map(|tally| (tally.id, tally.stored.clone()));
        let ticket = through
            .as_ref()
            .and_then(|_| self.breaker().try_fetch(began));
        let fetched = match ticket {
            Some(_) => tokio::time::timeout(TALLY_PATIENCE, fetch(mailbox, prefix))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {TALLY_PATIENCE:?}"))),
            None => Err("fetches paused by the breaker".to_owned()),
        };
        drop(through);
        match (ticket, &fetched) {
            (Some(ticket), Ok(_)) => self.breaker().answered(ticket),
            (Some(ticket), Err(_)) => self.breaker().failed(ticket, Instant::now()),
            (None, _) => {}
        }
        if let Err(e) = &fetched {
            tracing::debug!("cannot tally {prefix}> ({e}): judged on what is known");
        }
        self.record(prefix, before, fetched.ok(), began);
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(self: &Arc<Self>, prefix: &str, address: &str, sender: &str, id: Option<u64>) -> Held {
        Held {
            tallies: self.clone(),
            prefix: prefix.to_owned(),
            address: address.to_owned(),
            sender: sender.to_owned(),
            id,
            stored: false,
        }
    }

    /// Keeps `counts`, fetched from `began` on, unless a later fetch's are kept already.
    /// `before`: the tally's id and stored publishes when the fetch began (none: no tally).
    /// `counts` is `None` if the fetch failed: the tally keeps its counts as they are, or
    /// with none is made empty (counting from then on only what this relay stores), and
    /// either is fresh from `began` on, so that a relay that cannot fetch asks again after
    /// [`FAR_FOR`] (or near a limit) rather than before every publish, and bounds what it
    /// adds meanwhile by what it knows.
    fn record(
        &self,
        prefix: &str,
        before: Option<(u64, Counts)>,
        counts: Option<Counts>,
        began: Instant,
    ) {
        let mut tallies = self.lock();
        match (tallies.get_mut(prefix), before) {
            // An older fetch's counts are dropped.
            (Some(tally), Some((id, base))) if tally.id == id && began >= tally.fetched_at => {
                if let Some(counts) = counts {
                    tally.fetched = counts;
                    tally.base = base;
                }
                tally.fetched_at = began;
            }
            (None, _) => {
                if tallies.len() >= MAX_TALLIES {
                    tallies.retain(|_, t| t.fetched_at.elapsed() < FAR_FOR);
                    if tallies.len() >= MAX_TALLIES {
                        tallies.clear();
                    }
                }
                let id = self
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tallies.insert(
                    prefix.to_owned(),
                    Tally {
                        id,
                        fetched: counts.unwrap_or_default(),
                        base: Counts::default(),
                        stored: Counts::default(),
                        in_flight: Counts::default(),
                        fetched_at: began,
                        answered: tokio::sync::watch::Sender::new(0),
                    },
                );
            }
            // The tally was made or replaced while fetching: the next admit fetches again.
            _ => {}
        }
    }

    /// Whether none of this relay's publishes to `prefix` is in flight.
    fn settled(&self, prefix: &str) -> bool {
        self.lock()
            .get(prefix)
            .is_none_or(|tally| tally.in_flight.total == 0)
    }

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
    fn the_total_counts_every_sender() {
        let counts = Counts::from_subjects([("a1.bob", 3), ("a2.carol", 3), ("a3.dave", 4)]);
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
    fn near_means_half_a_limit() {
        assert!(!near([0, 0, 0], &limits()));
        assert!(!near([4, 1, 1], &limits()));
        assert!(near([5, 1, 1], &limits()));
        assert!(near([0, 2, 0], &limits()));
        assert!(near([0, 0, 2], &limits()));
    }

    /// One envelope from bob at a1 admitted to `p`'s tally `id`, as `admit` counts it.
    fn admitted(tallies: &Arc<Tallies>, p: &str, id: u64) -> Held {
        tallies
            .lock()
            .get_mut(p)
            .unwrap()
            .in_flight
            .add("a1", "bob", 1);
        tallies.held(p, "a1", "bob", Some(id))
    }

    /// Stored and in-flight publishes count until a fetch that began after them has them;
    /// overlapping fetches neither lose nor double-count them, an older fetch's counts are
    /// dropped, and a publish held for a tally since replaced leaves the new one alone.
    #[test]
    fn publishes_count_once_whatever_the_fetches_overlap() {
        let tallies = Arc::new(Tallies::default());
        let p = "chat.inbox.vic.";
        let t0 = Instant::now();
        tallies.record(p, None, Some(Counts::from_subjects([("a1.bob", 1)])), t0);
        let bob = |tallies: &Arc<Tallies>| tallies.lock().get(p).unwrap().affected("a1", "bob");
        let id = tallies.lock()[p].id;
        let held = |tallies: &Arc<Tallies>| admitted(tallies, p, id);
        // One in flight, then stored: 2 either way.
        let first = held(&tallies);
        assert_eq!(bob(&tallies), [2, 2, 2]);
        first.stored();
        assert_eq!(bob(&tallies), [2, 2, 2]);
        // Two fetches begin (both see 2 stored in JetStream); another is stored meanwhile.
        let snapshot = || {
            let t = &tallies.lock()[p];
            (t.id, t.stored.clone())
        };
        let (s1, t1) = (snapshot(), Instant::now());
        let (s2, t2) = (snapshot(), Instant::now());
        held(&tallies).stored();
        // The later fetch ends first (it saw the third), then the earlier one: dropped.
        tallies.record(
            p,
            Some(s2),
            Some(Counts::from_subjects([("a1.bob", 3)])),
            t2,
        );
        assert_eq!(
            bob(&tallies),
            [4, 4, 4],
            "conservative: the third may count twice"
        );
        tallies.record(
            p,
            Some(s1),
            Some(Counts::from_subjects([("a1.bob", 2)])),
            t1,
        );
        assert_eq!(bob(&tallies), [4, 4, 4]);
        let (s3, t3) = (snapshot(), Instant::now());
        tallies.record(
            p,
            Some(s3),
            Some(Counts::from_subjects([("a1.bob", 3)])),
            t3,
        );
        assert_eq!(bob(&tallies), [3, 3, 3]);
        // A publish held for a tally that was since dropped and made again.
        let stale = held(&tallies);
        tallies.lock().clear();
        tallies.record(p, None, Some(Counts::default()), Instant::now());
        drop(stale);
        assert_eq!(bob(&tallies), [0, 0, 0]);
        assert_eq!(tallies.lock()[p].in_flight, Counts::default());
    }

    /// A fetch that fails (no answer within `TALLY_PATIENCE`) leaves the counts known:
    /// with no tally, what this relay stores from then on, so that it cannot add more
    /// than a limit however long the counts stay out of reach; with one, its last counts.
    /// Either is fresh again, so the next publish does not wait on another fetch.
    #[test]
    fn a_failed_fetch_judges_on_what_is_known() {
        let tallies = Arc::new(Tallies::default());
        let p = "chat.inbox.vic.";
        let began = Instant::now()
            .checked_sub(FAR_FOR)
            .unwrap_or_else(Instant::now);
        tallies.record(p, None, None, began);
        let store = |tallies: &Arc<Tallies>, n: usize| {
            for _ in 0..n {
                let id = tallies.lock()[p].id;
                admitted(tallies, p, id).stored();
            }
        };
        let verdict = |tallies: &Arc<Tallies>, sender: &str| {
            judge(tallies.lock()[p].affected("a1", sender), &limits())
        };
        assert_eq!(verdict(&tallies, "bob"), None, "nothing known yet");
        store(&tallies, 4);
        assert_eq!(
            verdict(&tallies, "bob"),
            Some(Enqueued::SenderShareFull),
            "bob's share (4) is full of what this relay stored since"
        );
        // A fetch that worked, then one that failed: the fetched counts stay, and the
        // tally is fresh from the failed one's start.
        let before = {
            let t = &tallies.lock()[p];
            (t.id, t.stored.clone())
        };
        tallies.record(
            p,
            Some(before.clone()),
            Some(Counts::from_subjects([("a1.carol", 1)])),
            Instant::now(),
        );
        assert_eq!(verdict(&tallies, "bob"), None, "bob's were read meanwhile");
        let failed_at = Instant::now();
        tallies.record(p, Some(before), None, failed_at);
        let t = &tallies.lock()[p];
        assert_eq!(t.fetched, Counts::from_subjects([("a1.carol", 1)]));
        assert_eq!(t.fetched_at, failed_at);
    }
}
