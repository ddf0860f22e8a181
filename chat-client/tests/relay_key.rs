//! The relay's key, as users meet it: pinned from the address, trusted on first use, or
//! vouched for by a certificate authority; and a man in the middle with its own key
//! refused in every case, with nothing sent and the outbox kept.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use common::{Client, Options, Relay};
use tokio::net::{TcpListener, TcpStream};

/// What the [`Path`] in front of the relay does with each new connection.
const FORWARD: u8 = 0;
const DROP: u8 = 1;
const INTERCEPT: u8 = 2;
/// Forwards, but flips one bit of the relay's handshake (then back to FORWARD).
const FLIP_ONCE: u8 = 3;

/// The network path to the relay, controlled by an attacker: forwards bytes untouched,
/// drops connections, or terminates TLS with its own key (a man in the middle).
struct Path {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    _runtime: tokio::runtime::Runtime,
}

impl Path {
    fn start(relay: SocketAddr) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let key = chat_protocol::tls::RelayIdentity::generate_key_pem().unwrap();
        let cert = chat_protocol::tls::RelayIdentity::self_signed_pem(&key).unwrap();
        let own = chat_protocol::tls::RelayIdentity::from_pem(&cert, &key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(own.server_config().unwrap());
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let current = mode.clone();
        runtime.spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                match current.load(Ordering::SeqCst) {
                    FORWARD => {
                        tokio::spawn(async move {
                            let mut upstream = TcpStream::connect(relay).await.unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                        });
                    }
                    DROP => drop(socket),
                    FLIP_ONCE => {
                        current.store(FORWARD, Ordering::SeqCst);
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let upstream = TcpStream::connect(relay).await.unwrap();
                            let (mut up_read, mut up_write) = upstream.into_split();
                            let (mut down_read, mut down_write) = socket.into_split();
                            tokio::spawn(async move {
                                let _ = tokio::io::copy(&mut down_read, &mut up_write).await;
                            });
                            // The relay's ServerHello and encrypted handshake: byte 300 is
                            // inside its encrypted extensions or certificate.
                            let mut seen = 0usize;
                            let mut buf = vec![0u8; 16384];
                            while let Ok(n) = up_read.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                if (seen..seen + n).contains(&300) {
                                    buf[300 - seen] ^= 1;
                                }
                                seen += n;
                                if down_write.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    _ => {
                        // Completes the handshake only if the client accepts our key; a
                        // client that does would then be talking to us.
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(socket).await {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop(tls);
                            }
                        });
                    }
                }
            }
        });
        Self {
            addr,
            mode,
            _runtime: runtime,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

fn client(path: SocketAddr, name: &str, home: &std::path::Path, server: Option<String>) -> Client {
    let options = Options {
        server,
        ..Options::default()
    };
    Client::start_opts(path, name, home, &options)
}

fn known_relays(home: &std::path::Path) -> String {
    std::fs::read_to_string(home.join("known-relays")).unwrap_or_default()
}

/// The client refuses the impostor: `server_key_mismatch` naming both keys, `offline`,
/// exit 1, and what was queued is still queued (delivered once the path is honest). The
/// message says what to do where the pin came from (`remedy`).
fn refuses_the_impostor(mut victim: Client, relay_fp: &str, remedy: &str) {
    let mismatch = victim.expect("server_key_mismatch", |e| {
        e["event"] == "error" && e["code"] == "server_key_mismatch"
    });
    let message = mismatch["message"].as_str().unwrap();
    assert!(
        message.contains(relay_fp),
        "names the pinned key: {message}"
    );
    assert!(message.contains(remedy), "says {remedy:?}: {message}");
    victim.expect("offline", |e| {
        e["event"] == "connection" && e["state"] == "offline"
    });
    assert_eq!(
        victim.wait_exit(),
        1,
        "a key mismatch ends the headless client"
    );
}

#[test]
fn a_man_in_the_middle_is_refused_by_pinned_and_by_first_use_clients_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let path = Path::start(relay.addr);
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    let pinned = Some(format!("{}#{}", path.addr, relay.fingerprint));

    for (name, server) in [("bob", pinned), ("carol", None)] {
        let home = dir.path().join(name);
        // An honest path first: the pinned address connects, the bare one pins on first use.
        path.set(FORWARD);
        let mut user = client(path.addr, name, &home, server.clone());
        let key = user.expect("server_key", |e| e["event"] == "server_key");
        assert_eq!(key["fingerprint"], relay.fingerprint.as_str());
        assert_eq!(key["first_use"], server.is_none(), "{key}");
        assert_eq!(key["certified"], false);
        user.connected();
        assert!(known_relays(&home).contains(&relay.fingerprint));
        user.send(&format!("/msg alice first from {name}"));
        assert_eq!(
            alice.message_from(name)["text"],
            format!("first from {name}")
        );
        assert_eq!(user.quit(), 0);

        // The path goes down; a message waits in the outbox; then the impostor answers.
        path.set(DROP);
        let mut user = client(path.addr, name, &home, server.clone());
        user.expect("reconnecting", |e| {
            e["event"] == "connection" && e["state"] == "reconnecting"
        });
        user.send(&format!("/msg alice held by {name}"));
        user.expect("queued", |e| e["event"] == "queued");
        path.set(INTERCEPT);
        // A pin given with the address may be a typo; one from a first use is in a file.
        let remedy = if server.is_some() {
            "typo"
        } else {
            "known-relays"
        };
        refuses_the_impostor(user, &relay.fingerprint, remedy);
        let known = known_relays(&home);
        assert!(
            known.lines().count() == 1 && known.contains(&relay.fingerprint),
            "the relay's key stays the only one pinned: {known}"
        );

        // Honest again: the held message arrives, once.
        path.set(FORWARD);
        let mut user = client(path.addr, name, &home, server);
        user.connected();
        assert_eq!(alice.message_from(name)["text"], format!("held by {name}"));
        user.expect("delivered", |e| e["event"] == "delivered");
        alice.assert_no_more_messages(Duration::from_millis(500));
        assert_eq!(user.quit(), 0);
    }
}

