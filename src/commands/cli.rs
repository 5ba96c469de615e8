//! The command line: parses the arguments and hands each command to the
//! module that does it.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::commands::dev_tools::{self, TokenClaims};
use crate::commands::{demo, init_db, logging, serve};
use crate::config;
use crate::dev::keys::KeyKind;
use crate::ops::check;
use crate::session::shutdown;

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
pub(crate) enum LogFormat {
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
        /// The port of the HTTP front door (POST /sql, WebSocket), on
        /// 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 4444)]
        http_port: u16,
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
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = dev_tools::parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
        /// How long the token is valid, e.g. 90s, 15m, 1h, 7d. The proxy ends
        /// a session when its token expires.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = dev_tools::parse_ttl)]
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

impl From<KeyAlg> for KeyKind {
    fn from(alg: KeyAlg) -> KeyKind {
        match alg {
            KeyAlg::Rs256 => KeyKind::Rs256,
            KeyAlg::Es256 => KeyKind::Es256,
            KeyAlg::Es384 => KeyKind::Es384,
            KeyAlg::Eddsa => KeyKind::EdDsa,
        }
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve::run(config).await,
        Command::Check { config, database } => {
            check::command(&config, database.as_deref()).await;
            Ok(())
        }
        Command::Demo {
            port,
            http_port,
            json,
            keep,
        } => {
            let options = demo::Options {
                port,
                http_port,
                json,
                keep,
            };
            demo::run(options, shutdown::signal()).await
        }
        Command::InitDb {
            database_url,
            config,
            signing_key,
        } => init_db::command(&database_url, config.as_deref(), signing_key.as_deref()).await,
        Command::Keygen { out, alg, force } => dev_tools::keygen(&out, alg.into(), force),
        Command::Token {
            key,
            issuer,
            sub,
            aud,
            claims,
            ttl,
        } => {
            let claims = TokenClaims {
                issuer,
                sub,
                aud,
                extra: claims,
                ttl,
            };
            dev_tools::token(&key, claims)
        }
        Command::Issuer {
            keys,
            listen,
            issuer,
        } => dev_tools::issuer(keys, listen, issuer).await,
    }
}
