//! The TOML configuration: loaded once, `${VAR}` expanded from the environment,
//! and validated while it is parsed so that errors name the key and the line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::auth::claims::SigningKey;

/// Where `serve` looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "config/rlsgate.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub upstream: Upstream,
    #[serde(rename = "role")]
    pub roles: Vec<Role>,
    #[serde(rename = "provider", default)]
    pub providers: Vec<Provider>,
    pub claims: Claims,
    /// Warm upstream connections; off unless configured.
    #[serde(default)]
    pub pool: Pool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: SocketAddr,
    /// Where the admin HTTP endpoints listen (/metrics, /healthz, /readyz);
    /// unset: no admin listener. Port 0 picks a free port.
    pub admin_address: Option<SocketAddr>,
    /// PEM certificate chain; with `tls_key`, enables TLS for clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Accept tokens over plaintext TCP on a non-loopback address.
    #[serde(default)]
    pub allow_plaintext_tokens: bool,
    /// Sessions served at once: a slot is taken once the client's startup
    /// packet has arrived.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections not yet authenticated (TLS handshake, startup packet,
    /// password, token check, upstream login) at once; more are refused
    /// as they connect.
    #[serde(default = "defaults::max_startups")]
    pub max_startups: usize,
    /// Of those, from one client address (IPv6: one /64 network).
    #[serde(default = "defaults::max_startups_per_address")]
    pub max_startups_per_address: usize,
    /// Time a client has from connecting until its password has arrived
    /// (within `startup_timeout`).
    #[serde(default = "defaults::auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Largest password (token) accepted, in bytes.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
    /// Time a client has from connecting to being ready for queries.
    #[serde(default = "defaults::startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On shutdown, how long sessions may run on before they are ended.
    #[serde(default = "defaults::shutdown_drain", with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Verified tokens remembered so that reconnecting with one skips the
    /// signature check; 0 disables the cache.
    #[serde(default = "defaults::token_cache_entries")]
    pub token_cache_entries: usize,
    /// End each session when its token expires (after the leeway), with
    /// FATAL 28000. With `false` a session outlives its token, and so do its
    /// claims in the database; tokens are still checked when clients connect.
    #[serde(default = "defaults::yes")]
    pub end_sessions_at_token_expiry: bool,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub host: String,
    #[serde(default = "defaults::postgres_port")]
    pub port: u16,
    /// Database to connect to; by default the one the client asked for.
    pub database: Option<String>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to Postgres, with libpq's `sslmode` meanings.
    #[serde(default)]
    pub tls: UpstreamTlsMode,
    /// PEM CA certificates that sign the server's certificate, for
    /// `verify-ca` and `verify-full`; unset: the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// The name sent in SNI and checked by `verify-full`; unset: `host`.
    pub tls_server_name: Option<String>,
    /// PEM client certificate (chain) and its key, presented to Postgres
    /// for pg_hba's `cert` method; read at start and on reload.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
}

impl Upstream {
    /// Whether `host` names a directory holding the server's Unix socket
    /// (it starts with `/`, as in libpq).
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Where the proxy connects, for messages: `host:port` or the socket.
    pub fn address(&self) -> String {
        crate::session::stream::address(&self.host, self.port)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.validate_transport()?;
        if self.tls_ca_file.is_some() && !self.tls.verifies_chain() {
            bail!(
                "[upstream] tls_ca_file is only used with tls = \"verify-ca\" or \"verify-full\" \
                 (tls = \"{}\" does not check the certificate)",
                self.tls.as_str()
            );
        }
        if let Some(name) = &self.tls_server_name {
            if self.tls == UpstreamTlsMode::Disable {
                bail!("[upstream] tls_server_name is set but tls = \"disable\"");
            }
            rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                anyhow::anyhow!(
                    "[upstream] tls_server_name = {name:?} is not a DNS name or IP address"
                )
            })?;
        }
        Ok(())
    }

    /// A Unix socket has no TLS (libpq asks for none there either), and a
    /// client certificate needs TLS that is never skipped.
    fn validate_transport(&self) -> anyhow::Result<()> {
        if self.is_socket() && self.tls.requires_tls() {
            bail!(
                "[upstream] host = {:?} is a Unix socket directory, which has no TLS, but \
                 [upstream] tls = \"{}\" requires it: use tls = \"prefer\" or \"disable\" with a \
                 socket, or a TCP host",
                self.host,
                self.tls.as_str()
            );
        }
        if self.is_socket() && self.tls_server_name.is_some() {
            bail!(
                "[upstream] tls_server_name is set but host = {:?} is a Unix socket directory, \
                 which has no TLS",
                self.host
            );
        }
        match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => return Ok(()),
            (Some(_), None) | (None, Some(_)) => {
                bail!("[upstream] tls_client_cert and tls_client_key must be given together")
            }
            (Some(_), Some(_)) => {}
        }
        if self.is_socket() {
            bail!(
                "[upstream] tls_client_cert is set but host = {:?} is a Unix socket directory, \
                 which has no TLS: there Postgres identifies the proxy by peer authentication \
                 (pg_hba `local ... peer`)",
                self.host
            );
        }
        if !self.tls.requires_tls() {
            bail!(
                "[upstream] tls_client_cert is set but tls = \"{}\" may connect without TLS, \
                 where no certificate is presented: use tls = \"require\", \"verify-ca\" or \
                 \"verify-full\"",
                self.tls.as_str()
            );
        }
        Ok(())
    }
}

