use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chat_protocol::Username;
use chat_server::Config;
use chat_server::cluster::Cluster;
use chat_server::config::{Backend, NatsBackend};
use chat_server::health::Health;
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

#[derive(Debug, clap::Subcommand)]
enum Admin {
    /// Delete an account and its queued messages, freeing the name for anyone (in the
    /// SQLite file, or in the NATS cluster with the NATS backend)
    RemoveUser {
        /// The username to remove
        name: String,
    },
    /// Print the number of users and queued envelopes (of the SQLite file, or of the NATS
    /// cluster with the NATS backend)
    Stats,
    /// Ask the running relay whether it is serving, as a client would (TCP, TLS, Hello);
    /// exits 0 if it is, 1 with the reason if not
    Health {
        /// The relay's address [default: the listen address, on loopback]
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// Seconds to wait for each step
        #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
        timeout: f64,
    },
    /// Copy the accounts and queued envelopes of the SQLite data directory (--data-dir)
    /// into a NATS cluster; run it again to copy what is new or was left (idempotent)
    Migrate {
        /// The cluster's NATS URLs, comma-separated
        #[arg(
            long,
            value_name = "URL[,URL…]",
            value_delimiter = ',',
            required = true
        )]
        to_nats: Vec<String>,
        /// Copies of each stream and bucket, if the cluster has none yet [default: 3, or
        /// the config's]
        #[arg(long, value_name = "N")]
        replicas: Option<usize>,
    },
    /// Move every JetStream replica off a NATS node that is to leave the cluster for good
    /// (NATS backend): each stream with a copy on NODE gets one on another node; waits until
    /// the copies are current. Then stop NODE and run forget-node
    EvacuateNode {
        /// The node's NATS server name (server_name in its config)
        node: String,
        /// Seconds to wait for the new copies to catch up
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        timeout: u64,
    },
    /// Remove a stopped NATS node from the JetStream cluster's meta group (NATS backend;
    /// after evacuate-node), so that it no longer counts toward the quorum
    ForgetNode {
        /// The node's NATS server name
        node: String,
        /// File holding the system account's NKey seed (SU…); - reads it from stdin
        #[arg(long, value_name = "FILE")]
        system_nkey: PathBuf,
    },
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
    match (admin, &config.backend) {
        (Admin::Health { address, timeout }, _) => health(config, address, timeout),
        (Admin::Migrate { to_nats, replicas }, _) => migrate(config, to_nats, replicas),
        (admin @ (Admin::EvacuateNode { .. } | Admin::ForgetNode { .. }), Backend::Nats(nats)) => {
            node_admin(admin, nats)
        }
        (Admin::EvacuateNode { .. } | Admin::ForgetNode { .. }, Backend::Sqlite) => {
            anyhow::bail!("this command works on a NATS cluster: add --nats URL")
        }
        (admin, Backend::Nats(nats)) => cluster_admin(admin, config, nats),
        (admin, Backend::Sqlite) => sqlite_admin(admin, config),
    }
}

fn sqlite_admin(admin: Admin, config: &Config) -> anyhow::Result<()> {
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
            println!("users:                  {}", stats.users);
            print_queue(
                config,
                stats.queued,
                stats.queued_bytes,
                stats.recipients_waiting,
            );
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
                ("shed", "sends shed (overloaded)"),
            ] {
                let value = stats.counters.get(name).copied().unwrap_or(0);
                println!("{:<24}{value}", format!("{label}:"));
            }
        }
        _ => unreachable!("handled in run_admin"),
    }
    Ok(())
}

/// The queue's lines of `admin stats`, for either backend.
fn print_queue(config: &Config, queued: u64, bytes: u64, waiting: u64) {
    let limit = config.queue.max_total_bytes;
    let used = bytes as f64 * 100.0 / limit as f64;
    println!("queued envelopes:       {queued}");
    println!("queued bytes:           {bytes} of {limit} ({used:.1}%)");
    println!("users with mail queued: {waiting}");
}

/// `admin stats` and `admin remove-user` on the cluster.
fn cluster_admin(admin: Admin, config: &Config, nats: &NatsBackend) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let cluster = Cluster::connect_admin(config, nats).await?;
        match admin {
            Admin::Stats => {
                let stats = cluster.stats().await?;
                println!("backend:                NATS at {}", nats.urls.join(","));
                println!("relays:                 {}", stats.relays);
                println!("users:                  {}", stats.users);
                println!("users online:           {}", stats.online);
                print_queue(
                    config,
                    stats.queued,
                    stats.queued_bytes,
                    stats.recipients_waiting,
                );
                println!("mailbox stream:         {}", stats.replication);
            }
            Admin::RemoveUser { name } => {
                let user = Username::parse(&name)
                    .with_context(|| format!("{name:?} is not a valid username"))?;
                if cluster.remove_user(&user).await? {
                    println!(
                        "removed {user}: the name is free and its queued messages are deleted"
                    );
                } else {
                    anyhow::bail!("there is no user named {user}");
                }
            }
            _ => unreachable!("handled in run_admin"),
        }
        Ok(())
    })
}

