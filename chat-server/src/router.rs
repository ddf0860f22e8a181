//! Who is online, and handing messages to their connections.
//!
//! Each logged-in connection registers a bounded queue here. Routing never waits: a full
//! queue means that client is not reading, so it is disconnected (`slow_consumer`) rather
//! than letting the server's memory grow.
//!
//! Presence goes only to sessions that watch a user, so a login costs one notice per
//! watcher rather than one per user online.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chat_protocol::deliver::SharedDeliver;
use chat_protocol::{ErrorCode, ServerMessage, Username};
use tokio_util::bytes::Bytes;

mod outbox;
pub use outbox::{Inbound, Inbox, KickWatch, OutboxBound};
use outbox::{Outbox, PushError};

/// What the router queues for a connection to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// An envelope; its payload is shared with the store writer's envelope (and the
    /// sender's in-flight entry, if routed after its commit), not copied.
    Deliver(SharedDeliver<Bytes>),
    /// Anything else: presence, or a cluster mailbox's owned `Deliver`.
    Message(ServerMessage),
}

impl Routed {
    /// What it counts for against [`OutboxBound::bytes`]: an envelope's payload and
    /// sender's name, plus a little; anything else (presence) a small fixed size.
    pub fn weight(&self) -> usize {
        const FIXED: usize = 32;
        match self {
            Routed::Deliver(d) => FIXED + d.payload.len() + d.from.as_str().len(),
            Routed::Message(ServerMessage::Deliver { payload, from, .. }) => {
                FIXED + payload.len() + from.len()
            }
            Routed::Message(_) => 2 * FIXED,
        }
    }

    /// The envelope id, if this is a `Deliver` (in either form).
    pub fn envelope_id(&self) -> Option<u64> {
        match self {
            Routed::Deliver(d) => Some(d.envelope_id),
            Routed::Message(ServerMessage::Deliver { envelope_id, .. }) => Some(*envelope_id),
            Routed::Message(_) => None,
        }
    }
}

/// The router's handle on one logged-in connection.
#[derive(Debug)]
struct Session {
    /// Distinguishes a replaced session from its successor under the same name.
    conn_id: u64,
    /// What is routed to the connection, and its kick.
    outbox: Outbox,
    /// Users this session watches for presence.
    watching: HashSet<Username>,
    /// Its stored backlog has been written: new envelopes may go to it directly.
    live: bool,
    /// Before it went live, a committed envelope was not queued to it (queue full): its
    /// backlog must be read again before it can go live.
    dropped: std::cell::Cell<bool>,
}

impl Session {
    fn kick(&self, reason: ErrorCode) {
        self.outbox.kick(reason);
    }

