use super::*;

#[tokio::test]
async fn lines_that_are_not_utf8_or_too_long_are_refused_and_reading_goes_on() {
    let mut input: Vec<u8> = b"/msg bob bad \xff\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
    input.extend_from_slice(b"\n/msg bob after\n/quit");
    let mut reader = tokio::io::BufReader::with_capacity(64, &input[..]);
    let mut buf = Vec::new();
    assert!(
        matches!(read_line(&mut reader, &mut buf).await, Line::Invalid(m) if m.contains("UTF-8"))
    );
    assert!(
        matches!(read_line(&mut reader, &mut buf).await, Line::Invalid(m) if m.contains("longer"))
    );
    assert!(
        matches!(read_line(&mut reader, &mut buf).await, Line::Text(t) if t == "/msg bob after\n")
    );
    assert!(matches!(read_line(&mut reader, &mut buf).await, Line::Text(t) if t == "/quit"));
    assert!(matches!(read_line(&mut reader, &mut buf).await, Line::End));
}

#[test]
fn parses_the_documented_commands() {
    assert_eq!(
        parse_command("/msg bob hello  there ").unwrap(),
        Some(Command::Send {
            to: "bob".into(),
            text: "hello  there ".into()
        })
    );
    assert_eq!(parse_command("/users").unwrap(), Some(Command::ListUsers));
    assert_eq!(
        parse_command("/watch bob  carol").unwrap(),
        Some(Command::Watch {
            users: vec!["bob".into(), "carol".into()]
        })
    );
    assert!(parse_command("/watch").unwrap_err().contains("usage"));
    assert_eq!(
        parse_command("/safety bob").unwrap(),
        Some(Command::Safety { user: "bob".into() })
    );
    assert_eq!(
        parse_command("/accept-key bob\r\n").unwrap(),
        Some(Command::AcceptKey {
            user: "bob".into(),
            fingerprint: None
        })
    );
    assert_eq!(
        parse_command("/accept-key bob 0a1b 2c3d").unwrap(),
        Some(Command::AcceptKey {
            user: "bob".into(),
            fingerprint: Some("0a1b 2c3d".into())
        })
    );
    assert_eq!(
        parse_command("/reject-key bob").unwrap(),
        Some(Command::RejectKey { user: "bob".into() })
    );
    assert!(matches!(
        parse_command("/quit").unwrap(),
        Some(Command::Shutdown { .. })
    ));
    assert_eq!(
        parse_command("/reconnect").unwrap(),
        Some(Command::Reconnect)
    );
    assert_eq!(parse_command("   ").unwrap(), None);
}

#[test]
fn group_names_quote_and_escape() {
    assert_eq!(
        parse_command(r#"/group-create "Spa ce \"q\" \\ ü 😀" bob carol"#).unwrap(),
        Some(Command::GroupCreate {
            name: r#"Spa ce "q" \ ü 😀"#.into(),
            members: vec!["bob".into(), "carol".into()]
        })
    );
    assert_eq!(
        parse_command(r#"/gmsg "Family 2" hi "there""#).unwrap(),
        Some(Command::GroupSend {
            group: "Family 2".into(),
            text: r#"hi "there""#.into()
        })
    );
    assert!(parse_command(r#"/gmsg "Family 2 hi"#).is_err(), "unclosed");
}

#[test]
fn an_unquoted_group_that_is_the_start_of_another_name_is_refused() {
    let groups = ["Family", "Family 2", "Work"];
    let err = check_unquoted_group("/gmsg Family 2 hi", groups).unwrap_err();
    assert!(err.contains("\"Family 2\""), "{err}");
    check_unquoted_group("/gmsg \"Family 2\" hi", groups).unwrap();
    check_unquoted_group("/gmsg Family hi 2", groups).unwrap();
    check_unquoted_group("/gmsg Work 2 hi", groups).unwrap();
    check_unquoted_group("/group-leave Family 2", groups).unwrap();
    assert!(check_unquoted_group("/group-add Family 2 dave", groups).is_err());
}

#[test]
fn bad_lines_are_errors() {
    for bad in [
        "hello",
        "/msg",
        "/msg bob",
        "/msg bob   ",
        "/safety",
        "/verify a b",
        "/accept-key",
        "/reject-key",
        "/archive",
        "/remove a b",
        "/quit now",
        "/users all",
        "/reconnect now",
        "/nope",
    ] {
        assert!(parse_command(bad).is_err(), "{bad:?}");
    }
}

/// A client whose start fails at once (as `passphrase_required` does): every line already
/// waiting on input is answered after the stop, in order, up to `/quit`, however the
/// reading and the stop interleave.
#[tokio::test]
async fn lines_waiting_when_the_client_stops_on_its_own_are_all_answered() {
    let mut input = Vec::new();
    for n in 0..40 {
        input.extend_from_slice(format!("/msg bob hi {n}\n").as_bytes());
        input.extend_from_slice(b"/users\n\n/frobnicate\n/gmsg g x\n\xff\n");
    }
    input.extend_from_slice(b"/quit\n/msg bob after the quit\n");
    for round in 0..40 {
        let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<Command>();
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
        // What the engine does when its start fails (`engine::spawn`): in even rounds
        // before the first line is read (its stop and the lines then race in `run`), in
        // odd ones once every line was read (it answers what it was handed).
        let engine = async move {
            let _ = ev_tx.send(Event::error(
                "passphrase_required",
                "a passphrase is needed",
            ));
            let _ = ev_tx.send(Event::Connection {
                state: ConnectionState::Offline,
                retry_in_ms: None,
                reason: Some("a passphrase is needed".into()),
                queued: 0,
                max_text_bytes: None,
                server: None,
            });
            cmd_rx.close();
            while let Ok(cmd) = cmd_rx.try_recv() {
                if let Some(event) = cmd.not_done() {
                    let _ = ev_tx.send(event);
                }
            }
        };
        let task = if round % 2 == 0 {
            engine.await;
            tokio::spawn(async {})
        } else {
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                engine.await
            })
        };
        let handle = ClientHandle {
            commands: cmd_tx,
            events: ev_rx,
            task,
        };
        let mut output = Vec::new();
        let reader = tokio::io::BufReader::with_capacity(64, &input[..]);
        let code = run(handle, reader, &mut output, Startup::default()).await;
        assert_eq!(code, 1);
        let events: Vec<serde_json::Value> = String::from_utf8(output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events[0]["code"], "passphrase_required");
        assert_eq!(events[1]["state"], "offline");
        let answers: Vec<(&str, String)> = events[2..]
            .iter()
            .map(|e| {
                let message = e["message"].as_str().unwrap();
                (
                    e["code"].as_str().unwrap(),
                    message.split(':').next().unwrap().to_owned(),
                )
            })
            .collect();
        let mut expected = Vec::new();
        for _ in 0..40 {
            expected.extend([
                (
                    "not_running",
                    "the message to bob was not queued".to_owned(),
                ),
                ("not_running", "the online users were not listed".to_owned()),
                ("invalid_command", "unknown command /frobnicate".to_owned()),
                (
                    "not_running",
                    "the message to the group g was not queued".to_owned(),
                ),
                (
                    "invalid_command",
                    "the line is not valid UTF-8 (byte 0 is not) and was ignored".to_owned(),
                ),
            ]);
        }
        assert_eq!(answers, expected);
    }
}
