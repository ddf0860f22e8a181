//! Headless mode: commands on stdin, one JSON event per line on stdout.
//!
//! stdin: `/msg USER TEXT…`, `/users`, `/watch USER…`, `/safety USER`, `/verify USER`,
//! `/accept-key USER [FINGERPRINT]`, `/reject-key USER`, `/history USER`, `/group-create NAME
//! USER…`, `/group-add GROUP USER…`, `/group-remove GROUP USER…`, `/group-leave GROUP`,
//! `/group-rename GROUP NAME`, `/group-promote GROUP USER…`, `/gmsg GROUP TEXT…`, `/groups`,
//! `/group-history GROUP`, `/archive USER`, `/unarchive USER`, `/remove USER`, `/reconnect`,
//! `/quit` (a NAME or GROUP with spaces goes in double quotes). Anything
//! else — including a line that is not UTF-8 — is answered with an `error` event, in its
//! place among the answers to the other lines (through the engine, as
//! [`Command::Report`]), and the client keeps running. On `/quit` or end of input the outbox is flushed (bounded wait)
//! and the process exits.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Longest input line accepted; a longer one is refused (and skipped), not buffered.
const MAX_LINE: usize = 256 * 1024;

use crate::api::{Command, ConnectionState, Event};
use crate::engine::ClientHandle;

/// How long `/quit` or end of input waits for the outbox to reach the server.
pub const FLUSH_ON_EXIT: Duration = Duration::from_secs(10);

/// After the client stopped on its own, lines still waiting on input are answered until
/// none comes for this long (input not written yet is not waited for)…
const UNREAD_QUIET: Duration = Duration::from_millis(250);
/// …or for this long in all.
const UNREAD_FOR: Duration = Duration::from_secs(10);

/// Parses one input line.
pub fn parse_command(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Err("commands start with '/': try /msg USER TEXT, /users, /watch USER, /safety USER, /verify USER, /accept-key USER [FINGERPRINT], /reject-key USER, /history USER, /archive USER, /unarchive USER, /remove USER, /group-create NAME USER…, /group-add GROUP USER…, /group-remove GROUP USER…, /group-promote GROUP USER…, /group-leave GROUP, /group-rename GROUP NAME, /gmsg GROUP TEXT…, /groups, /group-history GROUP, /reconnect, /quit".into());
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
        "users" if args.trim().is_empty() => Command::ListUsers,
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
        "accept-key" => {
            let (user, fingerprint) = args
                .trim()
                .split_once(' ')
                .map_or((args.trim(), None), |(u, fp)| {
                    (u, Some(fp.trim().to_owned()))
                });
            if user.is_empty() {
                return Err("usage: /accept-key USER [FINGERPRINT]".into());
            }
            Command::AcceptKey {
                user: user.to_owned(),
                fingerprint,
            }
        }
        "reject-key" => Command::RejectKey {
            user: one_user("/reject-key USER")?,
        },
        "archive" => Command::Archive {
            user: one_user("/archive USER")?,
        },
        "unarchive" => Command::Unarchive {
            user: one_user("/unarchive USER")?,
        },
        "remove" => Command::Remove {
            user: one_user("/remove USER")?,
        },
        "history" => Command::History {
            user: one_user("/history USER")?,
        },
        "group-create" => {
            let (name, rest) = take_word(args).ok_or("usage: /group-create NAME USER...")?;
            let members: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            if members.is_empty() {
                return Err(
                    "usage: /group-create NAME USER... (a name with spaces in double quotes)"
                        .into(),
                );
            }
            Command::GroupCreate { name, members }
        }
        "group-add" | "group-remove" | "group-promote" => {
            let usage = format!("usage: /{name} GROUP USER...");
            let (group, rest) = take_word(args).ok_or(usage.clone())?;
            let users: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            if users.is_empty() {
                return Err(usage);
            }
            match name {
                "group-add" => Command::GroupAdd { group, users },
                "group-remove" => Command::GroupRemove { group, users },
                _ => Command::GroupPromote { group, users },
            }
        }
        "group-leave" => Command::GroupLeave {
            group: whole_group(args).ok_or("usage: /group-leave GROUP")?,
        },
        "group-history" => Command::GroupHistory {
            group: whole_group(args).ok_or("usage: /group-history GROUP")?,
        },
        "group-rename" => {
            let (group, rest) = take_word(args).ok_or("usage: /group-rename GROUP NAME")?;
            let name = rest.trim();
            if name.is_empty() {
                return Err("usage: /group-rename GROUP NAME".into());
            }
            Command::GroupRename {
                group,
                name: name.trim_matches('"').to_owned(),
            }
        }
        "gmsg" => {
            let (group, text) = take_word(args).ok_or("usage: /gmsg GROUP TEXT")?;
            let text = text.strip_prefix(' ').unwrap_or(text);
            if text.trim().is_empty() {
                return Err("usage: /gmsg GROUP TEXT".into());
            }
            Command::GroupSend {
                group,
                text: text.to_owned(),
            }
        }
        "groups" if args.trim().is_empty() => Command::Groups,
        "reconnect" if args.trim().is_empty() => Command::Reconnect,
        "quit" if args.trim().is_empty() => Command::Shutdown {
            flush_for: FLUSH_ON_EXIT,
        },
        "users" | "quit" | "groups" | "reconnect" => {
            return Err(format!("usage: /{name} (it takes no arguments)"));
        }
        other => return Err(format!("unknown command /{other}")),
    }))
}

