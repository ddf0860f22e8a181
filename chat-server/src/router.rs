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
}

impl Session {
    fn kick(&self, reason: ErrorCode) {
        self.kick.send_replace(Some(reason));
    }

    /// Queues `msg`; a full queue kicks the session. Returns whether it was queued.
    fn push(&self, msg: ServerMessage) -> bool {
        match self.outbox.try_send(Box::new(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick(ErrorCode::SlowConsumer);
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
pub enum RouteError {
    Offline,
    SlowConsumer,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WatchError {
    /// The session would watch more than this many users.
    Limit(usize),
    /// The session is no longer registered (replaced or gone).
    NotJoined,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<Username, Session>,
    /// Watched user → the users whose sessions watch them.
    watchers: HashMap<Username, HashSet<Username>>,
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
        };
        let mut state = self.state();
        match state.sessions.insert(user.clone(), session) {
            Some(old) => {
                old.kick(ErrorCode::SessionReplaced);
                state.unwatch_all(user, &old);
            }
            None => state.announce(user, true),
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
            state.announce(user, false);
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
            .filter(|u| state.sessions.contains_key(*u))
            .map(|u| u.to_string())
            .collect();
        online.sort_unstable();
        online.dedup();
        Ok(online)
    }

    /// Queues `msg` for `to`.
    pub fn route(&self, to: &Username, msg: ServerMessage) -> Result<(), RouteError> {
        let state = self.state();
        let session = state.sessions.get(to).ok_or(RouteError::Offline)?;
        if session.push(msg) {
            Ok(())
        } else {
            Err(RouteError::SlowConsumer)
        }
    }

    /// Names of everyone online, sorted.
    pub fn online(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .state()
            .sessions
            .keys()
            .map(|u| u.to_string())
            .collect();
        names.sort_unstable();
        names
    }

    pub fn online_count(&self) -> usize {
        self.state().sessions.len()
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

        let msg = ServerMessage::Deliver {
            envelope_id: 1,
            from: "alice".into(),
            payload: vec![1],
        };
        router.route(&name("bob"), msg.clone()).unwrap();
        assert_eq!(*bob.outbox.try_recv().unwrap(), msg);
        assert_eq!(
            router.route(&name("carol"), msg.clone()),
            Err(RouteError::Offline)
        );

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

    #[test]
    fn full_queue_kicks_the_slow_reader() {
        let router = Router::default();
        let slow = router.join(&name("slow"), 1, 2);
        let msg = ServerMessage::Deliver {
            envelope_id: 1,
            from: "x".into(),
            payload: vec![],
        };
        assert!(router.route(&name("slow"), msg.clone()).is_ok());
        assert!(router.route(&name("slow"), msg.clone()).is_ok());
        assert_eq!(
            router.route(&name("slow"), msg),
            Err(RouteError::SlowConsumer)
        );
        assert_eq!(*slow.kicked.borrow(), Some(ErrorCode::SlowConsumer));
    }
}
