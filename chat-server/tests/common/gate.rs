//! A TCP forwarder on 127.0.0.1 that can hold what one side sends: a relay's NATS link
//! stalled on purpose (its requests reach NATS only when released), the way a node that
//! stops answering, or a link being re-established, holds them; or cut it (both ends
//! closed, new connections closed at once) while the node lives on, until mended.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

/// Forwards connections made to [`Gate::addr`] to the target; [`Gate::hold`] stops what
/// the connecting side sends (it stays queued, in order) until [`Gate::release`];
/// [`Gate::cut`] closes every connection through it, and those made until [`Gate::mend`].
/// Dropping the gate closes its connections too.
pub struct Gate {
    pub addr: SocketAddr,
    held: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn to(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = watch::Sender::new(false);
        let gate = held.subscribe();
        let cut = watch::Sender::new(false);
        let cuts = cut.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((near, _)) = listener.accept().await {
                if *cuts.borrow() {
                    continue;
                }
                let Ok(far) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (near_read, near_write) = near.into_split();
                let (far_read, far_write) = far.into_split();
                let cut = cuts.clone();
                tokio::spawn(pump(near_read, far_write, Some(gate.clone()), cut.clone()));
                tokio::spawn(pump(far_read, near_write, None, cut));
            }
        });
        Self {
            addr,
            held,
            cut,
            _task: task,
        }
    }

    /// From now on, nothing the connecting side sends goes through.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// What was held goes through, in order, and everything after it.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Closes every connection through the gate (both ends, nothing more forwarded), and
    /// every one made from now on as soon as it is accepted.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// New connections go through again.
    pub fn mend(&self) {
        self.cut.send_replace(false);
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    gate: Option<watch::Receiver<bool>>,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // A cut ends every wait below, reading, held or writing (and so does the gate's drop:
    // the watch then ends), and drops this pump's halves of both connections; the pump of
    // the other direction drops the other halves, and both sockets close.
    let pumped = async {
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Bytes read once the gate is held wait for its release.
            if let Some(mut gate) = gate.clone() {
                let _ = gate.wait_for(|held| !held).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::select! {
        biased;
        _ = cut.wait_for(|cut| *cut) => {}
        () = pumped => {}
    }
}
