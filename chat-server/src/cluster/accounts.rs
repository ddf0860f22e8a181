//! Accounts: the bucket `<prefix>_accounts`, user → public key (SPKI DER), written
//! create-only so the first key to claim a name keeps it, cluster-wide; read and written
//! through NATS disturbances ([`super::patience`]). Names looked up once are remembered as
//! existing (accounts are removed only by an operator, and every relay forgets a removed
//! name when it sees the removal).

use async_nats::jetstream::kv;
use bytes::Bytes;
use chat_protocol::Username;

use super::{Cluster, KNOWN_ACCOUNTS_MAX, patience, token};
use crate::store::{Bind, StoreError};

impl Cluster {
    /// `user`'s public key (DER), if the name is registered; asked again through a NATS
    /// disturbance until `deadline` ([`patience`]).
    ///
    /// # Errors
    /// [`StoreError::Cluster`] if NATS gave no answer by `deadline`.
    pub async fn public_key(
        &self,
        user: &Username,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = patience::until(deadline, "the account could not be read", |_| async {
            self.accounts
                .get(token(user))
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
        if key.is_some() {
            self.remember(user);
        }
        Ok(key.map(|k| k.to_vec()))
    }

    pub(super) fn forget(&self, user: &Username) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }

    pub(super) fn remember(&self, user: &Username) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_ACCOUNTS_MAX {
            known.clear();
        }
        known.insert(user.clone());
    }

    /// Whether `user` is registered (from memory after the first lookup; else one try).
    pub async fn exists(&self, user: &Username) -> Result<bool, StoreError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user)
        {
            return Ok(true);
        }
        let now = tokio::time::Instant::now();
        Ok(self.public_key(user, now).await?.is_some())
    }

    /// Binds `user` to `public_key` (DER) unless the name is already bound, cluster-wide
    /// (a create-only write: of two relays racing, one wins). Written again through a
    /// NATS disturbance until `deadline` ([`patience`]); a try that found the name bound
    /// to this very key after an earlier try went unanswered made the account itself.
    ///
    /// # Errors
    /// [`StoreError::Cluster`] if NATS took no write (or gave no answer) by `deadline`.
    pub async fn bind(
        &self,
        user: &Username,
        public_key: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<Bind, StoreError> {
        let value = Bytes::copy_from_slice(public_key);
        let bound = patience::until(deadline, "the account could not be written", |unknown| {
            let value = value.clone();
            async move {
                match self.accounts.create(token(user), value).await {
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Some(unknown)),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await?;
        let Some(earlier_unknown) = bound else {
            self.remember(user);
            return Ok(Bind::Created);
        };
        match self.public_key(user, deadline).await? {
            Some(stored) if stored == public_key && earlier_unknown => Ok(Bind::Created),
            Some(stored) if stored == public_key => Ok(Bind::Existing),
            _ => Ok(Bind::Taken),
        }
    }
}
