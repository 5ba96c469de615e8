//! The token check: is the password a JWT that a configured provider signed,
//! and are its claims acceptable?

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::auth::jwks::{JwksCache, KeyError};
use crate::auth::token_cache::{TokenCache, TokenDigest};
use crate::clock::unix_now;
use crate::config::{self, Config};
use crate::protocol::refusal::{Reason, Refusal, sqlstate};

/// Longest `kid` looked up in a JWKS. Real key ids are short (a thumbprint
/// is 43 characters, a UUID 36); a longer one is refused before any lookup,
/// so that it neither costs a refetch nor lands in a message or a log line.
const MAX_KID_BYTES: usize = 256;

/// The last second of year 9999 (9999-12-31T23:59:59Z): the latest `exp` or
/// `nbf` accepted.
///
/// RFC 7519 sets no upper bound on a NumericDate, but everything downstream
/// has one: the session's expiry timer, the envelope's `exp` (cast to
/// `bigint` in SQL) and the RFC 3339 times in messages, which stop at year
/// 9999. A token beyond it is refused rather than clamped: no provider
/// mints tokens valid for eight thousand years, so such an `exp` is a
/// mistake or an attack, and clamping would quietly give the session a
/// lifetime the token does not state.
const LATEST_NUMERIC_DATE: u64 = 253_402_300_799;

/// Claims that passed every check, and when they stop being valid.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub(crate) claims: Map<String, Value>,
    /// The token's `exp` (unix seconds): a fractional `exp` rounded down, and
    /// never beyond [`LATEST_NUMERIC_DATE`].
    pub(crate) expires_at: u64,
}

impl VerifiedToken {
    pub(crate) fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }
}

struct Provider {
    issuer: String,
    audience: Vec<String>,
    leeway: Duration,
    algorithms: Vec<Algorithm>,
    max_token_age: Option<Duration>,
    required_claims: Vec<String>,
    role_claim: Option<String>,
    hs256: Option<DecodingKey>,
    /// None for a provider that verifies only with its `hs256_secret`.
    keys: Option<Arc<JwksCache>>,
}

/// Verifies tokens against every configured provider, chosen by `iss`.
pub struct TokenChecker {
    providers: HashMap<String, Provider>,
    cache: TokenCache,
    /// Checks answered from the cache, and those that needed the full
    /// check while the cache is enabled.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl TokenChecker {
    pub fn new(config: &Config, http: reqwest::Client) -> Self {
        Self::replacing(None, config, http)
    }

    /// The checker for a reloaded configuration. Providers whose keys come
    /// from the same place under the same cache rules keep their cached keys,
    /// so a reload neither refetches them nor loses them while the provider
    /// is down. Verified tokens are forgotten: the rules they passed may have
    /// changed.
    pub(crate) fn replacing(
        previous: Option<&TokenChecker>,
        config: &Config,
        http: reqwest::Client,
    ) -> Self {
        let cached_keys = |p: &config::Provider| {
            let old = previous?.providers.get(&p.issuer)?.keys.as_ref()?;
            old.serves(p).then(|| Arc::clone(old))
        };
        let providers = config
            .providers
            .iter()
            .map(|p| {
                let provider = Provider {
                    issuer: p.issuer.clone(),
                    audience: p.audience.clone(),
                    leeway: p.leeway,
                    algorithms: p.algorithms(),
                    max_token_age: p.max_token_age,
                    required_claims: p.required_claims.clone(),
                    role_claim: p.role_claim.clone(),
                    hs256: p
                        .hs256_secret
                        .as_ref()
                        .map(|s| DecodingKey::from_secret(s.bytes())),
                    keys: p.has_jwks().then(|| {
                        cached_keys(p).unwrap_or_else(|| Arc::new(JwksCache::new(p, http.clone())))
                    }),
                };
                (p.issuer.clone(), provider)
            })
            .collect();
        TokenChecker {
            providers,
            cache: TokenCache::new(config.listen.token_cache_entries),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }

    /// The token cache's hits and misses so far.
    pub(crate) fn cache_counts(&self) -> (u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        )
    }

