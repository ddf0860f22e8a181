//! The worked example of docs/PROTOCOL.md, byte for byte. If this test fails, the wire
//! format changed: bump PROTOCOL_VERSION and update the document.

use chat_protocol::frame::{self, DEFAULT_MAX_FRAME};
use chat_protocol::{ClientMessage, ErrorCode, ServerMessage};

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn client(msg: ClientMessage) -> String {
    hex(&frame::encode(&msg, DEFAULT_MAX_FRAME).unwrap())
}

fn server(msg: ServerMessage) -> String {
    hex(&frame::encode(&msg, DEFAULT_MAX_FRAME).unwrap())
}

#[test]
fn worked_example_matches_the_document() {
    assert_eq!(
        chat_protocol::PROTOCOL_VERSION,
        8,
        "update the worked example"
    );
    let doc = include_str!("../../docs/PROTOCOL.md");
    let frames = [
        client(ClientMessage::Hello {
            version: 8,
            software: "cli/1".into(),
        }),
        server(ServerMessage::Hello {
            version: 8,
            software: "srv/1".into(),
            max_frame: 65536,
            queue_max_age_secs: 2_592_000,
            server_time_secs: 1_764_201_234,
        }),
        client(ClientMessage::Login {
            id: 1,
            username: "alice".into(),
        }),
        server(ServerMessage::Challenge {
            id: 1,
            nonce: [0xab; 32],
        }),
        client(ClientMessage::Prove {
            id: 2,
            signature: vec![0x5e; 3],
        }),
        server(ServerMessage::Welcome {
            id: 2,
            username: "alice".into(),
            registered: false,
        }),
        client(ClientMessage::Watch {
            id: 5,
            usernames: vec!["bob".into(), "dave".into()],
        }),
        server(ServerMessage::Users {
            id: 5,
            online: vec!["bob".into()],
        }),
        server(ServerMessage::Presence {
            username: "dave".into(),
            online: true,
        }),
        client(ClientMessage::Send {
            id: 3,
            to: "bob".into(),
            payload: vec![0xc1, 0xc2, 0xc3, 0xc4],
        }),
        server(ServerMessage::Deliver {
            envelope_id: 7,
            from: "alice".into(),
            payload: vec![0xc1, 0xc2, 0xc3, 0xc4],
        }),
        server(ServerMessage::Ok { id: 3 }),
        client(ClientMessage::Send {
            id: 4,
            to: "carol".into(),
            payload: vec![0xc5],
        }),
        client(ClientMessage::Ack {
            envelope_ids: vec![7],
        }),
        server(ServerMessage::Error {
            id: Some(4),
            code: ErrorCode::UnknownUser,
            message: "no user named \"carol\"".into(),
        }),
        client(ClientMessage::SendMany {
            id: 6,
            to: vec!["bob".into(), "carol".into()],
            payload: vec![0xc6],
        }),
        server(ServerMessage::Outcomes {
            id: 6,
            outcomes: vec![None, Some(ErrorCode::UnknownUser)],
        }),
    ];
    for f in &frames {
        println!("{f}");
    }
    for f in &frames {
        assert!(
            doc.contains(f.as_str()),
            "docs/PROTOCOL.md lacks the frame\n{f}"
        );
    }
}

/// The fuzz seeds are the document's frames (and the E2E test vector's envelope), so a
/// change of the wire format that forgets them fails here rather than fuzzing stale input.
#[test]
fn fuzz_seeds_are_the_current_worked_example() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/frame_decoder");
    let mut seeds = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let client = frame::parse::<ClientMessage>(&bytes, DEFAULT_MAX_FRAME)
            .ok()
            .flatten()
            .map(|(_, used)| used);
        let server = frame::parse::<ServerMessage>(&bytes, DEFAULT_MAX_FRAME)
            .ok()
            .flatten()
            .map(|(_, used)| used);
        assert!(
            client == Some(bytes.len()) || server == Some(bytes.len()),
            "seed {} is not a current frame",
            hex(&bytes)
        );
        seeds += 1;
    }
    assert_eq!(seeds, 17, "one seed per frame of the worked example");
    let vectors = include_str!("vectors/e2e.txt");
    let envelope = vectors
        .lines()
        .find_map(|l| l.strip_prefix("envelope_alice_to_bob = "))
        .unwrap();
    let seed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/open_envelope/vector.bin"
    ))
    .unwrap();
    assert_eq!(hex(&seed).replace(' ', ""), envelope.trim());
}

/// Every `Hello { version: N }` the document shows (the connection lifecycle as well as
/// the worked example) names the current version.
#[test]
fn the_document_names_the_current_version_everywhere() {
    let doc = include_str!("../../docs/PROTOCOL.md");
    let current = chat_protocol::PROTOCOL_VERSION.to_string();
    let shown: Vec<&str> = doc
        .match_indices("Hello { version: ")
        .map(|(at, m)| {
            let rest = &doc[at + m.len()..];
            &rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())]
        })
        .collect();
    assert!(
        shown.len() >= 3,
        "the Hello frames were not found: {shown:?}"
    );
    assert!(
        shown.iter().all(|v| *v == current),
        "PROTOCOL.md shows Hello versions {shown:?}; the protocol is at {current}"
    );
}
