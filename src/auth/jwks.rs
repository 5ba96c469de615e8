//! A provider's signing keys: found through OIDC discovery or a direct JWKS
//! URL, cached, and refetched when a token names a key the cache lacks.
//!
//! A fetched set is fresh for the response's `Cache-Control: max-age`,
//! clamped to the provider's `[jwks_min_age, jwks_max_age]`. A key in the
//! cache is always answered at once: when the set nears the end of its
//! freshness, or is past it, the refresh runs in the background, so a slow or
//! unreachable provider never holds up a connection whose key is known.
//! While the provider cannot be reached the cached keys keep serving for
//! `jwks_max_stale` past their freshness, and then no longer: a compromised
//! key the provider has since withdrawn must not stay trusted forever.
//!
//! Fetches are limited to one per `refetch_cooldown` and are single-flight,
//! so a burst of tokens with a new (or bogus) `kid` causes at most one request
//! to the provider.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use reqwest::header::{AGE, CACHE_CONTROL, HeaderMap};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::config;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::jwks=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::jwks";

/// Bound on a discovery document or JWKS, to keep a hostile server from
/// filling memory.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Freshness of a JWKS served without `max-age` (before clamping): long
/// enough to spare the provider, short enough that a withdrawn key goes.
const DEFAULT_FRESHNESS: Duration = Duration::from_secs(3600);

/// A set is refreshed in the background once it is in the last
/// `1 / REFRESH_AHEAD` of its freshness, so that a busy proxy keeps a fresh
/// set rather than serving from a stale one before each refresh.
const REFRESH_AHEAD: u32 = 10;

/// One verification key from a JWKS.
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<String>,
    /// The `alg` the JWK declares, if any; tokens must then use exactly it.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) kind: KeyKind,
    pub(crate) key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a token signed with `alg` can be checked with this kind of key.
    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("no key {kid:?} in the JWKS of {issuer}")]
    UnknownKid { kid: String, issuer: String },
    #[error("the token has no kid and the JWKS of {issuer} does not hold exactly one key")]
    AmbiguousKey { issuer: String },
    /// No cached key may be used: none was ever fetched, or those fetched
    /// are older than freshness + `jwks_max_stale` (`older_than`).
    #[error("the signing keys of {issuer} {}: {reason}", unavailable_state(.older_than))]
    Unavailable {
        issuer: String,
        reason: String,
        older_than: Option<Duration>,
    },
}

fn unavailable_state(older_than: &Option<Duration>) -> String {
    match older_than {
        None => "cannot be fetched".to_owned(),
        Some(limit) => format!(
            "are older than {} and it cannot be reached",
            humantime::format_duration(Duration::from_secs(limit.as_secs()))
        ),
    }
}

/// Why a provider's keys could not be fetched. Shown to operators (the
/// log, `rlsgate check`) and inside [`KeyError::Unavailable`]; each message
/// starts with the URL that failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error(
        "{url}: no complete answer within {} (fetch_timeout)",
        humantime::format_duration(*.timeout)
    )]
    TimedOut { url: String, timeout: Duration },
    /// No answer: refused, unresolvable, a TLS failure, a broken connection.
    #[error("{url}: {}", error_chain(.error))]
    Unreachable { url: String, error: reqwest::Error },
    #[error("{url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url}: response larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: not JSON: {error}")]
    NotJson {
        url: String,
        error: serde_json::Error,
    },
    #[error("{url}: not an OpenID discovery document: {error}")]
    NotDiscovery {
        url: String,
        error: serde_json::Error,
    },
    /// The discovery document speaks for another issuer.
    #[error("{url} names issuer {named:?}, not {expected:?}")]
    OtherIssuer {
        url: String,
        named: String,
        expected: String,
    },
    /// A discovery document fetched over https points to keys over http.
    #[error("{url} names jwks_uri {jwks_uri:?}, which is not https")]
    PlainJwksUri { url: String, jwks_uri: String },
    #[error("{url}: not a JWKS: no \"keys\" array")]
    NotJwks { url: String },
}

