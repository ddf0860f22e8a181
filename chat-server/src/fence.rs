//! Keeping one connection's sends to a recipient in order across a refusal.
//!
//! Sends are pipelined: a client may have many in flight before it reads the answer to
//! the first. When one is refused for a reason that may pass (the recipient's mailbox or
//! the server full, the store failing, the cluster not answering), a later send to the
//! same recipient must not be stored ahead of it, or the refused message, sent again,
//! would arrive after one written after it. The room can come back between the two (the
//! recipient reads and acknowledges, a quorum returns), so the later one would pass.
//!
//! Every send of a connection has a serial number, in the order it was read. A
//! [`RefusalFence`] records, per recipient, the lowest serial refused and not yet known
//! to the client; a send to that recipient with a higher serial is refused (`server_busy`)
//! wherever it is decided (the store writer, the cluster's checks and outbox, the live
//! path). The connection writes a `Ping` behind the answer to each refusal. When the
//! `Pong` to the latest comes back, the client has read every refusal answered so far:
//! for each recipient none of whose refusals is still unanswered, sends read from then
//! on pass again (those read before stay held, whenever they are decided). A refusal of
//! a send read before that, decided after it, holds its recipient again. The same idea as
//! the shed fence of `shed_when_full`, kept per recipient so that a full mailbox does not
//! refuse sends to anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chat_protocol::Username;

use crate::store::{Enqueued, StoreError};

/// Whether a send's outcome is a refusal that may pass, which later sends to its
/// recipient must not overtake: anything but stored, no such user (final), or shed (the
/// connection's shed fence already refuses every later send until its `Ping` is answered).
pub fn holds_back(outcome: &Result<Enqueued, StoreError>) -> bool {
    !matches!(
        outcome,
        Ok(Enqueued::Stored(_) | Enqueued::UnknownRecipient | Enqueued::Shed { .. })
    )
}

/// What is known of a recipient's refusals on one connection (serial numbers).
#[derive(Debug, Clone, Copy)]
struct Refusals {
    /// Sends after this one are held (the lowest refused serial not yet lifted).
    held_after: u64,
    /// The highest refused serial, and the highest whose answer the client was given.
    refused: u64,
    answered: u64,
    /// Sends from this serial on pass (`u64::MAX`: none yet).
    lifted_from: u64,
}

/// Per connection: the recipients a send was refused to, by serial number.
#[derive(Debug, Default)]
pub struct RefusalFence {
    /// Set once anything is recorded: the store writer checks every envelope, and most
    /// connections never see a refusal.
    any: AtomicBool,
    refused: Mutex<HashMap<Username, Refusals>>,
}