/// A private certificate authority (PEM) and a relay certificate chain and key it issued
/// for `localhost`, written into `dir`.
fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (chain, key, ca_file) = (
        dir.join("fullchain.pem"),
        dir.join("privkey.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let ron = format!(
        "(tls: Some((cert_chain: {:?}, key: {:?})))",
        chain.display().to_string(),
        key.display().to_string()
    );
    (ca_file, ron)
}

#[test]
fn a_relay_with_a_certificate_from_a_trusted_authority_is_trusted_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, ron) = private_ca(&dir.path().join("pki"));
    let relay = Relay::start_with_config("127.0.0.1:0", &dir.path().join("relay"), &ron);
    let by_name = format!("localhost:{}", relay.addr.port());

    // With the CA trusted: certified, and its key pinned so no later impostor is taken
    // for a first use.
    let alice_home = dir.path().join("alice");
    let options = Options {
        server: Some(by_name.clone()),
        args: vec!["--ca-file".into(), ca_file.display().to_string()],
        ..Options::default()
    };
    let mut alice = Client::start_opts(relay.addr, "alice", &alice_home, &options);
    let key = alice.expect("server_key", |e| e["event"] == "server_key");
    assert_eq!(key["certified"], true, "{key}");
    assert_eq!(key["first_use"], false);
    assert_eq!(key["fingerprint"], relay.fingerprint.as_str());
    alice.connected();
    assert!(
        known_relays(&alice_home).contains(&relay.fingerprint),
        "a certified relay's key is pinned: {}",
        known_relays(&alice_home)
    );

    // Without it: the same relay is an unknown key, trusted on first use and pinned.
    let bob_home = dir.path().join("bob");
    let mut bob = client(relay.addr, "bob", &bob_home, Some(by_name.clone()));
    let key = bob.expect("server_key", |e| e["event"] == "server_key");
    assert_eq!(
        (key["certified"].clone(), key["first_use"].clone()),
        (false.into(), true.into())
    );
    bob.connected();
    assert!(known_relays(&bob_home).contains(&relay.fingerprint));

    alice.send("/msg bob over a certified relay");
    assert_eq!(bob.message_from("alice")["text"], "over a certified relay");

    // A CA file that holds no certificate is a clear error, not a silent fallback.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let options = Options {
        server: Some(by_name),
        args: vec!["--ca-file".into(), junk.display().to_string()],
        ..Options::default()
    };
    let mut carol = Client::start_opts(relay.addr, "carol", &dir.path().join("carol"), &options);
    let error = carol.expect("invalid_ca_file", |e| e["event"] == "error");
    assert_eq!(error["code"], "invalid_ca_file", "{error}");
    assert!(error["message"].as_str().unwrap().contains("junk.pem"));
    // Also while a pin makes the authorities unneeded: found when given, not later.
    let options = Options {
        server: Some(format!("{}#{}", relay.addr, relay.fingerprint)),
        ..options
    };
    let mut dave = Client::start_opts(relay.addr, "dave", &dir.path().join("dave"), &options);
    let error = dave.expect("invalid_ca_file", |e| e["event"] == "error");
    assert_eq!(error["code"], "invalid_ca_file", "{error}");
}

#[test]
fn a_handshake_damaged_on_the_path_is_retried_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start("127.0.0.1:0", &dir.path().join("relay"));
    let path = Path::start(relay.addr);
    let mut alice = Client::ready(relay.addr, "alice", &dir.path().join("alice"));
    path.set(FLIP_ONCE);
    let server = Some(format!("{}#{}", path.addr, relay.fingerprint));
    let mut bob = client(path.addr, "bob", &dir.path().join("bob"), server);
    bob.send("/msg alice through a damaged handshake");
    bob.connected();
    assert_eq!(
        alice.message_from("bob")["text"],
        "through a damaged handshake"
    );
    assert!(
        bob.seen_of("error")
            .iter()
            .all(|e| e["code"] != "not_a_relay"),
        "{:?}",
        bob.seen
    );
}
