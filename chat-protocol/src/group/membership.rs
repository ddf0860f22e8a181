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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ChangeId, GroupId, StateHash};
use crate::identity::{Identity, PublicIdentity};
use crate::primitives;
use crate::username::Username;

const STATE_CONTEXT: &[u8] = b"secure-chat/v2/group-state";
const CHANGE_CONTEXT: &[u8] = b"secure-chat/v2/group-change";
const CHANGE_ID_CONTEXT: &[u8] = b"secure-chat/v2/group-change-id";
/// States remembered per group: forks and replays within them are recognised as such.
pub const HISTORY: usize = 64;
/// Longest group name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Version of [`Membership::to_bytes`].
const MEMBERSHIP_VERSION: u8 = 1;

/// A group at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub id: GroupId,
    /// Changes applied since (and including) the creation: the created group is version 1.
    pub version: u64,
    pub name: String,
    pub members: BTreeSet<Username>,
    /// Admins (always members too), each with the version of the state that made them
    /// admin: the earlier, the more senior. A group with members always has an admin.
    pub admins: BTreeMap<Username, u64>,
    /// Hash of the state this one was made from; zeros for the created group.
    pub prev: StateHash,
}

impl GroupState {
    /// SHA-256 over a context string and the state's postcard encoding (sets encode
    /// sorted, so equal states hash equal).
    pub fn hash(&self) -> StateHash {
        let mut h = Sha256::new();
        h.update(STATE_CONTEXT);
        h.update(postcard::to_allocvec(self).expect("a group state always encodes"));
        h.finalize().into()
    }

    pub fn is_member(&self, user: &Username) -> bool {
        self.members.contains(user)
    }

    pub fn is_admin(&self, user: &Username) -> bool {
        self.admins.contains_key(user)
    }
}

/// What a change does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Makes the group: the author and `members`, the author its first admin.
    Create {
        name: String,
        members: Vec<Username>,
    },
    /// Adds members (an admin only).
    Add { users: Vec<Username> },
    /// Removes members (an admin only; not the author, who leaves instead).
    Remove { users: Vec<Username> },
    /// The author leaves. If it was the last admin, the remaining member whose name sorts
    /// first becomes admin, so a group with members always has one.
    Leave,
    /// Renames the group (an admin only).
    Rename { name: String },
    /// Makes members admins (an admin only).
    Promote { users: Vec<Username> },
}

/// One change to a group, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub group: GroupId,
    /// Hash of the state changed ([`GroupState::hash`]); zeros for `Create`.
    pub prev: StateHash,
    /// Version of the state changed; 0 for `Create`.
    pub prev_version: u64,
    pub author: Username,
    /// Author's clock, ms since the Unix epoch: shown, never trusted for order.
    pub created_ms: u64,
    pub kind: ChangeKind,
}

/// A change and its author's RSA-PSS-SHA256 signature over [`Change::transcript`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    pub change: Change,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a change is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("the change is not signed by its author's key")]
    BadSignature,
    #[error("the change belongs to another group")]
    WrongGroup,
    #[error("the change does not name the group's current state")]
    WrongState,
    #[error("{0} is not an admin of the group")]
    NotAdmin(Username),
    #[error("{0} is not a member of the group")]
    NotMember(Username),
    #[error("{0} is already a member of the group")]
    AlreadyMember(Username),
    #[error("{0} is already an admin of the group")]
    AlreadyAdmin(Username),
    #[error("the change names nobody")]
    NobodyNamed,
    #[error("an admin leaves a group rather than removing themselves")]
    RemovesAuthor,
    #[error("a group has at most {0} members")]
    TooManyMembers(usize),
    #[error("a group name is 1 to {MAX_NAME_CHARS} characters, with no control characters")]
    BadName,
    #[error("a group is created only once")]
    AlreadyCreated,
    #[error("signing failed")]
    Sign,
}

impl Change {
    /// The bytes signed: a context string and the change's postcard encoding.
    pub fn transcript(&self) -> Vec<u8> {
        let mut t = CHANGE_CONTEXT.to_vec();
        t.extend(postcard::to_allocvec(self).expect("a change always encodes"));
        t
    }

    /// Signs with the author's identity (which must be `self.author`'s).
    pub fn sign(
        self,
        rng: &mut impl CryptoRng,
        identity: &Identity,
    ) -> Result<SignedChange, ChangeError> {
        let signature = primitives::pss_sign(rng, identity.private_key(), &self.transcript())
            .map_err(|_| ChangeError::Sign)?;
        Ok(SignedChange {
            change: self,
            signature,
        })
    }
}

