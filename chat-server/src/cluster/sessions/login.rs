//! A login's session write. It is conditional on what the login read from the bucket's
//! stream leader, so a write that arrives late never replaces a newer login: an attempt
//! whose answer was lost in an election, or one the NATS client held while its link was
//! down, may land after the client gave up on this relay and logged in at another.
//!
//! Attempts stop at the login's deadline (at most [`LOGIN_WINDOW`] after the connection
//! was accepted), before our client gives up on a login (after 15 s) and may log in
//! elsewhere; an attempt sent before then can only land on top of what was read.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use chat_protocol::Username;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::super::patience::TRY;
use super::super::{cluster_err, token};
use super::{Login, Mine, Sessions};
use crate::store::StoreError;

/// The longest a login may spend writing its session, counted from the connection's
/// accept: shorter than our client's own login deadline (15 s), so the client is still
/// waiting for this relay when the last attempt is sent.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(10);

/// The header a session write carries: when its login began (Unix ms, the writing
/// relay's clock). A rewrite keeps it, so it is never taken for a newer login.
pub(super) const STARTED_HEADER: &str = "Chat-Login-Started";

/// What the bucket holds under a user's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Held {
    /// Nothing: never written, or the bucket lost its history.
    Nothing,
    /// A deletion marker (a logout, a sweep) at this revision.
    Deleted(u64),
    /// A session: its owner (`"<relay id> <connection id>"`), revision, and when its
    /// login began (Unix ms; absent if written without [`STARTED_HEADER`]).
    Session(String, u64, Option<u64>),
}

/// What a login (or a rewrite) does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The key holds our session at this revision (an attempt whose answer was lost).
    Written(u64),
    /// A login written after this one first read the key holds it: this one is replaced.
    Replaced,
    /// Write on top of this revision (0: the key holds nothing).
    WriteOver(u64),
}

impl Held {
    fn revision(&self) -> u64 {
        match self {
            Held::Nothing => 0,
            Held::Deleted(revision) | Held::Session(_, revision, _) => *revision,
        }
    }

    /// The next step of the login by `owner`, begun at `started_ms`, that first read the
    /// key at revision `base` (0 for a rewrite). A session written since is a newer
    /// login, unless its login began before this one: then it is an older session
    /// written late (a rewrite after a sweep or a lost history, or an attempt that
    /// landed after its client gave up), and this login is the newer one. So is a
    /// session below `base`: written after the bucket lost its history.
    pub(super) fn step(&self, base: u64, owner: &str, started_ms: u64) -> Step {
        match self {
            Held::Session(by, revision, _) if by == owner => Step::Written(*revision),
            Held::Session(_, revision, Some(began)) if *began < started_ms => {
                Step::WriteOver(*revision)
            }
            Held::Session(_, revision, _) if *revision > base => Step::Replaced,
            held => Step::WriteOver(held.revision()),
        }
    }
}

/// Why a conditional session write failed.
#[derive(Debug)]
pub(super) enum WriteError {
    /// The key was written since it was read.
    Moved,
    /// NATS did not take it (the error).
    Other(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Moved => write!(f, "the key was written meanwhile"),
            WriteError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// A login writing its session, in [`super::Known::logging_in`] while it lives.
struct Writing<'a> {
    sessions: &'a Sessions,
    attempt: (Username, u64),
}

impl<'a> Writing<'a> {
    fn start(sessions: &'a Sessions, user: &Username, conn_id: u64) -> Self {
        let attempt = (user.clone(), conn_id);
        sessions.known().logging_in.insert(attempt.clone());
        Self { sessions, attempt }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.sessions.known().logging_in.remove(&self.attempt);
    }
}

impl Sessions {
    /// Writes `user`'s session on connection `conn_id`, retrying until `deadline` (while
    /// the bucket's stream elects a leader after a node died), and says whether a newer
    /// login elsewhere already replaced it. Errors: NATS did not take the write in time.
    pub(in crate::cluster) async fn login(
        &self,
        user: &Username,
        conn_id: u64,
        deadline: Instant,
    ) -> Result<Login, StoreError> {
        let owner = self.owner(conn_id);
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Until the session is in `mine` (or the login failed, or its future was dropped),
        // a sweep leaves a key naming this connection alone.
        let _writing = Writing::start(self, user, conn_id);
        let written = self.write_session(user, &owner, started_ms, deadline).await;
        let seen_newer = {
            let mut known = self.known();
            let revision = match written {
                Ok(Some(revision)) => revision,
                Ok(None) => {
                    return Ok(Login {
                        revision: 0,
                        replaced: true,
                    });
                }
                Err(e) => return Err(e),
            };
            let mine = Mine {
                conn: conn_id,
                revision,
                started_ms,
            };
            known.mine.insert(user.clone(), mine);
            known.high = known.high.max(revision);
            (revision, known.newer_seen(user, &owner, revision))
        };
        let (revision, true) = seen_newer else {
            return Ok(Login {
                revision: seen_newer.0,
                replaced: false,
            });
        };
        let replaced = self.replaced_since(user, &owner, revision).await?;
        if replaced {
            self.known().forget(user, conn_id);
        }
        Ok(Login { revision, replaced })
    }

