//! Limits that keep one client (or one address) from wedging the relay:
//!
//! - [`TokenBucket`]: the per-connection request rate, charged by *work* ([`work`]): a
//!   frame's size and the ids it carries, not one token per frame. Over the rate the server
//!   does not drop requests (that would reorder a client's pipelined sends): it waits
//!   before handling the next one, so a flooding connection is slowed to the configured
//!   rate and TCP pushes back on the client.
//! - [`AddressLimiter`]: a token bucket per source address (IPv6: per /64), for new
//!   connections and for new accounts. Bounded in memory.
//! - [`PreLoginSlots`]: connections that have not logged in yet have their own small
//!   budget and a cap per address, so silent sockets cannot take logged-in users' slots.
//! - [`SharedBucket`] and [`shared_address_name`]: the token bucket for new accounts kept
//!   in a store every relay of a cluster shares, so the limit holds per cluster.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::RateLimit;

/// Classic token bucket; time is passed in so it is testable without sleeping.
#[derive(Debug, Clone)]
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
        self.take_n(1.0, now)
    }

    /// Takes `n` tokens (see [`work`]) and returns how long to wait before using them.
    pub fn take_n(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes one token if there is one now; never goes into debt.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back one token taken for something that did not happen (up to the burst).
    pub fn give_back(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Seconds until one token is there.
    pub fn wait_for_one(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }

    /// Full again: nothing to remember about this bucket.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

/// The work a request costs, in tokens of the connection's [`TokenBucket`]: one per
/// frame, one more per KiB it carries, one more per 256 ids it names.
pub mod work {
    pub fn frame(bytes: usize, ids: usize) -> f64 {
        1.0 + bytes as f64 / 1024.0 + ids as f64 / 256.0
    }

    /// A `SendMany` of `bytes` (payload and names) to `recipients`, its payload
    /// `payload` bytes: the frame, and per copy a quarter token and a quarter per KiB
    /// (each copy is a queue write of its own, so the bytes a token may make the relay
    /// store stay within four times a `Send`'s). A 1.2 KB group envelope to 100 members
    /// costs about 56 tokens, where 100 `Send`s of it cost about 220.
    pub fn fan_out(bytes: usize, payload: usize, recipients: usize) -> f64 {
        frame(bytes, 0) + recipients as f64 * (0.25 + payload as f64 / 4096.0)
    }
}

/// Groups addresses the way one user's machine gets them: an IPv4 address, or the /64 an
/// IPv6 address is in (one host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey([u8; 9]);

impl AddressKey {
    pub fn of(ip: IpAddr) -> Self {
        let mut key = [0u8; 9];
        match ip.to_canonical() {
            IpAddr::V4(v4) => key[1..5].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => {
                key[0] = 6;
                key[1..].copy_from_slice(&v6.octets()[..8]);
            }
        }
        Self(key)
    }
}

/// The name of `ip`'s address group ([`AddressKey`]) in a store the relays of a cluster
/// share: 32 hex digits of SHA-256(`secret` ‖ group). The secret is derived from the
/// relays' shared TLS key, so the store (NATS) does not say where anyone connected from,
/// and every relay of the cluster names an address alike.
pub fn shared_address_name(secret: &[u8; 32], ip: IpAddr) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(secret)
        .chain_update(AddressKey::of(ip).0)
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A token bucket kept as text in a shared store (`"<tokens> <unix ms>"`), on wall-clock
/// time so that every relay reads it alike. A missing or unreadable value is a full bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedBucket {
    /// Tokens left at `at_ms`.
    pub tokens: f64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl SharedBucket {
    /// Parses a stored value.
    pub fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (tokens, at) = text.split_once(' ')?;
        let tokens: f64 = tokens.parse().ok()?;
        tokens.is_finite().then_some(())?;
        Some(Self {
            tokens,
            at_ms: at.parse().ok()?,
        })
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        format!("{} {}", self.tokens, self.at_ms)
    }

    /// Takes one token at `now_ms` from `prev` (`None`: full) under `limit`: the new state
    /// to store, or how long until a token is there. A clock behind the stored time
    /// refills nothing (relays' clocks differ a little).
    pub fn take(prev: Option<Self>, limit: RateLimit, now_ms: u64) -> Result<Self, Duration> {
        let tokens = match prev {
            None => limit.burst,
            Some(p) => {
                let elapsed = now_ms.saturating_sub(p.at_ms) as f64 / 1000.0;
                (p.tokens + elapsed * limit.per_second).min(limit.burst)
            }
        };
        if tokens >= 1.0 {
            Ok(Self {
                tokens: tokens - 1.0,
                at_ms: now_ms.max(prev.map_or(0, |p| p.at_ms)),
            })
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / limit.per_second))
        }
    }

    /// Gives one token back to `prev` at `now_ms` (a token taken for an account that was
    /// not made), up to the burst; `None` (nothing stored) stays full.
    pub fn give_back(prev: Option<Self>, limit: RateLimit, now_ms: u64) -> Self {
        let at_ms = now_ms.max(prev.map_or(0, |p| p.at_ms));
        let tokens = match prev {
            None => limit.burst,
            Some(p) => {
                let elapsed = now_ms.saturating_sub(p.at_ms) as f64 / 1000.0;
                (p.tokens + elapsed * limit.per_second + 1.0).min(limit.burst)
            }
        };
        Self { tokens, at_ms }
    }
}

