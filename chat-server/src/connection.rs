//! One client connection: Hello, login by challenge-response, then requests and relaying.
//!
//! The handler owns both halves of the socket. It waits at once on the client's next
//! frame, on messages routed to it, on shutdown or a kick, and on its timers; every write
//! is bounded by the write timeout, so a client that stops reading cannot stall it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use chat_protocol::auth;
use chat_protocol::codec::{CodecError, WireCodec};
use chat_protocol::message::{CHALLENGE_LEN, RequestId};
use chat_protocol::{
    ClientMessage, ErrorCode, FrameError, PROTOCOL_VERSION, ServerMessage, Username,
};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::broadcast;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use crate::Shared;
use crate::limits::TokenBucket;
use crate::router::{Membership, WatchError};
use crate::store::{Bind, Enqueued, Store, StoreError};
use crate::writer::{Envelope, Ticket};

type Codec = WireCodec<ClientMessage, ServerMessage>;

/// Most routed messages written before one flush, so a busy receiver gets batched writes
/// without starving its own reads. Also the size of one backlog read.
const WRITE_BATCH: usize = 64;

/// Sends from one connection waiting for their commit at once. More are not read until
/// the oldest is answered, which bounds what a fast sender can make the server hold.
const MAX_PIPELINED: usize = 128;

/// Initial read buffer; it grows only while a large frame is arriving.
const READ_BUFFER: usize = 1024;
/// Buffers larger than this are released once empty (after a burst or a big frame).
const IDLE_BUFFER_MAX: usize = 4096;

/// How a connection ends.
enum Close {
    /// The peer went away, or writing to it failed: nothing more can be said.
    Silent,
    /// Tell the client why, then close.
    Tell(ErrorCode, String),
}

impl Close {
    fn tell(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Tell(code, message.into())
    }
}

enum State {
    AwaitHello,
    AwaitLogin,
    AwaitProof(PendingLogin),
    Ready(Username),
}

/// A `Send` handed to the store, answered once durable (committed, or acknowledged by
/// its recipient).
struct InFlight {
    id: RequestId,
    to: Username,
    /// Kept to route the envelope once committed; `None` if it was delivered at once.
    payload: Option<Vec<u8>>,
    ticket: Ticket,
}

struct PendingLogin {
    username: Username,
    public_key: Vec<u8>,
    nonce: [u8; CHALLENGE_LEN],
}

/// Something the router or the server wants this connection to act on.
enum Inbound {
    Routed(Box<ServerMessage>),
    Kicked(ErrorCode),
}

pub(crate) struct Handler {
    conn_id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    reader: FramedRead<OwnedReadHalf, Codec>,
    writer: FramedWrite<OwnedWriteHalf, Codec>,
    state: State,
    /// Present once logged in: the queue the router fills, and the kick signal.
    membership: Option<Membership>,
    bucket: TokenBucket,
    shutdown: broadcast::Receiver<()>,
    /// Last time a frame arrived; drives ping and idle timeout.
    last_heard: Instant,
    /// A ping was sent since `last_heard`.
    pinged: bool,
    /// Highest envelope id written from the stored backlog: where its next read starts.
    backlog_cursor: u64,
    /// The stored backlog has been written; new envelopes may go straight out.
    backlog_done: bool,
    /// Resolves once what was submitted before this login is durable; the backlog is
    /// read only after. Polled in the main loop, so routed messages keep draining.
    settling: Option<Ticket>,
    /// Sends awaiting their commit, in the order they arrived (and are answered).
    sends: VecDeque<InFlight>,
}

