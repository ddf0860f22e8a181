//! One client connection: Hello, login by challenge-response (`login`), then requests and
//! relaying (`relay`).
//!
//! The handler owns both halves of the socket. It waits at once on the client's next
//! frame, on messages routed to it, on shutdown or a kick, on room in the store writer,
//! and on its timers; every write is bounded by the write timeout, so a client that stops
//! reading cannot stall it. What a client may make the server do is bounded: its requests
//! are charged by work against a rate limit, a write that does not fit the writer's budget
//! stops the connection being read until it does, and until it logs in it holds only a
//! pre-login slot with a short first-byte deadline.

mod admission;
mod buffers;
mod events;
mod fan_out;
mod login;
mod order;
mod pipeline;
mod relay;
mod reply;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use chat_protocol::auth::ChannelBinding;
use chat_protocol::codec::{CodecError, WireCodec};
use chat_protocol::message::RequestId;
use chat_protocol::{ClientMessage, ErrorCode, FrameError, ServerMessage, Username};
use futures_util::StreamExt;
use rand::Rng;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::Shared;
use crate::cluster::MailboxRead;
use crate::limits::{PreLoginSlot, TokenBucket};
use crate::router::{Inbound, Membership, Routed};
use crate::store::{Store, StoreError};
use crate::writer::{Room, Ticket};
use events::{next_commit, next_delivery, next_inbound, parked_room, settle_writes};
use login::PendingLogin;
use reply::{kick_message, truncate};

type Codec = WireCodec<ClientMessage, ServerMessage>;

/// A client's connection once its TLS handshake is done.
#[cfg(not(feature = "bench-plaintext"))]
pub(crate) type Stream = tokio_rustls::server::TlsStream<TcpStream>;
/// A client's connection: TLS, or plain TCP in the benchmark-only binary.
#[cfg(feature = "bench-plaintext")]
pub(crate) type Stream =
    tokio_util::either::Either<tokio_rustls::server::TlsStream<TcpStream>, TcpStream>;

/// The channel binding a login proof must cover: the TLS exporter value (all zeros on the
/// benchmark-only plaintext transport, whose client signs the same zeros).
fn channel_of(socket: &Stream) -> Result<chat_protocol::auth::ChannelBinding, rustls::Error> {
    #[cfg(feature = "bench-plaintext")]
    let socket = match socket {
        tokio_util::either::Either::Left(tls) => tls,
        tokio_util::either::Either::Right(_) => return Ok(Default::default()),
    };
    chat_protocol::tls::channel_binding(socket.get_ref().1)
}

/// Most routed messages written before one flush, so a busy receiver gets batched writes
/// without starving its own reads. Also the size of one backlog read.
const WRITE_BATCH: usize = 64;

/// Sends from one connection waiting for their commit at once. More are not read until
/// the oldest is answered (with `shed_when_full`: are refused `server_busy`), which bounds
/// what a fast sender can make the server hold.
const MAX_PIPELINED: usize = chat_protocol::message::MAX_PIPELINED;

/// `Sync` requests one session may have waiting at once; more are refused (`rate_limited`).
const MAX_SYNCS: usize = 4;

/// How long a closing session waits for answers to its sends in flight
/// ([`Handler::finish_sends_closing`]).
const FINISH_SENDS_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A public key lookup's outcome: the key, if the name is registered.
type KeyLookup = Result<Option<Vec<u8>>, StoreError>;

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

/// A `Send` (or one copy of a `SendMany`) handed to the store, answered once durable
/// (committed, or acknowledged by its recipient).
struct InFlight {
    id: RequestId,
    /// The recipient as the request named it.
    to: String,
    /// Kept to route the envelope once committed: its recipient and payload. `None` if it
    /// was delivered at once, or never accepted (a name that is no user).
    route: Option<(Username, Bytes)>,
    ticket: Ticket,
    /// One copy of a `SendMany`, answered together with the others in one `Outcomes`:
    /// whether it is the request's last copy.
    part: Option<bool>,
    /// Its place among the connection's sends (`crate::fence`): told when the client is
    /// given its outcome. `None` for a copy never submitted (no such user, shed whole).
    fence: Option<crate::fence::FenceTag>,
}

/// A request read but waiting for room in the store writer: while it waits the connection
/// is not read (paced), but what is routed to it is still written.
struct Parked {
    msg: ClientMessage,
    room: Pin<Box<dyn Future<Output = Room> + Send>>,
}

