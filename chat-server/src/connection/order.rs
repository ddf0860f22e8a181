//! The connection's side of its [`RefusalFence`] (see `crate::fence`): the generation its
//! sends are read in, the `Ping` written behind a refusal, and the new generation its
//! `Pong` starts.

use std::sync::Arc;

use chat_protocol::Username;
use rand::Rng;

use crate::fence::{FenceTag, RefusalFence};

/// Generations of this connection's sends and the fence they are checked against.
#[derive(Debug, Default)]
pub(super) struct OrderFence {
    /// Made at the first send: an idle connection holds nothing.
    fence: Option<Arc<RefusalFence>>,
    /// Sends read now belong to this generation.
    generation: u64,
    /// Sends tagged so far (each tag's serial number).
    serial: u64,
    /// A refusal was answered and no `Ping` is written behind it yet (one is, once the
    /// answer that holds it is complete: a `SendMany`'s `Outcomes` comes at its last copy).
    ping_due: bool,
    /// The nonce of the `Ping` behind the latest refusal; its `Pong` starts the next
    /// generation.
    ping: Option<u64>,
}

impl OrderFence {
    /// The tag of the next send, to `recipient`.
    pub(super) fn tag(&mut self, recipient: &Username) -> FenceTag {
        self.serial += 1;
        self.fence.get_or_insert_with(Default::default).tag(
            recipient.clone(),
            self.generation,
            self.serial,
        )
    }

    /// Whether a send to `recipient` read now must be refused: one to it was refused
    /// and the client has not yet answered the `Ping` behind the refusal.
    pub(super) fn holds(&self, recipient: &Username) -> bool {
        self.fence
            .as_ref()
            .is_some_and(|f| f.holds(recipient, self.generation))
    }

    /// A send was answered with a refusal that may pass later: a `Ping` is due behind it.
    pub(super) fn refused(&mut self) {
        self.ping_due = true;
    }

    /// The nonce of the `Ping` to write now, if one is due (`answer_complete`: no
    /// `SendMany` is half answered).
    pub(super) fn ping(&mut self, answer_complete: bool) -> Option<u64> {
        if !(self.ping_due && answer_complete) {
            return None;
        }
        self.ping_due = false;
        let nonce = rand::rng().next_u64();
        self.ping = Some(nonce);
        Some(nonce)
    }

    /// The client answered `Ping` `nonce`. If it is the one behind the latest refusal, the
    /// client has read every refusal: a new generation starts, and with no send in flight
    /// (`idle`) the refusals recorded are forgotten.
    pub(super) fn pong(&mut self, nonce: u64, idle: bool) {
        if self.ping != Some(nonce) {
            return;
        }
        self.ping = None;
        self.generation += 1;
        if idle && let Some(fence) = &self.fence {
            fence.forget_before(self.generation);
        }
    }
}
