//! How the relay closes a session: the reason it gives must reach a client that is behind
//! on reading, even if that client sends (an `Ack`) before it has read it; and what it
//! holds for a reader that is behind, before and instead of closing it.

use std::time::Duration;

use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};
use futures_util::StreamExt;
use rstest::rstest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::{Backend, Client, Nats, PATIENCE, Sqlite, TestServer};

/// The relay's end of `client`'s connection has stopped sending (its state in
/// `/proc/net/tcp` is no longer ESTABLISHED): it wrote its last words and closed, at
/// least for writing.
fn relay_closed(relay_port: u16, client: &Client) -> bool {
    let tcp = client.framed.get_ref().get_ref().0;
    let client_port = tcp.local_addr().unwrap().port();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).unwrap();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        port(cols[1]) == relay_port && port(cols[2]) == client_port && cols[3] != "01"
    })
}

/// No rate limit, and one sender may fill a mailbox: these tests are about the reader.
fn unpaced(c: &mut chat_server::Config) {
    c.rate_limit.per_second = 1e6;
    c.rate_limit.burst = 1e6;
    c.queue.max_sender_share = 1.0;
    c.queue.max_bytes_per_user = 1 << 30;
    c.queue.max_source_share = 1.0;
}

/// Pipelines `n` sends of `payload` to bob, then reads their answers: how many were `Ok`.
async fn send_to_bob(alice: &mut Client, n: u32, payload: &[u8]) -> u32 {
    for k in 0..n {
        let msg = ClientMessage::Send {
            id: 1000 + k,
            to: "bob".into(),
            payload: payload.to_vec(),
        };
        alice.send(msg).await;
    }
    let mut accepted = 0;
    for _ in 0..n {
        if let ServerMessage::Ok { .. } = alice.recv_reply().await {
            accepted += 1;
        }
    }
    accepted
}

/// Why a session is closed, in the test below.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// The user logged in on another device.
    Replaced,
    /// The session sent a frame over the limit.
    TooLarge,
}

/// A device closed while it was not reading (a laptop asleep, a stalled link) wakes,
/// reads a delivery and acknowledges it, as every client does, then reads on: it must
/// get to the `Error` saying why (`session_replaced` stops it for good), not a reset
/// that throws away what it had not read yet. A client that only saw the reset would
/// reconnect, and a replaced one replace the new device in turn.
#[rstest]
#[tokio::test]
async fn a_session_closed_while_behind_on_reading_still_reads_why(
    #[values(Sqlite, Nats)] backend: Backend,
    #[values(Why::Replaced, Why::TooLarge)] why: Why,
) {
    let server = TestServer::on(backend, unpaced).await;
    let mut bob1 = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    // More than the sockets' buffers hold while bob1 does not read (about 1 MB).
    const N: u32 = 16;
    let payload = vec![7u8; 60_000];
    assert_eq!(send_to_bob(&mut alice, N, &payload).await, N);
    let (expected, bob2) = match why {
        Why::Replaced => (
            ErrorCode::SessionReplaced,
            Some(server.user("bob", 1).await),
        ),
        Why::TooLarge => {
            bob1.raw(&u32::MAX.to_be_bytes()).await;
            (ErrorCode::FrameTooLarge, None)
        }
    };
    // The relay has written why behind what bob1 has not read, and closed.
    let port = server.addr.port();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !relay_closed(port, &bob1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not close the replaced session"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (first, _, _) = bob1.delivery().await;
    bob1.send(ClientMessage::Ack {
        envelope_ids: vec![first],
    })
    .await;
    let mut read = 1;
    loop {
        match tokio::time::timeout(PATIENCE, bob1.framed.next()).await {
            Ok(Some(Ok(ServerMessage::Deliver { .. }))) => read += 1,
            Ok(Some(Ok(ServerMessage::Error { code, .. }))) => {
                assert_eq!(code, expected);
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("after {read} deliveries, no {expected} but {other:?}"),
        }
    }
    assert!(read <= N);
    bob1.expect_closed().await;
    // The next session gets everything (the closed one's late Ack is not taken), each
    // once.
    let mut bob2 = match bob2 {
        Some(bob2) => bob2,
        None => server.user("bob", 1).await,
    };
    let mut ids = Vec::new();
    for _ in 0..N {
        let (id, from, body) = bob2.delivery().await;
        assert_eq!((from.as_str(), body.len()), ("alice", payload.len()));
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), N as usize);
}

/// Handshakes still under way when the relay shuts down end at once: they do not hold
/// the shutdown for its grace period (here far longer than the test's patience).
#[tokio::test]
async fn shutdown_does_not_wait_for_unfinished_handshakes() {
    let server = TestServer::start(|c| {
        c.shutdown_grace_secs = 600.0;
        c.login_timeout_secs = 600.0;
    })
    .await;
    // Each a TLS record header promising a ClientHello that never comes.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .unwrap();
        stalled.push(socket);
    }
    // A login after them: the relay accepts in order, so it has taken them.
    let mut alice = server.user("alice", 0).await;
    server.stop().await;
    alice.expect_error(ErrorCode::ShuttingDown).await;
    for mut socket in stalled {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a stalled handshake was left open");
    }
}

