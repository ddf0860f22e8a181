//! The limit on new accounts per address, held per cluster: one token bucket per address
//! group in the `<prefix>_registrations` bucket ([`SharedBucket`]), taken with
//! compare-and-set so that relays racing for the same address take one token each.
//!
//! Within one relay, takes for the same address wait their turn ([`Registrations`]'s
//! stripes): many people behind one address (a campus, a carrier's NAT) registering at
//! once would otherwise race each other's compare-and-set and lose until they ran out of
//! attempts. Only relays race each other, and they back off between attempts.
//!
//! Reads and writes that get no answer (a NATS node died and the bucket elects a new
//! leader) are tried again until the caller's deadline ([`super::patience`]). A write
//! whose answer was lost may have landed; its retry then finds the bucket moved and takes
//! again, so such a loss can cost the address one token more.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::{Cluster, patience};
use crate::config::RateLimit;
use crate::limits::SharedBucket;
use crate::store::StoreError;

/// Compare-and-set attempts before giving up (other relays kept winning the race).
const ATTEMPTS: u32 = 16;

/// Locks an address's takes are serialised by within a relay, chosen by its name.
const STRIPES: usize = 64;

/// The longest pause between two attempts (each is random, up to 2^attempt ms).
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The `<prefix>_registrations` bucket, and the locks that keep this relay's takes for
/// one address from racing each other.
pub(super) struct Registrations {
    store: kv::Store,
    stripes: Box<[tokio::sync::Mutex<()>]>,
}

impl Registrations {
    pub(super) fn new(store: kv::Store) -> Self {
        Self {
            store,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// The lock of the address named `name` (names are hex digests: any bits will do).
    fn stripe(&self, name: &str) -> &tokio::sync::Mutex<()> {
        let h = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.stripes[h % STRIPES]
    }
}

impl Cluster {
    /// Takes one new-account token for the address named `name`
    /// ([`crate::limits::shared_address_name`]) under `limit`: `Ok(Ok(()))` if there was
    /// one, `Ok(Err(wait))` if not (and how long until there is).
    ///
    /// # Errors
    /// [`StoreError::Cluster`] if NATS does not answer by `deadline` or other relays keep
    /// winning.
    pub async fn take_registration(
        &self,
        name: &str,
        limit: RateLimit,
        deadline: tokio::time::Instant,
    ) -> Result<Result<(), Duration>, StoreError> {
        self.update_registrations(name, deadline, |prev, now_ms| {
            SharedBucket::take(prev, limit, now_ms)
        })
        .await
    }

    /// Gives back the token [`Self::take_registration`] took for the address named `name`
    /// when no account was made after all (its write failed, or the name was taken
    /// meanwhile), so that a failure is not charged to the people behind the address.
    ///
    /// # Errors
    /// [`StoreError::Cluster`] if NATS does not answer by `deadline` or other relays keep
    /// winning.
    pub async fn refund_registration(
        &self,
        name: &str,
        limit: RateLimit,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        self.update_registrations(name, deadline, |prev, now_ms| {
            Ok(SharedBucket::give_back(prev, limit, now_ms))
        })
        .await
        // A refund is never refused: nothing else to say.
        .map(drop)
    }

    /// Replaces the address's bucket with what `next` makes of it (compare-and-set, with
    /// this relay's other updates of the address waiting their turn); `Ok(Err(wait))` if
    /// `next` refused.
    async fn update_registrations(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
        next: impl Fn(Option<SharedBucket>, u64) -> Result<SharedBucket, Duration>,
    ) -> Result<Result<(), Duration>, StoreError> {
        let store = &self.registrations.store;
        let _turn = self.registrations.stripe(name).lock().await;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Another relay wrote first: let the racers spread out.
                let most = Duration::from_millis(1 << attempt.min(7)).min(MAX_BACKOFF);
                let pause = most.mul_f64(rand::random::<f64>());
                tokio::time::sleep(pause).await;
            }
            let read = "the registration quota could not be read";
            let entry = patience::until(deadline, read, |_| async {
                store.entry(name).await.map_err(|e| e.to_string())
            })
            .await?;
            let (prev, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (SharedBucket::parse(&e.value), Some(e.revision))
                }
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let next = match next(prev, now_ms) {
                Ok(next) => Bytes::from(next.encode()),
                Err(wait) => return Ok(Err(wait)),
            };
            // `Ok(false)`: another relay wrote first.
            let write = "the registration quota could not be written";
            let written = patience::until(deadline, write, |_| {
                let next = next.clone();
                async move {
                    let raced = match revision {
                        Some(revision) => match store.update(name, next, revision).await {
                            Ok(_) => return Ok(true),
                            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                            Err(e) => Some(e.to_string()),
                        },
                        None => match store.create(name, next).await {
                            Ok(_) => return Ok(true),
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                            Err(e) => Some(e.to_string()),
                        },
                    };
                    raced.map_or(Ok(false), Err)
                }
            })
            .await?;
            if written {
                return Ok(Ok(()));
            }
        }
        Err(StoreError::Cluster(format!(
            "the registration quota could not be updated: other relays kept writing it \
             ({ATTEMPTS} tries); try again"
        )))
    }
}