pub(crate) struct Handler {
    conn_id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    reader: FramedRead<ReadHalf<Stream>, Codec>,
    writer: FramedWrite<WriteHalf<Stream>, Codec>,
    /// The TLS session's channel binding, which the login proof must cover.
    channel: ChannelBinding,
    /// When the connection was accepted (the login deadline counts from here, the TLS
    /// handshake included).
    accepted: Instant,
    state: State,
    /// Present once logged in: the queue the router fills, and the kick signal.
    membership: Option<Membership>,
    bucket: TokenBucket,
    shutdown: CancellationToken,
    /// Last time a frame arrived; drives ping and idle timeout.
    last_heard: Instant,
    /// A ping was sent since `last_heard`.
    pinged: bool,
    /// When the buffers a burst grew are given back.
    quiet_trim: buffers::QuietTrim,
    /// A send on this connection was shed (refused `server_busy`): every later send is
    /// shed too until the client answers the `Ping` with this nonce, written right after
    /// the latest refusal (each refusal gets its own). The client has then read every
    /// refusal (and holds those recipients' messages), so nothing it sent before can be
    /// accepted ahead of its retry: shedding never reorders a sender's messages. With
    /// the nonce, when the fence went up or the client last answered one of its Pings
    /// (a client that answers none within the idle timeout is closed).
    shed_fence: Option<(u64, Instant)>,
    /// A send refused for a reason that may pass holds later sends to its recipient until
    /// the client answers the `Ping` behind the refusal (`crate::fence`).
    order: order::OrderFence,
    /// Highest envelope id written from the stored backlog: where its next read starts.
    backlog_cursor: u64,
    /// The stored backlog has been written; new envelopes may go straight out.
    backlog_done: bool,
    /// Resolves once what was submitted before this login is durable; the backlog is
    /// read only after. Polled in the main loop, so routed messages keep draining.
    settling: Option<Ticket>,
    /// Sends awaiting their commit, in the order they arrived (and are answered).
    sends: pipeline::Pipeline,
    /// Envelope ids written to this session and not yet acknowledged: the only ids its
    /// `Ack`s may name.
    unacked: HashSet<u64>,
    /// A request waiting for room in the store writer.
    parked: Option<Parked>,
    /// Held until login: a place in the pre-login budget.
    pre_login: Option<PreLoginSlot>,
    /// Held once logged in: one of `max_connections`.
    slot: Option<OwnedSemaphorePermit>,
    /// A frame has arrived (the first-byte deadline no longer applies).
    heard_any: bool,
    /// `Register`s and `Login`s begun on this connection (at most
    /// [`login::LOGINS_PER_CONNECTION`]).
    logins_begun: u8,
    /// This connection's address group in the queue's accounting.
    source: i64,
    /// With the cluster backend, once logged in: the mailbox read (backlog, then live).
    cluster_inbox: Option<mpsc::Receiver<Result<MailboxRead, String>>>,
    /// With the cluster backend: the mailbox read has handed over the backlog.
    mailbox_caught_up: bool,
    /// `Sync` requests waiting for the backlog to be written (at most [`MAX_SYNCS`]).
    syncs: Vec<RequestId>,
    /// Outcomes of the `SendMany` being answered, gathered copy by copy (its copies are
    /// answered in order, one after another, like every send).
    fan_out: Vec<Option<ErrorCode>>,
    /// Stops that read when the connection ends.
    _mailbox_reader: Option<crate::cluster::AbortOnDrop>,
}

impl Handler {
    /// A handler for a connection whose TLS handshake is done (`accepted`: when the TCP
    /// connection was accepted). Fails only if the session cannot export its channel
    /// binding (the handshake did not finish).
    pub(crate) fn new(
        socket: Stream,
        peer: SocketAddr,
        conn_id: u64,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
        pre_login: PreLoginSlot,
        accepted: Instant,
    ) -> Result<Self, rustls::Error> {
        let channel = channel_of(&socket)?;
        let max = shared.config.max_frame_bytes;
        let (read, write) = tokio::io::split(socket);
        let now = Instant::now();
        let source = shared.sources.of(peer.ip());
        Ok(Self {
            conn_id,
            peer,
            channel,
            accepted,
            reader: FramedRead::with_capacity(read, Codec::new(max), buffers::READ_BUFFER),
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
            quiet_trim: Default::default(),
            shed_fence: None,
            order: Default::default(),
            backlog_cursor: 0,
            backlog_done: true,
            settling: None,
            sends: pipeline::Pipeline::default(),
            unacked: HashSet::new(),
            parked: None,
            pre_login: Some(pre_login),
            slot: None,
            heard_any: false,
            logins_begun: 0,
            source,
            cluster_inbox: None,
            mailbox_caught_up: false,
            syncs: Vec::new(),
            fan_out: Vec::new(),
            _mailbox_reader: None,
        })
    }