/// `[upstream] tls`: whether and how the connection to Postgres is encrypted,
/// as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Never: plaintext TCP.
    Disable,
    /// TLS when the server offers it, else plaintext; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or no session; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by a trusted CA, for any name.
    VerifyCa,
    /// TLS with a trusted certificate for `tls_server_name`.
    VerifyFull,
}

impl UpstreamTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTlsMode::Disable => "disable",
            UpstreamTlsMode::Prefer => "prefer",
            UpstreamTlsMode::Require => "require",
            UpstreamTlsMode::VerifyCa => "verify-ca",
            UpstreamTlsMode::VerifyFull => "verify-full",
        }
    }

    /// libpq's `sslmode` value of the same meaning.
    pub fn from_sslmode(value: &str) -> Option<UpstreamTlsMode> {
        Some(match value {
            "disable" => UpstreamTlsMode::Disable,
            // libpq's `allow` tries plaintext first; TLS-if-offered is closest.
            "allow" | "prefer" => UpstreamTlsMode::Prefer,
            "require" => UpstreamTlsMode::Require,
            "verify-ca" => UpstreamTlsMode::VerifyCa,
            "verify-full" => UpstreamTlsMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a session without TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer)
    }

    /// Whether the certificate chain is checked against trusted roots.
    pub fn verifies_chain(self) -> bool {
        matches!(
            self,
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull
        )
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// The user name clients connect as.
    pub name: String,
    pub token: TokenPolicy,
    /// The Postgres role the proxy logs in as; defaults to `name`.
    upstream_user: Option<String>,
    pub upstream_password: Option<Secret>,
    /// Sessions of this role at once (within `[listen] max_connections`).
    pub max_connections: Option<usize>,
    /// The settings `ALTER ROLE <upstream_user> [IN DATABASE …] SET` is expected to have, as
    /// `pg_db_role_setting.setconfig` lists them ("name=value"); any other is refused at login.
    #[serde(default)]
    pub upstream_settings: Vec<String>,
}

impl Role {
    pub fn upstream_user(&self) -> &str {
        self.upstream_user.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenPolicy {
    /// The password must be a valid token; its claims are bound to the session.
    Required,
    /// No password is asked; the session has no claims (`auth.session()` is NULL).
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The JWKS address; without it, found through OIDC discovery at the issuer.
    pub jwks_url: Option<String>,
    /// Accepted `aud` values; when set, tokens without a matching `aud` are refused.
    #[serde(default, deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// Allowed clock skew for `exp` and `nbf`.
    #[serde(default = "defaults::leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// The JWKS is fetched at most this often, whatever asks for it (an
    /// unknown `kid`, an expiring set, a failed attempt).
    #[serde(default = "defaults::refetch_cooldown", with = "humantime_serde")]
    pub refetch_cooldown: Duration,
    /// Lower bound on the freshness of a fetched JWKS, which is its
    /// `Cache-Control: max-age` (1 h without one). Unset: 5 min, or
    /// `jwks_max_age` when that is shorter.
    #[serde(default, with = "humantime_serde")]
    jwks_min_age: Option<Duration>,
    /// Upper bound on the freshness of a fetched JWKS, so that a key the
    /// provider withdraws stops being trusted within this time.
    #[serde(default = "defaults::jwks_max_age", with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// While the provider cannot be reached, cached keys keep serving this
    /// long past their freshness; then tokens are refused (SQLSTATE 08006).
    #[serde(default = "defaults::jwks_max_stale", with = "humantime_serde")]
    pub jwks_max_stale: Duration,
    /// Bound on each discovery or JWKS request.
    #[serde(default = "defaults::fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Fetch keys over plain HTTP from a non-loopback host: only for a
    /// development issuer on a private network (e.g. a compose service).
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Where the discovery document is, for providers that do not serve it at
    /// `{issuer}/.well-known/openid-configuration` (Azure AD B2C).
    pub discovery_url: Option<String>,
    /// Signature algorithms accepted; unset: every asymmetric one. Narrowing
    /// it keeps a provider's tokens to the algorithm it actually signs with.
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    /// Tokens whose `iat` is older than this are refused, whatever their `exp`.
    #[serde(default, with = "humantime_serde")]
    pub max_token_age: Option<Duration>,
    /// Claims (names or dotted paths) every token must carry.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// A claim (name or dotted path) holding the roles the token may connect
    /// as: a string or an array of strings.
    pub role_claim: Option<String>,
    /// A shared secret for HS256 tokens (Supabase's legacy JWT secret). Only
    /// this provider's tokens may use it; without it HS256 is refused.
    pub hs256_secret: Option<Secret>,
}

/// A configured secret, kept out of `Debug` output.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Every asymmetric algorithm: the default of `algorithms`.
pub const ASYMMETRIC_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Shortest `hs256_secret`: RFC 7518 §3.2 asks for a key at least as long as
/// the hash output (32 bytes).
const MIN_HS256_SECRET_BYTES: usize = 32;

impl Provider {
    /// The lower bound on JWKS freshness, its default kept within `jwks_max_age`.
    pub fn jwks_min_age(&self) -> Duration {
        self.jwks_min_age
            .unwrap_or_else(|| defaults::jwks_min_age().min(self.jwks_max_age))
    }

    /// The accepted asymmetric algorithms (HS256 goes by `hs256_secret`).
    pub fn algorithms(&self) -> Vec<Algorithm> {
        match &self.algorithms {
            None => ASYMMETRIC_ALGORITHMS.to_vec(),
            Some(names) => names.iter().filter_map(|n| asymmetric(n).ok()).collect(),
        }
    }

    /// Whether keys are fetched: not for a provider that only has a shared secret.
    pub fn has_jwks(&self) -> bool {
        self.hs256_secret.is_none() || self.jwks_url.is_some() || self.discovery_url.is_some()
    }

    fn discovers_at_issuer(&self) -> bool {
        self.has_jwks() && self.jwks_url.is_none() && self.discovery_url.is_none()
    }

    fn validate(&self) -> anyhow::Result<()> {
        let named =
            |problem: String| anyhow::anyhow!("[[provider]] issuer = {:?}: {problem}", self.issuer);
        let show = |d: Duration| humantime::format_duration(d).to_string();
        for (key, value) in [
            ("jwks_max_age", self.jwks_max_age),
            ("fetch_timeout", self.fetch_timeout),
        ] {
            if value.is_zero() {
                return Err(named(format!("{key} must be longer than 0s")));
            }
        }
        if let Some(min) = self.jwks_min_age.filter(|min| *min > self.jwks_max_age) {
            return Err(named(format!(
                "jwks_min_age ({}) is longer than jwks_max_age ({})",
                show(min),
                show(self.jwks_max_age)
            )));
        }
        if self.jwks_url.is_some() && self.discovery_url.is_some() {
            return Err(named(
                "give jwks_url or discovery_url, not both: jwks_url skips discovery".to_owned(),
            ));
        }
        if let Some(names) = &self.algorithms {
            if names.is_empty() {
                return Err(named(
                    "algorithms is empty: no token could be accepted".to_owned(),
                ));
            }
            for name in names {
                asymmetric(name).map_err(|problem| named(format!("algorithms: {problem}")))?;
            }
        }
        if self.max_token_age.is_some_and(|age| age.is_zero()) {
            return Err(named("max_token_age must be longer than 0s".to_owned()));
        }
        for (key, path) in self
            .required_claims
            .iter()
            .map(|c| ("required_claims", c))
            .chain(self.role_claim.iter().map(|c| ("role_claim", c)))
        {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(named(format!(
                    "{key}: {path:?} is not a claim name or dotted path"
                )));
            }
        }
        if let Some(secret) = &self.hs256_secret
            && secret.bytes().len() < MIN_HS256_SECRET_BYTES
        {
            return Err(named(format!(
                "hs256_secret is {} bytes; it must have at least {MIN_HS256_SECRET_BYTES}",
                secret.bytes().len()
            )));
        }
        Ok(())
    }
}

/// An asymmetric algorithm by its JWS name; symmetric ones are refused here
/// because a shared secret is configured only through `hs256_secret`.
fn asymmetric(name: &str) -> Result<Algorithm, String> {
    if name.starts_with("HS") {
        return Err(format!(
            "{name:?} is symmetric; HS256 is accepted only through hs256_secret"
        ));
    }
    ASYMMETRIC_ALGORITHMS
        .into_iter()
        .find(|a| format!("{a:?}") == name)
        .ok_or_else(|| {
            format!(
                "unknown algorithm {name:?} (known: {})",
                ASYMMETRIC_ALGORITHMS.map(|a| format!("{a:?}")).join(", ")
            )
        })
}

/// `[pool]`: whether upstream connections outlive their clients.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default)]
    pub mode: PoolMode,
    /// Idle connections kept per (database, upstream user).
    #[serde(default = "defaults::pool_size")]
    pub size: usize,
    /// An idle connection unused this long is closed.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection this old is closed rather than reused.
    #[serde(default = "defaults::pool_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::None,
            size: defaults::pool_size(),
            idle_timeout: defaults::pool_idle_timeout(),
            max_lifetime: defaults::pool_max_lifetime(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// One upstream connection per client, closed when the client leaves.
    #[default]
    None,
    /// A client's upstream connection is reset and kept for the next client.
    Session,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Base64 of at least 32 random bytes, shared with the database by `rlsgate init-db`.
    pub signing_key: SigningKey,
    /// The longest one envelope is valid; sessions that last longer get a
    /// fresh one between transactions (see `claims`).
    #[serde(default = "defaults::envelope_lifetime", with = "humantime_serde")]
    pub envelope_lifetime: Duration,
}

mod defaults {
    use std::time::Duration;
    pub fn envelope_lifetime() -> Duration {
        crate::auth::claims::LIFETIME
    }
    pub fn max_connections() -> usize {
        1000
    }
    pub fn max_startups() -> usize {
        256
    }
    pub fn max_startups_per_address() -> usize {
        64
    }
    pub fn auth_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_token_bytes() -> usize {
        16 * 1024
    }
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn shutdown_drain() -> Duration {
        Duration::from_secs(30)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn token_cache_entries() -> usize {
        10_000
    }
    pub fn postgres_port() -> u16 {
        5432
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn pool_size() -> usize {
        20
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(10 * 60)
    }
    pub fn pool_max_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn leeway() -> Duration {
        Duration::from_secs(30)
    }
    pub fn refetch_cooldown() -> Duration {
        Duration::from_secs(30)
    }
    pub fn jwks_min_age() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn jwks_max_age() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn jwks_max_stale() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn fetch_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in configuration file {}", path.display()))
    }

    /// Parses configuration text, expanding `${VAR}` from the environment.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Self::parse_with_env(text, |name| std::env::var(name).ok())
    }

    /// Parses configuration text, expanding `${VAR}` with `lookup`.
    pub fn parse_with_env(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
        let text = expand_env(text, lookup)?;
        let config: Config = toml::from_str(&text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut names = HashSet::new();
        for role in &self.roles {
            if !names.insert(role.name.as_str()) {
                bail!("[[role]] name = {:?} appears twice", role.name);
            }
            check_role_settings(role)?;
        }
        if self.roles.is_empty() {
            bail!("no [[role]] is configured: nobody could connect");
        }
        let needs_tokens = self.roles.iter().any(|r| r.token == TokenPolicy::Required);
        if needs_tokens && self.providers.is_empty() {
            bail!("a [[role]] has token = \"required\" but no [[provider]] is configured");
        }
        let mut issuers = HashSet::new();
        for provider in &self.providers {
            if !issuers.insert(provider.issuer.as_str()) {
                bail!("[[provider]] issuer = {:?} appears twice", provider.issuer);
            }
            let allow_http = provider.allow_plain_http;
            // `iss` is any string (RFC 7519 §4.1.1; Stytch's is
            // `stytch.com/<project>`): a URL only when discovery starts there.
            if provider.discovers_at_issuer() {
                check_fetch_url("issuer", &provider.issuer, allow_http)?;
            } else if provider.issuer.is_empty() {
                bail!("[[provider]] issuer is empty");
            }
            if let Some(url) = &provider.jwks_url {
                check_fetch_url("jwks_url", url, allow_http)?;
            }
            if let Some(url) = &provider.discovery_url {
                check_fetch_url("discovery_url", url, allow_http)?;
            }
            provider.validate()?;
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("[listen] tls_cert and tls_key must be given together")
            }
            _ => {}
        }
        for (key, value) in [
            ("max_connections", self.listen.max_connections),
            ("max_startups", self.listen.max_startups),
            (
                "max_startups_per_address",
                self.listen.max_startups_per_address,
            ),
        ] {
            if value == 0 {
                bail!("[listen] {key} must be at least 1");
            }
        }
        if self.listen.auth_timeout.is_zero() {
            bail!("[listen] auth_timeout must be longer than 0s");
        }
        if self.claims.envelope_lifetime < Duration::from_secs(2) {
            bail!("[claims] envelope_lifetime must be at least 2s");
        }
        self.upstream.validate()?;
        if self.pool.mode == PoolMode::Session {
            if self.pool.size == 0 {
                bail!("[pool] size must be at least 1 with mode = \"session\"");
            }
            if self.pool.idle_timeout.is_zero() || self.pool.max_lifetime.is_zero() {
                bail!("[pool] idle_timeout and max_lifetime must be longer than zero");
            }
        }
        Ok(())
    }
}

/// Entries of `upstream_settings` are compared with `setconfig` as text, so
/// one that could never match is a mistake to point out now.
fn check_role_settings(role: &Role) -> anyhow::Result<()> {
    for setting in &role.upstream_settings {
        let name = setting.split_once('=').map_or("", |(name, _)| name);
        if name.is_empty() || name.trim() != name {
            bail!(
                "[[role]] {:?}: upstream_settings entry {setting:?} is not \"name=value\" \
                 (as pg_db_role_setting lists it, e.g. \"statement_timeout=5s\")",
                role.name
            );
        }
    }
    Ok(())
}

/// Keys are fetched over HTTPS; plain HTTP only from this machine, where
/// nobody on the network can swap them.
fn check_fetch_url(key: &str, url: &str, allow_http: bool) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url)
        .with_context(|| format!("[[provider]] {key} = {url:?} is not a URL"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http || is_loopback_host(parsed.host()) => Ok(()),
        "http" => bail!(
            "[[provider]] {key} = {url:?}: keys must be fetched over https (plain http is allowed for loopback addresses, or with allow_plain_http = true)"
        ),
        other => bail!("[[provider]] {key} = {url:?}: unsupported scheme {other:?}"),
    }
}

fn is_loopback_host(host: Option<url::Host<&str>>) -> bool {
    match host {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Replaces `${NAME}` with the variable's value. Full-line comments are left
/// alone so that a commented-out example never demands a variable.
fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                bail!("line {}: unclosed ${{ in {:?}", index + 1, line.trim_end());
            };
            let name = &after[..end];
            let value = lookup(name).with_context(|| {
                format!("line {}: environment variable {name} is not set", index + 1)
            })?;
            if value.contains(['"', '\\', '\n', '\r']) {
                bail!(
                    "line {}: environment variable {name} holds a quote, backslash or newline, which cannot be placed in the file",
                    index + 1
                );
            }
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_names_the_missing_variable_and_line() {
        let err = expand_env("a = 1\nb = \"${NOPE}\"\n", |_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: environment variable NOPE is not set"
        );
    }

    #[test]
    fn env_expansion_skips_comment_lines() {
        let out = expand_env("# x = \"${NOPE}\"\ny = \"${A}\"\n", |n| {
            (n == "A").then(|| "v".to_owned())
        })
        .unwrap();
        assert_eq!(out, "# x = \"${NOPE}\"\ny = \"v\"\n");
    }

    #[test]
    fn a_short_signing_key_is_refused_with_its_line() {
        let text = r#"
[listen]
address = "127.0.0.1:6432"
[upstream]
host = "127.0.0.1"
[[role]]
name = "anonymous"
token = "none"
[claims]
signing_key = "c2hvcnQ="
"#;
        let err = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(err.contains("line 10"), "{err}");
        assert!(err.contains("at least 32 bytes"), "{err}");
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let text = include_str!("../config/rlsgate.example.toml");
        let config = Config::parse_with_env(text, |name| match name {
            "RLSGATE_CLAIMS_KEY" => Some("cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=".into()),
            _ => Some(format!("value-of-{name}")),
        })
        .unwrap();
        assert_eq!(
            config.role("authenticated").unwrap().token,
            TokenPolicy::Required
        );
        assert!(!config.providers.is_empty());
        // Debug output (as in a log line) carries neither secrets nor keys.
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("value-of-AUTHENTICATED_PASSWORD"),
            "{shown}"
        );
        assert!(!shown.contains("cmxzZ2F0ZS1leGFtcGxl"), "{shown}");
    }

    #[test]
    fn role_settings_default_to_none_and_must_be_name_value() {
        let text = |settings: &str| {
            format!(
                "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"127.0.0.1\"\n\
                 [[role]]\nname = \"anonymous\"\ntoken = \"none\"\n{settings}\n\
                 [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
            )
        };
        let config = Config::parse(&text("")).unwrap();
        assert!(config.roles[0].upstream_settings.is_empty());
        let declared = r#"upstream_settings = ["statement_timeout=5s", "search_path=app, public"]"#;
        let config = Config::parse(&text(declared)).unwrap();
        assert_eq!(
            config.roles[0].upstream_settings,
            ["statement_timeout=5s", "search_path=app, public"]
        );
        for wrong in ["statement_timeout", "=5s", " statement_timeout=5s"] {
            let line = format!("upstream_settings = [{wrong:?}]");
            let err = format!("{:#}", Config::parse(&text(&line)).unwrap_err());
            assert!(err.contains("upstream_settings"), "{err}");
            assert!(err.contains(wrong), "{err}");
        }
    }

    #[test]
    fn plain_http_keys_are_refused_off_loopback() {
        assert!(check_fetch_url("issuer", "http://127.0.0.1:8080", false).is_ok());
        assert!(check_fetch_url("issuer", "http://localhost:8080", false).is_ok());
        assert!(check_fetch_url("issuer", "https://example.com", false).is_ok());
        let err = check_fetch_url("issuer", "http://example.com", false).unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert!(check_fetch_url("issuer", "http://issuer:8080", true).is_ok());
    }

    fn with_provider(lines: &str) -> anyhow::Result<Config> {
        Config::parse(&format!(
            r#"
[listen]
address = "127.0.0.1:6432"
[upstream]
host = "127.0.0.1"
[[role]]
name = "authenticated"
token = "required"
[claims]
signing_key = "cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM="
[[provider]]
issuer = "https://id.example"
{lines}
"#
        ))
    }

    #[test]
    fn provider_key_cache_defaults() {
        let config = with_provider("").unwrap();
        let p = &config.providers[0];
        assert_eq!(p.jwks_min_age(), Duration::from_secs(300));
        assert_eq!(p.jwks_max_age, Duration::from_secs(86400));
        assert_eq!(p.jwks_max_stale, Duration::from_secs(86400));
        assert_eq!(p.fetch_timeout, Duration::from_secs(10));
        assert_eq!(p.refetch_cooldown, Duration::from_secs(30));
        // An unset lower bound follows a short upper bound down.
        let config = with_provider("jwks_max_age = \"1s\"").unwrap();
        assert_eq!(config.providers[0].jwks_min_age(), Duration::from_secs(1));
        let config = with_provider("jwks_min_age = \"1m\"\nfetch_timeout = \"2s\"").unwrap();
        assert_eq!(config.providers[0].jwks_min_age(), Duration::from_secs(60));
        assert_eq!(config.providers[0].fetch_timeout, Duration::from_secs(2));
    }

    #[test]
    fn provider_key_cache_bounds_are_checked() {
        let err = |lines: &str| format!("{:#}", with_provider(lines).unwrap_err());
        let message = err("jwks_min_age = \"10m\"\njwks_max_age = \"5m\"");
        assert!(message.contains("jwks_min_age (10m)"), "{message}");
        assert!(message.contains("jwks_max_age (5m)"), "{message}");
        assert!(message.contains("https://id.example"), "{message}");
        let message = err("jwks_min_age = \"2days\"");
        assert!(message.contains("jwks_min_age"), "{message}");
        let message = err("fetch_timeout = \"0s\"");
        assert!(message.contains("fetch_timeout"), "{message}");
        let message = err("jwks_max_age = \"0s\"");
        assert!(message.contains("jwks_max_age"), "{message}");
        let message = err("jwks_max_stale = \"soon\"");
        assert!(message.contains("jwks_max_stale"), "{message}");
    }

    #[test]
    fn provider_claim_rules_are_checked_by_name() {
        let err = |lines: &str| format!("{:#}", with_provider(lines).unwrap_err());
        let message = err("algorithms = [\"RS256\", \"HS256\"]");
        assert!(message.contains("https://id.example"), "{message}");
        assert!(message.contains("algorithms"), "{message}");
        assert!(message.contains("hs256_secret"), "{message}");
        let message = err("algorithms = [\"RS1\"]");
        assert!(message.contains("unknown algorithm \"RS1\""), "{message}");
        assert!(err("algorithms = []").contains("algorithms is empty"));
        assert!(err("max_token_age = \"0s\"").contains("max_token_age"));
        assert!(err("required_claims = [\"a..b\"]").contains("required_claims"));
        assert!(err("role_claim = \"\"").contains("role_claim"));
        let message = err("hs256_secret = \"short\"");
        assert!(message.contains("hs256_secret is 5 bytes"), "{message}");
        assert!(
            !format!(
                "{:?}",
                with_provider("hs256_secret = \"a-secret-of-at-least-thirty-two-bytes\"")
                    .unwrap()
                    .providers[0]
            )
            .contains("thirty-two")
        );
        let message =
            err("jwks_url = \"https://id.example/k\"\ndiscovery_url = \"https://id.example/d\"");
        assert!(message.contains("not both"), "{message}");
        assert!(err("discovery_url = \"http://id.example/d\"").contains("discovery_url"));

        let config =
            with_provider("algorithms = [\"ES256\", \"EdDSA\"]\nmax_token_age = \"1h\"").unwrap();
        let p = &config.providers[0];
        assert_eq!(p.algorithms(), [Algorithm::ES256, Algorithm::EdDSA]);
        assert_eq!(p.max_token_age, Some(Duration::from_secs(3600)));
        assert!(p.has_jwks());
        let config = with_provider("").unwrap();
        assert_eq!(config.providers[0].algorithms(), ASYMMETRIC_ALGORITHMS);
        let config =
            with_provider("hs256_secret = \"a-secret-of-at-least-thirty-two-bytes\"").unwrap();
        assert!(!config.providers[0].has_jwks());
    }

    #[test]
    fn pooling_is_off_unless_configured_and_its_bounds_are_checked() {
        let config = with_provider("").unwrap();
        assert_eq!(config.pool.mode, PoolMode::None);
        let config = with_provider(
            "[pool]\nmode = \"session\"\nsize = 5\nidle_timeout = \"30s\"\nmax_lifetime = \"2h\"",
        )
        .unwrap();
        assert_eq!(config.pool.mode, PoolMode::Session);
        assert_eq!(config.pool.size, 5);
        assert_eq!(config.pool.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.pool.max_lifetime, Duration::from_secs(7200));
        let err = with_provider("[pool]\nmode = \"session\"\nsize = 0").unwrap_err();
        assert!(err.to_string().contains("[pool] size"), "{err:#}");
        let err = with_provider("[pool]\nmode = \"transaction\"").unwrap_err();
        assert!(format!("{err:#}").contains("transaction"), "{err:#}");
    }

    #[test]
    fn an_issuer_need_not_be_a_url_when_keys_come_from_elsewhere() {
        let parse = |provider: &str| {
            Config::parse(&format!(
                "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"h\"\n[[role]]\nname = \"a\"\ntoken = \"required\"\n[claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n[[provider]]\n{provider}\n"
            ))
        };
        assert!(parse("issuer = \"stytch.com/project-test-1\"\njwks_url = \"https://test.stytch.com/v1/sessions/jwks/project-test-1\"").is_ok());
        let err = format!(
            "{:#}",
            parse("issuer = \"stytch.com/project-test-1\"").unwrap_err()
        );
        assert!(
            err.contains("issuer = \"stytch.com/project-test-1\" is not a URL"),
            "{err}"
        );
        assert!(parse("issuer = \"\"\njwks_url = \"https://id.example/k\"").is_err());
    }

    fn with_listen(lines: &str) -> anyhow::Result<Config> {
        Config::parse(&format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\n{lines}\n[upstream]\nhost = \"db.internal\"\n\
             [[role]]\nname = \"a\"\ntoken = \"none\"\n\
             [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
        ))
    }

    #[test]
    fn startup_limits_have_defaults_and_are_checked_by_name() {
        let listen = with_listen("").unwrap().listen;
        assert_eq!(listen.max_startups, 256);
        assert_eq!(listen.max_startups_per_address, 64);
        assert_eq!(listen.auth_timeout, Duration::from_secs(10));
        let listen =
            with_listen("max_startups = 10\nmax_startups_per_address = 2\nauth_timeout = \"3s\"")
                .unwrap()
                .listen;
        assert_eq!(listen.max_startups, 10);
        assert_eq!(listen.max_startups_per_address, 2);
        assert_eq!(listen.auth_timeout, Duration::from_secs(3));
        let err = |lines: &str| format!("{:#}", with_listen(lines).unwrap_err());
        for key in [
            "max_startups",
            "max_startups_per_address",
            "max_connections",
        ] {
            let message = err(&format!("{key} = 0"));
            assert!(message.contains(&format!("[listen] {key}")), "{message}");
        }
        let message = err("auth_timeout = \"0s\"");
        assert!(message.contains("[listen] auth_timeout"), "{message}");
        let message = err("auth_timeout = \"soon\"");
        assert!(message.contains("auth_timeout"), "{message}");
        let message = err("max_startups = -1");
        assert!(message.contains("max_startups"), "{message}");
    }

    fn with_upstream(lines: &str) -> anyhow::Result<Config> {
        Config::parse(&format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\n[upstream]\nhost = \"db.internal\"\n{lines}\n\
             [[role]]\nname = \"a\"\ntoken = \"none\"\n\
             [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
        ))
    }

    #[test]
    fn upstream_tls_defaults_to_prefer_like_libpq() {
        let config = with_upstream("").unwrap();
        assert_eq!(config.upstream.tls, UpstreamTlsMode::Prefer);
        assert_eq!(config.upstream.tls_ca_file, None);
        assert_eq!(config.upstream.tls_server_name, None);
        for (text, mode) in [
            ("disable", UpstreamTlsMode::Disable),
            ("require", UpstreamTlsMode::Require),
            ("verify-ca", UpstreamTlsMode::VerifyCa),
            ("verify-full", UpstreamTlsMode::VerifyFull),
        ] {
            let config = with_upstream(&format!("tls = \"{text}\"")).unwrap();
            assert_eq!(config.upstream.tls, mode);
            assert_eq!(mode.as_str(), text);
        }
        let config = with_upstream(
            "tls = \"verify-full\"\ntls_ca_file = \"/ca.pem\"\ntls_server_name = \"db.example.com\"",
        )
        .unwrap();
        assert_eq!(config.upstream.tls_ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn upstream_tls_settings_are_checked_by_name() {
        let err = |lines: &str| format!("{:#}", with_upstream(lines).unwrap_err());
        let message = err("tls = \"verify\"");
        assert!(message.contains("tls"), "{message}");
        assert!(message.contains("verify-full"), "{message}");
        assert!(message.contains("line 5"), "{message}");
        let message = err("tls = \"require\"\ntls_ca_file = \"/ca.pem\"");
        assert!(message.contains("[upstream] tls_ca_file"), "{message}");
        assert!(message.contains("verify-ca"), "{message}");
        let message = err("tls_server_name = \"not a name\"");
        assert!(message.contains("[upstream] tls_server_name"), "{message}");
        let message = err("tls = \"disable\"\ntls_server_name = \"db.example.com\"");
        assert!(message.contains("tls_server_name"), "{message}");
        assert!(err("tls_sni = \"x\"").contains("tls_sni"));
    }

    #[test]
    fn upstream_client_certificates_come_in_pairs_and_need_tls_that_is_never_skipped() {
        let config = with_upstream("").unwrap();
        assert_eq!(config.upstream.tls_client_cert, None);
        assert_eq!(config.upstream.tls_client_key, None);
        let config = with_upstream(
            "tls = \"verify-full\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"",
        )
        .unwrap();
        assert_eq!(
            config.upstream.tls_client_cert,
            Some(PathBuf::from("/c.pem"))
        );
        assert_eq!(
            config.upstream.tls_client_key,
            Some(PathBuf::from("/k.pem"))
        );
        for mode in ["require", "verify-ca"] {
            with_upstream(&format!(
                "tls = \"{mode}\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\""
            ))
            .unwrap();
        }

        let err = |lines: &str| format!("{:#}", with_upstream(lines).unwrap_err());
        let message = err("tls = \"require\"\ntls_client_cert = \"/c.pem\"");
        assert!(
            message.contains("[upstream] tls_client_cert and tls_client_key"),
            "{message}"
        );
        let message = err("tls = \"require\"\ntls_client_key = \"/k.pem\"");
        assert!(message.contains("together"), "{message}");
        for mode in ["prefer", "disable"] {
            let message = err(&format!(
                "tls = \"{mode}\"\ntls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\""
            ));
            assert!(message.contains("[upstream] tls_client_cert"), "{message}");
            assert!(message.contains(&format!("tls = \"{mode}\"")), "{message}");
            assert!(message.contains("verify-full"), "{message}");
        }
        // The default mode is prefer, which may skip TLS.
        let message = err("tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"");
        assert!(message.contains("tls = \"prefer\""), "{message}");
    }

    fn with_socket(lines: &str) -> anyhow::Result<Config> {
        Config::parse(&format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\n\
             [upstream]\nhost = \"/var/run/postgresql\"\nport = 5433\n{lines}\n\
             [[role]]\nname = \"a\"\ntoken = \"none\"\n\
             [claims]\nsigning_key = \"cmxzZ2F0ZS1leGFtcGxlLXNpZ25pbmcta2V5LTMyYnl0ZXM=\"\n"
        ))
    }

    #[test]
    fn a_socket_directory_host_has_no_tls_and_errors_name_both_keys() {
        let config = with_socket("").unwrap();
        assert!(config.upstream.is_socket());
        assert_eq!(config.upstream.tls, UpstreamTlsMode::Prefer);
        assert_eq!(
            config.upstream.address(),
            "/var/run/postgresql/.s.PGSQL.5433"
        );
        with_socket("tls = \"disable\"").unwrap();
        assert!(!with_upstream("").unwrap().upstream.is_socket());

        let err = |lines: &str| format!("{:#}", with_socket(lines).unwrap_err());
        for mode in ["require", "verify-ca", "verify-full"] {
            let message = err(&format!("tls = \"{mode}\""));
            assert!(
                message.contains("[upstream] host = \"/var/run/postgresql\""),
                "{message}"
            );
            assert!(
                message.contains(&format!("[upstream] tls = \"{mode}\"")),
                "{message}"
            );
        }
        let message = err("tls_server_name = \"db.example.com\"");
        assert!(message.contains("tls_server_name"), "{message}");
        assert!(message.contains("Unix socket"), "{message}");
        let message = err("tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\"");
        assert!(message.contains("[upstream] tls_client_cert"), "{message}");
        assert!(message.contains("peer"), "{message}");
    }
}
