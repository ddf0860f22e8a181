//! Bounding the cost of key offers, the only envelopes that cost RSA work to open.
//!
//! - **Cache.** A verified and unwrapped offer is remembered by its offer id (and a bad
//!   one by its failure), so a replay costs a hash lookup, not an RSA decryption, even if
//!   the message it came with failed.
//! - **Throttle.** New offers are limited per sender (contacts get more than strangers).
//!   Over the limit that sender's envelopes wait, in order; nobody else's do.
//! - **Worker.** RSA runs on the blocking pool, one job at a time, contacts before
//!   strangers, while the engine keeps serving everyone else. A sender's later envelopes
//!   wait behind its offer, so each sender's order is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::Username;
use chat_protocol::e2e::{EpochKey, Inspected, OfferId, OpenError, Parties, unwrap_offer};
use chat_protocol::identity::{Identity, PublicIdentity};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Engine, Source, max_waiting};

/// Offers remembered (good or bad); the oldest is forgotten first.
const CACHE: usize = 1024;

/// New offers per sender: (burst, seconds per offer after it).
const CONTACT_OFFERS: (f64, f64) = (20.0, 30.0);
const STRANGER_OFFERS: (f64, f64) = (3.0, 120.0);

/// A sender's allowance of new offers: a token bucket.
struct Bucket {
    tokens: f64,
    /// When `tokens` was last refilled.
    last: Instant,
    /// Whether it was sized for a contact.
    contact: bool,
}

/// What an RSA job found.
pub(super) struct Unwrapped {
    peer: String,
    offer_id: OfferId,
    result: Result<EpochKey, OpenError>,
}

/// An envelope waiting for its sender's offer.
pub(super) struct Parked {
    pub source: Source,
    pub payload: Vec<u8>,
    pub arrived: Instant,
}

/// Why a sender's envelopes wait.
enum Block {
    /// This offer is being unwrapped (or waits for the worker).
    Unwrapping(OfferId),
    /// Its new offers are over the limit until then.
    Throttled(Instant),
}

struct Job {
    peer: String,
    offer_id: OfferId,
    me: Arc<Identity>,
    my_name: Username,
    peer_name: Username,
    public: PublicIdentity,
    inspected: Inspected,
}

/// Offer bookkeeping of the engine.
pub(super) struct Offers {
    cache: HashMap<OfferId, Result<EpochKey, OpenError>>,
    order: VecDeque<OfferId>,
    blocked: HashMap<String, (Block, VecDeque<Parked>)>,
    /// Per sender: its allowance of new offers (see `take_token`).
    buckets: HashMap<String, Bucket>,
    contact_jobs: VecDeque<Job>,
    stranger_jobs: VecDeque<Job>,
    /// The offer whose RSA job runs now. It outlives a connection: after a reconnect the
    /// same offer, delivered again, waits for it instead of being unwrapped twice.
    running: Option<OfferId>,
    done_tx: mpsc::UnboundedSender<Unwrapped>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Unwrapped>,
}

