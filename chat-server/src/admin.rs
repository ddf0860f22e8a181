//! `chat-server admin …`: the operator commands (part of the `chat-server` binary, not of
//! the library): account removal and stats on either backend, `health` against a running
//! relay, `migrate` from SQLite to NATS, and the NATS node commands.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chat_protocol::Username;
use chat_server::Config;
use chat_server::cluster::Cluster;
use chat_server::config::{Backend, NatsBackend};
use chat_server::health::Health;
use chat_server::store::Store;

use crate::runtime;
use crate::say::{say, say_err};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Admin {
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

/// Runs one `admin` subcommand on the configured backend.
pub(crate) fn run_admin(admin: Admin, config: &Config) -> anyhow::Result<()> {
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
                say!("removed {user}: the name is free and its queued messages are deleted");
                say!(
                    "(if the server is running and {user} is online, they stay connected until they disconnect)"
                );
            } else {
                anyhow::bail!("there is no user named {user}");
            }
        }
        Admin::Stats => {
            let stats = store.stats()?;
            field("users", stats.users);
            print_queue(
                config,
                stats.queued,
                stats.queued_bytes,
                stats.recipients_waiting,
            );
            field("expired (total)", stats.expired_total);
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
                field(label, value);
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
    field("queued envelopes", queued);
    field("queued bytes", format!("{bytes} of {limit} ({used:.1}%)"));
    field("users with mail queued", waiting);
}

/// `admin stats` and `admin remove-user` on the cluster.
fn cluster_admin(admin: Admin, config: &Config, nats: &NatsBackend) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let cluster = Cluster::connect_admin(config, nats).await?;
        match admin {
            Admin::Stats => {
                let stats = cluster.stats().await?;
                field("backend", format!("NATS at {}", nats.urls.join(",")));
                field("relays", stats.relays);
                field("users", stats.users);
                field("users online", stats.online);
                print_queue(
                    config,
                    stats.queued,
                    stats.queued_bytes,
                    stats.recipients_waiting,
                );
                field("mailbox stream", stats.replication);
            }
            Admin::RemoveUser { name } => {
                let user = Username::parse(&name)
                    .with_context(|| format!("{name:?} is not a valid username"))?;
                if cluster.remove_user(&user).await? {
                    say!("removed {user}: the name is free and its queued messages are deleted");
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
                    |stream| say_err!("moving {stream}'s replica off {node}"),
                )
                .await?;
                say!(
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
                    nodes::Forgot::Removed => say!("{node} removed from the cluster"),
                    nodes::Forgot::NotMember => {
                        say!("{node} is not a member of the cluster (already removed)")
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
            say!("serving: {addr} answered as {software}, key {fingerprint}");
            Ok(())
        }
        Health::NotServing(reason) => {
            // The answer, not a failure of the command: said plainly, exit status 1.
            say!("not serving: {reason}");
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
                    say!("{user}: {copied} envelope(s) copied");
                }
            })
            .await?;
        say!(
            "accounts: {} created, {} already there; envelopes: {} copied, {} copied before",
            done.accounts_created,
            done.accounts_present,
            done.envelopes_copied,
            done.envelopes_skipped
        );
        for user in &done.conflicts {
            say!(
                "conflict: {user} is bound to another key in the cluster; not copied (nor its mail)"
            );
        }
        for (user, left) in &done.refused {
            say!(
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

/// One line of `admin stats`: `label:` and the value, values aligned in one column.
fn field(label: &str, value: impl std::fmt::Display) {
    say!("{:<35}{value}", format!("{label}:"));
}
