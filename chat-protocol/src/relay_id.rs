//! How a client names and authenticates a relay: the address `HOST:PORT#FINGERPRINT`.
//!
//! A relay's TLS certificate is usually self-signed; what authenticates it is its key. The
//! **fingerprint** is the SHA-256 of the certificate's SubjectPublicKeyInfo (DER), written
//! as unpadded base64url (43 characters), so a certificate renewed under the same key keeps
//! the address, and relays sharing one key file share one fingerprint. This is how
//! self-hosted servers reached by IP are pinned elsewhere (SimpleX server addresses,
//! Syncthing device ids, HPKP's `pin-sha256` without the padding).

use std::fmt;
use std::str::FromStr;

use base64ct::{Base64UrlUnpadded, Encoding};
use sha2::{Digest, Sha256};

/// SHA-256 of a relay's SubjectPublicKeyInfo (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayFingerprint(pub [u8; 32]);

impl RelayFingerprint {
    /// The fingerprint of a SubjectPublicKeyInfo in DER.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }
}

impl fmt::Display for RelayFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Base64UrlUnpadded::encode_string(&self.0))
    }
}

impl fmt::Debug for RelayFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayFingerprint({self})")
    }
}

/// Why a relay address or fingerprint was refused; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{0:?} is not a relay fingerprint: expected 43 characters of unpadded base64url \
         (what `chat-server fingerprint` prints)"
    )]
    Fingerprint(String),
    #[error(
        "{0:?} is not a relay address: expected HOST:PORT or HOST:PORT#FINGERPRINT ({EXAMPLE})"
    )]
    NoPort(String),
    #[error("{0:?} has no valid host before the port: expected HOST:PORT ({EXAMPLE})")]
    Host(String),
    #[error("{0:?} has no valid port (1-65535) after the host: expected HOST:PORT ({EXAMPLE})")]
    Port(String),
    #[error("no relay address given: expected HOST:PORT, or several as HOST:PORT,HOST:PORT")]
    Empty,
    #[error(
        "the relays of one list are one cluster and share one key, but two fingerprints were \
         given ({0} and {1}); give it once, e.g. a.example:65432#<fingerprint>,b.example:65432"
    )]
    TwoFingerprints(RelayFingerprint, RelayFingerprint),
}

const EXAMPLE: &str = "e.g. 127.0.0.1:65432 or chat.example.org:65432#<fingerprint>";

impl FromStr for RelayFingerprint {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let mut out = [0u8; 32];
        match Base64UrlUnpadded::decode(s.trim(), &mut out) {
            Ok(bytes) if bytes.len() == 32 && s.trim().len() == 43 => Ok(Self(out)),
            _ => Err(AddressError::Fingerprint(s.to_owned())),
        }
    }
}

/// A relay address: where to connect and, optionally, which key to expect there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddress {
    /// `HOST:PORT` (IPv6 as `[ADDR]:PORT`), as given.
    pub host_port: String,
    /// The relay's key fingerprint; without one the client trusts on first use.
    pub fingerprint: Option<RelayFingerprint>,
}

impl RelayAddress {
    /// The host part without brackets (for TLS's server name and DNS).
    pub fn host(&self) -> &str {
        let (host, _) = self
            .host_port
            .rsplit_once(':')
            .expect("checked when parsed");
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl FromStr for RelayAddress {
    type Err = AddressError;

    /// Parses `HOST:PORT` or `HOST:PORT#FINGERPRINT`: a host (name, IPv4, or `[IPv6]`) and a
    /// port 1–65535, then an optional fingerprint.
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let (host_port, fingerprint) = match s.split_once('#') {
            Some((hp, fp)) => (hp, Some(fp.parse::<RelayFingerprint>()?)),
            None => (s, None),
        };
        let Some((host, port)) = host_port.rsplit_once(':') else {
            return Err(AddressError::NoPort(s.to_owned()));
        };
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace)
        };
        if !host_ok {
            return Err(AddressError::Host(s.to_owned()));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Self {
                host_port: host_port.to_owned(),
                fingerprint,
            }),
            _ => Err(AddressError::Port(s.to_owned())),
        }
    }
}

/// The relays of one cluster, tried in turn: `HOST:PORT[#FINGERPRINT][,HOST:PORT…]`. They
/// share one TLS key, so a fingerprint given with any address is every address's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayList {
    /// At least one address; each carries the list's fingerprint, if one was given.
    pub relays: Vec<RelayAddress>,
}