#[derive(PartialEq)]
enum Source {
    /// The discovery document's URL.
    Discovery(String),
    Direct(String),
}

impl Source {
    fn of(provider: &config::Provider) -> Source {
        match &provider.jwks_url {
            Some(url) => Source::Direct(url.clone()),
            None => Source::Discovery(provider.discovery_url.clone().unwrap_or_else(|| {
                format!(
                    "{}/.well-known/openid-configuration",
                    provider.issuer.trim_end_matches('/')
                )
            })),
        }
    }
}

/// How long fetched keys are trusted, from the provider's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Policy {
    min_age: Duration,
    max_age: Duration,
    max_stale: Duration,
    cooldown: Duration,
    fetch_timeout: Duration,
}

impl Policy {
    fn of(provider: &config::Provider) -> Policy {
        Policy {
            min_age: provider.jwks_min_age(),
            max_age: provider.jwks_max_age,
            max_stale: provider.jwks_max_stale,
            cooldown: provider.refetch_cooldown,
            fetch_timeout: provider.fetch_timeout,
        }
    }
}

#[derive(Default)]
struct Cached {
    keys: Arc<Vec<Arc<VerifyingKey>>>,
    fetched_at: Option<Instant>,
    /// Freshness of the current set, from its response's Cache-Control.
    fresh_for: Duration,
    last_attempt: Option<Instant>,
    /// Why the last attempt failed; cleared by a success.
    last_error: Option<FetchError>,
    /// Counts attempts, so that a waiter can tell someone else just fetched.
    attempts: u64,
    jwks_uri: Option<String>,
}

/// Where the cached set stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Fresh,
    /// Still fresh, but close enough to the end to refresh in the background.
    RefreshAhead,
    /// Past freshness, within `max_stale`: served, refreshed in the background.
    Stale,
    /// Never fetched, or past `max_stale`: not served.
    Unusable,
}

impl Standing {
    fn usable(self) -> bool {
        self != Standing::Unusable
    }
}

impl Cached {
    fn standing(&self, now: Instant, policy: &Policy) -> Standing {
        let Some(at) = self.fetched_at else {
            return Standing::Unusable;
        };
        let age = now.saturating_duration_since(at);
        if age < self.fresh_for - self.fresh_for / REFRESH_AHEAD {
            Standing::Fresh
        } else if age < self.fresh_for {
            Standing::RefreshAhead
        } else if age < self.fresh_for.saturating_add(policy.max_stale) {
            Standing::Stale
        } else {
            Standing::Unusable
        }
    }

    fn cooled(&self, now: Instant, policy: &Policy) -> bool {
        self.last_attempt
            .is_none_or(|at| now.saturating_duration_since(at) >= policy.cooldown)
    }
}

pub(crate) struct JwksCache {
    issuer: String,
    source: Source,
    http: reqwest::Client,
    policy: Policy,
    cached: RwLock<Cached>,
    fetching: Mutex<()>,
    /// Set while a background refresh is pending, so that a busy proxy
    /// spawns one, not one per connection.
    refreshing: AtomicBool,
    /// Fetches that succeeded and that failed, for metrics.
    fetches_ok: AtomicU64,
    fetches_failed: AtomicU64,
}

/// A key cache's counts and age, for metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchStats {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    /// Since the keys held were fetched; `None` before the first success.
    pub(crate) key_age: Option<Duration>,
}