impl Offers {
    pub(super) fn new() -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            cache: HashMap::new(),
            order: VecDeque::new(),
            blocked: HashMap::new(),
            buckets: HashMap::new(),
            contact_jobs: VecDeque::new(),
            stranger_jobs: VecDeque::new(),
            running: None,
            done_tx,
            done_rx,
        }
    }

    /// What is known of `offer_id`: its key, or why it is bad.
    pub(super) fn cached(&self, offer_id: &OfferId) -> Option<&Result<EpochKey, OpenError>> {
        self.cache.get(offer_id)
    }

    fn remember(&mut self, offer_id: OfferId, result: Result<EpochKey, OpenError>) {
        if self.cache.insert(offer_id, result).is_none() {
            self.order.push_back(offer_id);
            while self.order.len() > CACHE {
                if let Some(old) = self.order.pop_front() {
                    self.cache.remove(&old);
                }
            }
        }
    }

    /// Whether any sender's envelopes wait in memory.
    pub(super) fn any_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Whether `peer`'s envelopes are waiting (a new one must queue behind them).
    pub(super) fn is_blocked(&self, peer: &str) -> bool {
        self.blocked.contains_key(peer)
    }

    /// Queues an envelope behind `peer`'s waiting ones. Returns false (dropped from
    /// memory: it stays on the relay) when too many wait.
    pub(super) fn park(&mut self, peer: &str, parked: Parked) -> bool {
        let Some((_, queue)) = self.blocked.get_mut(peer) else {
            return false;
        };
        if queue.len() >= max_waiting() {
            return false;
        }
        queue.push_back(parked);
        true
    }

    /// If `offer_id`'s RSA job is already running (started on an earlier connection, its
    /// envelope delivered again since), `peer`'s line waits for it: no second unwrap and
    /// no token spent: `None`. Otherwise `parked` is handed back.
    fn wait_for_running(
        &mut self,
        peer: &str,
        offer_id: OfferId,
        parked: Parked,
    ) -> Option<Parked> {
        if self.running != Some(offer_id) {
            return Some(parked);
        }
        self.blocked.insert(
            peer.to_owned(),
            (Block::Unwrapping(offer_id), VecDeque::from([parked])),
        );
        None
    }

    /// Takes a token for a new offer from `peer`, or says until when it must wait. A
    /// token bucket per sender, sized by what the sender is now: a stranger who becomes
    /// a contact gets the contact's larger burst at once (the difference is added once).
    fn take_token(&mut self, peer: &str, contact: bool, now: Instant) -> Result<(), Instant> {
        let (burst, per) = if contact {
            CONTACT_OFFERS
        } else {
            STRANGER_OFFERS
        };
        let bucket = self.buckets.entry(peer.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
            contact,
        });
        if contact && !bucket.contact {
            bucket.tokens += CONTACT_OFFERS.0 - STRANGER_OFFERS.0;
            bucket.contact = true;
        }
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64() / per;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - bucket.tokens) * per))
        }
    }

    /// The earliest time a throttled sender may go on.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        self.blocked
            .values()
            .filter_map(|(b, _)| match b {
                Block::Throttled(at) => Some(*at),
                Block::Unwrapping(_) => None,
            })
            .min()
    }

    /// Senders whose throttle has passed: their waiting envelopes, to deliver again.
    pub(super) fn take_unthrottled(&mut self, now: Instant) -> Vec<(String, VecDeque<Parked>)> {
        let ready: Vec<String> = self
            .blocked
            .iter()
            .filter(|(_, (b, _))| matches!(b, Block::Throttled(at) if *at <= now))
            .map(|(p, _)| p.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|p| self.blocked.remove(&p).map(|(_, q)| (p, q)))
            .collect()
    }

    /// A connection ended: what waits in memory is dropped (unacknowledged, the relay
    /// delivers it again); cached offers stay.
    pub(super) fn forget_waiting(&mut self) {
        self.blocked.clear();
        self.contact_jobs.clear();
        self.stranger_jobs.clear();
    }

    fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(job) = self
            .contact_jobs
            .pop_front()
            .or_else(|| self.stranger_jobs.pop_front())
        else {
            return;
        };
        self.running = Some(job.offer_id);
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let parties = Parties {
                me: &job.me,
                my_name: &job.my_name,
                peer_name: &job.peer_name,
                peer: &job.public,
            };
            let result = unwrap_offer(parties, &job.inspected);
            let _ = done.send(Unwrapped {
                peer: job.peer,
                offer_id: job.offer_id,
                result,
            });
        });
    }
}

impl Engine {
    /// An envelope from `from` carries an offer not seen before: wait for its unwrap (or
    /// the sender's throttle), keeping it first in `from`'s line.
    pub(super) fn await_offer(
        &mut self,
        from: &str,
        inspected: Inspected,
        public: PublicIdentity,
        parked: Parked,
    ) {
        let Some(offer_id) = inspected.needs_unwrap().copied() else {
            return;
        };
        let Some(parked) = self.offers.wait_for_running(from, offer_id, parked) else {
            return;
        };
        let contact = self.store.has_conversation(from).unwrap_or(false);
        let now = Instant::now();
        if let Err(until) = self.offers.take_token(from, contact, now) {
            self.offers.blocked.insert(
                from.to_owned(),
                (Block::Throttled(until), VecDeque::from([parked])),
            );
            return;
        }
        let Ok(peer_name) = Username::parse(from) else {
            return;
        };
        let job = Job {
            peer: from.to_owned(),
            offer_id,
            me: self.identity.clone(),
            my_name: self.me.clone(),
            peer_name,
            public,
            inspected,
        };
        self.offers.blocked.insert(
            from.to_owned(),
            (Block::Unwrapping(offer_id), VecDeque::from([parked])),
        );
        if contact {
            self.offers.contact_jobs.push_back(job);
        } else {
            self.offers.stranger_jobs.push_back(job);
        }
        self.offers.start_next();
    }