    /// Serves the connection to its end. Takes the handler boxed: an `async fn` stores a
    /// by-value argument twice in its future (rust-lang/rust#62958), which for the
    /// handler (~700 B) would be room held per connection for nothing.
    pub(crate) async fn run(mut self: Box<Self>) {
        debug!(conn = self.conn_id, peer = %self.peer, "connected");
        let close = self.serve().await;
        // Whether the client was told why it is closed, and so must be let read that.
        let mut told = false;
        if let Close::Tell(code, message) = close {
            // Answer sends already committed, so their senders need not resend.
            let _ = Box::pin(self.finish_sends_closing()).await;
            debug!(conn = self.conn_id, %code, "closing: {message}");
            // Boxed, as every write here: its future is larger than `serve`'s and would
            // otherwise be room held for the whole connection.
            told = Box::pin(self.write(ServerMessage::Error {
                id: None,
                code,
                message,
            }))
            .await
            .is_ok();
        }
        let mut closed = false;
        if self.shared.cluster.is_some() {
            // The client hears the close now, not after the waits below (sends left in
            // flight, the logout), which wait on NATS: it may have just gone.
            closed = Box::pin(self.close_write()).await;
        }
        // Sends nobody can be answered for any more: their envelopes still go on.
        while let Some(mut sent) = self.sends.pop_front() {
            let done = sent.ticket.enqueued().await;
            self.settle(sent, done);
        }
        self._mailbox_reader = None;
        if let State::Ready(user) = &self.state {
            self.shared.router.leave(user, self.conn_id);
            if let Some(cluster) = &self.shared.cluster {
                cluster.logout(user, self.conn_id).await;
            }
            debug!(conn = self.conn_id, user = %user, "logged out");
        }
        // Only a session lingers: it may be behind on reading what was relayed to it. A
        // connection still logging in has nothing of its own to read, and lingering would
        // hold its place in the pre-login budget.
        let session = matches!(self.state, State::Ready(_));
        if told && session && (closed || Box::pin(self.close_write()).await) {
            Box::pin(self.linger()).await;
        }
        debug!(conn = self.conn_id, "disconnected");
    }

    /// Handles one request; with the cluster backend, a kick (the session replaced, or
    /// NATS unreachable past its grace) ends it meanwhile: a send's checks before it is
    /// published wait on NATS, and the session must close with the rest. Dropping such
    /// a send is safe: it was not answered, so the client sends it again.
    async fn handle_unless_kicked(&mut self, msg: ClientMessage) -> Result<(), Close> {
        let kick = self.shared.cluster.as_ref().and(self.membership.as_ref());
        let Some(kick) = kick.map(|m| m.inbox.kick_watch()) else {
            return self.handle(msg).await;
        };
        tokio::select! {
            handled = self.handle(msg) => handled,
            code = kick.kicked() => Err(Close::tell(code, kick_message(code))),
        }
    }

