//! The connection's side of its [`RefusalFence`] (see `crate::fence`): the serial number
//! of each send, the `Ping` written behind a refusal, and what its `Pong` lifts.

use std::sync::Arc;

use chat_protocol::Username;
use rand::Rng;

use crate::fence::{FenceTag, RefusalFence};

/// This connection's sends, numbered, and the fence they are checked against.
#[derive(Debug, Default)]
pub(super) struct OrderFence {
    /// Made at the first send: an idle connection holds nothing.
    fence: Option<Arc<RefusalFence>>,
    /// Sends tagged so far (the last tag's serial number).
    serial: u64,
    /// A refusal was answered and no `Ping` is written behind it yet (one is, once the
    /// answer that holds it is complete: a `SendMany`'s `Outcomes` comes at its last copy).
    ping_due: bool,
    /// The nonce of the `Ping` behind the latest refusal; its `Pong` lifts the refusals
    /// answered before it.
    ping: Option<u64>,
}

impl OrderFence {
    /// The tag of the next send, to `recipient`.
    pub(super) fn tag(&mut self, recipient: &Username) -> FenceTag {
        self.serial += 1;
        self.fence
            .get_or_insert_with(Default::default)
            .tag(recipient.clone(), self.serial)
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
    /// client has read every refusal answered so far: sends it makes from now on to those
    /// recipients pass. With no send in flight (`idle`) the lifted ones are forgotten.
    pub(super) fn pong(&mut self, nonce: u64, idle: bool) {
        if self.ping != Some(nonce) {
            return;
        }
        self.ping = None;
        if let Some(fence) = &self.fence {
            fence.lift_answered(self.serial + 1);
            if idle {
                fence.forget_lifted();
            }
        }
    }
}