impl FromStr for RelayList {
    type Err = AddressError;

    /// Parses comma-separated [`RelayAddress`]es (spaces around commas are ignored). Errors:
    /// an empty list or entry ([`AddressError::Empty`]), a bad address, or two different
    /// fingerprints ([`AddressError::TwoFingerprints`]).
    fn from_str(s: &str) -> Result<Self, AddressError> {
        if s.trim().is_empty() {
            return Err(AddressError::Empty);
        }
        let mut relays = s
            .split(',')
            .map(|one| match one.trim() {
                "" => Err(AddressError::Empty),
                one => one.parse::<RelayAddress>(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut fingerprint = None;
        for relay in &relays {
            match (fingerprint, relay.fingerprint) {
                (Some(a), Some(b)) if a != b => return Err(AddressError::TwoFingerprints(a, b)),
                (None, Some(b)) => fingerprint = Some(b),
                _ => {}
            }
        }
        for relay in &mut relays {
            relay.fingerprint = fingerprint;
        }
        Ok(Self { relays })
    }
}

impl fmt::Display for RelayList {
    /// The addresses joined by commas, the fingerprint (if any) after the first only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, relay) in self.relays.iter().enumerate() {
            if i == 0 {
                write!(f, "{relay}")?;
            } else {
                write!(f, ",{}", relay.host_port)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host_port)?;
        if let Some(fp) = &self.fingerprint {
            write!(f, "#{fp}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_one_cluster_with_one_fingerprint() {
        let fp = RelayFingerprint::of_spki(b"spki");
        let list: RelayList = format!("a.test:1, b.test:2#{fp} ,[::1]:3").parse().unwrap();
        let hosts: Vec<&str> = list.relays.iter().map(|r| r.host_port.as_str()).collect();
        assert_eq!(hosts, ["a.test:1", "b.test:2", "[::1]:3"]);
        // The fingerprint given with one address is every address's.
        assert!(list.relays.iter().all(|r| r.fingerprint == Some(fp)));
        assert_eq!(list.to_string(), format!("a.test:1#{fp},b.test:2,[::1]:3"));
        let one: RelayList = "a.test:1".parse().unwrap();
        assert_eq!(one.relays.len(), 1);
        assert_eq!(one.relays[0].fingerprint, None);
        let other = RelayFingerprint::of_spki(b"other");
        assert!(matches!(
            format!("a:1#{fp},b:2#{other}").parse::<RelayList>(),
            Err(AddressError::TwoFingerprints(..))
        ));
        assert!(format!("a:1#{fp},b:2#{fp}").parse::<RelayList>().is_ok());
        for bad in ["", " , ", "a:1,,b:2", "a:1,b"] {
            assert!(bad.parse::<RelayList>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_are_43_base64url_characters_and_round_trip() {
        let fp = RelayFingerprint::of_spki(b"spki");
        let text = fp.to_string();
        assert_eq!(text.len(), 43);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(text.parse::<RelayFingerprint>().unwrap(), fp);
        // SHA-256("spki"), base64url without padding.
        assert_eq!(text, "b-7MjBbFVR2f6z61934tp3O_aL2e-cUpJ86yyG5WiSs");
        for bad in [
            "",
            "abc",
            &format!("{text}="),
            &format!("{text}A"),
            &format!("+{}", &text[1..]),
        ] {
            assert!(bad.parse::<RelayFingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_with_and_without_a_fingerprint() {
        let fp = RelayFingerprint::of_spki(b"k");
        let a: RelayAddress = format!("chat.example.org:65432#{fp}").parse().unwrap();
        assert_eq!(a.host_port, "chat.example.org:65432");
        assert_eq!(a.host(), "chat.example.org");
        assert_eq!(a.fingerprint, Some(fp));
        assert_eq!(a.to_string(), format!("chat.example.org:65432#{fp}"));
        let b: RelayAddress = "[::1]:9".parse().unwrap();
        assert_eq!((b.host(), b.fingerprint), ("::1", None));
        for bad in [
            "nohost",
            ":65432",
            "a b:1",
            "host:0",
            "host:70000",
            "[zz]:1",
            "host:1#short",
        ] {
            let err = bad.parse::<RelayAddress>().unwrap_err().to_string();
            assert!(err.contains("expected"), "{bad}: {err}");
        }
    }
}