    /// Each provider's issuer and, unless it only has a shared secret, its key cache.
    pub(crate) fn providers(&self) -> impl Iterator<Item = (&str, Option<&Arc<JwksCache>>)> {
        self.providers
            .values()
            .map(|p| (p.issuer.as_str(), p.keys.as_ref()))
    }

    /// The leeway granted to the provider that issued these claims.
    pub(crate) fn leeway(&self, token: &VerifiedToken) -> Duration {
        token
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.providers.get(iss))
            .map_or(Duration::ZERO, |p| p.leeway)
    }

    /// Serves a token verified before from the cache while its `exp` has
    /// not passed and its issuer is still configured; everything else gets
    /// the full check (see [`crate::auth::token_cache`]). The provider's claim
    /// rules run on every call, cached or not: `role` (the `[[role]]` the
    /// client connects as) differs between connections, and `max_token_age`
    /// moves with the clock.
    pub async fn check(&self, token: &str, role: &str) -> Result<VerifiedToken, Refusal> {
        self.check_digested(token, TokenDigest::of(token), role)
            .await
    }

    /// [`check`](Self::check) of a token whose digest the caller took
    /// already (for its fingerprint), so that it is hashed once.
    pub(crate) async fn check_digested(
        &self,
        token: &str,
        digest: TokenDigest,
        role: &str,
    ) -> Result<VerifiedToken, Refusal> {
        if !self.cache.is_enabled() {
            return self
                .verify(token)
                .await
                .and_then(|v| self.apply_rules(v, role));
        }
        let hit = self.cache.get(&digest, unix_now());
        if let Some(hit) = hit.filter(|hit| self.providers.contains_key(&hit.issuer)) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return self.apply_rules(hit.verified.clone(), role);
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let verified = self.verify(token).await?;
        if let Some(issuer) = verified.claims.get("iss").and_then(Value::as_str) {
            self.cache
                .insert(digest, verified.clone(), issuer.to_owned());
        }
        self.apply_rules(verified, role)
    }

    /// The issuing provider's claim rules (see [`Provider::check_claims`]).
    fn apply_rules(&self, verified: VerifiedToken, role: &str) -> Result<VerifiedToken, Refusal> {
        let provider = verified
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.providers.get(iss))
            .ok_or_else(|| {
                Refusal::auth("the token's issuer is no longer configured")
                    .because(Reason::UnknownIssuer)
            })?;
        provider.check_claims(&verified.claims, role)?;
        Ok(verified)
    }

    /// The full check: signature, issuer, audience and validity.
    async fn verify(&self, token: &str) -> Result<VerifiedToken, Refusal> {
        if token.is_empty() {
            return Err(
                Refusal::auth("a token is required: send the JWT as the password")
                    .because(Reason::Malformed),
            );
        }
        let (header, payload) = split(token).map_err(malformed)?;
        let Header { alg, kid } = Header::read(&header).map_err(malformed)?;
        let validity = Validity::read(&payload).map_err(malformed)?;
        let issuer = payload.get("iss").and_then(Value::as_str).ok_or_else(|| {
            Refusal::auth("the token has no \"iss\" claim, so no provider can verify it")
                .because(Reason::UnknownIssuer)
        })?;
        let provider = self.providers.get(issuer).ok_or_else(|| {
            Refusal::auth(format!("issuer {:?} is not configured", clip(issuer)))
                .because(Reason::UnknownIssuer)
        })?;

        let jwk;
        let key = if alg == Algorithm::HS256 {
            provider.hs256.as_ref().ok_or_else(|| {
                Refusal::auth(format!(
                    "symmetric algorithm \"HS256\" is not accepted from {}: it has no hs256_secret, and its tokens must be signed with a key it publishes in its JWKS",
                    provider.issuer
                ))
                .because(Reason::BadSignature)
            })?
        } else {
            if !provider.algorithms.contains(&alg) {
                return Err(Refusal::auth(format!(
                    "token algorithm {alg:?} is not accepted by {} (algorithms = {:?})",
                    provider.issuer, provider.algorithms
                ))
                .because(Reason::BadSignature));
            }
            let keys = provider.keys.as_ref().ok_or_else(|| {
                Refusal::auth(format!(
                    "{} accepts only HS256 tokens signed with its hs256_secret, not {alg:?}",
                    provider.issuer
                ))
                .because(Reason::BadSignature)
            })?;
            jwk = keys.key(kid.as_deref()).await.map_err(|e| match e {
                KeyError::Unavailable { .. } => Refusal::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!("cannot verify the token now: {e}"),
                )
                .because(Reason::Upstream),
                _ => Refusal::auth(e.to_string()).because(Reason::UnknownKey),
            })?;
            if !jwk.kind.fits(alg) || jwk.alg.is_some_and(|a| a != alg) {
                return Err(Refusal::auth(format!(
                    "token algorithm {alg:?} does not match key {:?} of {}",
                    jwk.kid.as_deref().unwrap_or(""),
                    provider.issuer
                ))
                .because(Reason::BadSignature));
            }
            &jwk.key
        };

        // `exp` and `nbf` are `validity`'s: jsonwebtoken rounds fractional
        // times, calls a string `exp` missing and an object `exp` malformed.
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_issuer(&[&provider.issuer]);
        if provider.audience.is_empty() {
            validation.validate_aud = false;
            validation.set_required_spec_claims(&["iss"]);
        } else {
            validation.set_audience(&provider.audience);
            validation.set_required_spec_claims(&["iss", "aud"]);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|e| refusal_for(e.into_kind(), &payload, provider))?;
        validity.check(provider.leeway)?;
        Ok(VerifiedToken {
            claims: data.claims,
            expires_at: validity.exp,
        })
    }
}

