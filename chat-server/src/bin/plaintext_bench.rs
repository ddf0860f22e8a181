//! The relay without TLS, for `cargo xtask bench` only: it measures what TLS costs the
//! relay by running the same load against this binary. Built only with the
//! `bench-plaintext` feature and never shipped; clients cannot reach it (they speak only
//! TLS).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use chat_server::Config;
use clap::Parser;

/// Secure Chat relay over plain TCP, for benchmarks only.
#[derive(Debug, Parser)]
struct Cli {
    /// Address to listen on
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Directory for the account database
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// RON file with any server setting
    #[arg(long, value_name = "FILE.ron")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.listen = cli.listen;
    config.data_dir = cli.data_dir;
    config.validate()?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        chat_server::run_plaintext_bench(listener, config, tokio::signal::ctrl_c()).await?;
        Ok(())
    })
}
