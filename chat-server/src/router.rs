//! Who is online, and handing messages to their connections.
//!
//! Each logged-in connection registers a bounded queue here. Routing never waits: a full
//! queue means that client is not reading, so it is disconnected (`slow_consumer`) rather
//! than letting the server's memory grow.

use std::collections::HashMap;
use std::sync::Mutex;

use chat_protocol::{ErrorCode, ServerMessage, Username};
use tokio::sync::{mpsc, watch};

/// The router's handle on one logged-in connection.
#[derive(Debug)]
struct Session {
    /// Distinguishes a replaced session from its successor under the same name.
    conn_id: u64,
    outbox: mpsc::Sender<ServerMessage>,
    /// Tells the connection to close, and why.
    kick: watch::Sender<Option<ErrorCode>>,
}

impl Session {
    fn kick(&self, reason: ErrorCode) {
        self.kick.send_replace(Some(reason));
    }

    /// Queues `msg`; a full queue kicks the session. Returns whether it was queued.
    fn push(&self, msg: ServerMessage) -> bool {
        match self.outbox.try_send(msg) {
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
    pub outbox: mpsc::Receiver<ServerMessage>,
    pub kicked: watch::Receiver<Option<ErrorCode>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    Offline,
    SlowConsumer,
}

#[derive(Debug, Default)]
pub struct Router {
    // std Mutex: critical sections are map operations and non-blocking `try_send`s,
    // never an `.await`.
    sessions: Mutex<HashMap<Username, Session>>,
}

impl Router {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Username, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
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
        };
        let mut sessions = self.sessions();
        match sessions.insert(user.clone(), session) {
            Some(old) => old.kick(ErrorCode::SessionReplaced),
            None => broadcast(&sessions, user, true),
        }
        Membership { outbox, kicked }
    }

    /// Removes `user`'s session if it is still `conn_id` (not already replaced).
    pub fn leave(&self, user: &Username, conn_id: u64) {
        let mut sessions = self.sessions();
        if sessions.get(user).is_some_and(|s| s.conn_id == conn_id) {
            sessions.remove(user);
            broadcast(&sessions, user, false);
        }
    }

    /// Queues `msg` for `to`.
    pub fn route(&self, to: &Username, msg: ServerMessage) -> Result<(), RouteError> {
        let sessions = self.sessions();
        let session = sessions.get(to).ok_or(RouteError::Offline)?;
        if session.push(msg) {
            Ok(())
        } else {
            Err(RouteError::SlowConsumer)
        }
    }

    /// Names of everyone online, sorted.
    pub fn online(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sessions().keys().map(|u| u.to_string()).collect();
        names.sort_unstable();
        names
    }

    pub fn online_count(&self) -> usize {
        self.sessions().len()
    }
}

fn broadcast(sessions: &HashMap<Username, Session>, user: &Username, online: bool) {
    for (name, session) in sessions {
        if name != user {
            session.push(ServerMessage::Presence {
                username: user.to_string(),
                online,
            });
        }
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
        let mut bob = router.join(&name("bob"), 2, 8);
        assert_eq!(
            alice.outbox.try_recv().unwrap(),
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
        assert_eq!(bob.outbox.try_recv().unwrap(), msg);
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
            alice.outbox.try_recv().unwrap(),
            ServerMessage::Presence {
                username: "bob".into(),
                online: false
            }
        );
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