    /// Whether the key now holds a login written after ours at `revision`, which a
    /// follower saw: checked in the bucket itself, as its stream's leader says (a bucket
    /// that lost its history hands out revisions from 1 again, below the ones
    /// remembered; a member that lags behind would not have the newer write yet).
    pub(super) async fn replaced_since(
        &self,
        user: &Username,
        owner: &str,
        revision: u64,
    ) -> Result<bool, StoreError> {
        Ok(match self.held(&token(user)).await? {
            // Written after ours: a newer login (even if it has logged out since), unless
            // it is our own session written again after a loss.
            Held::Session(by, r, _) if r > revision => by != owner,
            Held::Deleted(r) if r > revision => true,
            // Ours is the newest write: the one remembered is no longer in the bucket.
            _ => {
                self.known().lost = true;
                false
            }
        })
    }

    /// Writes the session (see the module's doc): `Some(revision)` once written, `None`
    /// if a newer login took the key first.
    async fn write_session(
        &self,
        user: &Username,
        owner: &str,
        started_ms: u64,
        deadline: Instant,
    ) -> Result<Option<u64>, StoreError> {
        let key = token(user);
        let mut base = None;
        loop {
            let failure = match timeout_at(deadline, self.held(&key)).await {
                Ok(Ok(held)) => {
                    let base = *base.get_or_insert(held.revision());
                    match held.step(base, owner, started_ms) {
                        Step::Written(revision) => return Ok(Some(revision)),
                        Step::Replaced => return Ok(None),
                        Step::WriteOver(expected) => {
                            let write = self.write_over(&key, owner, expected, started_ms);
                            // Given `TRY` (one sent while the bucket has no leader is
                            // never answered), not past the deadline.
                            let this_try = (Instant::now() + TRY).min(deadline);
                            match timeout_at(this_try, write).await {
                                Ok(Ok(revision)) => return Ok(Some(revision)),
                                // Written meanwhile: read again at once.
                                Ok(Err(WriteError::Moved)) => None,
                                Ok(Err(WriteError::Other(e))) => Some(e),
                                Err(_) => Some("NATS did not answer in time".to_owned()),
                            }
                        }
                    }
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("NATS did not answer in time".to_owned()),
            };
            if Instant::now() >= deadline {
                let why = failure.unwrap_or_else(|| "other writes kept coming".to_owned());
                return Err(StoreError::Cluster(format!(
                    "the session could not be written: {why}"
                )));
            }
            if let Some(e) = failure {
                debug!(%user, "cannot write the session yet ({e}); trying again");
                let pause = Instant::now() + Duration::from_millis(250);
                tokio::time::sleep_until(pause.min(deadline)).await;
            }
        }
    }

    /// Writes `owner`'s session under `key` if the key's last revision is still
    /// `expected` (0: nothing), with when its login began ([`STARTED_HEADER`]); returns
    /// the new revision. (`kv::Store::update` with a header: the bucket is reached
    /// through the default JetStream API prefix, so its put prefix is the subject's.)
    pub(super) async fn write_over(
        &self,
        key: &str,
        owner: &str,
        expected: u64,
        started_ms: u64,
    ) -> Result<u64, WriteError> {
        let prefix = self
            .bucket
            .put_prefix
            .as_ref()
            .unwrap_or(&self.bucket.prefix);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        headers.insert(STARTED_HEADER, started_ms.to_string().as_str());
        let value = Bytes::from(owner.to_owned());
        let moved = |e: &PublishError| e.kind() == PublishErrorKind::WrongLastSequence;
        let ack = self
            .js
            .publish_with_headers(format!("{prefix}{key}"), headers, value)
            .await
            .map_err(|e| WriteError::Other(e.to_string()))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if moved(&e) => Err(WriteError::Moved),
            Err(e) => Err(WriteError::Other(e.to_string())),
        }
    }