impl Provider {
    /// The provider's own rules, on claims whose signature has been verified.
    fn check_claims(&self, claims: &JsonObject, role: &str) -> Result<(), Refusal> {
        if let Some(max_age) = self.max_token_age {
            let iat = numeric_date(claims, "iat")?.ok_or_else(|| {
                Refusal::auth(format!(
                    "the token has no \"iat\" claim, which {} requires (max_token_age)",
                    self.issuer
                ))
            })?;
            let (iat, now, leeway) = (iat.floor() as u64, unix_now(), self.leeway.as_secs());
            if iat.saturating_add(max_age.as_secs()).saturating_add(leeway) < now {
                return Err(Refusal::auth(format!(
                    "token was issued at {}, more than {} ago (max_token_age of {})",
                    format_time(iat),
                    humantime::format_duration(max_age),
                    self.issuer
                ))
                .because(Reason::Expired));
            }
            // A future `iat` would otherwise stretch the allowed age.
            if iat > now.saturating_add(leeway) {
                return Err(Refusal::auth(format!(
                    "token claims to be issued at {}, which is in the future",
                    format_time(iat)
                )));
            }
        }
        for name in &self.required_claims {
            if claim_at(claims, name).is_none_or(Value::is_null) {
                return Err(Refusal::auth(format!(
                    "the token has no {name:?} claim, which {} requires",
                    self.issuer
                )));
            }
        }
        if let Some(path) = &self.role_claim {
            let allowed = match claim_at(claims, path) {
                Some(Value::String(r)) => r == role,
                Some(Value::Array(roles)) => roles.iter().any(|r| r.as_str() == Some(role)),
                _ => false,
            };
            if !allowed {
                let held = claim_at(claims, path)
                    .map_or_else(|| "absent".to_owned(), |v| clip(&v.to_string()));
                return Err(Refusal::auth(format!(
                    "token does not allow role {role:?}: its {path:?} claim is {held}"
                ))
                .because(Reason::Role));
            }
        }
        Ok(())
    }
}

