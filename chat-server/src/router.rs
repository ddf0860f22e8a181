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

use chat_protocol::{ErrorCode, ServerMessage, Username};
use tokio::sync::{mpsc, watch};

/// The router's handle on one logged-in connection.
#[derive(Debug)]
struct Session {
    /// Distinguishes a replaced session from its successor under the same name.
    conn_id: u64,
    /// Boxed: tokio's channel allocates a block of 32 slots up front, so an idle
    /// connection holds 32 pointers instead of 32 messages.
    outbox: mpsc::Sender<Box<ServerMessage>>,
    /// Tells the connection to close, and why.
    kick: watch::Sender<Option<ErrorCode>>,
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
        self.kick.send_replace(Some(reason));
    }

    /// Queues `msg`; a full queue kicks the session. Returns whether it was queued.
    fn push(&self, msg: ServerMessage) -> bool {
        match self.outbox.try_send(Box::new(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(msg)) => {
                if !self.live && matches!(*msg, ServerMessage::Deliver { .. }) {
                    // Still reading its backlog, which has this committed envelope too:
                    // not a slow reader, just busy. It reads once more before going live.
                    self.dropped.set(true);
                } else {
                    self.kick(ErrorCode::SlowConsumer);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What a connection gets back when it joins.
#[derive(Debug)]
pub struct Membership {
    pub outbox: mpsc::Receiver<Box<ServerMessage>>,
    pub kicked: watch::Receiver<Option<ErrorCode>>,
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
                session.push(ServerMessage::Presence {
                    username: user.to_string(),
                    online,
                });
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
    pub fn join(&self, user: &Username, conn_id: u64, queue_len: usize) -> Membership {
        let (tx, outbox) = mpsc::channel(queue_len);
        let (kick, kicked) = watch::channel(None);
        let session = Session {
            conn_id,
            outbox: tx,
            kick,
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
        Membership { outbox, kicked }
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
        payload: Vec<u8>,
        store: impl FnOnce(u64, bool, Vec<u8>) -> T,
    ) -> (T, bool) {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        let delivered = match state.sessions.get(to) {
            Some(session) if session.live && !state.unrouted.contains_key(to) => {
                session.push(ServerMessage::Deliver {
                    envelope_id: id,
                    from: from.to_string(),
                    payload: payload.clone(),
                })
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
    pub fn settle(&self, to: &Username, deliver: Option<ServerMessage>) {
        let mut state = self.state();
        if let Some(msg) = deliver
            && let Some(session) = state.sessions.get(to)
        {
            // Too slow: it waits in the store for the next login.
            session.push(msg);
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
mod tests {
    use super::*;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn presence_route_and_replace() {
        let router = Router::default();
        let mut alice = router.join(&name("alice"), 1, 8);
        assert_eq!(
            router.watch(&name("alice"), 1, vec![name("bob"), name("carol")], 8),
            Ok(vec![])
        );
        let mut bob = router.join(&name("bob"), 2, 8);
        assert_eq!(
            *alice.outbox.try_recv().unwrap(),
            ServerMessage::Presence {
                username: "bob".into(),
                online: true
            }
        );
        assert_eq!(router.online(), vec!["alice", "bob"]);

        // Bob logs in again: the old session is kicked, nobody sees him go offline.
        let _bob2 = router.join(&name("bob"), 3, 8);
        assert_eq!(*bob.kicked.borrow(), Some(ErrorCode::SessionReplaced));
        router.leave(&name("bob"), 2);
        assert_eq!(router.online(), vec!["alice", "bob"]);
        assert!(alice.outbox.try_recv().is_err());

        router.leave(&name("bob"), 3);
        assert_eq!(router.online(), vec!["alice"]);
        assert_eq!(
            *alice.outbox.try_recv().unwrap(),
            ServerMessage::Presence {
                username: "bob".into(),
                online: false
            }
        );
        // Bob watched nobody, so he never heard of alice.
        assert!(bob.outbox.try_recv().is_err());
    }

    #[test]
    fn watching_is_bounded_and_forgotten_with_the_session() {
        let router = Router::default();
        let _alice = router.join(&name("alice"), 1, 8);
        let mut bob = router.join(&name("bob"), 2, 8);
        let many: Vec<Username> = (0..5).map(|i| name(&format!("u{i}"))).collect();
        assert_eq!(
            router.watch(&name("alice"), 1, many.clone(), 4),
            Err(WatchError::Limit(4))
        );
        assert_eq!(router.watch_count(), 0, "all or nothing");
        assert_eq!(
            router.watch(&name("alice"), 1, many[..4].to_vec(), 4),
            Ok(vec![])
        );
        // Names already watched do not count twice.
        assert!(
            router
                .watch(&name("alice"), 1, many[..2].to_vec(), 4)
                .is_ok()
        );
        assert_eq!(router.watch_count(), 4);
        assert_eq!(
            router.watch(&name("alice"), 9, vec![name("bob")], 4),
            Err(WatchError::NotJoined),
            "a stale connection id is not the session"
        );
        assert_eq!(
            router.watch(&name("bob"), 2, vec![name("alice"), name("alice")], 4),
            Ok(vec!["alice".to_string()])
        );
        // Alice leaves: bob hears it, and her watches are gone.
        router.leave(&name("alice"), 1);
        assert_eq!(router.watch_count(), 1);
        assert_eq!(
            *bob.outbox.try_recv().unwrap(),
            ServerMessage::Presence {
                username: "alice".into(),
                online: false
            }
        );
        // A replaced session's watches are dropped with it.
        let _bob2 = router.join(&name("bob"), 3, 8);
        assert_eq!(router.watch_count(), 0);
    }

    fn deliver(envelope_id: u64) -> ServerMessage {
        ServerMessage::Deliver {
            envelope_id,
            from: "alice".into(),
            payload: vec![1],
        }
    }

    /// Alice sends `[1]` to `to`: (id, the id the store was given, delivered at once).
    fn accept(router: &Router, to: &str) -> (u64, (u64, bool), bool) {
        let (stored, delivered) =
            router.accept(&name(to), &name("alice"), vec![1], |id, d, payload| {
                assert_eq!(payload, vec![1]);
                (id, d)
            });
        (stored.0, stored, delivered)
    }

    #[test]
    fn envelopes_go_direct_only_when_nothing_earlier_is_still_on_its_way() {
        let router = Router::new(10);
        let mut bob = router.join(&name("bob"), 1, 8);
        // Not live yet (reading its backlog): through the store, in id order.
        let (_, stored, delivered) = accept(&router, "bob");
        assert_eq!((stored, delivered), ((10, false), false));
        router.set_live(&name("bob"), 1);
        // Live, but envelope 10 is still on its way through the store: 11 must follow it.
        let (id, _, delivered) = accept(&router, "bob");
        assert_eq!((id, delivered), (11, false));
        assert!(bob.outbox.try_recv().is_err());
        router.settle(&name("bob"), Some(deliver(10)));
        router.settle(&name("bob"), Some(deliver(11)));
        // Nothing left on its way: the next one goes straight to bob, after 10 and 11.
        let (id, _, delivered) = accept(&router, "bob");
        assert_eq!((id, delivered), (12, true));
        let got: Vec<ServerMessage> = std::iter::from_fn(|| bob.outbox.try_recv().ok())
            .map(|m| *m)
            .collect();
        assert_eq!(got, vec![deliver(10), deliver(11), deliver(12)]);
        // Offline recipients: through the store; settling without a session is harmless.
        let (_, _, delivered) = accept(&router, "carol");
        assert!(!delivered);
        router.settle(&name("carol"), Some(deliver(13)));
        // A stale connection id does not make the new session live.
        let _bob2 = router.join(&name("bob"), 2, 8);
        router.set_live(&name("bob"), 1);
        assert!(!accept(&router, "bob").2);
    }

    #[test]
    fn a_session_reading_its_backlog_is_not_kicked_for_envelopes_the_store_has() {
        let router = Router::default();
        let mut bob = router.join(&name("bob"), 1, 1);
        for id in [1, 2] {
            accept(&router, "bob");
            router.settle(&name("bob"), Some(deliver(id)));
        }
        assert_eq!(*bob.kicked.borrow(), None, "not kicked while not live");
        // Envelope 2 was left to the store: one more backlog read before going live.
        assert!(!router.set_live(&name("bob"), 1));
        assert!(router.set_live(&name("bob"), 1));
        assert_eq!(*bob.outbox.try_recv().unwrap(), deliver(1));
    }

    #[test]
    fn on_a_cluster_a_session_here_is_online_before_the_bucket_says_so() {
        let router = Router::clustered();
        let _alice = router.join(&name("alice"), 1, 8);
        let _bob = router.join(&name("bob"), 2, 8);
        assert_eq!(router.online(), vec!["alice", "bob"]);
        assert_eq!(
            router.watch(&name("alice"), 1, vec![name("bob"), name("carol")], 8),
            Ok(vec!["bob".to_string()])
        );
        // Carol is on another relay: only the bucket tells.
        router.cluster_presence(&name("carol"), true);
        router.cluster_presence(&name("alice"), true);
        assert_eq!(router.online(), vec!["alice", "bob", "carol"]);
        router.leave(&name("bob"), 2);
        router.cluster_presence(&name("carol"), false);
        assert_eq!(router.online(), vec!["alice"]);
    }

    #[test]
    fn full_queue_kicks_the_slow_reader() {
        let router = Router::default();
        let slow = router.join(&name("slow"), 1, 2);
        router.set_live(&name("slow"), 1);
        assert!(accept(&router, "slow").2);
        assert!(accept(&router, "slow").2);
        assert!(!accept(&router, "slow").2);
        assert_eq!(*slow.kicked.borrow(), Some(ErrorCode::SlowConsumer));
    }
}
