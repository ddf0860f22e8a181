//! Ports for the servers tests start (nats-server, sshd, moto): free, and outside the
//! kernel's ephemeral range.

use std::net::TcpListener;

/// A free TCP port on 127.0.0.1 for a server to bind. Taken from outside the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`, which outgoing connections draw
/// their local ports from), so nothing connecting anywhere on this machine can take it
/// between this check and the server's bind: with `bind(0)`, the port came from that very
/// range, and a nats-server once failed "address already in use" for it. Tried at random
/// until one is free (another test may hold one).
pub fn free_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter_map(|n| n.parse::<u32>().ok());
    let (low, high) = (
        bounds.next().unwrap_or(32768),
        bounds.next().unwrap_or(60999),
    );
    let span = if low >= 12_000 {
        10_000..low
    } else if high <= 63_000 {
        high + 1..65_536
    } else {
        // The whole range is ephemeral: the kernel's pick is all there is.
        return bound_port(0).expect("a free port on 127.0.0.1");
    };
    for _ in 0..10_000 {
        let port = rand::random_range(span.clone()) as u16;
        if let Some(port) = bound_port(port) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {span:?}")
}

/// `port` on 127.0.0.1 if it could be bound just now (0: any free one).
fn bound_port(port: u16) -> Option<u16> {
    let listener = TcpListener::bind(("127.0.0.1", port)).ok()?;
    listener.local_addr().ok().map(|a| a.port())
}
