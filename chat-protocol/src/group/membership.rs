//! Group membership as a chain of signed changes.
//!
//! A [`GroupState`] is the group's name, members and admins at one version; its
//! [`hash`](GroupState::hash) commits to all of that and to the hash of the state before it,
//! so the hashes form a chain. A [`Change`] names the state it changes (hash and version)
//! and is signed (RSA-PSS-SHA256) by its author's identity key: an admin's, or for
//! [`ChangeKind::Leave`] the leaving member's. Every member checks each change with
//! [`Membership::receive`] against the author's *pinned* key and its own state, so a relay
//! can delay or drop changes but never make one, and a member that is not an admin cannot
//! either.
//!
//! Two admins may change the same state at once (a fork). While the change applied is
//! still the newest, every member resolves such a race the same way, whatever order the
//! changes arrive in: a change that removes the other's author wins (two admins removing
//! each other: the more senior admin); otherwise the one with the smaller
//! [`ChangeId`]. The loser is undone and reported as superseded, so its
//! author can make it again on the new state. A change forking from anything older than
//! the parent of the current state is refused, so nobody — in particular an admin since
//! removed, who could sign and grind ids at will — can rewrite more than the last step,
//! and a removal always beats its target's rival change. Changes older than the
//! remembered history ([`HISTORY`] states) are refused as stale.

use std::collections::VecDeque;

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use super::change::{Change, ChangeError, ChangeKind, GroupState, SignedChange, apply};
use super::{ChangeId, GroupId, StateHash};
use crate::identity::{Identity, PublicIdentity};
use crate::username::Username;

/// States remembered per group: forks and replays within them are recognised as such.
pub const HISTORY: usize = 64;
/// Version of [`Membership::to_bytes`].
const MEMBERSHIP_VERSION: u8 = 1;

/// Whether `new` beats `rival`, two changes of `state`: a change removing the other's
/// author wins; two admins removing each other: the more senior admin (admin since an
/// earlier version; the same: the name that sorts first) — so an admin removed by a
/// junior one may answer in kind, a junior one removed cannot; otherwise the smaller id.
fn wins_race(
    state: &GroupState,
    new: &SignedChange,
    new_id: &ChangeId,
    rival: &SignedChange,
    rival_id: &ChangeId,
) -> bool {
    let removes = |c: &SignedChange, user: &Username| matches!(&c.change.kind, ChangeKind::Remove { users } if users.contains(user));
    match (
        removes(new, &rival.change.author),
        removes(rival, &new.change.author),
    ) {
        (true, true) => {
            let seniority = |c: &SignedChange| {
                let since = state.admins.get(&c.change.author).copied();
                (since.unwrap_or(u64::MAX), c.change.author.clone())
            };
            seniority(new) < seniority(rival)
        }
        (true, false) => true,
        (false, true) => false,
        (false, false) => new_id < rival_id,
    }
}

/// How [`Membership::receive`] dealt with a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Applied; the group is now `state`. `superseded` lists changes undone because this
    /// one won a fork (oldest first): their authors may make them again.
    Applied {
        state: GroupState,
        superseded: Vec<SignedChange>,
    },
    /// It names a version this member has not reached, or a state of its newest version it
    /// has not seen (a rival change that may still win): keep it, and offer it again
    /// after the next change is applied (an earlier change may still be on its way).
    Ahead,
    /// The author's key is needed (and not pinned): fetch it, then offer the change again.
    NeedKey(Username),
    /// Refused; nothing changed.
    Refused(Refusal),
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this change was already applied (a replay)")]
    Replayed,
    #[error("this change forks the group's history and lost to the change applied instead")]
    Forked,
    #[error("this change names a state older than the remembered history")]
    Stale,
    #[error("{0}")]
    Invalid(ChangeError),
}

impl Refusal {
    /// Stable snake_case name for events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Replayed => "replayed",
            Self::Forked => "forked",
            Self::Stale => "stale",
            Self::Invalid(ChangeError::BadSignature) => "bad_signature",
            Self::Invalid(ChangeError::NotAdmin(_)) => "not_admin",
            Self::Invalid(_) => "invalid",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    state: GroupState,
    hash: StateHash,
    /// The change that made `state`; `None` for a state given whole (on joining).
    change: Option<SignedChange>,
    change_id: ChangeId,
}