impl JwksCache {
    pub(crate) fn new(provider: &config::Provider, http: reqwest::Client) -> Self {
        JwksCache {
            issuer: provider.issuer.clone(),
            source: Source::of(provider),
            http,
            policy: Policy::of(provider),
            cached: RwLock::default(),
            fetching: Mutex::new(()),
            refreshing: AtomicBool::new(false),
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> FetchStats {
        let fetched_at = self.cached.read().expect("jwks lock").fetched_at;
        FetchStats {
            succeeded: self.fetches_ok.load(Ordering::Relaxed),
            failed: self.fetches_failed.load(Ordering::Relaxed),
            key_age: fetched_at.map(|at| at.elapsed()),
        }
    }

    /// Whether tokens can be verified now: the cached keys are fresh, or
    /// stale within `jwks_max_stale`. With nothing usable it fetches (past
    /// the cooldown, like a token would) and answers from the result, so
    /// that a proxy no client has used yet becomes ready, and one whose
    /// provider came back recovers; stale keys get a background refresh.
    pub(crate) async fn readiness(self: &Arc<Self>) -> Result<(), KeyError> {
        let now = Instant::now();
        let (standing, attempts, cooled) = {
            let cached = self.cached.read().expect("jwks lock");
            (
                cached.standing(now, &self.policy),
                cached.attempts,
                cached.cooled(now, &self.policy),
            )
        };
        if standing.usable() {
            if standing != Standing::Fresh && cooled {
                self.refresh_in_background(attempts);
            }
            return Ok(());
        }
        if cooled {
            self.refresh_once(attempts).await;
        }
        let cached = self.cached.read().expect("jwks lock");
        if cached.standing(Instant::now(), &self.policy).usable() {
            Ok(())
        } else {
            Err(self.unavailable(&cached))
        }
    }

    /// Whether this cache fetches and keeps keys as `provider` asks, so that
    /// a reloaded configuration can go on using it.
    pub(crate) fn serves(&self, provider: &config::Provider) -> bool {
        self.issuer == provider.issuer
            && self.source == Source::of(provider)
            && self.policy == Policy::of(provider)
    }

    /// Fetches the set now, past the cache and its cooldown, keeping nothing
    /// (for `rlsgate check`): the JWKS URL and its usable keys, or why they
    /// cannot be had.
    pub(crate) async fn fetch_once(&self) -> Result<(String, Vec<Arc<VerifyingKey>>), FetchError> {
        self.fetch().await.map(|f| (f.jwks_uri, f.keys))
    }

    /// The key for a token's `kid` (or the only key, for tokens without one).
    ///
    /// Only an unknown key, or a cache with nothing usable in it, waits for
    /// a fetch, and only past the cooldown.
    pub(crate) async fn key(
        self: &Arc<Self>,
        kid: Option<&str>,
    ) -> Result<Arc<VerifyingKey>, KeyError> {
        let now = Instant::now();
        let (standing, found, attempts, cooled) = {
            let cached = self.cached.read().expect("jwks lock");
            (
                cached.standing(now, &self.policy),
                find(&cached.keys, kid),
                cached.attempts,
                cached.cooled(now, &self.policy),
            )
        };
        if standing.usable() {
            if let Some(key) = found {
                if standing != Standing::Fresh && cooled {
                    self.refresh_in_background(attempts);
                }
                return Ok(key);
            }
            if !cooled {
                return Err(self.missing(kid));
            }
        } else if !cooled {
            return Err(self.unavailable(&self.cached.read().expect("jwks lock")));
        }
        self.refresh_once(attempts).await;
        let cached = self.cached.read().expect("jwks lock");
        if !cached.standing(Instant::now(), &self.policy).usable() {
            return Err(self.unavailable(&cached));
        }
        find(&cached.keys, kid).ok_or_else(|| self.missing(kid))
    }

    fn refresh_in_background(self: &Arc<Self>, attempts: u64) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            // Cleared on drop too, so a cancelled task cannot stop refreshes for good.
            let _pending = Pending(&cache.refreshing);
            cache.refresh_once(attempts).await;
        });
    }

    /// Fetches unless another task fetched since `attempts` was read: many
    /// waiters, one request.
    async fn refresh_once(&self, attempts: u64) {
        let _guard = self.fetching.lock().await;
        if self.cached.read().expect("jwks lock").attempts == attempts {
            self.refresh().await;
        }
    }

    fn missing(&self, kid: Option<&str>) -> KeyError {
        match kid {
            Some(kid) => KeyError::UnknownKid {
                kid: kid.chars().take(80).collect(),
                issuer: self.issuer.clone(),
            },
            None => KeyError::AmbiguousKey {
                issuer: self.issuer.clone(),
            },
        }
    }

    fn unavailable(&self, cached: &Cached) -> KeyError {
        let reason = cached.last_error.as_ref().map_or_else(
            || "no fetch has been attempted yet".to_owned(),
            ToString::to_string,
        );
        KeyError::Unavailable {
            issuer: self.issuer.clone(),
            reason,
            older_than: cached
                .fetched_at
                .map(|_| cached.fresh_for.saturating_add(self.policy.max_stale)),
        }
    }

    async fn refresh(&self) {
        let result = self.fetch().await;
        let now = Instant::now();
        let mut cached = self.cached.write().expect("jwks lock");
        cached.attempts += 1;
        cached.last_attempt = Some(now);
        match &result {
            Ok(_) => self.fetches_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.fetches_failed.fetch_add(1, Ordering::Relaxed),
        };
        match result {
            Ok(fetched) => {
                tracing::info!(
                    target: LOG_TARGET,
                    issuer = %self.issuer,
                    keys = fetched.keys.len(),
                    fresh_for = %humantime::format_duration(fetched.fresh_for),
                    "fetched signing keys"
                );
                cached.keys = Arc::new(fetched.keys);
                cached.fetched_at = Some(now);
                cached.fresh_for = fetched.fresh_for;
                cached.jwks_uri = Some(fetched.jwks_uri);
                cached.last_error = None;
            }
            Err(reason) => {
                let standing = cached.standing(now, &self.policy);
                if standing.usable() {
                    tracing::warn!(
                        target: LOG_TARGET,
                        issuer = %self.issuer,
                        %reason,
                        cached_keys = cached.keys.len(),
                        "cannot fetch signing keys; the cached keys keep serving",
                    );
                } else if cached.fetched_at.is_some() {
                    tracing::error!(
                        target: LOG_TARGET,
                        issuer = %self.issuer,
                        %reason,
                        "cannot fetch signing keys, and the cached keys are past jwks_max_stale: tokens are refused",
                    );
                } else {
                    tracing::error!(
                        target: LOG_TARGET,
                        issuer = %self.issuer,
                        %reason,
                        "cannot fetch signing keys: tokens are refused",
                    );
                }
                cached.last_error = Some(reason);
            }
        }
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        let known_uri = self.cached.read().expect("jwks lock").jwks_uri.clone();
        let jwks_uri = match (&self.source, known_uri) {
            (Source::Direct(url), _) => url.clone(),
            (Source::Discovery(_), Some(uri)) => uri,
            (Source::Discovery(url), None) => self.discover(url).await?,
        };
        let (document, headers) =
            get_json(&self.http, &jwks_uri, self.policy.fetch_timeout).await?;
        let keys = parse_jwks(&document).ok_or_else(|| FetchError::NotJwks {
            url: jwks_uri.clone(),
        })?;
        let fresh_for = freshness(&headers, self.policy.min_age, self.policy.max_age);
        Ok(Fetched {
            jwks_uri,
            keys,
            fresh_for,
        })
    }

    async fn discover(&self, url: &str) -> Result<String, FetchError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let (document, _) = get_json(&self.http, url, self.policy.fetch_timeout).await?;
        let document: Discovery =
            serde_json::from_value(document).map_err(|error| FetchError::NotDiscovery {
                url: url.to_owned(),
                error,
            })?;
        if document.issuer.trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            return Err(FetchError::OtherIssuer {
                url: url.to_owned(),
                named: document.issuer,
                expected: self.issuer.clone(),
            });
        }
        // The configuration only allowed plain http for the document itself.
        if url.starts_with("https:") && !document.jwks_uri.starts_with("https:") {
            return Err(FetchError::PlainJwksUri {
                url: url.to_owned(),
                jwks_uri: document.jwks_uri,
            });
        }
        Ok(document.jwks_uri)
    }
}

