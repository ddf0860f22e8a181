//! The futures the handler waits on besides the socket: each is pending for ever while
//! what it waits on does not exist, so `select!` can poll it unconditionally.

use chat_protocol::ErrorCode;
use tokio::sync::{mpsc, watch};

use super::{Inbound, Parked, pipeline};
use crate::cluster::MailboxRead;
use crate::router::Membership;
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

/// The code `kicked` closes its session with, once it does (a session the router dropped
/// without one was replaced).
pub(super) async fn kicked(mut kicked: watch::Receiver<Option<ErrorCode>>) -> ErrorCode {
    loop {
        if let Some(code) = *kicked.borrow_and_update() {
            return code;
        }
        if kicked.changed().await.is_err() {
            return ErrorCode::SessionReplaced;
        }
    }
}

/// The next routed message or kick; never resolves before login.
pub(super) async fn next_inbound(membership: &mut Option<Membership>) -> Inbound {
    let Some(m) = membership else {
        return std::future::pending().await;
    };
    loop {
        if let Some(code) = *m.kicked.borrow_and_update() {
            return Inbound::Kicked(code);
        }
        tokio::select! {
            biased;
            changed = m.kicked.changed() => {
                if changed.is_err() {
                    // The router dropped us without a reason: treat as replaced.
                    return Inbound::Kicked(ErrorCode::SessionReplaced);
                }
            }
            msg = m.outbox.recv() => match msg {
                Some(msg) => return Inbound::Routed(msg),
                None => return Inbound::Kicked(ErrorCode::SessionReplaced),
            },
        }
    }
}
