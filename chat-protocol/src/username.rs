//! Account names: 1–32 characters of `a-z 0-9 _ - .`, starting with a letter or digit.
//! Names are case-insensitive: they are folded to lowercase, so `Alice` *is* `alice`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub const MAX_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsernameError {
    #[error("username is empty")]
    Empty,
    #[error("username is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("username may only contain letters a-z, digits, '_', '-' and '.'")]
    BadCharacter,
    #[error("username must start with a letter or digit")]
    BadStart,
}

/// A valid username in canonical (lowercase) form. Shared, not copied, when cloned: the
/// relay clones the sender's and recipient's names for every message it routes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(Arc<str>);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, UsernameError> {
        if raw.is_empty() {
            return Err(UsernameError::Empty);
        }
        if raw.len() > MAX_LEN {
            return Err(UsernameError::TooLong);
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(UsernameError::BadCharacter);
        }
        if !raw.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(UsernameError::BadStart);
        }
        // One allocation when the name is already lowercase (as clients send it), where
        // folding a copy first would be two.
        let folded: Arc<str> = if raw.bytes().any(|b| b.is_ascii_uppercase()) {
            raw.to_ascii_lowercase().into()
        } else {
            raw.into()
        };
        Ok(Self(folded))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Username {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Username {
    type Err = UsernameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Username {
    type Error = UsernameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Username> for String {
    fn from(u: Username) -> String {
        u.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_folds_case() {
        assert_eq!(Username::parse("Alice_01").unwrap().as_str(), "alice_01");
        assert_eq!(Username::parse("a").unwrap().as_str(), "a");
        assert_eq!(Username::parse("b.o-b").unwrap().as_str(), "b.o-b");
        let max = "x".repeat(MAX_LEN);
        assert_eq!(Username::parse(&max).unwrap().as_str(), max);
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(Username::parse(""), Err(UsernameError::Empty));
        assert_eq!(
            Username::parse(&"x".repeat(MAX_LEN + 1)),
            Err(UsernameError::TooLong)
        );
        for bad in ["al ice", "alice!", "ålice", "a/b", "a\0", "bob\n"] {
            assert_eq!(
                Username::parse(bad),
                Err(UsernameError::BadCharacter),
                "{bad:?}"
            );
        }
        for bad in ["_alice", ".alice", "-alice"] {
            assert_eq!(
                Username::parse(bad),
                Err(UsernameError::BadStart),
                "{bad:?}"
            );
        }
    }
}