    /// An RSA job finished: remember its result and deliver what waited on it, in order.
    pub(super) fn offer_unwrapped(&mut self, done: Unwrapped) {
        self.offers.running = None;
        self.offers.remember(done.offer_id, done.result);
        // Only what waits for this offer: after a reconnect the sender's line may wait
        // for another one (its own job queued), which must not be let go early.
        if matches!(
            self.offers.blocked.get(&done.peer),
            Some((Block::Unwrapping(id), _)) if *id == done.offer_id
        ) && let Some((_, waiting)) = self.offers.blocked.remove(&done.peer)
        {
            self.redeliver(&done.peer, waiting);
        }
        self.offers.start_next();
    }

    /// Senders whose throttle passed go on.
    pub(super) fn offers_unthrottled(&mut self) {
        for (peer, waiting) in self.offers.take_unthrottled(Instant::now()) {
            self.redeliver(&peer, waiting);
        }
    }

    fn redeliver(&mut self, peer: &str, waiting: VecDeque<Parked>) {
        for p in waiting {
            self.deliver(p.source, peer.to_owned(), p.payload, p.arrived);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field report: a sender first heard from as a stranger kept the stranger's
    /// burst of 3 after becoming a contact, so every later new epoch (one per reconnect)
    /// waited 30 s.
    #[test]
    fn a_stranger_who_becomes_a_contact_gets_the_contacts_burst() {
        let mut offers = Offers::new();
        let now = Instant::now();
        let stranger = STRANGER_OFFERS.0 as usize;
        let contact = CONTACT_OFFERS.0 as usize;
        for _ in 0..stranger {
            assert!(offers.take_token("cs0", false, now).is_ok());
        }
        let until = offers.take_token("cs0", false, now).unwrap_err();
        assert_eq!(until - now, Duration::from_secs_f64(STRANGER_OFFERS.1));
        // Now a contact: the rest of the contact's burst, at once and only once.
        for _ in stranger..contact {
            assert!(offers.take_token("cs0", true, now).is_ok());
        }
        let until = offers.take_token("cs0", true, now).unwrap_err();
        assert_eq!(until - now, Duration::from_secs_f64(CONTACT_OFFERS.1));
        // A contact from the start: the contact's burst, no more.
        for _ in 0..contact {
            assert!(offers.take_token("bob", true, now).is_ok());
        }
        assert!(offers.take_token("bob", true, now).is_err());
    }

    /// An offer whose unwrap was running when the connection dropped, delivered again on
    /// the next connection: its sender's line waits for that job, with no second job
    /// queued and none of the sender's offer allowance spent; any other offer goes the
    /// usual way.
    #[test]
    fn an_offer_delivered_again_waits_for_its_running_unwrap() {
        let mut offers = Offers::new();
        let parked = |n: u64| Parked {
            source: Source::Relay(n),
            payload: vec![n as u8],
            arrived: Instant::now(),
        };
        offers.running = Some([7; 32]);
        offers.forget_waiting();
        assert!(offers.wait_for_running("bob", [7; 32], parked(1)).is_none());
        assert!(offers.is_blocked("bob"));
        assert!(
            offers.park("bob", parked(2)),
            "later envelopes queue behind it"
        );
        assert!(offers.contact_jobs.is_empty() && offers.stranger_jobs.is_empty());
        assert!(offers.buckets.is_empty(), "no offer allowance spent");
        let back = offers.wait_for_running("amy", [8; 32], parked(3));
        assert_eq!(back.map(|p| p.source), Some(Source::Relay(3)));
        assert!(!offers.is_blocked("amy"));
    }
}
