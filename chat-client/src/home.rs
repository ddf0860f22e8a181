//! The client's home directory (mode 0700): `settings.ron`, `identity.pem` and the SQLite
//! store, every file mode 0600. Default is the platform data dir; `--home DIR` or
//! `CHAT_HOME` override it. An existing home readable by others is tightened (and the
//! caller is told, see [`Home::warnings`]).

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
    /// Desktop notifications for messages that arrive while the window is not looked at.
    pub notifications: bool,
    /// Whether those notifications show the message's first line (else only the sender).
    pub notification_previews: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: format!("127.0.0.1:{}", chat_protocol::DEFAULT_PORT),
            username: None,
            theme: Theme::System,
            font_size: 15.0,
            notifications: true,
            notification_previews: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
    /// Things worth telling the user that did not stop us (e.g. permissions fixed).
    warnings: Vec<String>,
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
        let io = |source| HomeError::Io {
            path: dir.clone(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(io)?;
        #[cfg_attr(not(unix), allow(unused_mut))]
        let mut warnings = Vec::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
                warnings.push(format!(
                    "{} was readable by other users (mode {:o}); it is now private (700)",
                    dir.display(),
                    mode & 0o777
                ));
            }
            for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
                let path = entry.path();
                if path.is_file() && make_private(&path).map_err(io)? {
                    warnings.push(format!("{} is now private (600)", path.display()));
                }
            }
        }
        Ok(Self { dir, warnings })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What was fixed while opening the home (shown to the user once).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }

    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("settings.ron")
    }

    /// The saved settings. A missing file gives the defaults; an unreadable or damaged
    /// one gives the defaults *and* the error, to show as a warning: settings never stop
    /// the client from starting.
    pub fn load_settings(&self) -> (Settings, Option<HomeError>) {
        let path = self.settings_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => match ron::from_str(&text) {
                Ok(settings) => (settings, None),
                Err(source) => (
                    Settings::default(),
                    Some(HomeError::Settings {
                        path,
                        source: Box::new(source),
                    }),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Settings::default(), None),
            Err(source) => (Settings::default(), Some(HomeError::Io { path, source })),
        }
    }

    pub fn save_settings(&self, settings: &Settings) -> Result<(), HomeError> {
        let text = ron::ser::to_string_pretty(settings, ron::ser::PrettyConfig::default())
            .expect("settings always serialise");
        write_private(&self.settings_path(), text.as_bytes())
    }

    /// Writes the settings if they differ from what is saved (a read-only home or a full
    /// disk only matters when something changed).
    pub fn save_settings_if_changed(&self, settings: &Settings) -> Result<(), HomeError> {
        match self.load_settings() {
            (saved, None) if saved == *settings => Ok(()),
            _ => self.save_settings(settings),
        }
    }

    /// The stored identity and whether its file is encrypted (has a passphrase), or `None`
    /// if there is none yet.
    pub fn load_identity(
        &self,
        passphrase: Option<&str>,
    ) -> Result<Option<(Identity, bool)>, HomeError> {
        let path = self.identity_path();
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => zeroize::Zeroizing::new(pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Io { path, source }),
        };
        let encrypted = pem.trim_start().starts_with("-----BEGIN ENCRYPTED");
        Identity::from_pem(&pem, passphrase)
            .map(|identity| Some((identity, encrypted)))
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

/// Creates `path` empty with mode 0600 if it does not exist (so a program that opens it
/// next, such as SQLite, never creates it with the default mode).
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

/// Makes an existing file readable by its owner only. Returns whether it changed; a
/// missing file is not an error.
pub fn make_private(path: &Path) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = match std::fs::metadata(path) {
            Ok(meta) => meta.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
            return Ok(true);
        }
    }
    let _ = path;
    Ok(false)
}

/// Writes `bytes` to `path` atomically (temp file + rename), readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
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
        assert_eq!(home.load_settings().0, Settings::default());
        let settings = Settings {
            server: "example.invalid:1".into(),
            username: Some("alice".into()),
            theme: Theme::Dark,
            font_size: 20.0,
            notifications: true,
            notification_previews: false,
        };
        home.save_settings(&settings).unwrap();
        let (loaded, problem) = home.load_settings();
        assert_eq!(loaded, settings);
        assert!(problem.is_none());
        // Damaged, empty or truncated: defaults and the reason, never a failure to start.
        for bad in ["(server: 5)", "", "(server: \"x:1\", theme: Da"] {
            std::fs::write(home.settings_path(), bad).unwrap();
            let (loaded, err) = home.load_settings();
            assert_eq!(loaded, Settings::default(), "{bad:?}");
            assert!(err.unwrap().to_string().contains("settings.ron"), "{bad:?}");
        }
        // Unchanged settings are not written (a read-only home is fine).
        home.save_settings(&settings).unwrap();
        let before = std::fs::metadata(home.settings_path())
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        home.save_settings_if_changed(&settings).unwrap();
        let after = std::fs::metadata(home.settings_path())
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
    }

    #[cfg(unix)]
    #[test]
    fn a_home_readable_by_others_is_tightened_with_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let fresh = Home::resolve(Some(path.clone())).unwrap();
        assert!(fresh.warnings().is_empty());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o700);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(path.join("client.sqlite3"), b"x").unwrap();
        std::fs::set_permissions(
            path.join("client.sqlite3"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let home = Home::resolve(Some(path.clone())).unwrap();
        assert_eq!(home.warnings().len(), 2, "{:?}", home.warnings());
        assert!(home.warnings()[0].contains("755"));
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&path.join("client.sqlite3")), 0o600);
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
        let (back, encrypted) = home.load_identity(Some("pw")).unwrap().unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        assert!(encrypted);
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
