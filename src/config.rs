//! The TOML configuration: loaded once, `${VAR}` expanded from the environment,
//! and validated while it is parsed so that errors name the key and the line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::claims::SigningKey;

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: SocketAddr,
    /// PEM certificate chain; with `tls_key`, enables TLS for clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Accept tokens over plaintext TCP on a non-loopback address.
    #[serde(default)]
    pub allow_plaintext_tokens: bool,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Largest password (token) accepted, in bytes.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
    /// Time a client has from connecting to being ready for queries.
    #[serde(default = "defaults::startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On shutdown, how long sessions may run on before they are ended.
    #[serde(default = "defaults::shutdown_drain", with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub host: String,
    #[serde(default = "defaults::postgres_port")]
    pub port: u16,
    /// Database to connect to; by default the one the client asked for.
    pub database: Option<String>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// The user name clients connect as.
    pub name: String,
    pub token: TokenPolicy,
    /// The Postgres role the proxy logs in as; defaults to `name`.
    upstream_user: Option<String>,
    pub upstream_password: Option<String>,
    /// Sessions of this role at once (within `[listen] max_connections`).
    pub max_connections: Option<usize>,
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
}

impl Provider {
    /// The lower bound on JWKS freshness, its default kept within `jwks_max_age`.
    pub fn jwks_min_age(&self) -> Duration {
        self.jwks_min_age
            .unwrap_or_else(|| defaults::jwks_min_age().min(self.jwks_max_age))
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
        match self.jwks_min_age {
            Some(min) if min > self.jwks_max_age => Err(named(format!(
                "jwks_min_age ({}) is longer than jwks_max_age ({})",
                show(min),
                show(self.jwks_max_age)
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Base64 of at least 32 random bytes, shared with the database by `rlsgate init-db`.
    pub signing_key: SigningKey,
}

mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> usize {
        1000
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
    pub fn postgres_port() -> u16 {
        5432
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
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
            check_fetch_url("issuer", &provider.issuer, allow_http)?;
            if let Some(url) = &provider.jwks_url {
                check_fetch_url("jwks_url", url, allow_http)?;
            }
            provider.validate()?;
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("[listen] tls_cert and tls_key must be given together")
            }
            _ => {}
        }
        if self.listen.max_connections == 0 {
            bail!("[listen] max_connections must be at least 1");
        }
        Ok(())
    }
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
}
