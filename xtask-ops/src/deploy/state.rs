//! The local side of a deployment: a RON cache of what was created (tags in EC2 are the
//! truth; this file only saves lookups and remembers how to reach the host), the SSH
//! private key, and the host key seen on first contact.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What `deploy` created, as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Deployment {
    pub name: String,
    pub region: String,
    pub instance_id: Option<String>,
    pub public_ip: Option<String>,
    pub security_group_id: Option<String>,
    pub key_name: String,
    pub ssh_user: String,
    pub port: u16,
    /// The relay's key fingerprint, as read on the host after the last deploy: clients
    /// connect to `IP:PORT#FINGERPRINT`, and `status` checks the relay still has it.
    pub fingerprint: Option<String>,
    /// A cluster's nodes (`deploy --instances N`, N ≥ 3), by index; empty for one host.
    pub nodes: Vec<Node>,
}

/// One node of a cluster: an instance running a relay and a NATS node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Node {
    pub index: usize,
    pub instance_id: String,
    pub zone: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
}

/// Where one named deployment keeps its files: `<state dir>/<name>/`.
#[derive(Debug, Clone)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(state_dir: &Path, name: &str) -> Self {
        Self {
            dir: state_dir.join(name),
        }
    }

    /// The default state directory: the user's data dir, so `cargo clean` never loses the
    /// only copy of an instance's SSH key.
    pub fn default_state_dir() -> anyhow::Result<PathBuf> {
        let dirs = directories::ProjectDirs::from("", "", "secure-chat")
            .context("cannot find a home directory for the deploy state; pass --state-dir DIR")?;
        Ok(dirs.data_local_dir().join("deploy"))
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("deployment.ron")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("ssh-key.pem")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// A cluster's shared relay TLS identity (`relay-key.pem`, `relay-cert.pem`), made
    /// here at the first deploy and installed on every node.
    pub fn identity(&self) -> PathBuf {
        self.dir.join("relay-identity")
    }

    /// The cluster's shared relay TLS identity in [`Files::identity`], made at the first
    /// call (an ECDSA P-256 key and a self-signed certificate, as a relay makes its own;
    /// the directory 0700, the files 0600); returns its key fingerprint, as clients write
    /// it after `#`. Made here rather than by the relay binary, which may not run on this
    /// machine (it is built for x86-64 Linux).
    pub fn ensure_identity(&self) -> anyhow::Result<String> {
        use chat_protocol::tls::RelayIdentity;
        let dir = self.identity();
        self.create_dir()?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let (key_path, cert_path) = (dir.join("relay-key.pem"), dir.join("relay-cert.pem"));
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = RelayIdentity::generate_key_pem()?;
                self.write_private(&key_path, &pem)?;
                pem
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", key_path.display())),
        };
        let identity = match std::fs::read_to_string(&cert_path)
            .ok()
            .and_then(|cert| RelayIdentity::from_pem(&cert, &key).ok())
        {
            Some(identity) => identity,
            None => {
                // Missing or not the key's: a new certificate for the same key (the
                // fingerprint is the key's, so clients' pins still hold).
                let cert = RelayIdentity::self_signed_pem(&key)?;
                self.write_private(&cert_path, &cert)?;
                RelayIdentity::from_pem(&cert, &key)
                    .with_context(|| format!("{} is not a usable TLS key", key_path.display()))?
            }
        };
        Ok(identity.fingerprint.to_string())
    }

    /// A cluster's NATS system-account NKey seed (`SU…`, owner-only): the credential
    /// that may take a node out of the JetStream meta group (`--allow-shrink`). Only its
    /// public key goes to the nodes.
    pub fn system_nkey(&self) -> PathBuf {
        self.dir.join("nats-system.nk")
    }

    /// The system account's key pair, made and saved at the first call.
    pub fn ensure_system_nkey(&self) -> anyhow::Result<nkeys::KeyPair> {
        let path = self.system_nkey();
        match std::fs::read_to_string(&path) {
            Ok(seed) => nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not an NKey seed ({e}); restore it from a backup, or delete it \
                     to make a new one (the next deploy then installs that one)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = nkeys::KeyPair::new_user();
                let seed = pair
                    .seed()
                    .map_err(|e| anyhow::anyhow!("cannot make an NKey: {e}"))?;
                self.write_private(&path, &seed)?;
                Ok(pair)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn load(&self) -> anyhow::Result<Option<Deployment>> {
        let path = self.state();
        match std::fs::read_to_string(&path) {
            Ok(text) => ron::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not a valid deployment file; delete it (the tags in EC2 are the truth) and run again", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, deployment: &Deployment) -> anyhow::Result<()> {
        self.create_dir()?;
        let text = ron::ser::to_string_pretty(deployment, ron::ser::PrettyConfig::default())?;
        let path = self.state();
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes the private key readable by the owner only (ssh refuses it otherwise).
    pub fn save_key(&self, pem: &str) -> anyhow::Result<PathBuf> {
        let path = self.key();
        self.write_private(&path, pem)?;
        Ok(path)
    }

    /// Forgets the host key (a new instance has a new one; its IP may be an old one's).
    pub fn forget_host(&self) -> anyhow::Result<()> {
        remove_if_present(&self.known_hosts())
    }

    /// Removes everything of this deployment.
    pub fn remove_all(&self) -> anyhow::Result<()> {
        for path in [
            self.key(),
            self.known_hosts(),
            self.state(),
            self.system_nkey(),
        ] {
            remove_if_present(&path)?;
        }
        match std::fs::remove_dir_all(self.identity()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove {}", self.identity().display()));
            }
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            // Something else of the user's is in there: leave it.
            Err(_) => Ok(()),
        }
    }

    /// Writes `text` (newline-terminated) to `path` in the deployment's directory, readable by the owner only (ssh
    /// refuses a key others may read).
    fn write_private(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        self.create_dir()?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        Ok(())
    }

    fn create_dir(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_cluster_identity_and_system_key_are_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path(), "chat");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fingerprint = files.ensure_identity().unwrap();
        assert_eq!(files.ensure_identity().unwrap(), fingerprint);
        assert_eq!(mode(&files.identity()), 0o700);
        for file in ["relay-key.pem", "relay-cert.pem"] {
            assert_eq!(mode(&files.identity().join(file)), 0o600, "{file}");
        }
        // What a relay loads from these files presents the same fingerprint.
        let read = |f: &str| std::fs::read_to_string(files.identity().join(f)).unwrap();
        let identity = chat_protocol::tls::RelayIdentity::from_pem(
            &read("relay-cert.pem"),
            &read("relay-key.pem"),
        )
        .unwrap();
        assert_eq!(identity.fingerprint.to_string(), fingerprint);
        // A lost certificate is made again for the same key: the pin holds.
        std::fs::remove_file(files.identity().join("relay-cert.pem")).unwrap();
        assert_eq!(files.ensure_identity().unwrap(), fingerprint);

        let pair = files.ensure_system_nkey().unwrap();
        assert!(pair.public_key().starts_with('U'));
        assert_eq!(mode(&files.system_nkey()), 0o600);
        assert_eq!(
            files.ensure_system_nkey().unwrap().public_key(),
            pair.public_key()
        );
        files.remove_all().unwrap();
        assert!(!dir.path().join("chat").exists());
    }

    #[test]
    fn state_round_trips_and_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path(), "relay");
        assert_eq!(files.load().unwrap(), None);
        let deployment = Deployment {
            name: "relay".into(),
            region: "eu-west-1".into(),
            instance_id: Some("i-0123".into()),
            public_ip: Some("203.0.113.9".into()),
            security_group_id: Some("sg-1".into()),
            key_name: "secure-chat-relay".into(),
            ssh_user: "ec2-user".into(),
            port: 65432,
            fingerprint: Some("b-7MjBbFVR2f6z61934tp3O_aL2e-cUpJ86yyG5WiSs".into()),
            nodes: vec![Node {
                index: 1,
                instance_id: "i-0456".into(),
                zone: "eu-west-1b".into(),
                public_ip: Some("203.0.113.10".into()),
                private_ip: Some("172.31.0.7".into()),
            }],
        };
        files.save(&deployment).unwrap();
        assert_eq!(files.load().unwrap(), Some(deployment));

        let key = files
            .save_key("-----BEGIN OPENSSH PRIVATE KEY-----")
            .unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(key.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        files.remove_all().unwrap();
        assert!(!key.exists());
        assert_eq!(files.load().unwrap(), None);
    }

    #[test]
    fn a_corrupt_state_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path(), "relay");
        files.save(&Deployment::default()).unwrap();
        std::fs::write(files.state(), "(instance_id: ").unwrap();
        let err = format!("{:#}", files.load().unwrap_err());
        assert!(err.contains("delete it"), "{err}");
    }
}
