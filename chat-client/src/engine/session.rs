//! One connected session: the loop that waits at once on the server's frames, the front
//! end's commands, the outbox and the engine's timers, until the connection ends.

use std::collections::{BTreeSet, HashSet};

use chat_protocol::ClientMessage;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use tokio::time::{Instant, sleep_until};

use super::{Commands, Engine, HOUSEKEEPING, META_QUEUE_MAX_AGE, Pending, READ_BATCH, SessionEnd};
use crate::api::{Command, ConnectionState, Event};
use crate::net::{self, Session};

impl Engine {
    /// One connected session, until it ends.
    pub(super) async fn session(
        &mut self,
        session: Session,
        commands: &mut Commands,
    ) -> SessionEnd {
        let Session {
            mut conn,
            max_frame,
            queue_max_age_secs,
            clock_offset_ms,
            ..
        } = session;
        self.max_frame = max_frame;
        self.relay_clock = Some(clock_offset_ms);
        if let Err(e) = self.store.set_meta(META_QUEUE_MAX_AGE, queue_max_age_secs) {
            self.store_error(e);
        }
        self.online = true;
        let end = self.session_loop(&mut conn, commands).await;
        self.online = false;
        self.relay_clock = None;
        self.out.clear();
        self.stalled.clear();
        self.left_after.clear();
        self.offers.forget_waiting();
        end
    }