#[cfg(test)]
impl JwksCache {
    /// A cache holding the keys of `jwks` as if just fetched from the
    /// provider, so that unit tests verify tokens through [`JwksCache::key`]
    /// without an HTTP server. Its cooldown starts now: an unknown `kid` is
    /// refused without a fetch.
    pub(crate) fn holding(provider: &config::Provider, jwks: &Value) -> Self {
        let cache = Self::new(provider, reqwest::Client::new());
        {
            let now = Instant::now();
            let mut cached = cache.cached.write().expect("jwks lock");
            cached.keys = Arc::new(parse_jwks(jwks).expect("a JWKS"));
            cached.fetched_at = Some(now);
            cached.last_attempt = Some(now);
            cached.fresh_for = cache.policy.max_age;
        }
        cache
    }
}

struct Pending<'a>(&'a AtomicBool);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

struct Fetched {
    jwks_uri: String,
    keys: Vec<Arc<VerifyingKey>>,
    fresh_for: Duration,
}

fn find(keys: &[Arc<VerifyingKey>], kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

async fn get_json(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(Value, HeaderMap), FetchError> {
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::TimedOut {
                url: url.to_owned(),
                timeout,
            }
        } else {
            FetchError::Unreachable {
                url: url.to_owned(),
                error: e.without_url(),
            }
        }
    };
    let mut response = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(failed)?;
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: response.status(),
        });
    }
    let headers = response.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
            });
        }
        body.extend_from_slice(&chunk);
    }
    let document = serde_json::from_slice(&body).map_err(|error| FetchError::NotJson {
        url: url.to_owned(),
        error,
    })?;
    Ok((document, headers))
}

