//! Safety numbers: a 60-digit number two people compare (in person, or over a channel they
//! trust) to confirm that neither public key was substituted by the server.
//!
//! The construction follows Signal's numeric fingerprint. For each user:
//!
//! ```text
//! h = SHA-512(version[2] || SPKI_DER || username)
//! repeat 5200 times: h = SHA-512(h || SPKI_DER)
//! digits = for each of the first six 5-byte chunks of h: (big-endian u40) mod 100000, 5 digits
//! ```
//!
//! giving 30 digits per user. The safety number is the two 30-digit halves in ascending
//! order, so both sides compute the same 60 digits. Iterating makes a brute-force search
//! for a key with a colliding half expensive (5200 hashes per try).

use sha2::{Digest, Sha512};

use crate::identity::PublicIdentity;
use crate::username::Username;

/// Version of the construction, hashed in so a future change cannot collide.
const VERSION: [u8; 2] = [0, 0];
const ITERATIONS: usize = 5200;

/// 60 decimal digits, shown as 12 groups of 5.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SafetyNumber(String);

impl SafetyNumber {
    /// The number for the conversation between `a` and `b` (order does not matter).
    pub fn new(a: (&Username, &PublicIdentity), b: (&Username, &PublicIdentity)) -> Self {
        let mut halves = [half(a.0, a.1.der()), half(b.0, b.1.der())];
        halves.sort();
        Self(halves.concat())
    }

    /// The 60 digits without spaces.
    pub fn digits(&self) -> &str {
        &self.0
    }

    /// The 12 groups of 5 digits.
    pub fn groups(&self) -> Vec<&str> {
        (0..12).map(|i| &self.0[i * 5..i * 5 + 5]).collect()
    }
}

impl std::fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.groups().join(" "))
    }
}

impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

fn half(user: &Username, spki_der: &[u8]) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION)
        .chain_update(spki_der)
        .chain_update(user.as_str().as_bytes())
        .finalize();
    for _ in 0..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(spki_der)
            .finalize();
    }
    hash[..30]
        .chunks(5)
        .map(|chunk| {
            let n = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::pair;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn same_on_both_sides_and_well_formed() {
        let (a, b) = pair();
        let ab = SafetyNumber::new((&name("alice"), a.public()), (&name("bob"), b.public()));
        let ba = SafetyNumber::new((&name("bob"), b.public()), (&name("alice"), a.public()));
        assert_eq!(ab, ba);
        assert_eq!(ab.digits().len(), 60);
        assert!(ab.digits().bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(ab.groups().len(), 12);
        assert_eq!(ab.to_string().len(), 60 + 11);
    }

    #[test]
    fn changes_with_any_key_or_name() {
        let (a, b) = pair();
        let base = SafetyNumber::new((&name("alice"), a.public()), (&name("bob"), b.public()));
        let other_key = SafetyNumber::new((&name("alice"), b.public()), (&name("bob"), b.public()));
        let other_name =
            SafetyNumber::new((&name("alice"), a.public()), (&name("rob"), b.public()));
        assert_ne!(base, other_key);
        assert_ne!(base, other_name);
    }
}