    async fn serve(&mut self) -> Close {
        let config = &self.shared.config;
        let started = self.accepted;
        let login_deadline = started + config.login_timeout();
        let first_byte_deadline = started + config.first_byte_timeout();
        let (ping_interval, idle_timeout) = (config.ping_interval(), config.idle_timeout());
        let timer = sleep_until(first_byte_deadline.min(login_deadline));
        tokio::pin!(timer);
        // Registered once for the connection: a wait created on every turn of the loop
        // would register and unregister each time.
        let stop = self.shutdown.clone().cancelled_owned();
        tokio::pin!(stop);
        loop {
            let logged_in = matches!(self.state, State::Ready(_));
            let idle_at = self.last_heard + idle_timeout;
            let mut wake = idle_at;
            if !logged_in {
                wake = wake.min(login_deadline);
            }
            if !self.heard_any {
                wake = wake.min(first_byte_deadline);
            }
            if !self.pinged {
                wake = wake.min(self.last_heard + ping_interval);
            }
            let trim_at = self.quiet_trim.due();
            if let Some(trim_at) = trim_at {
                wake = wake.min(trim_at);
            }
            // Re-armed only when the deadline moves earlier (or it fired): every frame
            // moves it later, and a timer that fires early just finds nothing due.
            if wake < timer.deadline() || timer.is_elapsed() {
                timer.as_mut().reset(wake);
            }

            let evicted = self.pre_login.as_ref().map(PreLoginSlot::eviction);
            tokio::select! {
                () = &mut stop => {
                    let _ = Box::pin(self.finish_sends_closing()).await;
                    Box::pin(self.drain_routed()).await;
                    return Close::tell(ErrorCode::ShuttingDown, "the server is shutting down; reconnect in a moment");
                }
                inbound = next_inbound(&mut self.membership) => match inbound {
                    Inbound::Routed(msg) => {
                        if let Err(close) = Box::pin(self.forward(msg)).await {
                            return close;
                        }
                    }
                    Inbound::Kicked(code) => return Close::tell(code, kick_message(code)),
                },
                delivery = next_delivery(&mut self.cluster_inbox), if self.cluster_inbox.is_some() => match delivery {
                    Ok(MailboxRead::Deliver(msg, room)) => {
                        let forwarded = Box::pin(self.forward(Routed::Message(msg))).await;
                        // Written: the reader may hand over that much more.
                        drop(room);
                        if let Err(close) = forwarded {
                            return close;
                        }
                    }
                    Ok(MailboxRead::CaughtUp) => {
                        self.mailbox_caught_up = true;
                        if let Err(close) = Box::pin(self.answer_syncs()).await {
                            return close;
                        }
                    }
                    Err(e) => return self.storage_lost(StoreError::Cluster(e)),
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
                room = parked_room(&mut self.parked), if self.parked.is_some() => {
                    let Some(Parked { msg, .. }) = self.parked.take() else { continue };
                    if let Err(close) = Box::pin(self.with_room(msg, room)).await {
                        return close;
                    }
                }
                frame = self.reader.next(), if self.parked.is_none() && self.sends.len() < self.read_limit() => match frame {
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
                        self.note_read(self.last_heard);
                        self.pinged = false;
                        self.heard_any = true;
                        if let Err(close) = Box::pin(self.handle_unless_kicked(msg)).await {
                            return close;
                        }
                    }
                },
                () = async { evicted.expect("checked").notified().await }, if evicted.is_some() => {
                    return Close::tell(
                        ErrorCode::ServerBusy,
                        "the server is busy with other logins; try again in a moment",
                    );
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if !logged_in && now >= login_deadline {
                        return Close::tell(ErrorCode::LoginTimeout, "login was not completed in time");
                    }
                    if !self.heard_any && now >= first_byte_deadline && self.reader.read_buffer().is_empty() {
                        return Close::tell(ErrorCode::LoginTimeout, "nothing was sent; a client must start with Hello at once");
                    }
                    if !self.heard_any && now >= first_byte_deadline {
                        // Bytes are arriving: the login timeout still bounds them.
                        self.heard_any = true;
                    }
                    if now >= idle_at {
                        return Close::tell(ErrorCode::IdleTimeout, "nothing received for too long");
                    }
                    if trim_at.is_some_and(|at| now >= at) {
                        self.trim_quiet();
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

    /// `user`'s public key from the backend, if registered (the cluster's asked through a
    /// NATS disturbance until `deadline`). (Not an `async fn`, like [`Handler::store`].)
    fn public_key(
        &self,
        user: Username,
        deadline: tokio::time::Instant,
    ) -> Pin<Box<dyn Future<Output = KeyLookup> + Send>> {
        match self.shared.cluster.clone() {
            Some(cluster) => Box::pin(async move { cluster.public_key(&user, deadline).await }),
            None => Box::pin(self.store(move |s| s.public_key(&user))),
        }
    }

    /// Runs a store call on the blocking pool. (Not an `async fn`: the future holds no
    /// reference to the handler, which is `Send` but not `Sync`.)
    fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let store = self.shared.store.clone();
        async move {
            match tokio::task::spawn_blocking(move || f(&store)).await {
                Ok(result) => result,
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
