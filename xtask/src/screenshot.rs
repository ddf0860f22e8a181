//! `cargo xtask screenshot`: the real binaries, a real X server (Xvfb), real typing
//! (xdotool) and a real screenshot (ImageMagick `import`). It also checks the window
//! worked: bob must receive what was typed into alice's window.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};

use xtask::headless::{events, say, wait_event, wait_for};
use xtask::procs::Processes;
use xtask::{build_binaries, project_root};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the PNG [default: docs/screenshot.png]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use release builds
    #[arg(long)]
    release: bool,
    /// Use the chat-server and chat-client in DIR (e.g. unpacked from `cargo xtask dist`)
    /// instead of building them
    #[arg(long, value_name = "DIR", conflicts_with = "release")]
    bin_dir: Option<PathBuf>,
}

const SCREEN: (u32, u32) = (1280, 960);

pub fn run(args: Args) -> anyhow::Result<()> {
    let bin = match args.bin_dir {
        Some(dir) => dir,
        None => build_binaries(&["chat-server", "chat-client"], args.release)?,
    };
    let out = args
        .out
        .unwrap_or_else(|| project_root().join("docs/screenshot.png"));
    let work = std::env::temp_dir().join(format!("secure-chat-screenshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = scene(&bin, &work, &out);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    println!("saved {}", out.display());
    Ok(())
}

fn scene(bin: &Path, work: &Path, out: &Path) -> anyhow::Result<()> {
    let mut procs = Processes::default();
    let display = free_display()?;
    procs.spawn(
        Command::new("Xvfb")
            .args([
                &display,
                "-screen",
                "0",
                &format!("{}x{}x24", SCREEN.0, SCREEN.1),
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_for("Xvfb to start", || {
        Ok(Command::new("xdotool")
            .env("DISPLAY", &display)
            .arg("getdisplaygeometry")
            .output()?
            .status
            .success())
    })?;

    let addr = procs.start_relay(bin, &work.join("relay"))?;

    // Bob, headless, scripted through stdin.
    let bob = procs.spawn(
        Command::new(bin.join("chat-client"))
            .args(["--headless", "--server", &addr, "--user", "bob", "--home"])
            .arg(work.join("bob"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let mut bob_in = bob.stdin.take().expect("piped");
    let bob_events = events(bob.stdout.take().expect("piped"));
    wait_event(&bob_events, "bob ready", |e| e["event"] == "ready")?;
    // Presence is only sent to those who follow a user.
    say(&mut bob_in, "/watch alice")?;

    // Alice, in the real window, straight into the conversation with bob.
    procs.spawn(
        Command::new(bin.join("chat-client"))
            .args([
                "--server",
                &addr,
                "--user",
                "alice",
                "--chat-with",
                "bob",
                "--home",
            ])
            .arg(work.join("alice"))
            .env("DISPLAY", &display)
            .env("LIBGL_ALWAYS_SOFTWARE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_event(&bob_events, "alice online", |e| {
        e["event"] == "presence" && e["user"] == "alice" && e["online"] == true
    })?;

    for text in [
        "Hey Alice! Did the new client install fine?",
        "Let's compare safety numbers when we meet on Friday.",
    ] {
        say(&mut bob_in, &format!("/msg alice {text}"))?;
        wait_event(&bob_events, "alice's client to confirm receipt", |e| {
            e["event"] == "delivered"
        })?;
    }

    let mut window = String::new();
    wait_for("alice's window", || {
        // Not `search --sync`: it can block forever. The title is "Secure Chat — alice",
        // with the unread count before it while anything is unread ("(2) Secure Chat …").
        let found = xdotool(&display, &["search", "--name", "Secure Chat"]).unwrap_or_default();
        window = found.lines().next().unwrap_or_default().to_owned();
        Ok(!window.is_empty())
    })?;
    xdotool(&display, &["windowmove", &window, "20", "20"])?;
    xdotool(&display, &["windowfocus", "--sync", &window])?;
    let reply = "Yes, all set. Everything is end-to-end encrypted now.";
    type_text(&display, reply)?;
    xdotool(&display, &["key", "Return"])?;
    let got = wait_event(
        &bob_events,
        "bob to receive what was typed in the window",
        |e| e["event"] == "message" && e["from"] == "alice",
    )?;
    ensure!(
        got["text"] == reply,
        "bob received {:?}, not what was typed",
        got["text"]
    );
    type_text(&display, "Friday works.")?;
    xdotool(&display, &["key", "shift+Return"])?;
    type_text(&display, "Bring the numbers!")?;
    xdotool(&display, &["key", "Return"])?;
    let got = wait_event(&bob_events, "the two-line message", |e| {
        e["event"] == "message" && e["from"] == "alice"
    })?;
    ensure!(
        got["text"] == "Friday works.\nBring the numbers!",
        "Shift+Enter should make one two-line message, got {:?}",
        got["text"]
    );
    say(&mut bob_in, "/msg alice See you then 👋")?;
    wait_event(&bob_events, "delivery of bob's last message", |e| {
        e["event"] == "delivered"
    })?;
    // Let the window repaint the last receipt before the picture.
    std::thread::sleep(Duration::from_millis(800));

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let status = Command::new("import")
        .env("DISPLAY", &display)
        .args(["-window", &window])
        .arg(out)
        .status()
        .context("cannot run ImageMagick's `import`; install imagemagick")?;
    ensure!(status.success(), "import failed");
    let size = std::fs::metadata(out)?.len();
    ensure!(
        size > 10_000,
        "the screenshot is suspiciously small ({size} bytes)"
    );
    let _ = writeln!(bob_in, "/quit");
    Ok(())
}

fn free_display() -> anyhow::Result<String> {
    (90..200)
        .find(|n| !Path::new(&format!("/tmp/.X{n}-lock")).exists())
        .map(|n| format!(":{n}"))
        .context("no free X display number")
}

fn xdotool(display: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("xdotool")
        .env("DISPLAY", display)
        .args(args)
        .output()
        .context("cannot run xdotool; install it")?;
    ensure!(
        out.status.success(),
        "xdotool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn type_text(display: &str, text: &str) -> anyhow::Result<()> {
    xdotool(display, &["type", "--delay", "15", text]).map(drop)
}