/// The first word of `args` and the rest: a word in double quotes may hold spaces.
fn take_word(args: &str) -> Option<(String, &str)> {
    let args = args.trim_start();
    let (word, rest) = match args.strip_prefix('"') {
        Some(quoted) => unquote(quoted)?,
        None => {
            let (word, rest) = args.split_once(' ').unwrap_or((args, ""));
            (word.to_owned(), rest)
        }
    };
    (!word.trim().is_empty()).then_some((word, rest))
}

/// The text up to the closing `"` (`\"` is a quote in it, `\\` a backslash) and what
/// follows it; `None` without a closing quote.
fn unquote(quoted: &str) -> Option<(String, &str)> {
    let mut word = String::new();
    let mut chars = quoted.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((word, &quoted[at + 1..])),
            // Only \" and \\ are escapes; any other backslash is kept as typed.
            '\\' => match chars.next()?.1 {
                c @ ('"' | '\\') => word.push(c),
                c => {
                    word.push('\\');
                    word.push(c);
                }
            },
            c => word.push(c),
        }
    }
    None
}

/// For a command whose GROUP is given unquoted (the first word): an error if the first
/// words together are the name of one of `groups` — `/gmsg Family 2 hi` with a group
/// "Family 2" would otherwise go to "Family", or fail, without the user seeing why.
pub fn check_unquoted_group<'a>(
    line: &str,
    groups: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let Some((name, args)) = line
        .trim_end()
        .strip_prefix('/')
        .map(|rest| rest.split_once(' ').unwrap_or((rest, "")))
    else {
        return Ok(());
    };
    let takes_group_then_more = matches!(
        name,
        "gmsg" | "group-add" | "group-remove" | "group-promote" | "group-rename"
    );
    let args = args.trim_start();
    if !takes_group_then_more || args.starts_with('"') {
        return Ok(());
    }
    let words: Vec<&str> = args.split(' ').collect();
    for name_here in groups {
        let parts = name_here.split(' ').count();
        if parts >= 2 && words.len() > parts && words[..parts].join(" ") == name_here {
            return Err(format!(
                "\"{name_here}\" is the name of one of your groups, but unquoted only its first \
                 word is taken as the group: put a name with spaces in double quotes (/{name} \
                 \"{name_here}\" …) or give the group's id (/groups lists them)"
            ));
        }
    }
    Ok(())
}

