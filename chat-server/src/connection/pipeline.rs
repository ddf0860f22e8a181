//! A connection's sends awaiting their answer, in request order, and answering them.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::events::next_commit;
use super::{Close, FINISH_SENDS_WITHIN, Handler, InFlight};

/// Sends awaiting their answer, oldest first: one entry per copy (a `SendMany` has one per
/// recipient, answered together), counted by copies and by requests.
#[derive(Default)]
pub(super) struct Pipeline {
    entries: VecDeque<InFlight>,
    /// Entries that end a request: plain sends and the last copy of each `SendMany`.
    requests: usize,
}

impl Pipeline {
    fn ends_request(sent: &InFlight) -> bool {
        sent.part != Some(false)
    }

    pub(super) fn push_back(&mut self, sent: InFlight) {
        self.requests += usize::from(Self::ends_request(&sent));
        self.entries.push_back(sent);
    }

    pub(super) fn pop_front(&mut self) -> Option<InFlight> {
        let sent = self.entries.pop_front()?;
        self.requests -= usize::from(Self::ends_request(&sent));
        Some(sent)
    }

    pub(super) fn front_mut(&mut self) -> Option<&mut InFlight> {
        self.entries.front_mut()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Copies awaiting their answer.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Requests (`Send`s and `SendMany`s) awaiting their answer.
    pub(super) fn requests(&self) -> usize {
        self.requests
    }

    /// Entries an idle connection's pipeline keeps room for (more is a burst's).
    pub(super) const IDLE_ROOM: usize = 8;

    /// Gives back the room if empty and over `room` entries.
    pub(super) fn trim(&mut self, room: usize) {
        if self.entries.is_empty() && self.entries.capacity() > room {
            self.entries = VecDeque::new();
        }
    }

    /// Holds room a burst left (trimmed once the connection is quiet).
    pub(super) fn grown(&self) -> bool {
        self.entries.capacity() > Self::IDLE_ROOM
    }
}

/// Answering what is in flight, oldest first.
impl Handler {
    /// Waits for every send in flight and answers each, oldest first (replies keep request
    /// order: a request answered at once first waits for the sends before it).
    pub(super) async fn finish_sends(&mut self) -> Result<(), Close> {
        self.finish_sends_until(None).await
    }

    /// At a close: answers the sends in flight, oldest first, as [`Self::finish_sends`],
    /// but for at most [`FINISH_SENDS_WITHIN`]: with the cluster backend gone (the session
    /// is closed because NATS stayed unreachable) an answer may never come, and the client
    /// must hear of the close to try another relay; it sends what was not answered again.
    pub(super) async fn finish_sends_closing(&mut self) -> Result<(), Close> {
        self.finish_sends_until(Some(Instant::now() + FINISH_SENDS_WITHIN))
            .await
    }

    /// Answers the sends in flight, oldest first, until none is left or (if given) the
    /// deadline passes waiting for the next answer.
    async fn finish_sends_until(&mut self, deadline: Option<Instant>) -> Result<(), Close> {
        while !self.sends.is_empty() {
            let next = next_commit(&mut self.sends);
            let done = match deadline {
                None => next.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                    Ok(done) => done,
                    Err(_) => break,
                },
            };
            self.send_committed(done).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::Ticket;

    fn sent(part: Option<bool>) -> InFlight {
        InFlight {
            id: 1,
            to: "bob".into(),
            route: None,
            ticket: Ticket::pending().1,
            part,
            fence: None,
        }
    }

    #[test]
    fn a_send_many_is_one_request_of_many_copies() {
        let mut p = Pipeline::default();
        p.push_back(sent(None));
        for part in [Some(false), Some(false), Some(true)] {
            p.push_back(sent(part));
        }
        assert_eq!((p.requests(), p.len()), (2, 4));
        p.pop_front();
        assert_eq!((p.requests(), p.len()), (1, 3));
        p.pop_front();
        p.pop_front();
        // The fan-out is a request until its last copy is answered.
        assert_eq!((p.requests(), p.len()), (1, 1));
        p.pop_front();
        assert_eq!((p.requests(), p.len()), (0, 0));
        assert!(p.pop_front().is_none() && p.is_empty());
    }
}