/// The claim at `path`: a top-level name, or names joined by dots into nested
/// objects. Names may contain dots themselves (Auth0's namespaced claims are
/// URLs), so every split is tried, the whole name first.
fn claim_at<'a>(object: &'a JsonObject, path: &str) -> Option<&'a Value> {
    if let Some(value) = object.get(path) {
        return Some(value);
    }
    path.match_indices('.').find_map(|(at, _)| {
        let inner = object.get(&path[..at])?.as_object()?;
        claim_at(inner, &path[at + 1..])
    })
}

/// A JSON object: a token's header or claims set.
type JsonObject = Map<String, Value>;

/// Splits a JWS in compact serialization and decodes its header and claims
/// without trusting them: they only choose the provider and key that then
/// verify the whole token.
///
/// Every part must be base64url without padding (RFC 7515 §2), the
/// signature included, so that a token has one spelling: `=`, `+`, `/` or
/// any other character outside the alphabet refuse it here.
fn split(token: &str) -> Result<(JsonObject, JsonObject), Refusal> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        if parts.len() == 5 {
            return Err(Refusal::auth(
                "encrypted tokens (JWE) are not accepted: send the signed JWT the provider issued",
            ));
        }
        return Err(not_jwt());
    };
    let header = decode_object(header, "the token header")?;
    let claims = decode_object(payload, "the token's claims set")?;
    URL_SAFE_NO_PAD.decode(signature).map_err(|_| not_jwt())?;
    Ok((header, claims))
}

/// A refusal while reading the token's parts counts as malformed, unless it
/// already says more precisely what is wrong.
fn malformed(refusal: Refusal) -> Refusal {
    match refusal.reason {
        Reason::Other => refusal.because(Reason::Malformed),
        _ => refusal,
    }
}

fn not_jwt() -> Refusal {
    Refusal::auth(
        "the password is not a JWT (expected header.payload.signature in base64url, without padding)",
    )
    .because(Reason::Malformed)
}

/// One part of a token as a JSON object, `what` naming it in refusals.
///
/// A repeated member name is refused rather than resolved. RFC 7515 §5.2 and
/// RFC 7519 §4 allow either, but serde_json keeps the last of repeated
/// members while jsonwebtoken refuses them in the claims it checks: refusing
/// them all leaves no room for the two readings to differ.
fn decode_object(part: &str, what: &str) -> Result<JsonObject, Refusal> {
    let json = URL_SAFE_NO_PAD.decode(part).map_err(|_| not_jwt())?;
    match serde_json::from_slice(&json).map_err(|_| not_jwt())? {
        Value::Object(members) => match repeated_name(&json) {
            Some(name) => Err(Refusal::auth(format!(
                "{:?} appears twice in {what}",
                clip(&name)
            ))),
            None => Ok(members),
        },
        _ => Err(Refusal::auth(format!("{what} is not a JSON object"))),
    }
}

/// The first member name repeated at the top level of `json`, a JSON object.
fn repeated_name(json: &[u8]) -> Option<String> {
    struct FirstRepeated(Option<String>);

    impl<'de> Deserialize<'de> for FirstRepeated {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(FirstRepeatedVisitor)
        }
    }

    struct FirstRepeatedVisitor;

    impl<'de> Visitor<'de> for FirstRepeatedVisitor {
        type Value = FirstRepeated;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<FirstRepeated, A::Error> {
            let mut seen = HashSet::new();
            let mut repeated = None;
            while let Some((name, IgnoredAny)) = members.next_entry::<String, IgnoredAny>()? {
                if repeated.is_none() && !seen.insert(name.clone()) {
                    repeated = Some(name);
                }
            }
            Ok(FirstRepeated(repeated))
        }
    }

    serde_json::from_slice::<FirstRepeated>(json).ok()?.0
}

