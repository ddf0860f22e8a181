//! The futures the handler waits on besides the socket: each is pending for ever while
//! what it waits on does not exist, so `select!` can poll it unconditionally.

use tokio::sync::mpsc;

use super::{Parked, pipeline};
use crate::cluster::MailboxRead;
use crate::router::{Inbound, Membership};
use crate::store::{Enqueued, StoreError};
use crate::writer::{Room, Ticket};

/// Room for the parked request; pending while nothing is parked.
pub(super) async fn parked_room(parked: &mut Option<Parked>) -> Room {
    match parked {
        Some(p) => p.room.as_mut().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn settle_writes(settling: &mut Option<Ticket>) -> Result<(), StoreError> {
    match settling {
        Some(ticket) => ticket.passed().await,
        None => std::future::pending().await,
    }
}

/// The next envelope from the cluster's mailbox, or why it cannot be read; pending while
/// there is no mailbox read.
pub(super) async fn next_delivery(
    inbox: &mut Option<mpsc::Receiver<Result<MailboxRead, String>>>,
) -> Result<MailboxRead, String> {
    match inbox {
        Some(rx) => match rx.recv().await {
            Some(delivery) => delivery,
            None => Err("the mailbox read ended".into()),
        },
        None => std::future::pending().await,
    }
}

/// The outcome of the oldest send in flight; pending while there is none.
pub(super) async fn next_commit(sends: &mut pipeline::Pipeline) -> Result<Enqueued, StoreError> {
    match sends.front_mut() {
        Some(oldest) => oldest.ticket.enqueued().await,
        None => std::future::pending().await,
    }
}

/// The next routed message or kick (a kick first); never resolves before login.
pub(super) async fn next_inbound(membership: &mut Option<Membership>) -> Inbound {
    match membership {
        Some(m) => m.inbox.next().await,
        None => std::future::pending().await,
    }
}
