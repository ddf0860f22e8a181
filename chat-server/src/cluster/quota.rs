//! The limit on new accounts per address, held per cluster: one token bucket per address
//! group in the `<prefix>_registrations` bucket ([`SharedBucket`]), taken with
//! compare-and-set so that relays racing for the same address take one token each.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::{Cluster, cluster_err};
use crate::config::RateLimit;
use crate::limits::SharedBucket;
use crate::store::StoreError;

/// Compare-and-set attempts before giving up (another relay kept winning the race).
const ATTEMPTS: usize = 16;

impl Cluster {
    /// Takes one new-account token for the address named `name`
    /// ([`crate::limits::shared_address_name`]) under `limit`: `Ok(Ok(()))` if there was
    /// one, `Ok(Err(wait))` if not (and how long until there is).
    ///
    /// # Errors
    /// [`StoreError::Cluster`] if NATS does not answer or other relays keep winning.
    pub async fn take_registration(
        &self,
        name: &str,
        limit: RateLimit,
    ) -> Result<Result<(), Duration>, StoreError> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let entry = self.registrations.entry(name).await.map_err(cluster_err)?;
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
            let next = match SharedBucket::take(prev, limit, now_ms) {
                Ok(next) => Bytes::from(next.encode()),
                Err(wait) => return Ok(Err(wait)),
            };
            let written = match revision {
                Some(revision) => self
                    .registrations
                    .update(name, next, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .registrations
                    .create(name, next)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return Ok(Ok(())),
                // Another relay wrote first: read again.
                Err(e) => last = e,
            }
        }
        Err(StoreError::Cluster(format!(
            "the registration quota could not be updated ({last}); try again"
        )))
    }
}