impl Handler {
    pub(crate) fn new(
        socket: TcpStream,
        peer: SocketAddr,
        conn_id: u64,
        shared: Arc<Shared>,
        shutdown: broadcast::Receiver<()>,
    ) -> Self {
        let max = shared.config.max_frame_bytes;
        let (read, write) = socket.into_split();
        let now = Instant::now();
        Self {
            conn_id,
            peer,
            reader: FramedRead::with_capacity(read, Codec::new(max), READ_BUFFER),
            writer: {
                // FramedWrite starts with 8 KiB; an idle connection should hold nothing.
                let mut w = FramedWrite::new(write, Codec::new(max));
                *w.write_buffer_mut() = Default::default();
                w
            },
            state: State::AwaitHello,
            membership: None,
            bucket: TokenBucket::new(shared.config.rate_limit, now.into_std()),
            shared,
            shutdown,
            last_heard: now,
            pinged: false,
            backlog_cursor: 0,
            backlog_done: true,
            settling: None,
            sends: VecDeque::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        debug!(conn = self.conn_id, peer = %self.peer, "connected");
        let close = self.serve().await;
        if let Close::Tell(code, message) = close {
            // Answer sends already committed, so their senders need not resend.
            let _ = Box::pin(self.finish_sends()).await;
            debug!(conn = self.conn_id, %code, "closing: {message}");
            let _ = self
                .write(ServerMessage::Error {
                    id: None,
                    code,
                    message,
                })
                .await;
        }
        // Sends nobody can be answered for any more: their envelopes still go on.
        while let Some(mut sent) = self.sends.pop_front() {
            let done = sent.ticket.enqueued().await;
            self.settle(sent, done);
        }
        if let State::Ready(user) = &self.state {
            self.shared.router.leave(user, self.conn_id);
            info!(conn = self.conn_id, user = %user, "logged out");
        }
        debug!(conn = self.conn_id, "disconnected");
    }

    async fn serve(&mut self) -> Close {
        let config = &self.shared.config;
        let login_deadline = Instant::now() + config.login_timeout();
        let (ping_interval, idle_timeout) = (config.ping_interval(), config.idle_timeout());
        let timer = sleep_until(login_deadline);
        tokio::pin!(timer);
        loop {
            let logged_in = matches!(self.state, State::Ready(_));
            let idle_at = self.last_heard + idle_timeout;
            let mut wake = idle_at;
            if !logged_in {
                wake = wake.min(login_deadline);
            }
            if !self.pinged {
                wake = wake.min(self.last_heard + ping_interval);
            }
            // Re-armed only when the deadline moves earlier (or it fired): every frame
            // moves it later, and a timer that fires early just finds nothing due.
            if wake < timer.deadline() || timer.is_elapsed() {
                timer.as_mut().reset(wake);
            }

            tokio::select! {
                _ = self.shutdown.recv() => {
                    let _ = Box::pin(self.finish_sends()).await;
                    Box::pin(self.drain_routed()).await;
                    return Close::tell(ErrorCode::ShuttingDown, "the server is shutting down; reconnect in a moment");
                }
                inbound = next_inbound(&mut self.membership) => match inbound {
                    Inbound::Routed(msg) => {
                        if let Err(close) = Box::pin(self.forward(*msg)).await {
                            return close;
                        }
                    }
                    Inbound::Kicked(code) => return Close::tell(code, kick_message(code)),
                },
                settled = settle_writes(&mut self.settling), if self.settling.is_some() => {
                    self.settling = None;
                    if let Err(e) = settled {
                        return self.storage_lost(e);
                    }
                }
                () = std::future::ready(()), if !self.backlog_done && self.settling.is_none() => {
                    if let Err(close) = Box::pin(self.send_backlog()).await {
                        return close;
                    }
                }
                done = next_commit(&mut self.sends), if !self.sends.is_empty() => {
                    if let Err(close) = Box::pin(self.send_committed(done)).await {
                        return close;
                    }
                }
                frame = self.reader.next(), if self.sends.len() < MAX_PIPELINED => match frame {
                    None => return Close::Silent,
                    Some(Err(CodecError::Io(e))) => {
                        debug!(conn = self.conn_id, "read failed: {e}");
                        return Close::Silent;
                    }
                    Some(Err(CodecError::Frame(e @ FrameError::TooLarge { .. }))) => {
                        warn!(conn = self.conn_id, peer = %self.peer, "{e}");
                        return Close::tell(ErrorCode::FrameTooLarge, e.to_string());
                    }
                    Some(Err(CodecError::Frame(e))) => {
                        warn!(conn = self.conn_id, peer = %self.peer, "{e}");
                        return Close::tell(ErrorCode::MalformedFrame, e.to_string());
                    }
                    Some(Ok(msg)) => {
                        self.last_heard = Instant::now();
                        self.pinged = false;
                        if let Err(close) = Box::pin(self.handle(msg)).await {
                            return close;
                        }
                    }
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if !logged_in && now >= login_deadline {
                        return Close::tell(ErrorCode::LoginTimeout, "login was not completed in time");
                    }
                    if now >= idle_at {
                        return Close::tell(ErrorCode::IdleTimeout, "nothing received for too long");
                    }
                    if !self.pinged && now >= self.last_heard + ping_interval {
                        self.pinged = true;
                        let nonce = rand::rng().next_u64();
                        if let Err(close) = Box::pin(self.write(ServerMessage::Ping { nonce })).await {
                            return close;
                        }
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: ClientMessage) -> Result<(), Close> {
        let id = msg.request_id();
        debug!(conn = self.conn_id, kind = msg.kind(), "request");
        // `last_heard` was set as this frame arrived.
        let wait = self.bucket.take(self.last_heard.into_std());
        if !wait.is_zero() {
            // Over the rate: pace this connection instead of dropping (keeps order).
            tokio::time::sleep(wait).await;
        }
        match msg {
            ClientMessage::Hello { version, software } => self.hello(version, &software).await,
            _ if matches!(self.state, State::AwaitHello) => Err(Close::tell(
                ErrorCode::ProtocolViolation,
                "the first message must be Hello",
            )),
            ClientMessage::Ping { nonce } => self.write(ServerMessage::Pong { nonce }).await,
            ClientMessage::Pong { .. } => Ok(()),
            ClientMessage::Ack { envelope_ids } => {
                if let State::Ready(user) = &self.state {
                    // Nothing is answered, so nothing waits: the writer logs a failure.
                    self.shared.writer.ack(user.clone(), envelope_ids);
                }
                Ok(())
            }
            ClientMessage::Register {
                id,
                username,
                public_key,
            } => self.begin_login(id, &username, Some(public_key)).await,
            ClientMessage::Login { id, username } => self.begin_login(id, &username, None).await,
            ClientMessage::Prove { id, signature } => self.prove(id, &signature).await,
            msg => {
                let State::Ready(user) = &self.state else {
                    let id = id.unwrap_or_default();
                    return self
                        .fail(id, ErrorCode::ProtocolViolation, "log in first")
                        .await;
                };
                let user = user.clone();
                if !matches!(msg, ClientMessage::Send { .. }) {
                    // Replies keep request order: earlier sends are answered first.
                    self.finish_sends().await?;
                }
                self.request(user, msg).await
            }
        }
    }

    async fn hello(&mut self, version: u16, software: &str) -> Result<(), Close> {
        if !matches!(self.state, State::AwaitHello) {
            return Err(Close::tell(
                ErrorCode::ProtocolViolation,
                "Hello may only be sent once",
            ));
        }
        if version != PROTOCOL_VERSION {
            return Err(Close::tell(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this server speaks protocol version {PROTOCOL_VERSION}, the client sent {version}; update the client"
                ),
            ));
        }
        debug!(conn = self.conn_id, software = %truncate(software, 64), "hello");
        self.state = State::AwaitLogin;
        self.write(ServerMessage::Hello {
            version: PROTOCOL_VERSION,
            software: concat!("chat-server/", env!("CARGO_PKG_VERSION")).into(),
            max_frame: self.shared.config.max_frame_bytes as u32,
            queue_max_age_secs: self.shared.config.queue.max_age_secs as u64,
        })
        .await
    }

    /// Register (with a key) or Login (without): check the name and key, send a challenge.
    async fn begin_login(
        &mut self,
        id: RequestId,
        username: &str,
        offered_key: Option<Vec<u8>>,
    ) -> Result<(), Close> {
        if matches!(self.state, State::Ready(_)) {
            return self
                .fail(id, ErrorCode::ProtocolViolation, "already logged in")
                .await;
        }
        let username = match Username::parse(username) {
            Ok(u) => u,
            Err(e) => {
                return self
                    .fail(id, ErrorCode::InvalidUsername, e.to_string())
                    .await;
            }
        };
        if let Some(key) = &offered_key
            && let Err(e) = auth::parse_public_key(key)
        {
            return self
                .fail(id, ErrorCode::InvalidPublicKey, e.to_string())
                .await;
        }
        let lookup = username.clone();
        let stored = match self.store(move |s| s.public_key(&lookup)).await {
            Ok(stored) => stored,
            Err(close) => return self.fail_internal(id, close).await,
        };
        let public_key = match (stored, offered_key) {
            (Some(stored), Some(offered)) if stored != offered => {
                return self.username_taken(id, &username).await;
            }
            (_, Some(offered)) => offered,
            (Some(stored), None) => stored,
            (None, None) => {
                return self
                    .fail(
                        id,
                        ErrorCode::UnknownUser,
                        format!("no account named {username}; register it first"),
                    )
                    .await;
            }
        };
        let nonce = random_nonce();
        self.state = State::AwaitProof(PendingLogin {
            username,
            public_key,
            nonce,
        });
        self.write(ServerMessage::Challenge { id, nonce }).await
    }

    async fn prove(&mut self, id: RequestId, signature: &[u8]) -> Result<(), Close> {
        let pending = match std::mem::replace(&mut self.state, State::AwaitLogin) {
            State::AwaitProof(pending) => pending,
            other => {
                self.state = other;
                return self
                    .fail(
                        id,
                        ErrorCode::ProtocolViolation,
                        "no login challenge is pending",
                    )
                    .await;
            }
        };
        if auth::verify_login(
            &pending.public_key,
            &pending.username,
            &pending.nonce,
            signature,
        )
        .is_err()
        {
            warn!(conn = self.conn_id, peer = %self.peer, user = %pending.username, "bad login signature");
            return Err(Close::tell(
                ErrorCode::BadSignature,
                "the login signature does not match the account key",
            ));
        }
        let (user, key) = (pending.username.clone(), pending.public_key);
        let bind = match self.shared.writer.bind(user, key).bound().await {
            Ok(bind) => bind,
            Err(close) => return self.fail_internal(id, close).await,
        };
        let username = pending.username;
        if bind == Bind::Taken {
            // Another key registered the name between our challenge and this proof.
            return self.username_taken(id, &username).await;
        }
        let config = &self.shared.config;
        self.membership = Some(self.shared.router.join(
            &username,
            self.conn_id,
            config.send_queue_len,
        ));
        info!(conn = self.conn_id, user = %username, registered = bind == Bind::Created, "logged in");
        self.state = State::Ready(username.clone());
        // Stored envelopes go out first, in order, then live ones. Envelopes an earlier
        // session of ours was given may still be held for its Ack or on their way to
        // disk: let them land before the first read.
        self.backlog_done = false;
        self.settling = Some(self.shared.writer.barrier());
        self.write(ServerMessage::Welcome {
            id,
            username: username.to_string(),
            registered: bind == Bind::Created,
        })
        .await
    }

    /// Requests of a logged-in user.
    async fn request(&mut self, me: Username, msg: ClientMessage) -> Result<(), Close> {
        match msg {
            ClientMessage::ListUsers { id } => {
                let online = self.shared.router.online();
                self.write(ServerMessage::Users { id, online }).await
            }
            ClientMessage::Watch { id, usernames } => {
                let limit = chat_protocol::message::MAX_WATCHED;
                let watched = if usernames.len() > limit {
                    Err(WatchError::Limit(limit))
                } else {
                    // A name that is not valid can never come online: nothing to watch.
                    let users = usernames
                        .iter()
                        .filter_map(|u| Username::parse(u).ok())
                        .collect();
                    self.shared.router.watch(&me, self.conn_id, users, limit)
                };
                match watched {
                    Ok(online) => self.write(ServerMessage::Users { id, online }).await,
                    Err(WatchError::Limit(n)) => {
                        self.fail(
                            id,
                            ErrorCode::WatchLimit,
                            format!("a session may watch at most {n} users; nothing was added"),
                        )
                        .await
                    }
                    // Replaced meanwhile: the kick closes this connection next.
                    Err(WatchError::NotJoined) => Ok(()),
                }
            }
            ClientMessage::GetPublicKey { id, username } => {
                let Ok(user) = Username::parse(&username) else {
                    return self.unknown_user(id, &username).await;
                };
                let lookup = user.clone();
                match self.store(move |s| s.public_key(&lookup)).await {
                    Ok(Some(public_key)) => {
                        self.write(ServerMessage::PublicKey {
                            id,
                            username: user.to_string(),
                            public_key,
                        })
                        .await
                    }
                    Ok(None) => self.unknown_user(id, &username).await,
                    Err(close) => self.fail_internal(id, close).await,
                }
            }
            ClientMessage::Send { id, to, payload } => {
                let Ok(to_user) = Username::parse(&to) else {
                    return self.unknown_user(id, &to).await;
                };
                // The sender hears `Ok` only once the envelope cannot be lost: committed,
                // or (delivered at once to an online recipient) acknowledged by it. Later
                // sends are read meanwhile, so they share the commit.
                let writer = &self.shared.writer;
                let (recipient, sender) = (to_user.clone(), me.clone());
                let (now_secs, limits) = (unix_secs(), self.shared.config.queue.limits());
                let envelope = |payload| Envelope {
                    recipient,
                    sender,
                    payload,
                    now_secs,
                    limits,
                };
                let ((ticket, payload), _) = self.shared.router.accept(
                    &to_user,
                    &me,
                    payload,
                    |envelope_id, delivered, payload| {
                        if delivered {
                            (writer.enqueue_held(envelope_id, envelope(payload)), None)
                        } else {
                            // Kept to route once committed.
                            let ticket = writer.enqueue(envelope_id, envelope(payload.clone()));
                            (ticket, Some(payload))
                        }
                    },
                );
                self.sends.push_back(InFlight {
                    id,
                    to: to_user,
                    payload,
                    ticket,
                });
                Ok(())
            }
            other => {
                // Hello, login and ping are handled before; nothing else exists.
                let id = other.request_id().unwrap_or_default();
                self.fail(id, ErrorCode::ProtocolViolation, "unexpected message")
                    .await
            }
        }
    }

    /// Answers the oldest send now that its commit is done, and routes it on success.
    /// Also answers every later send whose outcome is already known, in one write.
    async fn send_committed(&mut self, done: Result<Enqueued, StoreError>) -> Result<(), Close> {
        let mut replies = Vec::new();
        let mut done = Some(done);
        while let Some(outcome) = done.take() {
            let Some(sent) = self.sends.pop_front() else {
                break;
            };
            replies.push(self.settle(sent, outcome));
            done = self.sends.front_mut().and_then(|s| s.ticket.try_enqueued());
        }
        let write_timeout = self.shared.config.write_timeout();
        let writer = &mut self.writer;
        let write = async {
            for reply in replies {
                writer.feed(reply).await?;
            }
            writer.flush().await
        };
        let result = timeout(write_timeout, write).await;
        self.finish_write(result)
    }

    /// Routes a send's envelope if it was not delivered at once and is now committed (an
    /// offline recipient gets it at the next login), and returns the answer for the sender.
    fn settle(&self, sent: InFlight, done: Result<Enqueued, StoreError>) -> ServerMessage {
        let InFlight {
            id, to, payload, ..
        } = sent;
        if let Some(payload) = payload {
            let deliver = match (&done, &self.state) {
                (Ok(Enqueued::Stored(envelope_id)), State::Ready(me)) => {
                    Some(ServerMessage::Deliver {
                        envelope_id: *envelope_id,
                        from: me.to_string(),
                        payload,
                    })
                }
                _ => None,
            };
            self.shared.router.settle(&to, deliver);
        }
        match done {
            Ok(Enqueued::Stored(_)) => ServerMessage::Ok { id },
            Ok(Enqueued::UnknownRecipient) => unknown_user_reply(id, to.as_str()),
            Ok(Enqueued::Full) => error_reply(
                id,
                ErrorCode::RecipientQueueFull,
                format!("{to} has too many undelivered messages waiting; try again later"),
            ),
            Err(e) => self.internal_reply(id, e),
        }
    }

    /// Waits for every send in flight and answers each, oldest first.
    async fn finish_sends(&mut self) -> Result<(), Close> {
        while !self.sends.is_empty() {
            let done = next_commit(&mut self.sends).await;
            self.send_committed(done).await?;
        }
        Ok(())
    }

    /// Writes one routed message, then whatever else is already queued, then flushes.
    async fn forward(&mut self, first: ServerMessage) -> Result<(), Close> {
        let write_timeout = self.shared.config.write_timeout();
        let Self {
            writer,
            membership,
            backlog_cursor,
            backlog_done,
            ..
        } = self;
        let batch = async {
            let mut next = Some(first);
            let mut written = 0;
            while let Some(msg) = next.take() {
                if let ServerMessage::Deliver { envelope_id, .. } = msg {
                    // While the backlog streams, or if already sent from it, the stored copy
                    // is (or was) written in order instead.
                    if !*backlog_done || envelope_id <= *backlog_cursor {
                        next = membership
                            .as_mut()
                            .and_then(|m| m.outbox.try_recv().ok())
                            .map(|m| *m);
                        continue;
                    }
                }
                writer.feed(msg).await?;
                written += 1;
                if written < WRITE_BATCH {
                    next = membership
                        .as_mut()
                        .and_then(|m| m.outbox.try_recv().ok())
                        .map(|m| *m);
                }
            }
            writer.flush().await
        };
        let result = timeout(write_timeout, batch).await;
        self.finish_write(result)
    }

    /// Writes the next batch of stored envelopes; marks the backlog done when it runs out.
    async fn send_backlog(&mut self) -> Result<(), Close> {
        let State::Ready(user) = &self.state else {
            self.backlog_done = true;
            return Ok(());
        };
        let user = user.clone();
        let (lookup, after) = (user.clone(), self.backlog_cursor);
        let batch = match self
            .store(move |s| s.pending(&lookup, after, WRITE_BATCH))
            .await
        {
            Ok(batch) => batch,
            Err(e) => return Err(self.storage_lost(e)),
        };
        // Caught up, unless envelopes committed meanwhile were left to the store.
        if batch.len() < WRITE_BATCH && self.shared.router.set_live(&user, self.conn_id) {
            self.backlog_done = true;
        }
        let write_timeout = self.shared.config.write_timeout();
        let Some(last) = batch.last().map(|q| q.id) else {
            return Ok(());
        };
        let writer = &mut self.writer;
        let write = async {
            for q in batch {
                writer
                    .feed(ServerMessage::Deliver {
                        envelope_id: q.id,
                        from: q.sender,
                        payload: q.payload,
                    })
                    .await?;
            }
            writer.flush().await
        };
        let result = timeout(write_timeout, write).await;
        self.finish_write(result)?;
        self.backlog_cursor = last;
        Ok(())
    }

    fn storage_lost(&self, e: StoreError) -> Close {
        tracing::error!(conn = self.conn_id, "storage error reading the queue: {e}");
        Close::tell(
            ErrorCode::Internal,
            "the server could not read your queued messages; reconnect later",
        )
    }

    /// At shutdown: write what was already routed to this client, within the write timeout.
    async fn drain_routed(&mut self) {
        while let Some(msg) = self
            .membership
            .as_mut()
            .and_then(|m| m.outbox.try_recv().ok())
            .map(|m| *m)
        {
            if self.forward(msg).await.is_err() {
                return;
            }
        }
    }

    async fn write(&mut self, msg: ServerMessage) -> Result<(), Close> {
        let write_timeout = self.shared.config.write_timeout();
        let result = timeout(write_timeout, self.writer.send(msg)).await;
        self.finish_write(result)
    }

    /// Gives back buffer memory a burst left behind, so idle connections stay small.
    fn trim_buffers(&mut self) {
        let write = self.writer.write_buffer_mut();
        if write.is_empty() && write.capacity() > IDLE_BUFFER_MAX {
            *write = Default::default();
        }
        if self.sends.is_empty() && self.sends.capacity() > 8 {
            self.sends = VecDeque::new();
        }
        let read = self.reader.read_buffer_mut();
        if read.is_empty() && read.capacity() > IDLE_BUFFER_MAX {
            *read = tokio_util::bytes::BytesMut::with_capacity(READ_BUFFER);
        }
    }

    fn finish_write(
        &mut self,
        result: Result<Result<(), CodecError>, tokio::time::error::Elapsed>,
    ) -> Result<(), Close> {
        match result {
            Ok(Ok(())) => {
                self.trim_buffers();
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

    async fn fail(
        &mut self,
        id: RequestId,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), Close> {
        self.write(error_reply(id, code, message)).await
    }

    async fn username_taken(&mut self, id: RequestId, name: &Username) -> Result<(), Close> {
        self.fail(
            id,
            ErrorCode::UsernameTaken,
            format!("the name {name} belongs to another key; choose another name"),
        )
        .await
    }

    async fn unknown_user(&mut self, id: RequestId, name: &str) -> Result<(), Close> {
        self.write(unknown_user_reply(id, name)).await
    }

    async fn fail_internal(&mut self, id: RequestId, error: StoreError) -> Result<(), Close> {
        let reply = self.internal_reply(id, error);
        self.write(reply).await
    }

    fn internal_reply(&self, id: RequestId, error: StoreError) -> ServerMessage {
        tracing::error!(conn = self.conn_id, "storage error: {error}");
        error_reply(
            id,
            ErrorCode::Internal,
            "the server could not reach its storage; try again later",
        )
    }

    /// Runs a store call on the blocking pool.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.shared.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

async fn settle_writes(settling: &mut Option<Ticket>) -> Result<(), StoreError> {
    match settling {
        Some(ticket) => ticket.passed().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the oldest send in flight; pending while there is none.
async fn next_commit(sends: &mut VecDeque<InFlight>) -> Result<Enqueued, StoreError> {
    match sends.front_mut() {
        Some(oldest) => oldest.ticket.enqueued().await,
        None => std::future::pending().await,
    }
}

/// The next routed message or kick; never resolves before login.
async fn next_inbound(membership: &mut Option<Membership>) -> Inbound {
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

fn error_reply(id: RequestId, code: ErrorCode, message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error {
        id: Some(id),
        code,
        message: message.into(),
    }
}

fn unknown_user_reply(id: RequestId, name: &str) -> ServerMessage {
    let shown = truncate(name, 40);
    error_reply(
        id,
        ErrorCode::UnknownUser,
        format!("no user named {shown:?}"),
    )
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_nonce() -> [u8; CHALLENGE_LEN] {
    let mut nonce = [0u8; CHALLENGE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

fn kick_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::SessionReplaced => "you logged in from another connection",
        ErrorCode::SlowConsumer => "messages were not read fast enough",
        _ => "disconnected by the server",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}