/// A GROUP that is the whole rest of the line (quotes optional).
fn whole_group(args: &str) -> Option<String> {
    let group = args.trim().trim_matches('"').trim();
    (!group.is_empty()).then(|| group.to_owned())
}

/// What the process wants done around the engine's start.
pub struct Startup {
    /// Shown as a `warning` event first (e.g. a damaged settings file was ignored).
    pub warning: Option<String>,
    /// Called once logged in (remember the server and name); a returned text is shown as
    /// a `warning`.
    pub on_ready: Box<dyn FnOnce() -> Option<String> + Send>,
}

impl Default for Startup {
    fn default() -> Self {
        Self {
            warning: None,
            on_ready: Box::new(|| None),
        }
    }
}

/// Runs until the engine stops. Returns the process exit code: 0 after `/quit` or end of
/// input, 1 if the client went offline for good on its own (e.g. username taken).
pub async fn run(
    mut handle: ClientHandle,
    mut input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    startup: Startup,
) -> i32 {
    if let Some(warning) = startup.warning {
        write_event(&mut output, &Event::warning("settings_unreadable", warning)).await;
    }
    let mut on_ready = Some(startup.on_ready);
    let mut buf = Vec::new();
    let mut input_open = true;
    let mut quitting = false;
    let mut code = 0;
    // Our groups' names by id, as the events said: for telling an unquoted name apart.
    let mut group_names = std::collections::HashMap::<String, String>::new();
    // Answers to lines the engine was gone for: written after its last events.
    let mut late_reports = Vec::new();
    // Reading stopped because the client stopped on its own: lines still waiting on
    // input are answered at the end, after the stop.
    let mut unread_left = false;
    loop {
        tokio::select! {
            line = read_line(&mut input, &mut buf), if input_open => {
                let cmd = match line {
                    // A refused line is answered by the engine, in order: the lines
                    // before it may still wait for their answers there.
                    Line::Text(line) => match parse_line(&line, &group_names) {
                        Ok(Some(cmd)) => cmd,
                        Ok(None) => continue,
                        Err(refusal) => Command::Report(refusal),
                    },
                    Line::Invalid(message) => {
                        Command::Report(Event::error("invalid_command", message))
                    }
                    Line::End => {
                        input_open = false;
                        Command::Shutdown { flush_for: FLUSH_ON_EXIT }
                    }
                };
                if matches!(cmd, Command::Shutdown { .. }) {
                    input_open = false;
                    quitting = true;
                }
                if let Err(refused) = handle.commands.send(cmd) {
                    // The engine stopped: what it said last is still to be read (and
                    // decides the exit code); this line's answer comes after it.
                    unread_left = input_open;
                    input_open = false;
                    late_reports.extend(refused.0.not_done());
                }
            }
            event = handle.events.recv() => {
                let Some(event) = event else { break };
                // Offline for good without being asked (e.g. username taken): stop, and exit
                // 1, even when the end of input already asked to quit (a `reason` says the
                // engine stopped on its own, not for that).
                let gave_up = match &event {
                    Event::Connection { state: ConnectionState::Offline, reason, .. } => {
                        reason.is_some() || !quitting
                    }
                    _ => false,
                };
                let ready = matches!(event, Event::Ready { .. });
                match &event {
                    Event::Group(info) => {
                        group_names.insert(info.id.clone(), info.name.clone());
                    }
                    Event::Groups { items } => {
                        group_names = items.iter().map(|g| (g.id.clone(), g.name.clone())).collect();
                    }
                    _ => {}
                }
                write_event(&mut output, &event).await;
                if ready
                    && let Some(warning) = on_ready.take().and_then(|f| f())
                {
                    write_event(&mut output, &Event::warning("settings_not_saved", warning)).await;
                }
                if gave_up {
                    code = 1;
                    quitting = true;
                    unread_left |= input_open;
                    input_open = false;
                    let _ = handle.commands.send(Command::Shutdown { flush_for: Duration::ZERO });
                }
            }
        }
    }
    for event in &late_reports {
        write_event(&mut output, event).await;
    }
    if unread_left {
        answer_unread(&mut input, &mut buf, &mut output, &group_names).await;
    }
    if let Err(e) = handle.task.await {
        // The engine died (a bug): say so, and exit non-zero.
        let message = format!("the client stopped unexpectedly ({e}); please report this");
        write_event(&mut output, &Event::error("internal", message)).await;
        return 1;
    }
    code
}

