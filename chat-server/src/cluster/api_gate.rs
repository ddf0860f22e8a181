//! A bound on this relay's JetStream API requests that come one per session or per
//! recipient.
//!
//! nats-server queues JetStream API requests (`$JS.API.>`: making or deleting a consumer,
//! purging a subject, reading a message from a stream's leader, a stream's info) up to its
//! `jetstream.request_queue_limit` (10,000 by default, counted on each node over every
//! client). When one more arrives it drops **every** request queued and answers none of
//! them (it logs `JetStream API queue limit reached, dropping N requests`); their clients
//! see only their own timeouts. A relay's mailbox readers that read through consumers
//! all make them again at each disturbance (a reconnection to NATS, a leader election),
//! readers not yet caught up read from the stream's leader, and a removal round
//! purges one subject per recipient: unbounded, that is one request per session at once,
//! and with more sessions than the queue holds (over all relays) every one was dropped,
//! each reader waited out its patience and asked again, all at once, and so on.
//!
//! Every such request passes a gate first: at most [`API_IN_FLIGHT`] await their answer
//! per gate. A relay has three for them: mailbox readers and removals share one, session reads
//! from the bucket's leader (logins, sweeps, rewrites) have another, so a login, which has
//! a deadline, never queues behind every reader remaking its consumer, and the tally
//! fetches before a send to a recipient ([`super::tally`], a stream info each) the third,
//! so a send does not either. A fourth bounds the direct gets of waiting readers
//! ([`super::bell`]): nats-server does not queue those with API requests, so they never
//! take the API gates' places. Waiting here costs
//! nothing on the server; a request's own patience starts once it is through (a login's
//! deadline counts from the login, so its wait does count there). A request given up
//! after its patience frees its place although a stalled node may still hold it queued:
//! the bound is on what each relay has outstanding, not a hard bound on a node's queue.
//! The gate is fair (first come, first through: tokio's semaphore).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// JetStream API requests one relay keeps in flight through its [`ApiGate`]. A healthy
/// cluster answers each in about a millisecond, so 32 at a time makes consumers for
/// 10,000 sessions in well under a second, while the queue they share holds 10,000 by
/// default.
pub const API_IN_FLIGHT: usize = 32;

/// Admits at most [`API_IN_FLIGHT`] JetStream API requests at once (clones share it).
#[derive(Debug, Clone)]
pub(super) struct ApiGate(Arc<Semaphore>);

impl Default for ApiGate {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(API_IN_FLIGHT)))
    }
}

impl ApiGate {
    /// Waits for a place; the request may be sent while the permit is held.
    pub(super) async fn pass(&self) -> OwnedSemaphorePermit {
        self.0
            .clone()
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_at_most_the_bound_and_the_next_once_one_is_done() {
        let gate = ApiGate::default();
        let mut held = Vec::new();
        for _ in 0..API_IN_FLIGHT {
            held.push(gate.pass().await);
        }
        // A clone is the same gate.
        let clone = gate.clone();
        assert!(
            clone.0.clone().try_acquire_owned().is_err(),
            "over the bound"
        );
        held.pop();
        assert!(
            clone.0.clone().try_acquire_owned().is_ok(),
            "a place was freed"
        );
    }
}