/// An error with its causes, which reqwest keeps out of its own message
/// ("error sending request" says nothing about a refused connection).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How long a JWKS response stays fresh: its `max-age` less its `Age`
/// (RFC 9111), or [`DEFAULT_FRESHNESS`] without one, clamped to
/// `[min, max]`. `no-store` and `no-cache` give the minimum.
fn freshness(headers: &HeaderMap, min: Duration, max: Duration) -> Duration {
    let lifetime = match cache_lifetime(headers) {
        Lifetime::Unspecified => DEFAULT_FRESHNESS,
        Lifetime::None => Duration::ZERO,
        Lifetime::MaxAge(seconds) => {
            let age = headers
                .get(AGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| delta_seconds(v.trim()))
                .unwrap_or(0);
            Duration::from_secs(seconds.saturating_sub(age))
        }
    };
    lifetime.clamp(min, max.max(min))
}

#[derive(Debug, PartialEq, Eq)]
enum Lifetime {
    /// No usable Cache-Control directive.
    Unspecified,
    /// `no-store` or `no-cache`: not to be reused without asking again.
    None,
    MaxAge(u64),
}

/// Reads the Cache-Control directives that matter to a private cache. A
/// `max-age` given more than once counts at its smallest, and one that is
/// not a number counts as zero (RFC 9111 treats such a response as stale).
fn cache_lifetime(headers: &HeaderMap) -> Lifetime {
    let mut max_age: Option<u64> = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for (name, argument) in directives(value) {
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Lifetime::None;
            }
            if name.eq_ignore_ascii_case("max-age") {
                let seconds = argument.as_deref().and_then(delta_seconds).unwrap_or(0);
                max_age = Some(max_age.map_or(seconds, |m| m.min(seconds)));
            }
        }
    }
    max_age.map_or(Lifetime::Unspecified, Lifetime::MaxAge)
}

/// Splits a Cache-Control value into `(name, argument)` pairs; commas inside
/// quoted arguments (`private="a, b"`) do not split, and quotes are removed.
fn directives(value: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars
            .peek()
            .is_some_and(|c| *c == ',' || c.is_ascii_whitespace())
        {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == ',' || c == '=' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let mut argument = None;
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                chars.next();
            }
            let mut text = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => text.extend(chars.next()),
                        c => text.push(c),
                    }
                }
                // Anything between the closing quote and the next comma is junk.
                while chars.peek().is_some_and(|c| *c != ',') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    text.push(c);
                    chars.next();
                }
                text.truncate(text.trim_end().len());
            }
            argument = Some(text);
        }
        let name = name.trim();
        if !name.is_empty() {
            out.push((name.to_owned(), argument));
        }
    }
}

