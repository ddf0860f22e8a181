use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chat_protocol::Username;
use chat_server::Config;
use chat_server::store::Store;
use clap::Parser;
use tokio::net::TcpListener;

/// Secure Chat relay: forwards end-to-end encrypted messages between users.
///
/// Settings come from defaults, then the RON file given by --config, then these flags.
/// Log level is taken from RUST_LOG (default: info); logs go to stderr.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address to listen on [default: 0.0.0.0:65432]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for the account database [default: ./chat-server-data]
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// RON file with any server setting (see `--print-config` for all of them)
    #[arg(long, value_name = "FILE.ron", global = true)]
    config: Option<PathBuf>,
    /// Print the effective settings as RON and exit
    #[arg(long)]
    print_config: bool,
    /// Logged-in connections served at once (`max_connections`)
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections not yet logged in, in all (`pre_login.max_connections`)
    #[arg(long, value_name = "N")]
    max_pending_logins: Option<usize>,
    /// Of those, from one address (`pre_login.max_per_address`)
    #[arg(long, value_name = "N")]
    max_pending_per_address: Option<usize>,
    /// New accounts per address and hour (`registrations.per_hour`)
    #[arg(long, value_name = "N")]
    registrations_per_hour: Option<f64>,
    /// Bytes queued for everyone together (`queue.max_total_bytes`)
    #[arg(long, value_name = "BYTES")]
    max_queue_bytes: Option<u64>,
    /// Largest fraction of one recipient's queue one sender may hold
    /// (`queue.max_sender_share`)
    #[arg(long, value_name = "FRACTION")]
    max_sender_share: Option<f64>,
    /// Largest fraction of the whole queue senders from one address may hold
    /// (`queue.max_source_share`)
    #[arg(long, value_name = "FRACTION")]
    max_source_share: Option<f64>,
    /// Use a NATS JetStream cluster as the backend, shared with other relays: its server
    /// URLs, comma-separated (`backend: Nats(urls: [...])`; see docs/CLUSTER.md)
    #[arg(long, value_name = "URL[,URL…]", value_delimiter = ',')]
    nats: Option<Vec<String>>,
    /// Copies of each stream and bucket in the NATS cluster (`backend: Nats(stream_replicas)`):
    /// 3 survives the loss of a node, 1 for a single NATS server [default: 3]
    #[arg(long, value_name = "N")]
    nats_replicas: Option<usize>,
    #[command(subcommand)]
    command: Option<Top>,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    /// Print the relay's key fingerprint (creating its TLS identity if missing): one line,
    /// for clients' addresses HOST:PORT#FINGERPRINT
    Fingerprint,
    /// Operator commands on the data directory (run them on the server host)
    #[command(subcommand)]
    Admin(Admin),
}

#[derive(Debug, clap::Subcommand)]
enum Admin {
    /// Delete an account and its queued messages, freeing the name for anyone
    RemoveUser {
        /// The username to remove
        name: String,
    },
    /// Print the number of users and queued envelopes
    Stats,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(n) = cli.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = cli.max_pending_logins {
        config.pre_login.max_connections = n;
    }
    if let Some(n) = cli.max_pending_per_address {
        config.pre_login.max_per_address = n;
    }
    if let Some(n) = cli.registrations_per_hour {
        config.registrations.per_hour = n;
    }
    if let Some(n) = cli.max_queue_bytes {
        config.queue.max_total_bytes = n;
    }
    if let Some(share) = cli.max_sender_share {
        config.queue.max_sender_share = share;
    }
    if let Some(share) = cli.max_source_share {
        config.queue.max_source_share = share;
    }
    if let Some(urls) = cli.nats {
        let mut nats = match config.backend {
            chat_server::config::Backend::Nats(nats) => nats,
            chat_server::config::Backend::Sqlite => Default::default(),
        };
        nats.urls = urls;
        config.backend = chat_server::config::Backend::Nats(nats);
    }
    if let Some(n) = cli.nats_replicas {
        match &mut config.backend {
            chat_server::config::Backend::Nats(nats) => nats.stream_replicas = n,
            chat_server::config::Backend::Sqlite => {
                anyhow::bail!("--nats-replicas needs the NATS backend: add --nats URL")
            }
        }
    }
    config.validate()?;
    if cli.print_config {
        println!("{}", config.to_ron());
        return Ok(());
    }
    match cli.command {
        Some(Top::Admin(admin)) => return run_admin(admin, &config),
        Some(Top::Fingerprint) => {
            let identity = chat_server::tls::load_or_create(&config)
                .context("cannot load or create the relay's TLS identity")?;
            println!("{}", identity.fingerprint);
            return Ok(());
        }
        None => {}
    }

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr on a full disk, a closed pipe) is
        // dropped: logging must never stop the program.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "cannot listen on {}; is another server running there? Choose another with --listen",
                config.listen
            )
        })?;
        let data_dir = config.data_dir.clone();
        // Handlers first, so a SIGTERM right after "listening on" is never missed.
        let shutdown = shutdown_signal().context("cannot install signal handlers")?;
        chat_server::run(listener, config, shutdown)
            .await
            .with_context(|| format!("cannot use data directory {}", data_dir.display()))
    })
}

fn run_admin(admin: Admin, config: &Config) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    anyhow::ensure!(
        dir.join(Store::FILE_NAME).exists(),
        "no server database in {}; pass the server's --data-dir (or --config)",
        dir.display()
    );
    let store = Store::open(dir)
        .with_context(|| format!("cannot open the database in {}", dir.display()))?;
    match admin {
        Admin::RemoveUser { name } => {
            let user = Username::parse(&name)
                .with_context(|| format!("{name:?} is not a valid username"))?;
            if store.remove_user(&user)? {
                println!("removed {user}: the name is free and its queued messages are deleted");
                println!(
                    "(if the server is running and {user} is online, they stay connected until they disconnect)"
                );
            } else {
                anyhow::bail!("there is no user named {user}");
            }
        }
        Admin::Stats => {
            let stats = store.stats()?;
            let limit = config.queue.max_total_bytes;
            let used = stats.queued_bytes as f64 * 100.0 / limit as f64;
            println!("users:                  {}", stats.users);
            println!("queued envelopes:       {}", stats.queued);
            println!(
                "queued bytes:           {} of {limit} ({used:.1}%)",
                stats.queued_bytes
            );
            println!("users with mail queued: {}", stats.recipients_waiting);
            println!("expired (total):        {}", stats.expired_total);
            // What the running server refused or ignored (totals, recorded every minute).
            for (name, label) in [
                ("refused_server_full", "refused, server full"),
                ("refused_queue_full", "refused, recipient queue full"),
                ("refused_sender_share", "refused, sender's share full"),
                ("refused_source_share", "refused, address's share full"),
                ("registrations_refused", "registrations refused"),
                ("connections_refused", "connections refused before login"),
                ("acks_ignored", "ack ids ignored"),
                ("paced", "times a connection was paced"),
            ] {
                let value = stats.counters.get(name).copied().unwrap_or(0);
                println!("{:<24}{value}", format!("{label}:"));
            }
        }
    }
    Ok(())
}

/// Installs the Ctrl-C and SIGTERM handlers now; the returned future resolves on either.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