    pub(super) async fn session_loop(
        &mut self,
        conn: &mut net::Conn,
        commands: &mut Commands,
    ) -> SessionEnd {
        self.pending.clear();
        self.shed_fence = false;
        self.awaiting_key.clear();
        self.checked_keys.clear();
        self.in_flight.clear();
        self.retired_out.clear();
        self.hold.clear();
        self.online_peers.clear();
        self.receipts_in_flight.clear();
        self.retries_in_flight.clear();
        self.group_in_flight.clear();
        self.unsettled_in_flight();
        self.synced = false;
        self.forget_member_checks();
        self.acks.clear();
        self.out.clear();
        // The sending epochs go on across connections (they end by count and age, at a key
        // change and at a retry request): a new one per connection cost each contact an
        // RSA unwrap per reconnect, and a flaky link met their offer throttle (20, then
        // one per 30 s), delaying every message after a reconnect.
        if !self.ready_sent {
            self.ready_sent = true;
            self.sink.emit(Event::Ready {
                user: self.me.to_string(),
                fingerprint: self.identity.fingerprint().to_string(),
            });
            match self.store.contacts().and_then(|users| {
                let verified = self.store.verified_contacts()?;
                let archived = self.store.archived_contacts()?;
                let mut last = self.store.last_messages()?;
                last.retain(|m| users.binary_search(&m.user).is_ok());
                Ok((users, verified, last, archived))
            }) {
                Ok((users, verified, last, archived)) => self.sink.emit(Event::Contacts {
                    users,
                    verified,
                    last,
                    archived,
                }),
                Err(e) => self.store_error(e),
            }
            self.group_command(Command::Groups);
        }
        self.connection_event(ConnectionState::Connected, None);

        // Presence is only sent to watchers: follow our contacts on every connection, the
        // most recent conversations first (a session may follow only so many).
        self.watching.clear();
        let mut all = match self.store.contacts_by_recency() {
            Ok(users) => users,
            Err(e) => {
                self.store_error(e);
                Vec::new()
            }
        };
        let known: HashSet<&String> = all.iter().collect();
        let asked: Vec<String> = self
            .watch_list
            .iter()
            .filter(|u| !known.contains(u))
            .cloned()
            .collect();
        // Fellow group members too (their presence dots), after the contacts.
        let me = self.me.clone();
        let members: BTreeSet<String> = self
            .groups
            .values()
            .map(|g| g.membership.current())
            .filter(|s| s.is_member(&me))
            .flat_map(|s| s.members.iter().map(|u| u.to_string()))
            .filter(|u| !known.contains(u) && !asked.contains(u))
            .collect();
        all.extend(asked);
        all.extend(members);
        self.watch_list.extend(all.iter().cloned());
        self.send_watch(all);
        // Group sends wait until the backlog is read (a removal may be in it).
        self.request(Pending::Sync, |id| ClientMessage::Sync { id });
        self.release_held_for_usable_keys();
        self.housekeeping();
        self.flush_due = true;

        let ping_interval = self.config.ping_interval;
        let mut last_heard = Instant::now();
        let mut pinged = false;
        let mut housekeeping_at = Instant::now() + HOUSEKEEPING;
        loop {
            if self.window_blocked && !self.send_window_full() {
                self.window_blocked = false;
                self.flush_due = true;
            }
            if std::mem::take(&mut self.flush_due) {
                self.flush();
            }
            if !self.acks.is_empty() {
                self.out.push(ClientMessage::Ack {
                    envelope_ids: std::mem::take(&mut self.acks),
                });
            }
            for msg in self.out.drain(..) {
                if let Err(e) = conn.feed(msg).await {
                    return SessionEnd::Lost(format!("write failed: {e}"));
                }
            }
            if let Err(e) = conn.flush().await {
                return SessionEnd::Lost(format!("write failed: {e}"));
            }
            // Our acknowledgements are written: renew the connection for what was left to
            // the relay as soon as nothing else waits.
            if self.time_to_resync() {
                return SessionEnd::Lost(
                    "catching up: messages left on the relay to keep their order are delivered again".into(),
                );
            }
            if let Some(deadline) = self.draining_until
                && (Instant::now() >= deadline || self.store.outbox_len().unwrap_or(0) == 0)
            {
                return SessionEnd::Shutdown;
            }
            let wake = if pinged {
                last_heard + ping_interval * 3
            } else {
                last_heard + ping_interval
            };
            let wake = wake.min(housekeeping_at);
            let wake = self.offers.next_wake().map_or(wake, |t| wake.min(t));
            let wake = self.draining_until.map_or(wake, |d| wake.min(d));
            let wake = self.retry_at.map_or(wake, |r| wake.min(r));
            tokio::select! {
                frame = conn.next() => {
                    let mut frame = frame;
                    // Handle what is already buffered before writing the answers, so
                    // acknowledgements and receipts go out in batches.
                    for handled in 1.. {
                        match frame {
                            None => return SessionEnd::Lost("the server closed the connection".into()),
                            Some(Err(e)) => return SessionEnd::Lost(crate::net::connection_lost(&e)),
                            Some(Ok(msg)) => {
                                last_heard = Instant::now();
                                pinged = false;
                                if let Some(end) = self.server_message(msg) {
                                    return end;
                                }
                            }
                        }
                        if handled == READ_BATCH {
                            break;
                        }
                        // Only what is buffered already: a frame taken here is handled.
                        match conn.next().now_or_never() {
                            Some(next) => frame = next,
                            None => break,
                        }
                    }
                },
                cmd = commands.recv() => match cmd {
                    None => return SessionEnd::Shutdown,
                    Some(Command::Shutdown { flush_for }) => {
                        self.draining_until = Some(Instant::now() + flush_for);
                    }
                    Some(Command::Send { to, text }) => {
                        // Texts written together are queued with one commit.
                        if self.enqueue_burst(commands.burst(to, text)) {
                            self.flush_due = true;
                        }
                    }
                    Some(cmd) => self.command_online(cmd),
                },
                Some(done) = self.offers.done_rx.recv() => self.offer_unwrapped(done),
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if self.retry_at.is_some_and(|r| now >= r) {
                        self.retry_at = None;
                        self.flush_due = true;
                        self.resettle();
                        // A relay that sent no fence ping (older than protocol 8's).
                        self.lift_shed_fence_if_drained();
                    }
                    if self.offers.next_wake().is_some_and(|t| now >= t) {
                        self.offers_unthrottled();
                    }
                    if now >= housekeeping_at {
                        housekeeping_at = now + HOUSEKEEPING;
                        self.housekeeping();
                        self.retry_stalled();
                        self.flush_undecryptable();
                    }
                    if now >= last_heard + ping_interval * 3 {
                        return SessionEnd::Lost("the server stopped answering".into());
                    }
                    if !pinged && now >= last_heard + ping_interval {
                        pinged = true;
                        self.out.push(ClientMessage::Ping { nonce: rand::rng().next_u64() });
                    }
                }
            }
        }
    }
}
