//! Relay keys pinned per address, like SSH's `known_hosts`: `HOME/known-relays`, mode
//! 0600, one line per relay, `HOST:PORT FINGERPRINT`. A relay's key is pinned the first
//! time the client connects to its address (trust on first use) or when the address is
//! given with `#FINGERPRINT`; afterwards any other key is refused. To accept a relay's new
//! key, start with `--server HOST:PORT#NEW_FINGERPRINT` (after comparing it with the
//! operator's) or delete the relay's line here.

use chat_protocol::relay_id::RelayFingerprint;

use crate::home::{Home, HomeError, write_private};

/// The file, in the home directory.
pub const FILE: &str = "known-relays";

/// The key pinned for `host_port`, if any (lines that do not parse are ignored).
pub fn pinned(home: &Home, host_port: &str) -> Option<RelayFingerprint> {
    let text = std::fs::read_to_string(home.dir().join(FILE)).ok()?;
    text.lines().find_map(|line| {
        let (addr, fp) = line.trim().split_once(' ')?;
        (addr == host_port)
            .then(|| fp.trim().parse().ok())
            .flatten()
    })
}

/// Pins `fingerprint` for `host_port`, replacing any earlier pin for it.
pub fn pin(home: &Home, host_port: &str, fingerprint: RelayFingerprint) -> Result<(), HomeError> {
    let path = home.dir().join(FILE);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|line| {
            line.split_once(' ')
                .is_none_or(|(addr, _)| addr != host_port)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&format!("{host_port} {fingerprint}\n"));
    write_private(&path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_kept_per_address_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("home"))).unwrap();
        let (a, b) = (
            RelayFingerprint::of_spki(b"a"),
            RelayFingerprint::of_spki(b"b"),
        );
        assert_eq!(pinned(&home, "relay:1"), None);
        pin(&home, "relay:1", a).unwrap();
        pin(&home, "other:2", b).unwrap();
        assert_eq!(pinned(&home, "relay:1"), Some(a));
        assert_eq!(pinned(&home, "other:2"), Some(b));
        pin(&home, "relay:1", b).unwrap();
        assert_eq!(pinned(&home, "relay:1"), Some(b));
        let text = std::fs::read_to_string(home.dir().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(home.dir().join(FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
