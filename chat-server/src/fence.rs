//! Keeping one connection's sends to a recipient in order across a refusal.
//!
//! Sends are pipelined: a client may have many in flight before it reads the answer to
//! the first. When one is refused for a reason that may pass (the recipient's mailbox or
//! the server full, the store failing, the cluster not answering), a later send to the
//! same recipient must not be stored ahead of it, or the refused message, sent again,
//! would arrive after one written after it. The room can come back between the two (the
//! recipient reads and acknowledges, a quorum returns), so the later one would pass.
//!
//! A [`RefusalFence`] records, per recipient, the *generation* in which a send of the
//! connection was refused. A send carries the generation it was read in (a
//! [`FenceTag`]); it is refused (`server_busy`) wherever it is decided (the store
//! writer, the cluster's checks and outbox, the live path) if a send of its generation or
//! a later one to the same recipient was refused before it. The connection writes a
//! `Ping` behind each refusal and starts a new generation when the `Pong` to the latest
//! comes back: the client has then read every refusal, so what it sends from then on is
//! sent knowing of them (a retry, in order). The same idea as the shed fence of
//! `shed_when_full`, kept per recipient so that a full mailbox does not refuse sends to
//! anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chat_protocol::Username;

/// Per connection: recipients a send was refused to, with the generation of the refusal
/// and the serial number of the refused send.
#[derive(Debug, Default)]
pub struct RefusalFence {
    /// Set once anything is recorded: the store writer checks every envelope, and most
    /// connections never see a refusal.
    any: AtomicBool,
    refused: Mutex<HashMap<Username, (u64, u64)>>,
}

impl RefusalFence {
    /// The tag of a send to `recipient` read in `generation`, the connection's
    /// `serial`-th send (unique per connection).
    pub fn tag(self: &Arc<Self>, recipient: Username, generation: u64, serial: u64) -> FenceTag {
        FenceTag {
            fence: self.clone(),
            recipient,
            generation,
            serial,
        }
    }

    /// Whether a new send to `recipient` in `generation` must be refused: one of this
    /// generation (or a later one) was refused.
    pub fn holds(&self, recipient: &Username, generation: u64) -> bool {
        self.holds_other(recipient, generation, None)
    }

    fn holds_other(&self, recipient: &Username, generation: u64, serial: Option<u64>) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        // The send that set the entry is not held by it: a batch that failed whole is
        // tried again write by write, and its first refusal is decided again.
        refused
            .get(recipient)
            .is_some_and(|&(g, s)| g >= generation && Some(s) != serial)
    }

    /// Forgets refusals older than `generation`, once no send of an older generation is
    /// in flight any more (none can be held by them).
    pub fn forget_before(&self, generation: u64) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.retain(|_, (g, _)| *g >= generation);
        if refused.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }

    /// Recipients with a recorded refusal.
    pub fn len(&self) -> usize {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no refusal is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A send's place in its connection's [`RefusalFence`]: checked where the send is decided
/// (in the order the connection's sends are decided), and recorded if it is refused.
#[derive(Debug, Clone)]
pub struct FenceTag {
    fence: Arc<RefusalFence>,
    recipient: Username,
    generation: u64,
    serial: u64,
}

impl FenceTag {
    /// Whether this send must be refused because an earlier one to its recipient was.
    pub fn holds(&self) -> bool {
        self.fence
            .holds_other(&self.recipient, self.generation, Some(self.serial))
    }

    /// Records that this send was refused (or failed): later sends of its generation to
    /// its recipient are held.
    pub fn refused(&self) {
        let mut refused = self.fence.refused.lock().unwrap_or_else(|p| p.into_inner());
        let entry = refused
            .entry(self.recipient.clone())
            .or_insert((self.generation, self.serial));
        *entry = (entry.0.max(self.generation), self.serial);
        self.fence.any.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Username {
        Username::parse(name).unwrap()
    }

    #[test]
    fn a_refusal_holds_later_sends_to_its_recipient_in_its_generation_only() {
        let fence = Arc::new(RefusalFence::default());
        let (carol, bob) = (user("carol"), user("bob"));
        let first = fence.tag(carol.clone(), 1, 1);
        let second = fence.tag(carol.clone(), 1, 2);
        let to_bob = fence.tag(bob.clone(), 1, 3);
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
        assert!(fence.holds(&carol, 1));
        // The client answered the Ping behind the refusal: its new sends pass.
        assert!(!fence.holds(&carol, 2));
        assert!(second.holds(), "a send of the old generation stays held");
        fence.forget_before(2);
        assert!(fence.is_empty());
        assert!(!fence.holds(&carol, 1));
    }

    #[test]
    fn a_refusal_in_a_later_generation_holds_again() {
        let fence = Arc::new(RefusalFence::default());
        let carol = user("carol");
        fence.tag(carol.clone(), 1, 1).refused();
        fence.tag(carol.clone(), 3, 7).refused();
        assert!(fence.holds(&carol, 3));
        assert!(!fence.holds(&carol, 4));
        fence.forget_before(3);
        assert_eq!(fence.len(), 1);
    }
}
