//! The command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::claims::SigningKey;
use crate::commands::init_db;
use crate::config::{self, Config};
use crate::ops::reload;
use crate::session::listener;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::cli=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::cli";

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
    /// Check a configuration against the world it names, before serving with it.
    ///
    /// Validates the file as `serve` loads it; fetches each provider's
    /// discovery document and JWKS and counts the signing keys; logs in to
    /// Postgres as each role, as the proxy does, and checks that schema `auth`
    /// is installed in the version this rlsgate expects and knows the
    /// configured signing key; and looks for what Row-Level Security leaves
    /// open to the served roles: tables they have privileges on with RLS
    /// disabled, tables they own, superuser or BYPASSRLS.
    ///
    /// Prints one line per finding (ok, warn, FAIL) and a summary. Exits with
    /// status 0 when nothing failed (warnings allowed), 1 otherwise. Prints no
    /// passwords, keys or secrets.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// The database to check when [upstream] names none (the proxy then
        /// connects to the one each client asks for).
        #[arg(long, value_name = "NAME")]
        database: Option<String>,
    },
    /// Install or upgrade schema `auth` (auth.user_id(), auth.session(), …) and register the claims signing key.
    ///
    /// Safe to run again; with a new signing key it adds that key, so that
    /// proxies using the old and the new key both work during a rotation.
    InitDb {
        /// A superuser or the database owner, e.g. postgresql://postgres@localhost/app.
        ///
        /// TLS as with libpq: add ?sslmode=verify-full (disable, prefer,
        /// require, verify-ca, verify-full) and &sslrootcert=ca.pem (or
        /// sslrootcert=system), and &sslcert=…&sslkey=… for a client
        /// certificate. Without TLS settings, those of the configuration's
        /// [upstream] apply, else prefer. A host starting with / is a Unix
        /// socket directory (host=/var/run/postgresql), without TLS.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Take the signing key from this configuration file's [claims] section
        /// (without --config or --signing-key: config/rlsgate.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The signing key (base64), when no --config is given.
        #[arg(long, env = "RLSGATE_CLAIMS_KEY", hide_env_values = true)]
        signing_key: Option<String>,
    },
    /// Make a token signing key for a local issuer, for testing without an identity provider.
    ///
    /// Writes DIR/issuer.pem, the private key (PKCS#8 PEM, readable only by
    /// you), and DIR/jwks.json, its public key set. The key id (kid) is the
    /// key's RFC 7638 thumbprint, so every command that loads the file agrees
    /// on it. Then serve the key and mint tokens with it:
    ///
    ///   rlsgate issuer --key DIR/issuer.pem --listen 127.0.0.1:8080
    ///
    ///   rlsgate token --key DIR/issuer.pem --issuer http://127.0.0.1:8080 --sub alice
    ///
    /// and point the proxy at it: [[provider]] issuer = "http://127.0.0.1:8080".
    Keygen {
        /// The directory to write issuer.pem and jwks.json to; created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The key type; the proxy accepts each of them.
        #[arg(long, value_enum, default_value = "es256")]
        alg: KeyAlg,
        /// Replace an existing issuer.pem and jwks.json. Tokens signed with the
        /// old key stop verifying once the issuer serves the new one.
        #[arg(long)]
        force: bool,
    },
    /// Mint a token (JWT) signed with a key from `rlsgate keygen`; prints only the token.
    ///
    /// Sets iss, sub, iat (now) and exp (now + --ttl), plus aud and any
    /// --claim. The proxy accepts it when a [[provider]] names the same
    /// issuer URL, character for character, and that issuer (e.g. `rlsgate
    /// issuer`) publishes the key. Use it as the password:
    ///
    ///   PGPASSWORD=$(rlsgate token …) psql -h localhost -p 6432 -U authenticated app
    Token {
        /// The private key to sign with (PKCS#8 PEM, e.g. issuer.pem from `rlsgate keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The `iss` claim: the issuer URL, exactly as the proxy's [[provider]] and `rlsgate issuer` have it.
        #[arg(long, value_name = "URL")]
        issuer: String,
        /// The `sub` claim: the user id that auth.user_id() returns.
        #[arg(long, value_name = "SUB")]
        sub: String,
        /// An `aud` value, e.g. the provider's `audience`; repeat for several
        /// (one gives a string, several an array).
        #[arg(long = "aud", value_name = "AUD")]
        aud: Vec<String>,
        /// An extra claim; repeatable. VALUE is JSON when it parses as JSON
        /// (42, true, null, ["a","b"], {"k":1}), else a string; quote it to
        /// force a string: --claim 'org="42"'. iss, sub, aud, iat and exp come
        /// from their own flags and cannot be set here.
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
        /// How long the token is valid, e.g. 90s, 15m, 1h, 7d. The proxy ends
        /// a session when its token expires.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Serve OIDC discovery and a JWKS for local keys, as an identity provider would.
    ///
    /// Publishes the public half of each --key at /jwks.json, and
    /// /.well-known/openid-configuration naming the issuer URL, so the proxy
    /// verifies tokens from `rlsgate token` as it verifies a provider's.
    /// Configure it with [[provider]] issuer = "<that URL>". Plain HTTP and no
    /// login: for development, tests and compose setups, not production.
    /// Runs until Ctrl-C or SIGTERM.
    Issuer {
        /// A private key to publish (PKCS#8 PEM); repeat to publish several,
        /// e.g. the old and the new key while rotating.
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
        /// The address to serve on: 127.0.0.1:8080 on a workstation,
        /// 0.0.0.0:8080 in a container.
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// The issuer URL to advertise, as proxies reach this server and as
        /// tokens carry it in `iss`, e.g. http://issuer:8080 in a compose
        /// network. No path. Default: http://<listen address>.
        #[arg(long, value_name = "URL")]
        issuer: Option<String>,
    },
}

