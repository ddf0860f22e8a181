//! A group's state at one version and the signed changes between versions: what a
//! [`GroupState`] commits to (its [`hash`](GroupState::hash) chains it to the state before),
//! how a [`Change`] is signed (RSA-PSS-SHA256, by its author's identity key) and
//! identified, and [`apply`], the pure check-and-apply of one change by its author's
//! rights. The chain of changes and its fork rule are in [`super::membership`].

use std::collections::{BTreeMap, BTreeSet};

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
/// Longest group name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
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