/// The persisted form: version byte, then postcard.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u8,
    entries: Vec<Entry>,
}

/// A member's view of one group: the current state and the recent ones, each with the
/// change that made it (for recognising replays and resolving forks).
#[derive(Debug, Clone)]
pub struct Membership {
    /// Oldest first; never empty; the last is the current state.
    entries: VecDeque<Entry>,
}

/// The persisted membership could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stored group membership is damaged or from a newer version")]
pub struct MembershipStateError;

impl Membership {
    /// Creates a group: signs the `Create` change. Returns the membership and the change
    /// to send to every other member.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        rng: &mut impl CryptoRng,
        identity: &Identity,
        author: &Username,
        id: GroupId,
        name: &str,
        members: Vec<Username>,
        created_ms: u64,
        max_members: usize,
    ) -> Result<(Self, SignedChange), ChangeError> {
        let change = Change {
            group: id,
            prev: [0; 32],
            prev_version: 0,
            author: author.clone(),
            created_ms,
            kind: ChangeKind::Create {
                name: name.to_owned(),
                members,
            },
        };
        let state = apply(None, &change, max_members)?;
        let signed = change.sign(rng, identity)?;
        Ok((Self::start(state, Some(signed.clone())), signed))
    }

    /// Joins a group from its first change (`Create`), checked against the author's key.
    pub fn from_create(
        change: SignedChange,
        author: &PublicIdentity,
        max_members: usize,
    ) -> Result<Self, ChangeError> {
        change.verify(author)?;
        let state = apply(None, &change.change, max_members)?;
        Ok(Self::start(state, Some(change)))
    }

    /// Joins a group we were added to: `prior` is the state the adding change changed, as
    /// the admin who added us gave it (trusted as theirs: it came over their end-to-end
    /// channel); `change` must be signed by `author` and apply to it.
    pub fn join(
        prior: GroupState,
        change: SignedChange,
        author: &PublicIdentity,
        max_members: usize,
    ) -> Result<Self, ChangeError> {
        change.verify(author)?;
        let state = apply(Some(&prior), &change.change, max_members)?;
        let mut joined = Self::start(prior, None);
        joined.push(state, Some(change));
        Ok(joined)
    }

    fn start(state: GroupState, change: Option<SignedChange>) -> Self {
        let mut new = Self {
            entries: VecDeque::new(),
        };
        new.push(state, change);
        new
    }

    fn push(&mut self, state: GroupState, change: Option<SignedChange>) {
        let change_id = change.as_ref().map_or([0; 32], SignedChange::id);
        self.entries.push_back(Entry {
            hash: state.hash(),
            state,
            change,
            change_id,
        });
        while self.entries.len() > HISTORY {
            self.entries.pop_front();
        }
    }

    /// The current state.
    pub fn current(&self) -> &GroupState {
        &self.entries.back().expect("never empty").state
    }

    /// Hash of the current state: what the next change must name.
    pub fn head(&self) -> StateHash {
        self.entries.back().expect("never empty").hash
    }

    /// The change that made the current state, if it was not given whole.
    pub fn last_change(&self) -> Option<&SignedChange> {
        self.entries.back().expect("never empty").change.as_ref()
    }

    /// Whether `author` may make the change `kind` to the current state (what
    /// [`Membership::make`] would refuse, without signing or changing anything): e.g. to
    /// refuse a change before asking the relay whether its new members exist.
    ///
    /// # Errors
    /// The [`ChangeError`] `make` would return.
    pub fn check(
        &self,
        author: &Username,
        kind: ChangeKind,
        max_members: usize,
    ) -> Result<(), ChangeError> {
        let change = Change {
            group: self.current().id,
            prev: self.head(),
            prev_version: self.current().version,
            author: author.clone(),
            created_ms: 0,
            kind,
        };
        apply(Some(self.current()), &change, max_members).map(drop)
    }

    /// Whether `author` may create a group named `name` with `members` (what
    /// [`Membership::create`] would refuse, without signing).
    ///
    /// # Errors
    /// [`ChangeError::BadName`] or [`ChangeError::TooManyMembers`].
    pub fn check_create(
        author: &Username,
        name: &str,
        members: Vec<Username>,
        max_members: usize,
    ) -> Result<(), ChangeError> {
        let change = Change {
            group: [0; 16],
            prev: [0; 32],
            prev_version: 0,
            author: author.clone(),
            created_ms: 0,
            kind: ChangeKind::Create {
                name: name.to_owned(),
                members,
            },
        };
        apply(None, &change, max_members).map(drop)
    }

    /// Makes and applies a change of ours to the current state; returns it signed, to send
    /// to the members (and, for `Add`, with [`current`](Self::current) *before* it, to the
    /// new ones).
    pub fn make(
        &mut self,
        rng: &mut impl CryptoRng,
        identity: &Identity,
        author: &Username,
        kind: ChangeKind,
        created_ms: u64,
        max_members: usize,
    ) -> Result<SignedChange, ChangeError> {
        let change = Change {
            group: self.current().id,
            prev: self.head(),
            prev_version: self.current().version,
            author: author.clone(),
            created_ms,
            kind,
        };
        let state = apply(Some(self.current()), &change, max_members)?;
        let signed = change.sign(rng, identity)?;
        self.push(state, Some(signed.clone()));
        Ok(signed)
    }

    /// Checks a change received from anyone and applies it if valid. `key` gives a user's
    /// *pinned* key (None if not pinned yet).
    pub fn receive(
        &mut self,
        signed: &SignedChange,
        key: impl Fn(&Username) -> Option<PublicIdentity>,
        max_members: usize,
    ) -> Received {
        let change = &signed.change;
        if change.group != self.current().id {
            return Received::Refused(Refusal::Invalid(ChangeError::WrongGroup));
        }
        let id = signed.id();
        if self.entries.iter().any(|e| e.change_id == id) {
            return Received::Refused(Refusal::Replayed);
        }
        let head_version = self.current().version;
        if change.prev_version > head_version {
            return Received::Ahead;
        }
        let Some(at) = self
            .entries
            .iter()
            .position(|e| e.state.version == change.prev_version)
        else {
            return Received::Refused(Refusal::Stale);
        };
        if self.entries[at].hash != change.prev {
            // It changes a state we never had. Of our newest version: the change that made
            // that state is a rival of our newest change, may still reach us and win (its
            // author's client then builds on it, as this change does) — keep it like an
            // early one. Older: a branch that already lost.
            if change.prev_version == head_version {
                return Received::Ahead;
            }
            return Received::Refused(Refusal::Forked);
        }
        if let Some(rival) = self.entries.get(at + 1) {
            let newest = at + 2 == self.entries.len();
            let wins = newest
                && rival.change.as_ref().is_some_and(|change| {
                    wins_race(
                        &self.entries[at].state,
                        signed,
                        &id,
                        change,
                        &rival.change_id,
                    )
                });
            if !wins {
                return Received::Refused(Refusal::Forked);
            }
        }
        let Some(author_key) = key(&change.author) else {
            return Received::NeedKey(change.author.clone());
        };
        if let Err(e) = signed.verify(&author_key) {
            return Received::Refused(Refusal::Invalid(e));
        }
        let state = match apply(Some(&self.entries[at].state), change, max_members) {
            Ok(state) => state,
            Err(e) => return Received::Refused(Refusal::Invalid(e)),
        };
        let superseded = self
            .entries
            .drain(at + 1..)
            .filter_map(|e| e.change)
            .collect();
        self.push(state.clone(), Some(signed.clone()));
        Received::Applied { state, superseded }
    }

    /// The persisted form (store it after every applied change).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&Stored {
            version: MEMBERSHIP_VERSION,
            entries: self.entries.iter().cloned().collect(),
        })
        .expect("a membership always encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MembershipStateError> {
        let stored: Stored = postcard::from_bytes(bytes).map_err(|_| MembershipStateError)?;
        if stored.version != MEMBERSHIP_VERSION || stored.entries.is_empty() {
            return Err(MembershipStateError);
        }
        Ok(Self {
            entries: stored.entries.into(),
        })
    }
}