/// A reader that reads just enough never to time out cannot make the relay hold more than
/// `send_queue_bytes` for it: past that it is closed `slow_consumer` (and reads why,
/// behind what it had not read yet), and its next session gets every envelope, in order.
/// (With the NATS backend the mailbox is read at the client's pace, and what the relay
/// takes from it ahead of the client is bounded: the last test.)
#[tokio::test]
async fn a_slow_reader_is_bounded_in_bytes_and_loses_nothing() {
    let server = TestServer::start(|c| {
        unpaced(c);
        c.send_queue_bytes = 256 * 1024;
    })
    .await;
    let mut bob = server.user("bob", 1).await;
    let mut alice = server.user("alice", 0).await;
    // 12 MB: far more than the sockets' buffers and the bound together.
    const N: u32 = 200;
    let payload = vec![9u8; 60_000];
    let sent = payload.clone();
    let sending = tokio::spawn(async move { send_to_bob(&mut alice, N, &sent).await });
    // Bob reads a delivery every 50 ms (1.2 MB/s): never too slow for the write timeout.
    let mut read = 0;
    let closed_with = loop {
        match tokio::time::timeout(PATIENCE, bob.framed.next()).await {
            Ok(Some(Ok(ServerMessage::Deliver { .. }))) => {
                read += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Some(Ok(ServerMessage::Error { id: None, code, .. }))) => break code,
            Ok(Some(Ok(_))) => {}
            other => panic!("after {read} deliveries, not closed but {other:?}"),
        }
    };
    assert_eq!(closed_with, ErrorCode::SlowConsumer, "after {read}");
    assert!(read < N, "{read}");
    assert_eq!(sending.await.unwrap(), N);
    let mut bob = server.user("bob", 1).await;
    let got = crate::deliveries(&mut bob, N as usize).await;
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(got.iter().all(|(_, p)| *p == payload));
}

/// With the NATS backend a session's mailbox reader pulls envelopes ahead of what its
/// client has read, bounded in bytes: for a client with 40 MB waiting that reads the first
/// 20 (the reader gives 16 by gets, then reads through a consumer: a backlog) and then
/// none, the relay takes about 3 MiB more from NATS (its hand-over to the session, 1 MiB,
/// and two pull requests of 1 MiB), besides what the sockets hold; not a pull request's
/// 500 envelopes, nor the hand-over channel's 64. The client then gets every envelope,
/// once and in order.
#[tokio::test]
async fn a_mailbox_reader_pulls_ahead_of_its_client_only_so_many_bytes() {
    let server = TestServer::on(Nats, |c| {
        unpaced(c);
        c.write_timeout_secs = 120.0;
        c.max_frame_bytes = 512 * 1024;
        c.writer_queue_bytes = 256 << 20;
    })
    .await;
    drop(server.user("bob", 1).await);
    let mut alice = server.user("alice", 0).await;
    const N: u32 = 80;
    let payload = vec![5u8; 500_000];
    assert_eq!(send_to_bob(&mut alice, N, &payload).await, N);
    let mut bob = server.user("bob", 1).await;
    const READ_FIRST: usize = 20;
    let mut got = crate::deliveries(&mut bob, READ_FIRST).await;
    // Until the relay stops taking envelopes: the count unchanged for a second.
    let deadline = Instant::now() + PATIENCE;
    let (mut taken, mut since) = (server.mailbox_sent().await, Instant::now());
    while since.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "the relay kept taking envelopes");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = server.mailbox_sent().await;
        if now != taken {
            (taken, since) = (now, Instant::now());
        }
    }
    // 500 KB each: 10 past what was read when this test was written (the reader's and the
    // sockets' together). Without the bound in bytes: all 80; with pulls bounded but not
    // the hand-over, 74.
    assert!(taken > READ_FIRST as u64, "no consumer took any: {taken}");
    assert!(
        taken <= READ_FIRST as u64 + 30,
        "the relay took {taken} envelopes for a client that read {READ_FIRST}"
    );
    got.extend(crate::deliveries(&mut bob, N as usize - READ_FIRST).await);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(got.iter().all(|(_, p)| *p == payload));
}