    /// What the bucket holds under `key`, read from its stream's leader (a direct get may
    /// be answered by a member that lags behind, which would make the first read older
    /// than it is). Waits for a place in the API gate first (a relay's clients all log in
    /// again after it restarts), then at most [`TRY`] for the answer (a read sent while
    /// the bucket has no leader is never answered).
    pub(super) async fn held(&self, key: &str) -> Result<Held, StoreError> {
        let subject = format!("{}{key}", self.bucket.prefix);
        let _through = self.api.pass().await;
        let read = self.bucket.stream.get_last_raw_message_by_subject(&subject);
        let Ok(read) = tokio::time::timeout(TRY, read).await else {
            return Err(StoreError::Cluster(
                "the bucket's leader did not answer in time".into(),
            ));
        };
        match read {
            Ok(message) => {
                let header = |name: &str| message.headers.get(name).map(|v| v.as_str());
                // Deletes and purges carry `KV-Operation`, limit markers a reason.
                let marker = matches!(header("KV-Operation"), Some("DEL" | "PURGE"))
                    || header("Nats-Marker-Reason").is_some();
                Ok(if marker {
                    Held::Deleted(message.sequence)
                } else {
                    let owner = String::from_utf8_lossy(&message.payload).into_owned();
                    let started = header(STARTED_HEADER).and_then(|v| v.parse().ok());
                    Held::Session(owner, message.sequence, started)
                })
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                Ok(Held::Nothing)
            }
            Err(e) => Err(cluster_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Held, Step};

    /// This login: its owner, and when it began (Unix ms).
    const US: &str = "r1 7";
    const NOW: u64 = 1_000_000;

    fn session(owner: &str, revision: u64, started: Option<u64>) -> Held {
        Held::Session(owner.into(), revision, started)
    }

    #[test]
    fn the_first_read_is_written_over() {
        assert_eq!(Held::Nothing.step(0, US, NOW), Step::WriteOver(0));
        assert_eq!(Held::Deleted(12).step(12, US, NOW), Step::WriteOver(12));
        // The previous session, here or elsewhere: this login replaces it.
        let previous = session("r2 3", 12, Some(NOW - 60_000));
        assert_eq!(previous.step(12, US, NOW), Step::WriteOver(12));
        // Written by a relay that does not say when its login began, too.
        assert_eq!(
            session("r2 3", 12, None).step(12, US, NOW),
            Step::WriteOver(12)
        );
    }

    #[test]
    fn a_login_begun_later_and_written_first_is_the_newer_one() {
        // Read at 12; a login elsewhere, begun after ours, wrote at 13 before our write:
        // ours must not land over it (it would close the newer session).
        let newer = session("r2 4", 13, Some(NOW + 1));
        assert_eq!(newer.step(12, US, NOW), Step::Replaced);
        // A relay that does not say when: written after our read, taken for newer.
        assert_eq!(session("r2 4", 13, None).step(12, US, NOW), Step::Replaced);
    }

    #[test]
    fn an_older_session_written_late_is_written_over() {
        // The previous session written again by its relay after a sweep, or an attempt
        // of an abandoned login landing late: begun before ours, so ours is newer.
        let rewritten = session("r2 3", 13, Some(NOW - 20_000));
        assert_eq!(rewritten.step(12, US, NOW), Step::WriteOver(13));
        // A rewrite (base 0) meets a login begun after its session's: that one wins.
        let later = session("r2 4", 13, Some(NOW + 5));
        assert_eq!(later.step(0, US, NOW), Step::Replaced);
    }

    #[test]
    fn a_logout_or_sweep_after_the_first_read_is_written_over() {
        // The previous session's logout or a sweep deleted the key: not a login.
        assert_eq!(Held::Deleted(13).step(12, US, NOW), Step::WriteOver(13));
    }

    #[test]
    fn our_own_write_whose_answer_was_lost_is_taken() {
        assert_eq!(
            session(US, 13, Some(NOW)).step(12, US, NOW),
            Step::Written(13)
        );
    }

    #[test]
    fn after_a_lost_history_the_key_is_written_over() {
        // Read at 40; the bucket lost its history (revisions from 1 again).
        assert_eq!(Held::Nothing.step(40, US, NOW), Step::WriteOver(0));
        // A session below what was read was written after the loss.
        assert_eq!(
            session("r2 3", 2, None).step(40, US, NOW),
            Step::WriteOver(2)
        );
    }
}