impl SignedChange {
    /// SHA-256 over a context, the change and its signature: equal ids, equal changes.
    pub fn id(&self) -> ChangeId {
        let mut h = Sha256::new();
        h.update(CHANGE_ID_CONTEXT);
        h.update(postcard::to_allocvec(self).expect("a change always encodes"));
        h.finalize().into()
    }

    /// Checks the signature against the author's pinned key.
    pub fn verify(&self, author: &PublicIdentity) -> Result<(), ChangeError> {
        primitives::pss_verify(author.key(), &self.change.transcript(), &self.signature)
            .map_err(|_| ChangeError::BadSignature)
    }
}

/// Checks a group name: 1 to [`MAX_NAME_CHARS`] characters, not blank, no control characters.
pub fn check_name(name: &str) -> Result<(), ChangeError> {
    let chars = name.chars().count();
    if chars == 0
        || chars > MAX_NAME_CHARS
        || name.trim().is_empty()
        || name.chars().any(char::is_control)
    {
        return Err(ChangeError::BadName);
    }
    Ok(())
}

/// The state `change` makes of `state` (`None` only for `Create`), if the change is valid
/// for it. The signature is not checked here (see [`SignedChange::verify`]). `max_members`
/// bounds the group's size (256 by default, [`super::DEFAULT_MAX_MEMBERS`]).
pub fn apply(
    state: Option<&GroupState>,
    change: &Change,
    max_members: usize,
) -> Result<GroupState, ChangeError> {
    let author = &change.author;
    let Some(state) = state else {
        let ChangeKind::Create { name, members } = &change.kind else {
            return Err(ChangeError::WrongState);
        };
        if change.prev != [0; 32] || change.prev_version != 0 {
            return Err(ChangeError::WrongState);
        }
        check_name(name)?;
        let mut all: BTreeSet<Username> = members.iter().cloned().collect();
        all.insert(author.clone());
        if all.len() > max_members {
            return Err(ChangeError::TooManyMembers(max_members));
        }
        return Ok(GroupState {
            id: change.group,
            version: 1,
            name: name.clone(),
            members: all,
            admins: BTreeMap::from([(author.clone(), 1)]),
            prev: [0; 32],
        });
    };
    if change.group != state.id {
        return Err(ChangeError::WrongGroup);
    }
    if change.prev != state.hash() || change.prev_version != state.version {
        return Err(ChangeError::WrongState);
    }
    let mut next = state.clone();
    next.version += 1;
    next.prev = state.hash();
    let needs_admin = !matches!(change.kind, ChangeKind::Leave);
    if needs_admin && !state.is_admin(author) {
        return Err(ChangeError::NotAdmin(author.clone()));
    }
    let named = |users: &Vec<Username>| {
        if users.is_empty() {
            Err(ChangeError::NobodyNamed)
        } else {
            Ok(())
        }
    };
    match &change.kind {
        ChangeKind::Create { .. } => return Err(ChangeError::AlreadyCreated),
        ChangeKind::Add { users } => {
            named(users)?;
            for user in users {
                if !next.members.insert(user.clone()) {
                    return Err(ChangeError::AlreadyMember(user.clone()));
                }
            }
            if next.members.len() > max_members {
                return Err(ChangeError::TooManyMembers(max_members));
            }
        }
        ChangeKind::Remove { users } => {
            named(users)?;
            for user in users {
                if user == author {
                    return Err(ChangeError::RemovesAuthor);
                }
                if !next.members.remove(user) {
                    return Err(ChangeError::NotMember(user.clone()));
                }
                next.admins.remove(user);
            }
        }
        ChangeKind::Leave => {
            if !next.members.remove(author) {
                return Err(ChangeError::NotMember(author.clone()));
            }
            next.admins.remove(author);
            if next.admins.is_empty()
                && let Some(first) = next.members.first()
            {
                next.admins.insert(first.clone(), next.version);
            }
        }
        ChangeKind::Rename { name } => {
            check_name(name)?;
            next.name = name.clone();
        }
        ChangeKind::Promote { users } => {
            named(users)?;
            for user in users {
                if !state.is_member(user) {
                    return Err(ChangeError::NotMember(user.clone()));
                }
                if next.admins.insert(user.clone(), next.version).is_some() {
                    return Err(ChangeError::AlreadyAdmin(user.clone()));
                }
            }
        }
    }
    Ok(next)
}

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
