//! Headless mode: commands on stdin, one JSON event per line on stdout.
//!
//! stdin: `/msg USER TEXT…`, `/users`, `/safety USER`, `/verify USER`, `/accept-key USER`,
//! `/history USER`, `/quit`. Anything else is answered with an `error` event. On `/quit`
//! or end of input the outbox is flushed (bounded wait) and the process exits.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::api::{Command, ConnectionState, Event};
use crate::engine::ClientHandle;

/// How long `/quit` or end of input waits for the outbox to reach the server.
pub const FLUSH_ON_EXIT: Duration = Duration::from_secs(10);

/// Parses one input line.
pub fn parse_command(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Err("commands start with '/': try /msg USER TEXT, /users, /safety USER, /verify USER, /accept-key USER, /quit".into());
    };
    let (name, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let one_user = |usage: &str| {
        let user = args.trim();
        if user.is_empty() || user.contains(' ') {
            Err(format!("usage: {usage}"))
        } else {
            Ok(user.to_owned())
        }
    };
    Ok(Some(match name {
        "msg" => {
            let (to, text) = args
                .trim_start()
                .split_once(' ')
                .unwrap_or((args.trim(), ""));
            if to.is_empty() || text.trim().is_empty() {
                return Err("usage: /msg USER TEXT".into());
            }
            Command::Send {
                to: to.to_owned(),
                text: text.to_owned(),
            }
        }
        "users" => Command::ListUsers,
        "watch" => {
            let users: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
            if users.is_empty() {
                return Err("usage: /watch USER [USER...]".into());
            }
            Command::Watch { users }
        }
        "safety" => Command::Safety {
            user: one_user("/safety USER")?,
        },
        "verify" => Command::Verify {
            user: one_user("/verify USER")?,
        },
        "accept-key" => Command::AcceptKey {
            user: one_user("/accept-key USER")?,
        },
        "history" => Command::History {
            user: one_user("/history USER")?,
        },
        "quit" => Command::Shutdown {
            flush_for: FLUSH_ON_EXIT,
        },
        other => return Err(format!("unknown command /{other}")),
    }))
}

/// Runs until the engine stops. Returns the process exit code: 0 after `/quit` or end of
/// input, 1 if the client went offline for good on its own (e.g. username taken).
pub async fn run(
    mut handle: ClientHandle,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> i32 {
    let mut lines = input.lines();
    let mut input_open = true;
    let mut quitting = false;
    let mut code = 0;
    loop {
        tokio::select! {
            line = lines.next_line(), if input_open => {
                let cmd = match line {
                    Ok(Some(line)) => match parse_command(&line) {
                        Ok(Some(cmd)) => cmd,
                        Ok(None) => continue,
                        Err(message) => {
                            write_event(&mut output, &Event::error("invalid_command", message)).await;
                            continue;
                        }
                    },
                    Ok(None) | Err(_) => {
                        input_open = false;
                        Command::Shutdown { flush_for: FLUSH_ON_EXIT }
                    }
                };
                if matches!(cmd, Command::Shutdown { .. }) {
                    input_open = false;
                    quitting = true;
                }
                if handle.commands.send(cmd).is_err() {
                    break;
                }
            }
            event = handle.events.recv() => {
                let Some(event) = event else { break };
                let gave_up = matches!(event, Event::Connection { state: ConnectionState::Offline, .. }) && !quitting;
                write_event(&mut output, &event).await;
                if gave_up {
                    // Offline for good without being asked (e.g. username taken): stop.
                    code = 1;
                    quitting = true;
                    input_open = false;
                    let _ = handle.commands.send(Command::Shutdown { flush_for: Duration::ZERO });
                }
            }
        }
    }
    let _ = handle.task.await;
    code
}

async fn write_event(output: &mut (impl AsyncWrite + Unpin), event: &Event) {
    let mut line = serde_json::to_string(event).expect("events always serialise");
    line.push('\n');
    // If stdout is gone there is nobody left to tell.
    let _ = output.write_all(line.as_bytes()).await;
    let _ = output.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Some(Command::AcceptKey { user: "bob".into() })
        );
        assert!(matches!(
            parse_command("/quit").unwrap(),
            Some(Command::Shutdown { .. })
        ));
        assert_eq!(parse_command("   ").unwrap(), None);
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
            "/nope",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?}");
        }
    }
}
