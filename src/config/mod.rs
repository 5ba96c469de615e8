//! The TOML configuration: loaded once, `${VAR}` expanded from the environment,
//! and validated while it is parsed so that errors name the key and the line.
//! Each section has a file of its own: its keys, defaults and checks.

mod claims;
mod cluster;
mod http;
mod listen;
mod pool;
mod providers;
mod roles;
mod upstream;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

pub use claims::Claims;
pub use cluster::{Cluster, MAX_PEER_ID, Peer};
pub use http::Http;
pub use listen::{IoUring, Listen};
pub use pool::{Pool, PoolMode};
pub use providers::{ASYMMETRIC_ALGORITHMS, Provider};
pub use roles::{Role, TokenPolicy};
pub use upstream::{Upstream, UpstreamTlsMode};

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
    /// The serverless driver's front door; off unless `address` is set.
    #[serde(default)]
    pub http: Http,
    /// Peers behind the same load balancer; off unless `peer_id` is set.
    #[serde(default)]
    pub cluster: Cluster,
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
            roles::check_role_settings(role)?;
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
                providers::check_fetch_url("issuer", &provider.issuer, allow_http)?;
            } else if provider.issuer.is_empty() {
                bail!("[[provider]] issuer is empty");
            }
            if let Some(url) = &provider.jwks_url {
                providers::check_fetch_url("jwks_url", url, allow_http)?;
            }
            if let Some(url) = &provider.discovery_url {
                providers::check_fetch_url("discovery_url", url, allow_http)?;
            }
            provider.validate()?;
        }
        self.listen.validate()?;
        self.claims.validate()?;
        self.upstream.validate()?;
        self.pool.validate(self.http.address.is_some())?;
        self.http.validate()?;
        self.cluster.validate()?;
        Ok(())
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
mod tests;