/// Key types `rlsgate keygen` makes.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlg {
    /// RSA 2048 (RS256): what most providers use; the largest tokens.
    Rs256,
    /// ECDSA P-256 (ES256): small keys and tokens, widely supported.
    Es256,
    /// ECDSA P-384 (ES384).
    Es384,
    /// Ed25519 (EdDSA): the smallest and fastest; not every library has it.
    Eddsa,
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(config).await,
            Command::Check { config, database } => {
                let report = crate::ops::check::run(&config, database.as_deref()).await;
                print!("{report}");
                if !report.passed() {
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Demo { port, json, keep } => {
                let options = crate::commands::demo::Options { port, json, keep };
                crate::commands::demo::run(options, shutdown_signal()).await
            }
            Command::InitDb {
                database_url,
                config,
                signing_key,
            } => {
                // A configuration named on the command line wins over the
                // key's environment variable, which that file may expand.
                // Its [upstream] gives the TLS settings the URL does not.
                let (key, upstream) = match (config, signing_key) {
                    (Some(path), _) => {
                        let config = Config::load(&path)?;
                        (config.claims.signing_key, Some(config.upstream))
                    }
                    (None, Some(text)) => (
                        SigningKey::from_base64(&text).map_err(anyhow::Error::msg)?,
                        None,
                    ),
                    (None, None) => {
                        let config = Config::load(std::path::Path::new(config::DEFAULT_PATH))?;
                        (config.claims.signing_key, Some(config.upstream))
                    }
                };
                let report =
                    init_db::run(&database_url, upstream.as_ref(), &[key.bytes().to_vec()]).await?;
                println!("{report}");
                Ok(())
            }
            Command::Keygen { out, alg, force } => keygen(&out, alg, force),
            Command::Token {
                key,
                issuer,
                sub,
                aud,
                claims,
                ttl,
            } => token(&key, issuer, sub, aud, claims, ttl),
            Command::Issuer {
                keys,
                listen,
                issuer,
            } => serve_issuer(keys, listen, issuer).await,
        }
    })
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let address = config.listen.address;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    // The bound addresses, which differ from the configured ones for port 0.
    let address = listener.local_addr()?;
    let admin = listener::bind_admin(&config).await?;
    let admin_address = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let (services, current) = watch::channel(Arc::new(listener::services(config)?));
    tracing::info!(
        target: LOG_TARGET,
        %address,
        admin = admin_address.map(tracing::field::display),
        config = %path.display(),
        "rlsgate listening"
    );
    tokio::spawn(async move { reload::on_hangup(&path, services).await });
    listener::run(listener, admin, current, shutdown_signal()).await;
    Ok(())
}

