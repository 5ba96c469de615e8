//! A provider's signing keys: found through OIDC discovery or a direct JWKS
//! URL, cached, and refetched when a token names a key the cache lacks.
//!
//! Refetches for unknown key ids are limited to one per cooldown and are
//! single-flight, so a burst of tokens with a new (or bogus) `kid` causes at
//! most one request to the provider. When the provider is unreachable the keys
//! already fetched keep serving.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

/// Bound on a discovery document or JWKS, to keep a hostile server from
/// filling memory.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// One verification key from a JWKS.
pub struct VerifyingKey {
    pub kid: Option<String>,
    /// The `alg` the JWK declares, if any; tokens must then use exactly it.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a token signed with `alg` can be checked with this kind of key.
    pub fn fits(self, alg: Algorithm) -> bool {
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
pub enum KeyError {
    #[error("no key {kid:?} in the JWKS of {issuer}")]
    UnknownKid { kid: String, issuer: String },
    #[error("the token has no kid and the JWKS of {issuer} does not hold exactly one key")]
    AmbiguousKey { issuer: String },
    #[error("the signing keys of {issuer} cannot be fetched: {reason}")]
    Unavailable { issuer: String, reason: String },
}

enum Source {
    Discovery,
    Direct(String),
}

#[derive(Default)]
struct Cached {
    keys: Arc<Vec<Arc<VerifyingKey>>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Counts attempts, so that a waiter can tell someone else just fetched.
    attempts: u64,
    jwks_uri: Option<String>,
}

pub struct JwksCache {
    issuer: String,
    source: Source,
    http: reqwest::Client,
    max_age: Duration,
    cooldown: Duration,
    cached: RwLock<Cached>,
    fetching: Mutex<()>,
}

impl JwksCache {
    pub fn new(
        issuer: &str,
        jwks_url: Option<&str>,
        http: reqwest::Client,
        max_age: Duration,
        cooldown: Duration,
    ) -> Self {
        JwksCache {
            issuer: issuer.to_owned(),
            source: match jwks_url {
                Some(url) => Source::Direct(url.to_owned()),
                None => Source::Discovery,
            },
            http,
            max_age,
            cooldown,
            cached: RwLock::default(),
            fetching: Mutex::new(()),
        }
    }

    /// The key for a token's `kid` (or the only key, for tokens without one).
    ///
    /// A known key is answered from the cache at once, even when the cache
    /// is due for a refresh (that runs in the background), so a slow or
    /// unreachable provider never holds up a connection whose key is known.
    pub async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<VerifyingKey>, KeyError> {
        let (found, attempts, fresh, cooled) = {
            let cached = self.cached.read().expect("jwks lock");
            let fresh = cached
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.max_age);
            let cooled = cached
                .last_attempt
                .is_none_or(|at| at.elapsed() >= self.cooldown);
            (find(&cached.keys, kid), cached.attempts, fresh, cooled)
        };
        if let Some(key) = found {
            if !fresh && cooled {
                let cache = Arc::clone(self);
                tokio::spawn(async move { cache.refresh_once(attempts).await });
            }
            return Ok(key);
        }
        if !cooled {
            return Err(self.missing(kid));
        }
        self.refresh_once(attempts).await;
        let cached = self.cached.read().expect("jwks lock");
        if let Some(key) = find(&cached.keys, kid) {
            return Ok(key);
        }
        if cached.fetched_at.is_none() {
            return Err(KeyError::Unavailable {
                issuer: self.issuer.clone(),
                reason: "no successful fetch yet".into(),
            });
        }
        Err(self.missing(kid))
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

    async fn refresh(&self) {
        let result = self.fetch().await;
        let mut cached = self.cached.write().expect("jwks lock");
        cached.attempts += 1;
        cached.last_attempt = Some(Instant::now());
        match result {
            Ok((jwks_uri, keys)) => {
                tracing::info!(issuer = %self.issuer, keys = keys.len(), "fetched signing keys");
                cached.keys = Arc::new(keys);
                cached.fetched_at = Some(Instant::now());
                cached.jwks_uri = Some(jwks_uri);
            }
            Err(reason) => {
                tracing::warn!(issuer = %self.issuer, %reason, cached_keys = cached.keys.len(), "cannot fetch signing keys");
            }
        }
    }

    async fn fetch(&self) -> Result<(String, Vec<Arc<VerifyingKey>>), String> {
        let known_uri = self.cached.read().expect("jwks lock").jwks_uri.clone();
        let jwks_uri = match (&self.source, known_uri) {
            (Source::Direct(url), _) => url.clone(),
            (Source::Discovery, Some(uri)) => uri,
            (Source::Discovery, None) => self.discover().await?,
        };
        let document = get_json(&self.http, &jwks_uri).await?;
        let keys = parse_jwks(&document).map_err(|e| format!("{jwks_uri}: {e}"))?;
        Ok((jwks_uri, keys))
    }

    async fn discover(&self) -> Result<String, String> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let document: Discovery = serde_json::from_value(get_json(&self.http, &url).await?)
            .map_err(|e| format!("{url}: not an OpenID discovery document: {e}"))?;
        if document.issuer.trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            return Err(format!(
                "{url} names issuer {:?}, not {:?}",
                document.issuer, self.issuer
            ));
        }
        Ok(document.jwks_uri)
    }
}

fn find(keys: &[Arc<VerifyingKey>], kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let mut response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "{url}: response larger than {MAX_DOCUMENT_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}

/// Keeps the usable signature keys of a JWKS. Symmetric (`kty: oct`) keys are
/// never taken from a fetched set, nor keys meant for encryption.
fn parse_jwks(document: &Value) -> Result<Vec<Arc<VerifyingKey>>, String> {
    let entries = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS: no \"keys\" array")?;
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
    Ok(keys)
}

/// The HTTP client for discovery and JWKS: bounded in time, and following
/// redirects only within the same host.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let same_host = attempt
                .previous()
                .first()
                .is_some_and(|first| first.host_str() == attempt.url().host_str());
            if same_host && attempt.previous().len() < 5 {
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
}
