//! The relay's TLS identity on disk. On first start the relay creates an ECDSA P-256 key
//! (`relay-key.pem`) and a self-signed certificate for it (`relay-cert.pem`) in its data
//! directory, both mode 0600, and reuses them on every later start; a certificate that is
//! missing or unreadable is made again under the same key, so the fingerprint (the key's)
//! never changes. Relays that share the key file share the fingerprint. With
//! `tls: Some((cert_chain: …, key: …))` the operator's PEM files are used instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use chat_protocol::tls::{RelayIdentity, TlsError};
use tracing::{info, warn};

use crate::config::Config;

/// The relay's key, in the data directory.
pub const KEY_FILE: &str = "relay-key.pem";
/// Its self-signed certificate, in the data directory.
pub const CERT_FILE: &str = "relay-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tls { path: PathBuf, source: TlsError },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the relay's TLS identity, creating its key and certificate in the data directory
/// on first use (see the module docs).
pub fn load_or_create(config: &Config) -> Result<RelayIdentity, IdentityError> {
    if let Some(files) = &config.tls {
        let cert = std::fs::read_to_string(&files.cert_chain).map_err(io(&files.cert_chain))?;
        let key = std::fs::read_to_string(&files.key).map_err(io(&files.key))?;
        return RelayIdentity::from_pem(&cert, &key).map_err(|source| IdentityError::Tls {
            path: files.cert_chain.clone(),
            source,
        });
    }
    let dir = &config.data_dir;
    crate::store::create_private_dir(dir).map_err(io(dir))?;
    let key_path = dir.join(KEY_FILE);
    let key = match std::fs::read_to_string(&key_path) {
        Ok(pem) => {
            tighten(&key_path);
            pem
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pem = RelayIdentity::generate_key_pem().map_err(|source| IdentityError::Tls {
                path: key_path.clone(),
                source,
            })?;
            write_private(&key_path, &pem)?;
            info!("created the relay's TLS key in {}", key_path.display());
            pem
        }
        Err(e) => return Err(io(&key_path)(e)),
    };
    let cert_path = dir.join(CERT_FILE);
    let tls_err = |path: &Path| {
        let path = path.to_owned();
        move |source| IdentityError::Tls { path, source }
    };
    if let Ok(cert) = std::fs::read_to_string(&cert_path)
        && let Ok(identity) = RelayIdentity::from_pem(&cert, &key)
    {
        tighten(&cert_path);
        return Ok(identity);
    }
    // Missing or unreadable: a new self-signed certificate for the same key.
    let cert = RelayIdentity::self_signed_pem(&key).map_err(tls_err(&key_path))?;
    let _ = std::fs::remove_file(&cert_path);
    write_private(&cert_path, &cert)?;
    RelayIdentity::from_pem(&cert, &key).map_err(tls_err(&cert_path))
}

/// Writes a new file readable by the owner only.
fn write_private(path: &Path, text: &str) -> Result<(), IdentityError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(text.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// A key or certificate file others can read is made private, with a warning.
fn tighten(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            warn!("{} was readable by others; made it 0600", path.display());
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_created_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let first = load_or_create(&config).unwrap();
        #[cfg(unix)]
        for file in [KEY_FILE, CERT_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(config.data_dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        assert_eq!(
            load_or_create(&config).unwrap().fingerprint,
            first.fingerprint
        );
        // A lost certificate is made again under the same key: same fingerprint.
        std::fs::remove_file(config.data_dir.join(CERT_FILE)).unwrap();
        assert_eq!(
            load_or_create(&config).unwrap().fingerprint,
            first.fingerprint
        );
        std::fs::write(config.data_dir.join(CERT_FILE), "garbage").unwrap();
        assert_eq!(
            load_or_create(&config).unwrap().fingerprint,
            first.fingerprint
        );
        // Another relay's certificate copied in by mistake: the key's fingerprint, a new
        // certificate for it.
        let stranger =
            RelayIdentity::self_signed_pem(&RelayIdentity::generate_key_pem().unwrap()).unwrap();
        std::fs::write(config.data_dir.join(CERT_FILE), stranger).unwrap();
        assert_eq!(
            load_or_create(&config).unwrap().fingerprint,
            first.fingerprint
        );
        // Another data directory, another key.
        let other = Config {
            data_dir: dir.path().join("other"),
            ..Config::default()
        };
        assert_ne!(
            load_or_create(&other).unwrap().fingerprint,
            first.fingerprint
        );
        let other_key = other.data_dir.join(KEY_FILE);
        // An operator's files: the same key copied gives the same fingerprint.
        let files = Config {
            tls: Some(crate::config::TlsFiles {
                cert_chain: config.data_dir.join(CERT_FILE),
                key: config.data_dir.join(KEY_FILE),
            }),
            ..other
        };
        assert_eq!(
            load_or_create(&files).unwrap().fingerprint,
            first.fingerprint
        );
        // An operator's key that is not the certificate's: refused, naming the file.
        let mismatched = Config {
            tls: Some(crate::config::TlsFiles {
                cert_chain: config.data_dir.join(CERT_FILE),
                key: other_key,
            }),
            ..files
        };
        let err = load_or_create(&mismatched).unwrap_err().to_string();
        assert!(
            err.contains(CERT_FILE) && err.contains("does not belong"),
            "{err}"
        );
    }
}
