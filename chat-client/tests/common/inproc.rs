//! An in-process relay and client cores on a tokio runtime, for tests that drive the
//! engine (or the GUI) directly rather than through processes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_client::home::Home;
use chat_client::{ClientConfig, ClientHandle, Command, Event};

use chat_protocol::Username;
use tokio::sync::oneshot;

use super::PATIENCE;

pub struct Relay {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// The key fingerprint of each relay started here, by address (what an operator would
/// hand out with the address).
static FINGERPRINTS: std::sync::Mutex<std::collections::BTreeMap<SocketAddr, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// `ADDR#FINGERPRINT` of a relay started here (just `ADDR` for another one).
pub fn pinned_address(addr: SocketAddr) -> String {
    match FINGERPRINTS.lock().unwrap().get(&addr) {
        Some(fp) => format!("{addr}#{fp}"),
        None => addr.to_string(),
    }
}

pub fn start_relay(rt: &tokio::runtime::Runtime, addr: &str, data: &std::path::Path) -> Relay {
    start_relay_with(rt, addr, data, |_| {})
}

pub fn start_relay_with(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    data: &std::path::Path,
    tweak: impl FnOnce(&mut chat_server::Config),
) -> Relay {
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = chat_server::Config {
        data_dir: data.to_owned(),
        // Off unless a test turns it on: a debug relay on a loaded machine may shed, which
        // only delays the client (it retries) but makes timings noisy.
        shed_delay_ms: 0.0,
        ..Default::default()
    };
    tweak(&mut config);
    // The relay's TLS identity, made now so its fingerprint is known to the test.
    let fingerprint = chat_server::tls::load_or_create(&config)
        .unwrap()
        .fingerprint;
    FINGERPRINTS
        .lock()
        .unwrap()
        .insert(addr, fingerprint.to_string());
    let (tx, rx) = oneshot::channel();
    let task = rt.spawn(async move { chat_server::run(listener, config, rx).await.unwrap() });
    Relay {
        addr,
        stop: Some(tx),
        task,
    }
}

pub fn stop_relay(rt: &tokio::runtime::Runtime, mut relay: Relay) {
    relay.stop.take().unwrap().send(()).unwrap();
    rt.block_on(relay.task).unwrap();
}

/// A headless peer built on the same client core the GUI uses.
pub struct Peer {
    pub handle: ClientHandle,
}

impl Peer {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        addr: SocketAddr,
        name: &str,
        home: &std::path::Path,
    ) -> Self {
        Self::start_with(rt, addr, name, home, |_| {})
    }

    pub fn start_with(
        rt: &tokio::runtime::Runtime,
        addr: SocketAddr,
        name: &str,
        home: &std::path::Path,
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> Self {
        let mut config = ClientConfig::new(
            Home::resolve(Some(home.to_owned())).unwrap(),
            addr.to_string(),
            Username::parse(name).unwrap(),
        );
        config.identity_bits = 2048;
        config.backoff_max = Duration::from_millis(500);
        tweak(&mut config);
        let _guard = rt.enter();
        let mut peer = Self {
            handle: chat_client::spawn(config, || {}),
        };
        peer.expect(|e| matches!(e, Event::Ready { .. }));
        peer
    }

    pub fn expect(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.handle.events.try_recv() {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(_) => {
                    assert!(Instant::now() < deadline, "peer: expected event never came");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn send(&self, cmd: Command) {
        self.handle.commands.send(cmd).unwrap();
    }
}