    /// Queues `msg`; a full queue kicks the session. Returns whether it was queued.
    fn push(&self, msg: Routed) -> bool {
        match self.outbox.push(msg) {
            Ok(()) => true,
            Err(PushError::Full(msg)) => {
                if !self.live && matches!(msg, Routed::Deliver(_)) {
                    // Still reading its backlog, which has this committed envelope too:
                    // not a slow reader, just busy. It reads once more before going live.
                    self.dropped.set(true);
                } else {
                    self.kick(ErrorCode::SlowConsumer);
                }
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

/// What a connection gets back when it joins.
#[derive(Debug)]
pub struct Membership {
    /// What is routed to the connection, in order, and its kick.
    pub inbox: Inbox,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WatchError {
    /// The session would watch more than this many users.
    Limit(usize),
    /// The session is no longer registered (replaced or gone).
    NotJoined,
}

#[derive(Debug)]
struct State {
    sessions: HashMap<Username, Session>,
    /// Watched user → the users whose sessions watch them.
    watchers: HashMap<Username, HashSet<Username>>,
    /// The next envelope id. Handed out under the lock, in the order envelopes reach
    /// recipients and the store.
    next_id: u64,
    /// Recipient → envelopes accepted for it, not delivered at once, and not yet routed
    /// after their commit. While any are, new ones take the same path, so a recipient
    /// never gets a sender's envelopes out of order.
    unrouted: HashMap<Username, usize>,
    /// With a cluster backend: who is online on any relay (this one included), as the
    /// cluster's session bucket says. Presence follows it instead of local logins.
    cluster_online: Option<HashSet<Username>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            sessions: HashMap::new(),
            watchers: HashMap::new(),
            next_id: 1,
            unrouted: HashMap::new(),
            cluster_online: None,
        }
    }
}

impl State {
    /// Tells `user`'s watchers that it came or went.
    fn announce(&self, user: &Username, online: bool) {
        let Some(watchers) = self.watchers.get(user) else {
            return;
        };
        for watcher in watchers {
            if let Some(session) = self.sessions.get(watcher)
                && watcher != user
            {
                session.push(Routed::Message(ServerMessage::Presence {
                    username: user.to_string(),
                    online,
                }));
            }
        }
    }

    /// A session here counts at once, even before the cluster's session bucket shows it
    /// (a user that just logged in here must not read as offline to a watcher here).
    fn is_online(&self, user: &Username) -> bool {
        self.sessions.contains_key(user)
            || self
                .cluster_online
                .as_ref()
                .is_some_and(|set| set.contains(user))
    }

    /// Forgets what `session` (of `user`) watched.
    fn unwatch_all(&mut self, user: &Username, session: &Session) {
        for watched in &session.watching {
            if let Some(set) = self.watchers.get_mut(watched) {
                set.remove(user);
                if set.is_empty() {
                    self.watchers.remove(watched);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Router {
    // std Mutex: critical sections are map operations and non-blocking `try_send`s,
    // never an `.await`.
    state: Mutex<State>,
}

impl Router {
    /// A router whose envelope ids start at `first_id` (above any the store has seen).
    pub fn new(first_id: u64) -> Self {
        let router = Self::default();
        router.state().next_id = first_id.max(1);
        router
    }

    /// A router for a relay of a cluster: who is online comes from
    /// [`Router::cluster_presence`], not from this relay's logins.
    pub fn clustered() -> Self {
        let router = Self::default();
        router.state().cluster_online = Some(HashSet::new());
        router
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `user`'s connection. A previous session of the same user is closed with
    /// `session_replaced`; others learn the user is online (unless it already was).
    pub fn join(&self, user: &Username, conn_id: u64, bound: OutboxBound) -> Membership {
        let (outbox, inbox) = outbox::outbox(bound);
        let session = Session {
            conn_id,
            outbox,
            watching: HashSet::new(),
            live: false,
            dropped: std::cell::Cell::new(false),
        };
        let mut state = self.state();
        match state.sessions.insert(user.clone(), session) {
            Some(old) => {
                old.kick(ErrorCode::SessionReplaced);
                state.unwatch_all(user, &old);
            }
            None if state.cluster_online.is_none() => state.announce(user, true),
            None => {}
        }
        Membership { inbox }
    }

    /// Removes `user`'s session if it is still `conn_id` (not already replaced).
    pub fn leave(&self, user: &Username, conn_id: u64) {
        let mut state = self.state();
        if state
            .sessions
            .get(user)
            .is_some_and(|s| s.conn_id == conn_id)
            && let Some(old) = state.sessions.remove(user)
        {
            state.unwatch_all(user, &old);
            if state.cluster_online.is_none() {
                state.announce(user, false);
            }
        }
    }

    /// With a cluster backend: `user` is now online (or not) somewhere in the cluster.
    /// Watchers here hear of it if that changes what they knew.
    pub fn cluster_presence(&self, user: &Username, online: bool) {
        let mut state = self.state();
        let Some(set) = state.cluster_online.as_mut() else {
            return;
        };
        let changed = if online {
            set.insert(user.clone())
        } else {
            set.remove(user)
        };
        if changed {
            state.announce(user, online);
        }
    }

    /// Takes every user of the cluster for offline (announcing it), before the session
    /// bucket is read afresh: those still online are announced again as it is read.
    pub fn cluster_presence_reset(&self) {
        let mut state = self.state();
        let Some(set) = state.cluster_online.take() else {
            return;
        };
        for user in &set {
            state.announce(user, false);
        }
        state.cluster_online = Some(std::collections::HashSet::new());
    }

    /// Closes `user`'s session `conn_id` with `code`, if it is still registered.
    pub fn kick(&self, user: &Username, conn_id: u64, code: ErrorCode) {
        let state = self.state();
        if let Some(session) = state.sessions.get(user).filter(|s| s.conn_id == conn_id) {
            session.kick(code);
        }
    }

    /// Closes every session with `code` (the relay can no longer serve them).
    pub fn kick_all(&self, code: ErrorCode) {
        for session in self.state().sessions.values() {
            session.kick(code);
        }
    }

    /// Adds `users` to what `user`'s session `conn_id` watches, all or none within `limit`.
    /// Returns which of `users` are online now, sorted.
    pub fn watch(
        &self,
        user: &Username,
        conn_id: u64,
        users: Vec<Username>,
        limit: usize,
    ) -> Result<Vec<String>, WatchError> {
        let mut state = self.state();
        let session = state
            .sessions
            .get_mut(user)
            .filter(|s| s.conn_id == conn_id)
            .ok_or(WatchError::NotJoined)?;
        let new = users
            .iter()
            .filter(|u| !session.watching.contains(*u))
            .count();
        if session.watching.len() + new > limit {
            return Err(WatchError::Limit(limit));
        }
        session.watching.extend(users.iter().cloned());
        for watched in &users {
            state
                .watchers
                .entry(watched.clone())
                .or_default()
                .insert(user.clone());
        }
        let mut online: Vec<String> = users
            .iter()
            .filter(|u| state.is_online(u))
            .map(|u| u.to_string())
            .collect();
        online.sort_unstable();
        online.dedup();
        Ok(online)
    }

    /// Marks `user`'s session `conn_id` as past its backlog: envelopes may go to it
    /// directly from now on.
    /// Returns false (and stays not live) if a committed envelope could not be queued to
    /// it meanwhile: the backlog must be read again first. A replaced session has
    /// nothing to wait for.
    pub fn set_live(&self, user: &Username, conn_id: u64) -> bool {
        let mut state = self.state();
        let Some(s) = state
            .sessions
            .get_mut(user)
            .filter(|s| s.conn_id == conn_id)
        else {
            return true;
        };
        if s.dropped.replace(false) {
            return false;
        }
        s.live = true;
        true
    }

    /// Accepts a new envelope `payload` from `from` for `to`: gives it the next id and, if
    /// `to` is online and past its backlog, queues a `Deliver` to it at once. Then calls
    /// `store(id, delivered, payload)`, still under the lock, so the store sees envelopes
    /// in id order. Returns what `store` returned and whether it was delivered.
    pub fn accept<T>(
        &self,
        to: &Username,
        from: &Username,
        payload: Bytes,
        store: impl FnOnce(u64, bool, Bytes) -> T,
    ) -> (T, bool) {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        let delivered = match state.sessions.get(to) {
            Some(session) if session.live && !state.unrouted.contains_key(to) => {
                session.push(Routed::Deliver(SharedDeliver {
                    envelope_id: id,
                    from: from.clone(),
                    payload: payload.clone(),
                }))
            }
            _ => false,
        };
        if !delivered {
            *state.unrouted.entry(to.clone()).or_default() += 1;
        }
        (store(id, delivered, payload), delivered)
    }

    /// Settles an envelope [`Router::accept`] did not deliver: queues `deliver` (if it was
    /// committed) to `to` if online. Every such envelope must be settled exactly once.
    pub fn settle(&self, to: &Username, deliver: Option<SharedDeliver<Bytes>>) {
        let mut state = self.state();
        if let Some(msg) = deliver
            && let Some(session) = state.sessions.get(to)
        {
            // Too slow: it waits in the store for the next login.
            session.push(Routed::Deliver(msg));
        }
        if let Some(n) = state.unrouted.get_mut(to) {
            *n -= 1;
            if *n == 0 {
                state.unrouted.remove(to);
            }
        }
    }

    /// Names of everyone online (in the cluster, with a cluster backend), sorted.
    pub fn online(&self) -> Vec<String> {
        let state = self.state();
        let mut names: Vec<String> = state.sessions.keys().map(|u| u.to_string()).collect();
        if let Some(set) = &state.cluster_online {
            names.extend(set.iter().map(|u| u.to_string()));
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// How many (watcher, watched) pairs are registered, for tests and stats.
    pub fn watch_count(&self) -> usize {
        self.state().watchers.values().map(HashSet::len).sum()
    }
}

#[cfg(test)]
mod tests;