/// `admin evacuate-node` and `admin forget-node`.
fn node_admin(admin: Admin, nats: &NatsBackend) -> anyhow::Result<()> {
    use chat_server::cluster::nodes;
    runtime()?.block_on(async {
        match admin {
            Admin::EvacuateNode { node, timeout } => {
                let moved = nodes::evacuate(
                    &nats.urls,
                    &node,
                    std::time::Duration::from_secs(timeout),
                    |stream| eprintln!("moving {stream}'s replica off {node}"),
                )
                .await?;
                println!(
                    "{node} holds no replica now ({} stream(s) moved); stop it, then run \
                     admin forget-node {node}",
                    moved.len()
                );
            }
            Admin::ForgetNode { node, system_nkey } => {
                let seed = if system_nkey.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())
                        .context("cannot read the seed from stdin")?
                } else {
                    std::fs::read_to_string(&system_nkey).with_context(|| {
                        format!("cannot read the seed from {}", system_nkey.display())
                    })?
                };
                match nodes::forget(&nats.urls, &seed, &node).await? {
                    nodes::Forgot::Removed => println!("{node} removed from the cluster"),
                    nodes::Forgot::NotMember => {
                        println!("{node} is not a member of the cluster (already removed)")
                    }
                }
            }
            _ => unreachable!("handled in run_admin"),
        }
        Ok(())
    })
}

/// `admin health`: exits 0 if the relay answers as a client expects.
fn health(config: &Config, address: Option<String>, timeout: f64) -> anyhow::Result<()> {
    let addr = match address {
        Some(text) => std::net::ToSocketAddrs::to_socket_addrs(&text)
            .with_context(|| format!("{text:?} is not an address; write HOST:PORT"))?
            .next()
            .with_context(|| format!("{text:?} resolves to no address"))?,
        None => {
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            addr
        }
    };
    anyhow::ensure!(
        timeout.is_finite() && timeout > 0.0,
        "--timeout must be a positive number of seconds"
    );
    let patience = std::time::Duration::from_secs_f64(timeout);
    match runtime()?.block_on(chat_server::health::probe(addr, patience)) {
        Health::Serving {
            software,
            fingerprint,
        } => {
            println!("serving: {addr} answered as {software}, key {fingerprint}");
            Ok(())
        }
        Health::NotServing(reason) => {
            // The answer, not a failure of the command: said plainly, exit status 1.
            println!("not serving: {reason}");
            std::process::exit(1)
        }
    }
}

/// `admin migrate --to-nats`: the SQLite data directory into a cluster.
fn migrate(config: &Config, urls: Vec<String>, replicas: Option<usize>) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    anyhow::ensure!(
        dir.join(Store::FILE_NAME).exists(),
        "no server database in {} to migrate; pass the SQLite relay's --data-dir (or --config)",
        dir.display()
    );
    let store = Store::open(dir)
        .with_context(|| format!("cannot open the database in {}", dir.display()))?;
    let mut nats = match &config.backend {
        Backend::Nats(nats) => nats.clone(),
        Backend::Sqlite => NatsBackend::default(),
    };
    nats.urls = urls;
    if let Some(n) = replicas {
        nats.stream_replicas = n;
    }
    let mut target = config.clone();
    target.backend = Backend::Nats(nats.clone());
    target.validate()?;
    runtime()?.block_on(async {
        let cluster = Cluster::connect_admin(&target, &nats).await?;
        let done = cluster
            .migrate_from(&store, &nats, |user, copied| {
                if copied > 0 {
                    println!("{user}: {copied} envelope(s) copied");
                }
            })
            .await?;
        println!(
            "accounts: {} created, {} already there; envelopes: {} copied, {} copied before",
            done.accounts_created,
            done.accounts_present,
            done.envelopes_copied,
            done.envelopes_skipped
        );
        for user in &done.conflicts {
            println!(
                "conflict: {user} is bound to another key in the cluster; not copied (nor its mail)"
            );
        }
        for (user, left) in &done.refused {
            println!(
                "refused: {left} envelope(s) for {user}: their mailbox in the cluster (or one \
                 sender's share of it) is full; they stay in SQLite, run again once {user} has \
                 read their mail"
            );
        }
        anyhow::ensure!(
            done.complete(),
            "the migration is incomplete: see the conflicts and refusals above"
        );
        Ok(())
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
