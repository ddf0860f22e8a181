use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chat_server::Config;
use chat_server::config::Backend;
use clap::Parser;
use tokio::net::TcpListener;

mod admin;
mod say;

use admin::{Admin, run_admin};
use say::say;

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
    #[arg(long, value_name = "URL[,URL…]", value_delimiter = ',', global = true)]
    nats: Option<Vec<String>>,
    /// Copies of each stream and bucket in the NATS cluster (`backend: Nats(stream_replicas)`):
    /// 3 survives the loss of a node, 1 for a single NATS server [default: 3]
    #[arg(long, value_name = "N", global = true)]
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
            Backend::Nats(nats) => nats,
            Backend::Sqlite => Default::default(),
        };
        nats.urls = urls;
        config.backend = Backend::Nats(nats);
    }
    if let Some(n) = cli.nats_replicas {
        match &mut config.backend {
            Backend::Nats(nats) => nats.stream_replicas = n,
            Backend::Sqlite => {
                anyhow::bail!("--nats-replicas needs the NATS backend: add --nats URL")
            }
        }
    }
    adopt_systemd_credentials(&mut config, std::env::var_os("CREDENTIALS_DIRECTORY"));
    config.validate()?;
    if cli.print_config {
        say!("{}", config.to_ron());
        return Ok(());
    }
    match cli.command {
        Some(Top::Admin(admin)) => return run_admin(admin, &config),
        Some(Top::Fingerprint) => {
            let identity = chat_server::tls::load_or_create(&config)
                .context("cannot load or create the relay's TLS identity")?;
            say!("{}", identity.fingerprint);
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

/// With no `tls:` files configured, takes the TLS identity from systemd credentials when
/// the service was given both (`LoadCredential=relay-key.pem:…` and `relay-cert.pem:…`, as
/// on a cluster node: every relay of a cluster shares one identity, installed by `cargo
/// xtask deploy --instances N`). `credentials` is `$CREDENTIALS_DIRECTORY`.
fn adopt_systemd_credentials(config: &mut Config, credentials: Option<std::ffi::OsString>) {
    let Some(dir) = credentials.map(PathBuf::from) else {
        return;
    };
    let key = dir.join(chat_server::tls::KEY_FILE);
    let cert_chain = dir.join(chat_server::tls::CERT_FILE);
    if config.tls.is_none() && key.is_file() && cert_chain.is_file() {
        config.tls = Some(chat_server::config::TlsFiles { cert_chain, key });
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
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
