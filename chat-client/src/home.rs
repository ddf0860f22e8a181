//! The client's home directory: `settings.ron`, `identity.pem` (mode 0600) and the
//! SQLite store. Default is the platform data dir; `--home DIR` or `CHAT_HOME` override it.

use std::io::Write;
use std::path::{Path, PathBuf};

use chat_protocol::identity::{Identity, IdentityError};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no home directory could be determined; pass --home DIR or set CHAT_HOME")]
    NoDefault,
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid settings RON: {source}")]
    Settings {
        path: PathBuf,
        source: Box<ron::error::SpannedError>,
    },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Theme {
    #[default]
    System,
    Light,
    Dark,
}

/// User settings, kept in `settings.ron`. Unknown or missing fields fall back to defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Relay address, `HOST:PORT`.
    pub server: String,
    /// The name last signed in with.
    pub username: Option<String>,
    pub theme: Theme,
    /// Base font size in points.
    pub font_size: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: format!("127.0.0.1:{}", chat_protocol::DEFAULT_PORT),
            username: None,
            theme: Theme::System,
            font_size: 15.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `explicit` (from `--home` / `CHAT_HOME`) or the platform data directory; created
    /// with mode 0700 if missing.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        let dir = match explicit {
            Some(dir) => dir,
            None => directories::ProjectDirs::from("", "", "secure-chat")
                .ok_or(HomeError::NoDefault)?
                .data_dir()
                .to_owned(),
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|source| HomeError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }

    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("settings.ron")
    }

    pub fn load_settings(&self) -> Result<Settings, HomeError> {
        let path = self.settings_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => ron::from_str(&text).map_err(|source| HomeError::Settings {
                path,
                source: Box::new(source),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(source) => Err(HomeError::Io { path, source }),
        }
    }

    pub fn save_settings(&self, settings: &Settings) -> Result<(), HomeError> {
        let text = ron::ser::to_string_pretty(settings, ron::ser::PrettyConfig::default())
            .expect("settings always serialise");
        write_private(&self.settings_path(), text.as_bytes())
    }

    /// The stored identity, or `None` if there is none yet.
    pub fn load_identity(&self, passphrase: Option<&str>) -> Result<Option<Identity>, HomeError> {
        let path = self.identity_path();
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Io { path, source }),
        };
        Identity::from_pem(&pem, passphrase)
            .map(Some)
            .map_err(|source| HomeError::Identity { path, source })
    }

    /// Writes the identity (encrypted if a passphrase is given) with mode 0600.
    pub fn save_identity(
        &self,
        identity: &Identity,
        passphrase: Option<&str>,
    ) -> Result<(), HomeError> {
        let path = self.identity_path();
        let pem = identity
            .to_pem(passphrase, &mut rand::rng())
            .map_err(|source| HomeError::Identity {
                path: path.clone(),
                source,
            })?;
        write_private(&path, pem.as_bytes())
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename), readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    let io = |source| HomeError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_then_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("h"))).unwrap();
        assert_eq!(home.load_settings().unwrap(), Settings::default());
        let settings = Settings {
            server: "example.invalid:1".into(),
            username: Some("alice".into()),
            theme: Theme::Dark,
            font_size: 20.0,
        };
        home.save_settings(&settings).unwrap();
        assert_eq!(home.load_settings().unwrap(), settings);
        std::fs::write(home.settings_path(), "(server: 5)").unwrap();
        assert!(
            home.load_settings()
                .unwrap_err()
                .to_string()
                .contains("settings.ron")
        );
    }

    #[test]
    fn identity_file_is_private_and_passphrase_checked() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_owned())).unwrap();
        assert!(home.load_identity(None).unwrap().is_none());
        let id = Identity::generate_with_bits(&mut rand::rng(), 2048).unwrap();
        home.save_identity(&id, Some("pw")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(home.identity_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let back = home.load_identity(Some("pw")).unwrap().unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        let err = home.load_identity(Some("nope")).unwrap_err();
        assert!(matches!(
            err,
            HomeError::Identity {
                source: IdentityError::WrongPassphrase,
                ..
            }
        ));
        std::fs::write(home.identity_path(), "garbage").unwrap();
        assert!(matches!(
            home.load_identity(None).unwrap_err(),
            HomeError::Identity {
                source: IdentityError::Corrupt,
                ..
            }
        ));
    }
}