/// A non-negative integer of seconds; too large for a u64 saturates, as
/// RFC 9111 asks, and anything else is no number.
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Keeps the usable signature keys of a JWKS; `None` when the document is
/// no JWKS. Symmetric (`kty: oct`) keys are never taken from a fetched set,
/// nor keys meant for encryption.
fn parse_jwks(document: &Value) -> Option<Vec<Arc<VerifyingKey>>> {
    let entries = document.get("keys").and_then(Value::as_array)?;
    let mut keys = Vec::new();
    for entry in entries {
        if entry.get("kty").and_then(Value::as_str) == Some("oct") {
            continue;
        }
        if entry
            .get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                KeyKind::EcP256
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                KeyKind::EcP384
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyKind::Ed25519
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        keys.push(Arc::new(VerifyingKey {
            kid: jwk.common.key_id.clone(),
            alg,
            kind,
            key,
        }));
    }
    Some(keys)
}

/// The HTTP client for discovery and JWKS: each request carries the
/// provider's `fetch_timeout`; redirects are followed only within the same
/// host and never from https to http.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let safe = attempt.previous().first().is_some_and(|first| {
                first.host_str() == attempt.url().host_str()
                    && (first.scheme() == attempt.url().scheme()
                        || attempt.url().scheme() == "https")
            });
            if safe && attempt.previous().len() < 5 {
                attempt.follow()
            } else {
                attempt.stop()
            }
        }))
        .user_agent(concat!("rlsgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client configuration is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn symmetric_and_encryption_keys_are_dropped() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "sig", "use": "sig", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "weird", "kid": "w"}
        ]});
        let keys = parse_jwks(&doc).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig"));
        assert_eq!(keys[0].kind, KeyKind::Ed25519);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    const MIN: Duration = Duration::from_secs(300);
    const MAX: Duration = Duration::from_secs(86400);

    fn fresh(pairs: &[(&str, &str)]) -> u64 {
        freshness(&headers(pairs), MIN, MAX).as_secs()
    }

    #[test]
    fn max_age_is_clamped_to_the_bounds() {
        assert_eq!(fresh(&[("cache-control", "max-age=3600")]), 3600);
        assert_eq!(fresh(&[("cache-control", "public, max-age=1")]), 300);
        assert_eq!(fresh(&[("cache-control", "max-age=9999999")]), 86400);
        assert_eq!(
            fresh(&[("cache-control", "max-age=99999999999999999999999")]),
            86400
        );
        // Names are case-insensitive; stray spaces around `=` are forgiven.
        assert_eq!(fresh(&[("Cache-Control", "MAX-AGE = 600")]), 600);
        assert_eq!(fresh(&[("Cache-Control", "Max-Age=600")]), 600);
    }

    #[test]
    fn without_max_age_the_default_is_clamped() {
        assert_eq!(fresh(&[]), DEFAULT_FRESHNESS.as_secs());
        assert_eq!(fresh(&[("cache-control", "public")]), 3600);
        let short = freshness(
            &headers(&[]),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        assert_eq!(short, Duration::from_secs(2));
    }

    #[test]
    fn no_store_and_no_cache_give_the_minimum() {
        assert_eq!(fresh(&[("cache-control", "no-store")]), 300);
        assert_eq!(fresh(&[("cache-control", "max-age=3600, no-cache")]), 300);
        assert_eq!(
            fresh(&[
                ("cache-control", "max-age=3600"),
                ("cache-control", "No-Store")
            ]),
            300
        );
        assert_eq!(
            fresh(&[("cache-control", "no-cache=\"set-cookie\", max-age=3600")]),
            300
        );
    }

    #[test]
    fn the_parser_respects_quotes_and_odd_values() {
        // A comma inside quotes does not start a directive.
        assert_eq!(
            fresh(&[("cache-control", "private=\"x, max-age=1\", max-age=7200")]),
            7200
        );
        assert_eq!(fresh(&[("cache-control", "max-age=\"7200\"")]), 7200);
        // Not a number, or repeated: the smallest (zero for junk) wins.
        assert_eq!(fresh(&[("cache-control", "max-age=abc")]), 300);
        assert_eq!(fresh(&[("cache-control", "max-age=-5")]), 300);
        assert_eq!(
            fresh(&[("cache-control", "max-age=7200, max-age=3600")]),
            3600
        );
        assert_eq!(fresh(&[("cache-control", ",,max-age=3600,,")]), 3600);
        assert_eq!(fresh(&[("cache-control", "max-age")]), 300);
    }

    #[test]
    fn age_counts_against_max_age() {
        assert_eq!(
            fresh(&[("cache-control", "max-age=3600"), ("age", "600")]),
            3000
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=3600"), ("age", "7200")]),
            300
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=3600"), ("age", "junk")]),
            3600
        );
    }

    #[test]
    fn a_set_ages_from_fresh_through_stale_to_unusable() {
        let policy = Policy {
            min_age: MIN,
            max_age: MAX,
            max_stale: Duration::from_secs(100),
            cooldown: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
        };
        let start = Instant::now();
        let mut cached = Cached::default();
        assert_eq!(cached.standing(start, &policy), Standing::Unusable);
        assert!(cached.cooled(start, &policy));
        cached.fetched_at = Some(start);
        cached.last_attempt = Some(start);
        cached.fresh_for = Duration::from_secs(1000);
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(cached.standing(at(0), &policy), Standing::Fresh);
        assert_eq!(cached.standing(at(899), &policy), Standing::Fresh);
        assert_eq!(cached.standing(at(900), &policy), Standing::RefreshAhead);
        assert_eq!(cached.standing(at(1000), &policy), Standing::Stale);
        assert_eq!(cached.standing(at(1099), &policy), Standing::Stale);
        assert_eq!(cached.standing(at(1100), &policy), Standing::Unusable);
        assert!(!cached.cooled(at(29), &policy));
        assert!(cached.cooled(at(30), &policy));
    }

    #[test]
    fn unavailable_names_the_provider_and_the_age() {
        let never = KeyError::Unavailable {
            issuer: "https://id.example".into(),
            reason: "HTTP 503".into(),
            older_than: None,
        };
        assert_eq!(
            never.to_string(),
            "the signing keys of https://id.example cannot be fetched: HTTP 503"
        );
        let stale = KeyError::Unavailable {
            issuer: "https://id.example".into(),
            reason: "HTTP 503".into(),
            older_than: Some(Duration::from_millis(25 * 3600 * 1000 + 1)),
        };
        assert_eq!(
            stale.to_string(),
            "the signing keys of https://id.example are older than 1day 1h and it cannot be reached: HTTP 503"
        );
    }

    #[test]
    fn fetch_errors_start_with_the_url_and_say_what_was_wrong() {
        let url = "https://id.example/.well-known/openid-configuration".to_owned();
        let cases = [
            (
                FetchError::TimedOut {
                    url: url.clone(),
                    timeout: Duration::from_secs(10),
                },
                format!("{url}: no complete answer within 10s (fetch_timeout)"),
            ),
            (
                FetchError::Status {
                    url: url.clone(),
                    status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                },
                format!("{url}: HTTP 503 Service Unavailable"),
            ),
            (
                FetchError::TooLarge { url: url.clone() },
                format!("{url}: response larger than 1048576 bytes"),
            ),
            (
                FetchError::OtherIssuer {
                    url: url.clone(),
                    named: "https://evil.example".into(),
                    expected: "https://id.example".into(),
                },
                format!("{url} names issuer \"https://evil.example\", not \"https://id.example\""),
            ),
            (
                FetchError::PlainJwksUri {
                    url: url.clone(),
                    jwks_uri: "http://id.example/jwks".into(),
                },
                format!("{url} names jwks_uri \"http://id.example/jwks\", which is not https"),
            ),
            (
                FetchError::NotJwks { url: url.clone() },
                format!("{url}: not a JWKS: no \"keys\" array"),
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
        assert!(parse_jwks(&json!({"issuer": "https://id.example"})).is_none());
    }

    #[tokio::test]
    async fn a_failed_request_says_why() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/jwks.json");
        let err = get_json(&http_client(), &url, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Unreachable { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.starts_with(&url), "{err}");
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
