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
