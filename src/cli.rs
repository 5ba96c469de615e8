//! The command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::claims::SigningKey;
use crate::config::{self, Config};
use crate::{init_db, listener};

/// A Postgres proxy that takes a JWT as the password and binds its verified
/// claims to the session, so Row-Level Security decides what each user sees.
#[derive(Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole path locally: a throwaway PostgreSQL with a sample todo
    /// app under RLS, a token issuer, and the proxy, with psql lines to paste.
    ///
    /// Needs the PostgreSQL server binaries (e.g. `apt-get install postgresql`).
    /// Everything it creates is removed on Ctrl-C.
    Demo {
        /// The port the proxy listens on (127.0.0.1); 0 picks a free one.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Print the connection details as one JSON object on stdout, for scripts.
        #[arg(long)]
        json: bool,
        /// Keep the database directory on exit (its path is printed).
        #[arg(long)]
        keep: bool,
    },
    /// Serve clients: verify each token, open an upstream session with its claims, relay.
    ///
    /// Log verbosity follows RUST_LOG (default: info).
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Install or upgrade schema `auth` (auth.user_id(), auth.session(), …) and register the claims signing key.
    ///
    /// Safe to run again; with a new signing key it adds that key, so that
    /// proxies using the old and the new key both work during a rotation.
    InitDb {
        /// A superuser or the database owner, e.g. postgresql://postgres@localhost/app.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Take the signing key from this configuration file's [claims] section.
        #[arg(long, short, default_value = config::DEFAULT_PATH, conflicts_with = "signing_key")]
        config: PathBuf,
        /// The signing key (base64), instead of reading it from the configuration.
        #[arg(long, env = "RLSGATE_CLAIMS_KEY", hide_env_values = true)]
        signing_key: Option<String>,
    },
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::Demo { port, json, keep } => {
                let options = crate::demo::Options { port, json, keep };
                crate::demo::run(options, shutdown_signal()).await
            }
            Command::InitDb {
                database_url,
                config,
                signing_key,
            } => {
                let key = match signing_key {
                    Some(text) => SigningKey::from_base64(&text).map_err(anyhow::Error::msg)?,
                    None => Config::load(&config)?.claims.signing_key,
                };
                let report = init_db::run(&database_url, &[key.bytes().to_vec()]).await?;
                println!("{report}");
                Ok(())
            }
        }
    })
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let address = config.listen.address;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let services = listener::services(config)?;
    tracing::info!(%address, config = %path.display(), "rlsgate listening");
    listener::run(listener, services, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