/// Makes a command of a line: `Ok(None)` for a blank line, `Err` with the `error` event
/// that refuses it (`invalid_command`, or `ambiguous_group` for an unquoted group name
/// that is the start of another group's, `groups` being our groups' names by id).
fn parse_line(
    line: &str,
    groups: &std::collections::HashMap<String, String>,
) -> Result<Option<Command>, Event> {
    check_unquoted_group(line, groups.values().map(String::as_str))
        .map_err(|message| Event::error("ambiguous_group", message))?;
    parse_command(line).map_err(|message| Event::error("invalid_command", message))
}

/// After the client stopped on its own: answers the lines already waiting on `input` as
/// those read before the stop were (refused lines refused, commands `not_running`), in
/// order, up to `/quit` or the end of input, until none comes for [`UNREAD_QUIET`] or
/// for [`UNREAD_FOR`] in all. Without this, how many of a script's lines were answered
/// would depend on how fast the stop came.
async fn answer_unread(
    input: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    output: &mut (impl AsyncWrite + Unpin),
    groups: &std::collections::HashMap<String, String>,
) {
    let until = tokio::time::Instant::now() + UNREAD_FOR;
    loop {
        let wait = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(UNREAD_QUIET);
        let Ok(line) = tokio::time::timeout(wait, read_line(input, buf)).await else {
            return;
        };
        let answer = match line {
            Line::End => return,
            Line::Invalid(message) => Some(Event::error("invalid_command", message)),
            Line::Text(line) => match parse_line(&line, groups) {
                Ok(Some(Command::Shutdown { .. })) => return,
                Ok(Some(cmd)) => cmd.not_done(),
                Ok(None) => None,
                Err(refusal) => Some(refusal),
            },
        };
        if let Some(event) = answer {
            write_event(output, &event).await;
        }
    }
}

/// One line of input.
enum Line {
    Text(String),
    /// Not a usable line (not UTF-8, too long): say why and go on.
    Invalid(String),
    /// End of input (or stdin failed).
    End,
}

/// Reads one line. Cancel-safe for `select!`: a partly read line stays in `buf`.
async fn read_line(input: &mut (impl AsyncBufRead + Unpin), buf: &mut Vec<u8>) -> Line {
    loop {
        let available = match input.fill_buf().await {
            Ok(available) => available,
            Err(_) => return Line::End,
        };
        if available.is_empty() {
            if buf.is_empty() {
                return Line::End;
            }
            // A last line without a newline.
            break;
        }
        let (used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if buf.len() <= MAX_LINE {
            buf.extend_from_slice(&available[..used]);
        }
        input.consume(used);
        if done {
            break;
        }
    }
    let bytes = std::mem::take(buf);
    if bytes.len() > MAX_LINE {
        return Line::Invalid(format!(
            "the line is longer than {MAX_LINE} bytes and was ignored"
        ));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Line::Text(text),
        Err(e) => Line::Invalid(format!(
            "the line is not valid UTF-8 (byte {} is not) and was ignored",
            e.utf8_error().valid_up_to()
        )),
    }
}

async fn write_event(output: &mut (impl AsyncWrite + Unpin), event: &Event) {
    let mut line = serde_json::to_string(event).expect("events always serialise");
    line.push('\n');
    // If stdout is gone there is nobody left to tell.
    let _ = output.write_all(line.as_bytes()).await;
    let _ = output.flush().await;
}

#[cfg(test)]
mod tests;
