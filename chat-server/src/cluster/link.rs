//! The relay's NATS link: whether it serves, how long an outage its sessions ride out,
//! and what is checked when the link comes back before it serves again.

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::{Cluster, layout, sessions};

/// How long a relay keeps its sessions while NATS is unreachable: the NATS client finds
/// another node of the cluster within moments when one fails; a longer outage closes them
/// (clients reconnect, to another relay if they know one). Shorter than a heartbeat's
/// life less one beat, so other relays do not take this one for dead meanwhile.
pub const LINK_GRACE: Duration = Duration::from_secs(8);
const _: () = assert!(
    LINK_GRACE.as_millis() + sessions::HEARTBEAT.as_millis() < sessions::RELAY_TTL.as_millis()
);

/// How long a relay whose NATS link came back waits for a verdict on the sessions
/// bucket's history before serving (the heartbeats go on checking).
const VERDICT_PATIENCE: Duration = Duration::from_secs(5);

/// How long the first check of the layout after the link came back may take (each one
/// after a check that ran out, twice as long, up to [`LAYOUT_TRY_MOST`]). A request that
/// reaches a stream while it has no leader (in the elections that follow a node's death)
/// is never answered; without this bound each check waited out the client's request
/// timeout, and the relay refused logins for some 4 s after the elections had ended.
const LAYOUT_TRY: Duration = Duration::from_secs(2);
const LAYOUT_TRY_MOST: Duration = Duration::from_secs(32);

impl Cluster {
    /// Whether the relay can serve, and its changes: `false` while NATS is unreachable
    /// and until the layout is back in place after it returns.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Waits until NATS has been unreachable for `grace` without a break (true: the
    /// relay's sessions should be closed), or the relay serves again (false). A link that
    /// comes back ends the wait for it; losing it again starts a new one.
    pub async fn outage_outlasts(&self, grace: Duration) -> bool {
        let mut link = self.link.clone();
        let mut serving = self.serving.subscribe();
        loop {
            if *serving.borrow_and_update() {
                return false;
            }
            if !*link.borrow_and_update() {
                let back = tokio::time::timeout(grace, link.wait_for(|up| *up))
                    .await
                    .map(|up| up.is_ok());
                match back {
                    Err(_) => return true,
                    Ok(true) => continue,
                    Ok(false) => std::future::pending().await,
                }
            }
            // Back, and the layout not yet checked.
            let changed = tokio::select! {
                changed = serving.changed() => changed,
                changed = link.changed() => changed,
            };
            if changed.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Follows the NATS connection and says (through [`Cluster::connection`]) whether the
    /// relay serves: not while NATS is unreachable; when it is back, once the stream and
    /// buckets are there — made again if missing (a cluster whose every node restarted
    /// has lost the memory-backed session buckets; a relay would otherwise serve with
    /// every session write failing) — and the sessions bucket's history is checked (if it
    /// was made anew or lost its writes, what was learnt from it is forgotten and this
    /// relay's sessions are written again; see [`sessions`]). Never returns.
    pub async fn keep_serving(&self, router: &crate::router::Router) -> ! {
        let mut link = self.link.clone();
        let (config, nats) = &*self.spec;
        // The first connection (made before serving began) is no news.
        let mut lost = false;
        let drops = || self.drops.load(std::sync::atomic::Ordering::SeqCst);
        let mut drops_seen = drops();
        loop {
            if link.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let up = *link.borrow_and_update();
            // Read after the link (a drop is counted before it is told): lost and back
            // again since the last look is a loss too, the layout and history checked
            // again before new sessions are taken.
            if drops() != drops_seen || !up {
                lost = true;
                self.serving.send_replace(false);
            }
            if !up || !lost {
                continue;
            }
            // Back. Until the layout is checked, new sessions are refused.
            let mut try_for = LAYOUT_TRY;
            while *link.borrow() {
                let checking_from = drops();
                let checked =
                    tokio::time::timeout(try_for, layout::layout(&self.js, config, nats, false));
                let Ok(checked) = checked.await else {
                    // A stream without a leader yet: asked again (a slow cluster gets
                    // longer each time).
                    tracing::debug!("the layout was not checked within {try_for:?}; again");
                    try_for = (try_for * 2).min(LAYOUT_TRY_MOST);
                    tokio::time::sleep(super::patience::PAUSE).await;
                    continue;
                };
                match checked {
                    Ok(_) => {
                        // A verdict needs the bucket's stream to have a leader, soon
                        // after a cluster restart; without one, the heartbeats check.
                        let deadline = tokio::time::Instant::now() + VERDICT_PATIENCE;
                        while !self.sessions.check_history(router).await
                            && *link.borrow()
                            && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        if !*link.borrow() {
                            // Lost again meanwhile: not serving until it is back.
                            break;
                        }
                        if drops() != checking_from {
                            // Lost and back meanwhile: checked again.
                            continue;
                        }
                        drops_seen = checking_from;
                        lost = false;
                        self.serving.send_replace(true);
                        break;
                    }
                    Err(e) => {
                        warn!("NATS is reachable but the cluster's layout is not ready: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}
