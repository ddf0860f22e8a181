//! Writing to the client: every write bounded by the write timeout (then buffers a burst
//! left are trimmed, `buffers`), a send's answer, and the error replies the handler sends.

use chat_protocol::codec::CodecError;
use chat_protocol::deliver::SharedDeliver;
use chat_protocol::message::RequestId;
use chat_protocol::{ErrorCode, ServerMessage};
use futures_util::SinkExt;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;
use tracing::{debug, info};

use super::{Close, Handler, InFlight, State};
use crate::metrics::Metrics;
use crate::store::{Enqueued, StoreError};

impl Handler {
    pub(super) async fn write(&mut self, msg: ServerMessage) -> Result<(), Close> {
        let write_timeout = self.shared.config.write_timeout();
        let result = timeout(write_timeout, self.writer.send(msg)).await;
        self.finish_write(result)
    }

    /// Ends what this side sends: TLS `close_notify`, then the TCP write side (FIN),
    /// behind everything written before. Whether that was done within the write timeout.
    pub(super) async fn close_write(&mut self) -> bool {
        let write_timeout = self.shared.config.write_timeout();
        let closing = SinkExt::<ServerMessage>::close(&mut self.writer);
        matches!(timeout(write_timeout, closing).await, Ok(Ok(())))
    }

    /// The lingering close (RFC 9112 §9.6): after the last words and [`Self::close_write`],
    /// reads and discards what the client still sends until it closes its side, for at
    /// most the write timeout, or until the relay shuts down. A socket closed with input
    /// unread answers the client's next bytes (an `Ack` of what it is still reading) with
    /// a reset, which throws away everything the client had not yet read, the `Error`
    /// saying why included: a device replaced while it was behind would then not learn
    /// it was replaced, reconnect, and replace the new one.
    pub(super) async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + self.shared.config.write_timeout();
        let (reader, stop) = (self.reader.get_mut(), &self.shutdown);
        let mut discard = [0u8; 512];
        let drain = async {
            while let Ok(n) = reader.read(&mut discard).await
                && n > 0
            {}
        };
        tokio::select! {
            _ = tokio::time::timeout_at(deadline, drain) => {}
            () = stop.cancelled() => {}
        }
    }

    pub(super) fn finish_write(
        &mut self,
        result: Result<Result<(), CodecError>, tokio::time::error::Elapsed>,
    ) -> Result<(), Close> {
        match result {
            Ok(Ok(())) => {
                self.trim_after_write();
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(conn = self.conn_id, "write failed: {e}");
                Err(Close::Silent)
            }
            Err(_) => {
                info!(conn = self.conn_id, peer = %self.peer, "client is not reading; disconnecting");
                Err(Close::Silent)
            }
        }
    }

    pub(super) async fn fail(
        &mut self,
        id: RequestId,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), Close> {
        self.write(error_reply(id, code, message)).await
    }

    pub(super) async fn unknown_user(&mut self, id: RequestId, name: &str) -> Result<(), Close> {
        self.write(unknown_user_reply(id, name)).await
    }

    pub(super) async fn fail_internal(
        &mut self,
        id: RequestId,
        error: StoreError,
    ) -> Result<(), Close> {
        let reply = self.internal_reply(id, error);
        self.write(reply).await
    }

    pub(super) fn internal_reply(&self, id: RequestId, error: StoreError) -> ServerMessage {
        tracing::error!(conn = self.conn_id, "storage error: {error}");
        error_reply(
            id,
            ErrorCode::Internal,
            "the server could not reach its storage; try again later",
        )
    }
}

/// A send's answer.
impl Handler {
    /// Routes a send's envelope if it was not delivered at once and is now committed (an
    /// offline recipient gets it at the next login), and returns the answer for the sender.
    pub(super) fn settle(
        &self,
        sent: InFlight,
        done: Result<Enqueued, StoreError>,
    ) -> ServerMessage {
        let InFlight {
            id,
            to,
            route,
            fence,
            ..
        } = sent;
        if let Some(tag) = &fence {
            // Lifted by the client's answer to the Ping written behind this answer.
            tag.answered();
        }
        if let Some((recipient, payload)) = route {
            let deliver = match (&done, &self.state) {
                (Ok(Enqueued::Stored(envelope_id)), State::Ready(me)) => Some(SharedDeliver {
                    envelope_id: *envelope_id,
                    from: me.clone(),
                    payload,
                }),
                _ => None,
            };
            self.shared.router.settle(&recipient, deliver);
        }
        let metrics = &self.shared.metrics;
        match done {
            Ok(Enqueued::Stored(_)) => ServerMessage::Ok { id },
            Ok(Enqueued::UnknownRecipient) => unknown_user_reply(id, &to),
            Ok(Enqueued::Full) => {
                Metrics::inc(&metrics.refused_queue_full);
                error_reply(
                    id,
                    ErrorCode::RecipientQueueFull,
                    format!("{to} has too many undelivered messages waiting; try again later"),
                )
            }
            Ok(Enqueued::SenderShareFull) => {
                Metrics::inc(&metrics.refused_sender_share);
                error_reply(
                    id,
                    ErrorCode::RecipientQueueFull,
                    format!(
                        "you (or others from your address) already have as many undelivered \
                         messages waiting for {to} as one sender may; try again once they have \
                         read some"
                    ),
                )
            }
            Ok(Enqueued::ServerFull) => {
                Metrics::inc(&metrics.refused_server_full);
                server_full(id)
            }
            Ok(Enqueued::SourceFull) => {
                Metrics::inc(&metrics.refused_source_share);
                error_reply(
                    id,
                    ErrorCode::ServerFull,
                    "senders from your address hold as many undelivered messages as one \
                     address may; try again once some have been delivered",
                )
            }
            Ok(Enqueued::Shed { why, .. }) => error_reply(id, ErrorCode::ServerBusy, why),
            Ok(Enqueued::Fenced) => error_reply(
                id,
                ErrorCode::ServerBusy,
                format!(
                    "an earlier message to {to} was refused; answer the relay's Ping that \
                     followed it, then send the messages to {to} again, in order"
                ),
            ),
            Err(e) if e.is_full() => {
                Metrics::inc(&metrics.refused_server_full);
                tracing::error!("the disk is full: {e}");
                server_full(id)
            }
            Err(e) => self.internal_reply(id, e),
        }
    }
}

pub(super) fn error_reply(
    id: RequestId,
    code: ErrorCode,
    message: impl Into<String>,
) -> ServerMessage {
    ServerMessage::Error {
        id: Some(id),
        code,
        message: message.into(),
    }
}

pub(super) fn unknown_user_reply(id: RequestId, name: &str) -> ServerMessage {
    let shown = truncate(name, 40);
    error_reply(
        id,
        ErrorCode::UnknownUser,
        format!("no user named {shown:?}"),
    )
}

pub(super) fn kick_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::SessionReplaced => "you logged in from another connection",
        ErrorCode::SlowConsumer => "messages were not read fast enough",
        _ => "disconnected by the server",
    }
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

fn server_full(id: RequestId) -> ServerMessage {
    error_reply(
        id,
        ErrorCode::ServerFull,
        "the server's storage for undelivered messages is full; try again later",
    )
}
