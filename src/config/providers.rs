//! `[[provider]]`: the identity providers whose tokens are accepted, where
//! their keys are fetched, and the rules their claims must meet.

use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::Secret;

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

    pub(super) fn discovers_at_issuer(&self) -> bool {
        self.has_jwks() && self.jwks_url.is_none() && self.discovery_url.is_none()
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
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

/// Keys are fetched over HTTPS; plain HTTP only from this machine, where
/// nobody on the network can swap them.
pub(super) fn check_fetch_url(key: &str, url: &str, allow_http: bool) -> anyhow::Result<()> {
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

mod defaults {
    use std::time::Duration;
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