/// Names a sender's address group ([`AddressKey`]) in the queue without storing the
/// address: a keyed hash (SipHash with a random key drawn at start, never written), so
/// the database does not say where anyone connected from. A new key after a restart
/// means an address's queue share starts afresh; what it queued before still counts
/// against the recipients' and the server's bounds.
#[derive(Debug, Default)]
pub struct Sources(std::hash::RandomState);

impl Sources {
    /// The source of `ip`: never 0 (0 marks envelopes from before sources were kept).
    pub fn of(&self, ip: IpAddr) -> i64 {
        use std::hash::BuildHasher;
        (self.0.hash_one(AddressKey::of(ip)) | 1) as i64
    }
}

/// A token bucket per source address, forgetting full buckets when it has too many.
#[derive(Debug)]
pub struct AddressLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<AddressKey, TokenBucket>>,
}

/// Addresses remembered at most; full buckets are forgotten first.
const MAX_ADDRESSES: usize = 65_536;

impl AddressLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip` if it has one; otherwise says how long until it will.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ADDRESSES {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_ADDRESSES {
                // Under a spread-out flood: start afresh rather than grow.
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(AddressKey::of(ip))
            .or_insert_with(|| TokenBucket::new(self.limit, now));
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(bucket.wait_for_one())
        }
    }

    /// Gives back the token [`Self::check`] took for `ip`, for something that then did not
    /// happen (an account not made: a storage failure, or the name taken meanwhile).
    pub fn refund(&self, ip: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(&AddressKey::of(ip)) {
            bucket.give_back(now);
        }
    }
}

/// The budget of connections not logged in yet, shared fairly between addresses: when it
/// is full, a connection from an address holding fewer slots than the busiest address takes
/// the oldest slot of that address (whose connection is closed with `server_busy`). Filling
/// the budget so that nobody new gets in therefore takes as many addresses (IPv6: /64s) as
/// the budget has slots, not `budget / max_per_address` of them.
#[derive(Debug)]
pub struct PreLoginSlots {
    inner: Arc<Mutex<SlotTable>>,
    total: usize,
    max_per_address: usize,
}

#[derive(Debug, Default)]
struct SlotTable {
    /// Per address, its slots oldest first: (slot id, how to tell it it was evicted).
    by_address: HashMap<AddressKey, VecDeque<(u64, Arc<Notify>)>>,
    in_use: usize,
    next_id: u64,
}

/// Why a new connection got no pre-login slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    Full,
    AddressFull,
}

/// A connection's place in the pre-login budget, given back on drop (at login or close).
#[derive(Debug)]
pub struct PreLoginSlot {
    id: u64,
    key: AddressKey,
    evicted: Arc<Notify>,
    table: Arc<Mutex<SlotTable>>,
}

impl PreLoginSlot {
    /// Completes when this slot was given to a connection from a less busy address.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }

    /// The notification [`PreLoginSlot::evicted`] waits for (to wait without borrowing).
    pub(crate) fn eviction(&self) -> Arc<Notify> {
        self.evicted.clone()
    }
}

impl Drop for PreLoginSlot {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slots) = table.by_address.get_mut(&self.key) else {
            return;
        };
        let before = slots.len();
        slots.retain(|(id, _)| *id != self.id);
        let removed = before != slots.len();
        if slots.is_empty() {
            table.by_address.remove(&self.key);
        }
        // An evicted slot was handed over already.
        if removed {
            table.in_use -= 1;
        }
    }
}

impl PreLoginSlots {
    pub fn new(total: usize, max_per_address: usize) -> Self {
        Self {
            inner: Arc::default(),
            total,
            max_per_address,
        }
    }

    pub fn take(&self, ip: IpAddr) -> Result<PreLoginSlot, NoSlot> {
        let key = AddressKey::of(ip);
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mine = table.by_address.get(&key).map_or(0, VecDeque::len);
        if mine >= self.max_per_address {
            return Err(NoSlot::AddressFull);
        }
        if table.in_use >= self.total {
            // Full: take the oldest slot of the busiest address, if it is busier than this
            // one would be with the slot.
            let busiest = table
                .by_address
                .iter()
                .max_by_key(|(_, slots)| slots.len())
                .map(|(k, slots)| (*k, slots.len()));
            let Some((victim, held)) = busiest.filter(|(_, held)| *held > mine + 1) else {
                return Err(NoSlot::Full);
            };
            let slots = table.by_address.get_mut(&victim).expect("just found");
            let (_, notify) = slots.pop_front().expect("busiest holds slots");
            if held == 1 {
                table.by_address.remove(&victim);
            }
            notify.notify_one();
        } else {
            table.in_use += 1;
        }
        table.next_id += 1;
        let id = table.next_id;
        let evicted = Arc::new(Notify::new());
        table
            .by_address
            .entry(key)
            .or_default()
            .push_back((id, evicted.clone()));
        Ok(PreLoginSlot {
            id,
            key,
            evicted,
            table: self.inner.clone(),
        })
    }

    /// Connections not logged in now.
    pub fn in_use(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).in_use
    }
}

#[cfg(test)]
mod tests;