impl RefusalFence {
    fn lock(&self) -> MutexGuard<'_, HashMap<Username, Refusals>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tag of the connection's send number `serial` (unique, rising in the order
    /// sends are read), to `recipient`.
    pub fn tag(self: &Arc<Self>, recipient: Username, serial: u64) -> FenceTag {
        FenceTag {
            fence: self.clone(),
            recipient,
            serial,
        }
    }

    fn holds(&self, recipient: &Username, serial: u64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.lock()
            .get(recipient)
            .is_some_and(|r| serial > r.held_after && serial < r.lifted_from)
    }

    /// The client answered the `Ping` written after every answer so far: for each
    /// recipient whose refusals were all answered, sends from serial `next` on pass.
    pub fn lift_answered(&self, next: u64) {
        for r in self.lock().values_mut() {
            if r.answered >= r.refused && r.lifted_from == u64::MAX {
                r.lifted_from = next;
            }
        }
    }

    /// Forgets the lifted recipients, once no send read before its lift is in flight.
    pub fn forget_lifted(&self) {
        let mut refused = self.lock();
        refused.retain(|_, r| r.lifted_from == u64::MAX);
        if refused.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }

    /// Recipients with a recorded refusal.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no refusal is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A send's place in its connection's [`RefusalFence`]: checked where the send is decided
/// (in the order the connection's sends are decided), recorded if it is refused, and
/// marked answered once the client is told its outcome.
#[derive(Debug, Clone)]
pub struct FenceTag {
    fence: Arc<RefusalFence>,
    recipient: Username,
    serial: u64,
}

impl FenceTag {
    /// Whether this send must be refused: an earlier one to its recipient was, and the
    /// client had not read that when it sent this one.
    pub fn holds(&self) -> bool {
        self.fence.holds(&self.recipient, self.serial)
    }

    /// Records that this send was refused (or failed): later sends to its recipient are
    /// held until the client has read the refusal.
    pub fn refused(&self) {
        let mut refused = self.fence.lock();
        let r = refused.entry(self.recipient.clone()).or_insert(Refusals {
            held_after: self.serial,
            refused: self.serial,
            answered: 0,
            lifted_from: u64::MAX,
        });
        // Sends read before an earlier lift may still be in flight: the lowest stays.
        r.held_after = r.held_after.min(self.serial);
        r.refused = r.refused.max(self.serial);
        r.lifted_from = u64::MAX;
        self.fence.any.store(true, Ordering::Release);
    }

    /// The client is being told this send's outcome (the `Ping` behind it follows).
    pub fn answered(&self) {
        if !self.fence.any.load(Ordering::Acquire) {
            return;
        }
        if let Some(r) = self.fence.lock().get_mut(&self.recipient) {
            r.answered = r.answered.max(self.serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Username {
        Username::parse(name).unwrap()
    }

    #[test]
    fn a_refusal_holds_later_sends_to_its_recipient_until_the_client_has_read_it() {
        let fence = Arc::new(RefusalFence::default());
        let (carol, bob) = (user("carol"), user("bob"));
        let first = fence.tag(carol.clone(), 1);
        let second = fence.tag(carol.clone(), 2);
        let to_bob = fence.tag(bob.clone(), 3);
        assert!(!first.holds() && !second.holds());
        first.refused();
        assert!(
            second.holds(),
            "a later send to carol overtook the refused one"
        );
        assert!(
            !first.holds(),
            "the refused send is decided again if retried whole"
        );
        assert!(!to_bob.holds(), "bob is not held by carol's refusal");
        // Answered, and the Ping behind the answers answered: sends read from now pass.
        first.answered();
        second.refused();
        second.answered();
        fence.lift_answered(4);
        assert!(!fence.tag(carol.clone(), 4).holds());
        assert!(second.holds(), "a send read before the lift stays held");
        fence.forget_lifted();
        assert!(fence.is_empty());
    }

    /// The case a connection-wide generation missed: the client reads a refusal to carol
    /// and answers the Ping behind it while a send to bob, read before, is still being
    /// decided; it is refused after that, and a send to bob read after the Pong must not
    /// overtake it.
    #[test]
    fn a_refusal_decided_after_a_lift_holds_sends_read_after_the_lift() {
        let fence = Arc::new(RefusalFence::default());
        let (carol, bob) = (user("carol"), user("bob"));
        let to_carol = fence.tag(carol.clone(), 1);
        let early_bob = fence.tag(bob.clone(), 2);
        to_carol.refused();
        to_carol.answered();
        fence.lift_answered(3);
        let late_bob = fence.tag(bob.clone(), 3);
        early_bob.refused();
        assert!(
            late_bob.holds(),
            "bob's later send overtook his refused one"
        );
        assert!(!fence.tag(carol.clone(), 4).holds());
        // Until bob's refusal is answered, a Pong lifts nothing for him.
        fence.lift_answered(5);
        assert!(fence.tag(bob.clone(), 5).holds());
        early_bob.answered();
        late_bob.refused();
        late_bob.answered();
        fence.lift_answered(6);
        assert!(!fence.tag(bob.clone(), 6).holds());
    }

    #[test]
    fn a_lifted_recipient_refused_again_holds_from_the_lowest_refusal_in_flight() {
        let fence = Arc::new(RefusalFence::default());
        let bob = user("bob");
        let (a, b) = (fence.tag(bob.clone(), 1), fence.tag(bob.clone(), 2));
        a.refused();
        a.answered();
        fence.lift_answered(3);
        // Send 2 was read before the lift: still held, and refused as such.
        assert!(b.holds());
        b.refused();
        let c = fence.tag(bob.clone(), 3);
        assert!(c.holds());
        assert_eq!(fence.len(), 1);
    }
}