/// What the JOSE header decides: the algorithm, and which key verifies.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

impl Header {
    /// Reads `alg`, `crit` and `kid`. Every other member is ignored: in
    /// particular `jku`, `x5u`, `jwk` and `x5c` are never fetched nor
    /// trusted, since keys come only from the provider's JWKS.
    fn read(header: &JsonObject) -> Result<Header, Refusal> {
        let alg = algorithm(header.get("alg"))?;
        refuse_critical_extensions(header.get("crit"))?;
        let kid = key_id(header.get("kid"))?;
        Ok(Header { alg, kid })
    }
}

fn algorithm(alg: Option<&Value>) -> Result<Algorithm, Refusal> {
    let alg = match alg {
        Some(Value::String(alg)) => alg.as_str(),
        Some(_) => return Err(Refusal::auth("the token header's \"alg\" is not a string")),
        None => {
            return Err(Refusal::auth(
                "the token header has no \"alg\", so it names no signature algorithm",
            ));
        }
    };
    match alg {
        "" => Err(Refusal::auth(
            "the token header's \"alg\" is empty, so it names no signature algorithm",
        )),
        // Algorithm names are case-sensitive (RFC 7515 §4.1.1), so "None" is
        // no algorithm at all; but it is meant as "none", and said so.
        none if none.eq_ignore_ascii_case("none") => Err(Refusal::auth(format!(
            "unsigned tokens (alg {none:?}) are not accepted"
        ))
        .because(Reason::BadSignature)),
        // HS256 only with a provider's `hs256_secret`, decided once the
        // provider is known.
        "HS256" => Ok(Algorithm::HS256),
        hs if hs.starts_with("HS") => Err(Refusal::auth(format!(
            "symmetric algorithm {:?} is not accepted: tokens must be signed with a key the provider publishes in its JWKS",
            clip(hs)
        ))
        .because(Reason::BadSignature)),
        other => Algorithm::from_str(other).map_err(|_| {
            Refusal::auth(format!(
                "token algorithm {:?} is not supported",
                clip(other)
            ))
        }),
    }
}

/// RFC 7515 §4.1.11: a token whose `crit` header lists an extension the
/// recipient does not understand is invalid. rlsgate understands none, so any
/// `crit` refuses the token; jsonwebtoken reads `crit` but does not enforce it.
fn refuse_critical_extensions(crit: Option<&Value>) -> Result<(), Refusal> {
    let Some(crit) = crit else {
        return Ok(());
    };
    let names: Vec<&str> = crit
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return Err(Refusal::auth(
            "the token header's \"crit\" is malformed: it must be a non-empty list of extension names (RFC 7515 §4.1.11)",
        ));
    }
    let names: Vec<String> = names.iter().map(|name| format!("{name:?}")).collect();
    Err(Refusal::auth(format!(
        "the token requires critical header extension {}, which rlsgate does not support (\"crit\", RFC 7515 §4.1.11)",
        clip(&names.join(", "))
    )))
}

fn key_id(kid: Option<&Value>) -> Result<Option<String>, Refusal> {
    match kid {
        None => Ok(None),
        Some(Value::String(kid)) if kid.len() > MAX_KID_BYTES => Err(Refusal::auth(format!(
            "the token's kid is too long: {} bytes, where key ids have at most {MAX_KID_BYTES}",
            kid.len()
        ))),
        Some(Value::String(kid)) => Ok(Some(kid.clone())),
        Some(_) => Err(Refusal::auth("the token's kid is not a string")),
    }
}

/// When a token is valid, in whole unix seconds.
struct Validity {
    exp: u64,
    nbf: Option<u64>,
}

