use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use chat_client::home::Home;
use chat_client::{ClientConfig, headless};
use chat_protocol::Username;
use clap::Parser;

/// Secure Chat client: end-to-end encrypted messaging through a Secure Chat relay.
///
/// Opens the desktop window; with --headless, runs as a JSON-lines tool for scripts.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Run without a window: commands on stdin, JSON events on stdout (see README)
    #[arg(long)]
    headless: bool,
    /// Relay address HOST:PORT#FINGERPRINT (the relay's key, as its operator gives it), or
    /// HOST:PORT to trust the key on first use; a cluster's relays as a comma-separated
    /// list (the first that answers is used, the next when it fails) [default: the last
    /// one used, else 127.0.0.1:65432]
    #[arg(long, value_name = "HOST:PORT[#FINGERPRINT][,HOST:PORT…]")]
    server: Option<String>,
    /// Your username [default: the last one used]; in the window, signs in right away
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Home directory for identity, settings and history [default: platform data dir]
    #[arg(long, env = "CHAT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Window only: open the conversation with USER after signing in
    #[arg(long, value_name = "USER", conflicts_with = "headless")]
    chat_with: Option<String>,
    /// Window only: where the window first appears, in screen pixels
    #[arg(long, value_name = "X,Y", value_parser = parse_position, conflicts_with = "headless")]
    window_position: Option<[f32; 2]>,
    /// Window only: take the left or right half of the screen (e.g. two side by side)
    #[arg(long, value_name = "SIDE", conflicts_with = "headless")]
    window_half: Option<chat_client::gui::placement::Half>,
    /// File holding the identity key's passphrase (or set CHAT_PASSPHRASE)
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Also trust this certificate authority (PEM), besides the system's, to vouch for a
    /// relay given as HOST:PORT without a fingerprint (its certificate must name HOST)
    #[arg(long, value_name = "FILE.pem")]
    ca_file: Option<PathBuf>,
    /// Most members a group may have when you create or grow it (changes made by others
    /// are accepted up to 4096 members)
    #[arg(long, value_name = "N", default_value_t = chat_protocol::group::DEFAULT_MAX_MEMBERS as u64,
          value_parser = clap::value_parser!(u64).range(2..=4096))]
    max_group_members: u64,
}

fn parse_position(s: &str) -> Result<[f32; 2], String> {
    let (x, y) = s.split_once(',').ok_or("expected X,Y, e.g. 40,40")?;
    let parse = |v: &str| v.trim().parse::<f32>().map_err(|e| format!("{v:?}: {e}"));
    Ok([parse(x)?, parse(y)?])
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk, a closed pipe) is
        // dropped: logging must never stop the program.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    // Everything the client writes (history, keys, window state) is for this user only.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let home = Home::resolve(cli.home.clone())?;
    let (mut settings, settings_problem) = home.load_settings();
    let settings_warning = settings_problem.map(|e| {
        let message = format!("{e}; using the defaults and the command-line options");
        tracing::warn!("{message}");
        message
    });
    let passphrase = match &cli.passphrase_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the passphrase file {}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        None => std::env::var("CHAT_PASSPHRASE").ok(),
    };

    if !cli.headless {
        // With --user on the command line the window signs in right away.
        let launch = chat_client::gui::Launch {
            auto_sign_in: cli.user.is_some(),
            position: cli.window_position,
            half: cli.window_half,
            chat_with: cli
                .chat_with
                .map(|u| Username::parse(&u).map(|u| u.to_string()))
                .transpose()
                .context("invalid --chat-with user")?,
            server: cli.server,
            user: cli.user,
            passphrase,
            warning: settings_warning,
            ca_file: cli.ca_file,
            max_group_members: cli.max_group_members as usize,
        };
        return chat_client::gui::run(home, settings, launch);
    }
    let server = cli.server.unwrap_or_else(|| settings.server.clone());
    chat_client::net::check_server_address(&server)
        .map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let user = cli
        .user
        .or_else(|| settings.username.clone())
        .context("no username: pass --user NAME")?;
    let username = Username::parse(&user).with_context(|| format!("invalid username {user:?}"))?;
    let mut config = ClientConfig::new(home.clone(), server.clone(), username.clone());
    config.passphrase = passphrase;
    config.ca_file = cli.ca_file;
    config.max_group_members = cli.max_group_members as usize;
    // Remembered as the defaults only once they worked (logged in).
    let remember = move || {
        settings.server = server;
        settings.username = Some(username.to_string());
        home.save_settings_if_changed(&settings)
            .err()
            .map(|e| format!("{e}; the server and name were not remembered"))
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let code = runtime.block_on(async {
        let handle = chat_client::spawn(config, || {});
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let startup = headless::Startup {
            warning: settings_warning,
            on_ready: Box::new(remember),
        };
        headless::run(handle, stdin, tokio::io::stdout(), startup).await
    });
    // stdin may still be blocked in a read; don't wait for it.
    runtime.shutdown_background();
    std::process::exit(code);
}