fn keygen(out: &std::path::Path, alg: KeyAlg, force: bool) -> anyhow::Result<()> {
    use crate::dev::keys::{KeyKind, SigningKeyPair, jwks};

    let kind = match alg {
        KeyAlg::Rs256 => KeyKind::Rs256,
        KeyAlg::Es256 => KeyKind::Es256,
        KeyAlg::Es384 => KeyKind::Es384,
        KeyAlg::Eddsa => KeyKind::EdDsa,
    };
    let key_path = out.join("issuer.pem");
    let jwks_path = out.join("jwks.json");
    if !force {
        // Both are checked before either is written, so a refusal leaves both as they were.
        for path in [&key_path, &jwks_path] {
            anyhow::ensure!(
                path.symlink_metadata().is_err(),
                "{} already exists; pass --force to replace it (tokens signed with the \
                 old key stop verifying)",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = SigningKeyPair::generate(kind)?;
    key.save(&key_path, force)?;
    let set = serde_json::to_string_pretty(&jwks([&key]))? + "\n";
    std::fs::write(&jwks_path, set)
        .with_context(|| format!("cannot write {}", jwks_path.display()))?;
    let (key_path, jwks_path) = (key_path.display(), jwks_path.display());
    println!("kid   {}", key.kid());
    println!(
        "key   {key_path}  (private, {}; keep it secret)",
        kind.alg_name()
    );
    println!("jwks  {jwks_path}");
    println!();
    println!("serve it:    rlsgate issuer --key {key_path} --listen 127.0.0.1:8080");
    println!(
        "mint tokens: rlsgate token --key {key_path} --issuer http://127.0.0.1:8080 --sub alice"
    );
    Ok(())
}

fn token(
    key: &std::path::Path,
    issuer: String,
    sub: String,
    aud: Vec<String>,
    claims: Vec<(String, serde_json::Value)>,
    ttl: std::time::Duration,
) -> anyhow::Result<()> {
    use serde_json::{Map, Value, json};

    let key = crate::dev::keys::SigningKeyPair::load(key)?;
    let mut payload = Map::new();
    for (name, value) in claims {
        anyhow::ensure!(
            payload.insert(name.clone(), value).is_none(),
            "--claim {name} is given twice"
        );
    }
    let now = crate::clock::unix_now();
    let exp = now
        .checked_add(ttl.as_secs())
        .filter(|&exp| exp < 1 << 53)
        .context("--ttl is too long")?;
    payload.insert("iss".into(), json!(issuer));
    payload.insert("sub".into(), json!(sub));
    match aud.as_slice() {
        [] => {}
        [one] => {
            payload.insert("aud".into(), json!(one));
        }
        many => {
            payload.insert("aud".into(), json!(many));
        }
    }
    payload.insert("iat".into(), json!(now));
    payload.insert("exp".into(), json!(exp));
    println!("{}", key.sign(&Value::Object(payload)));
    Ok(())
}

/// `--claim KEY=VALUE`: VALUE as JSON when it parses, else as a string.
/// The claims other flags set are refused, so that none is overridden
/// behind the user's back.
fn parse_claim(text: &str) -> Result<(String, serde_json::Value), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or("expected KEY=VALUE, e.g. role=admin or tier=3")?;
    if name.is_empty() {
        return Err("the claim name before '=' is empty".into());
    }
    let owner = match name {
        "iss" => Some("--issuer"),
        "sub" => Some("--sub"),
        "aud" => Some("--aud"),
        "exp" => Some("--ttl"),
        "iat" => Some("the current time"),
        _ => None,
    };
    if let Some(owner) = owner {
        return Err(format!("{name} is set by {owner}, not by --claim"));
    }
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < std::time::Duration::from_secs(1) {
        return Err("a token must live at least 1s".into());
    }
    Ok(ttl)
}

async fn serve_issuer(
    paths: Vec<PathBuf>,
    listen: std::net::SocketAddr,
    issuer_url: Option<String>,
) -> anyhow::Result<()> {
    use crate::dev::issuer::DevIssuer;
    use crate::dev::keys::SigningKeyPair;

    let mut keys: Vec<SigningKeyPair> = Vec::with_capacity(paths.len());
    for (index, path) in paths.iter().enumerate() {
        let key = SigningKeyPair::load(path)?;
        if let Some(first) = keys.iter().position(|k| k.kid() == key.kid()) {
            anyhow::bail!(
                "{} and {} hold the same key",
                paths[first].display(),
                paths[index].display()
            );
        }
        keys.push(key);
    }
    if issuer_url.is_none() && listen.ip().is_unspecified() {
        tracing::warn!(
            target: LOG_TARGET,
            "the issuer URL defaults to http://{listen}, which other hosts cannot reach; \
             pass --issuer with the URL proxies use for this server"
        );
    }
    let issuer = DevIssuer::start_with(listen, issuer_url, keys).await?;
    tracing::info!(
        target: LOG_TARGET,
        issuer = %issuer.issuer(),
        discovery = %issuer.discovery_url(),
        jwks = %issuer.jwks_url(),
        kids = ?issuer.published_kids(),
        address = %issuer.local_addr(),
        "token issuer listening"
    );
    shutdown_signal().await;
    tracing::info!(target: LOG_TARGET, "token issuer stopping");
    issuer.shutdown().await;
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
