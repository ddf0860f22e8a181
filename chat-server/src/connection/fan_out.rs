//! `SendMany`: checking a fan-out, and publishing its copies on the cluster backend. Each
//! copy then goes the way of a `Send` (see `relay`), answered together in one `Outcomes`.

use chat_protocol::Username;
use chat_protocol::message::RequestId;

use super::{Handler, InFlight};
use crate::fence::FenceTag;
use crate::store::Enqueued;
use crate::writer::{Done, Ticket};

impl Handler {
    /// A `SendMany` on the cluster backend: every copy's admission (the recipient exists,
    /// its mailbox has room) is looked up at once rather than one after another, then the
    /// copies are queued for publishing in `to` order, before any later request.
    pub(super) async fn publish_many(
        &mut self,
        me: &Username,
        id: RequestId,
        to: Vec<String>,
        recipients: Vec<Option<Username>>,
        payload: Vec<u8>,
    ) {
        let cluster = self.shared.cluster.clone().expect("called with a cluster");
        let address =
            crate::limits::shared_address_name(&self.shared.address_secret, self.peer.ip());
        let payload = tokio_util::bytes::Bytes::from(payload);
        // A copy to a recipient an earlier send to was refused is held (`crate::fence`).
        let tagged: Vec<_> = recipients
            .into_iter()
            .map(|user| user.map(|user| (self.order.tag(&user), user)))
            .collect();
        let publishes = tagged.iter().map(|copy| {
            let (cluster, address, payload) = (&cluster, &address, payload.clone());
            async move {
                let (tag, user) = copy.as_ref()?;
                if tag.holds() {
                    tag.refused();
                    return Some(settled_ticket(Enqueued::Fenced));
                }
                let msg_id = format!("{:032x}", rand::random::<u128>());
                let tag = tag.clone();
                Some(
                    cluster
                        .publish(user, me, address, payload, msg_id, tag)
                        .await,
                )
            }
        });
        let tickets = futures_util::future::join_all(publishes).await;
        let last = to.len() - 1;
        let copies = to.into_iter().zip(tickets).zip(tagged);
        for (i, ((name, ticket), tagged)) in copies.enumerate() {
            let part = Some(i == last);
            self.sends.push_back(match ticket {
                Some(ticket) => InFlight {
                    id,
                    to: name,
                    route: None,
                    ticket,
                    part,
                    fence: tagged.map(|(tag, _)| tag),
                },
                None => no_such_user(id, name, part),
            });
        }
    }
}

/// A ticket already answered with `outcome`.
fn settled_ticket(outcome: Enqueued) -> Ticket {
    let (reply, ticket) = Ticket::pending();
    let _ = reply.send(Ok(Done::Enqueued(outcome)));
    ticket
}

/// A send whose outcome is known without the store, answered in its turn among the
/// pipelined sends.
fn settled(id: RequestId, to: String, part: Option<bool>, outcome: Enqueued) -> InFlight {
    InFlight {
        id,
        to,
        route: None,
        ticket: settled_ticket(outcome),
        part,
        fence: None,
    }
}

/// A send (or copy) to `to` held because an earlier one to `to` was refused
/// (`crate::fence`): answered `server_busy` in its turn.
pub(super) fn fenced(id: RequestId, to: String, part: Option<bool>, tag: FenceTag) -> InFlight {
    InFlight {
        fence: Some(tag),
        ..settled(id, to, part, Enqueued::Fenced)
    }
}

/// A copy for `name`, which is no valid username: answered `unknown_user` in its turn.
pub(super) fn no_such_user(id: RequestId, name: String, part: Option<bool>) -> InFlight {
    settled(id, name, part, Enqueued::UnknownRecipient)
}

/// A send (or a whole `SendMany`) refused (`why`, see [`Busy`]): answered `server_busy`
/// in its turn, followed by a `Ping` with `fence` (the connection's shed fence, see
/// `Handler::shed_fence`).
pub(super) fn shed(id: RequestId, fence: u64, why: Busy) -> InFlight {
    settled(
        id,
        String::new(),
        None,
        Enqueued::Shed {
            fence,
            why: why.text(),
        },
    )
}

/// Why a send is refused `server_busy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// An earlier send was refused and its fence `Ping` is not answered yet.
    Fenced,
    /// The relay is saturated (`shed_delay_ms`, see `crate::overload`).
    Saturated,
    /// `MAX_PIPELINED` sends (or `4 × MAX_PIPELINED` copies) on this connection await
    /// their answer (`shed_when_full`).
    PipelineFull,
    /// The store writer has no room (`shed_when_full`).
    WriterFull,
}

impl Busy {
    /// The error text: what refused the send and what to do.
    pub(super) fn text(self) -> &'static str {
        match self {
            Busy::Fenced => {
                "an earlier message was refused: answer the relay's Ping that followed it, then send again, in order"
            }
            Busy::Saturated => {
                "the relay is overloaded and did not take this message; try again in a moment"
            }
            Busy::PipelineFull => {
                "128 messages on this connection already await their answer; wait for answers, answer the relay's Ping, then send again"
            }
            Busy::WriterFull => {
                "the relay's storage is busy and did not take this message; try again in a moment"
            }
        }
    }
}

/// Whether `to` is a recipient count a `SendMany` may have (1 to `MAX_FANOUT`).
pub(super) fn fan_out_size_ok(to: &[String]) -> bool {
    (1..=chat_protocol::message::MAX_FANOUT).contains(&to.len())
}

/// The recipients of a `SendMany`, each `None` where the name is no valid username (that
/// copy is answered `unknown_user`); or why the request is refused whole: no names, more
/// than `MAX_FANOUT`, or a name twice (in any letter case, valid or not).
pub(super) fn fan_out_recipients(to: &[String]) -> Result<Vec<Option<Username>>, String> {
    let max = chat_protocol::message::MAX_FANOUT;
    if !fan_out_size_ok(to) {
        return Err(format!(
            "a SendMany names 1 to {max} recipients, not {}; nothing was sent",
            to.len()
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(to.len());
    for name in to {
        if !seen.insert(name.to_ascii_lowercase()) {
            let shown = super::truncate(name, 40);
            return Err(format!(
                "a SendMany names {shown:?} twice; nothing was sent (name each recipient once)"
            ));
        }
    }
    Ok(to.iter().map(|name| Username::parse(name).ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::Busy;

    #[test]
    fn a_full_pipeline_refusal_names_the_real_bound() {
        let text = Busy::PipelineFull.text();
        let bound = chat_protocol::message::MAX_PIPELINED.to_string();
        assert!(text.starts_with(&format!("{bound} messages")), "{text}");
        for busy in [Busy::Fenced, Busy::Saturated, Busy::WriterFull] {
            assert_ne!(busy.text(), text);
        }
    }
}