impl Validity {
    /// Reads `exp` (required) and `nbf` (optional) as RFC 7519
    /// NumericDates: JSON numbers of seconds since 1970, which may have a
    /// fraction. A string, boolean, null, array or object is refused, and so
    /// is a number below 0 or beyond [`LATEST_NUMERIC_DATE`]. A fraction
    /// never lengthens validity: `exp` is rounded down, `nbf` up.
    fn read(claims: &JsonObject) -> Result<Validity, Refusal> {
        let exp = numeric_date(claims, "exp")?
            .ok_or_else(|| Refusal::auth("the token has no \"exp\" claim"))?;
        let nbf = numeric_date(claims, "nbf")?;
        Ok(Validity {
            exp: exp.floor() as u64,
            nbf: nbf.map(|nbf| nbf.ceil() as u64),
        })
    }

    /// Refuses a token that has expired or is not valid yet, by `leeway`.
    fn check(&self, leeway: Duration) -> Result<(), Refusal> {
        self.check_at(unix_now(), leeway)
    }

    /// [`Validity::check`] at the unix second `now`.
    fn check_at(&self, now: u64, leeway: Duration) -> Result<(), Refusal> {
        let leeway = leeway.as_secs();
        if self.exp.saturating_add(leeway) < now {
            return Err(
                Refusal::auth(format!("token expired at {}", format_time(self.exp)))
                    .because(Reason::Expired),
            );
        }
        if let Some(nbf) = self.nbf.filter(|nbf| *nbf > now.saturating_add(leeway)) {
            return Err(
                Refusal::auth(format!("token is not valid before {}", format_time(nbf)))
                    .because(Reason::Expired),
            );
        }
        Ok(())
    }
}

/// The claim `name` as a NumericDate within range, if present.
fn numeric_date(claims: &JsonObject, name: &str) -> Result<Option<f64>, Refusal> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Some(seconds) = value.as_f64() else {
        return Err(Refusal::auth(format!(
            "the token's {name:?} claim is not a NumericDate: expected a JSON number of seconds since 1970, got {}",
            json_kind(value)
        )));
    };
    if !(0.0..=LATEST_NUMERIC_DATE as f64).contains(&seconds) {
        return Err(Refusal::auth(format!(
            "the token's {name:?} claim {} is out of range: it must lie between 1970 and the end of year 9999",
            clip(&value.to_string())
        )));
    }
    Ok(Some(seconds))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn refusal_for(kind: ErrorKind, payload: &Map<String, Value>, provider: &Provider) -> Refusal {
    let reason = match &kind {
        ErrorKind::InvalidAudience => Reason::Audience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Reason::Audience,
        ErrorKind::InvalidIssuer => Reason::UnknownIssuer,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => Reason::BadSignature,
        _ => Reason::Malformed,
    };
    let message = match kind {
        ErrorKind::InvalidAudience => format!(
            "token audience {} is not accepted by {} (expected one of {:?})",
            payload
                .get("aud")
                .map_or_else(|| "(none)".to_owned(), |a| clip(&a.to_string())),
            provider.issuer,
            provider.audience
        ),
        ErrorKind::InvalidIssuer => format!("token issuer is not {}", provider.issuer),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim:?} claim"),
        ErrorKind::InvalidSignature => format!(
            "token signature does not verify with the key of {}",
            provider.issuer
        ),
        ErrorKind::InvalidAlgorithm => "token algorithm does not match its key".to_owned(),
        other => {
            return Refusal::auth("the token is malformed")
                .with_detail(format!("{other:?}"))
                .because(reason);
        }
    };
    Refusal::auth(message).because(reason)
}

/// A short, stable name for a token in logs: never the token itself.
pub fn fingerprint(token: &str) -> String {
    TokenDigest::of(token).fingerprint()
}

pub(crate) fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Untrusted text echoed in a message, cut to a readable length.
fn clip(text: &str) -> String {
    text.chars().take(100).collect()
}

#[cfg(test)]
mod tests;
