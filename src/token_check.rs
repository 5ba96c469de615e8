//! The token check: is the password a JWT that a configured provider signed,
//! and are its claims acceptable?

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Config;
use crate::error::{Refusal, sqlstate};
use crate::jwks::{JwksCache, KeyError};

/// Claims that passed every check, and when they stop being valid.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub claims: Map<String, Value>,
    /// The token's `exp` (unix seconds).
    pub expires_at: u64,
}

impl VerifiedToken {
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }
}

struct Provider {
    issuer: String,
    audience: Vec<String>,
    leeway: Duration,
    keys: Arc<JwksCache>,
}

/// Verifies tokens against every configured provider, chosen by `iss`.
pub struct TokenChecker {
    providers: HashMap<String, Provider>,
}

impl TokenChecker {
    pub fn new(config: &Config, http: reqwest::Client) -> Self {
        let providers = config
            .providers
            .iter()
            .map(|p| {
                let provider = Provider {
                    issuer: p.issuer.clone(),
                    audience: p.audience.clone(),
                    leeway: p.leeway,
                    keys: Arc::new(JwksCache::new(
                        &p.issuer,
                        p.jwks_url.as_deref(),
                        http.clone(),
                        p.jwks_max_age,
                        p.refetch_cooldown,
                    )),
                };
                (p.issuer.clone(), provider)
            })
            .collect();
        TokenChecker { providers }
    }

    /// The leeway granted to the provider that issued these claims.
    pub fn leeway(&self, token: &VerifiedToken) -> Duration {
        token
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.providers.get(iss))
            .map_or(Duration::ZERO, |p| p.leeway)
    }

    pub async fn check(&self, token: &str) -> Result<VerifiedToken, Refusal> {
        if token.is_empty() {
            return Err(Refusal::auth(
                "a token is required: send the JWT as the password",
            ));
        }
        let (header, payload) = split(token)?;
        let alg = match header.alg.as_str() {
            "none" => {
                return Err(Refusal::auth(
                    "unsigned tokens (alg \"none\") are not accepted",
                ));
            }
            hs if hs.starts_with("HS") => {
                return Err(Refusal::auth(format!(
                    "symmetric algorithm {hs} is not accepted: tokens must be signed with a key the provider publishes in its JWKS"
                )));
            }
            other => Algorithm::from_str(other).map_err(|_| {
                Refusal::auth(format!(
                    "token algorithm {:?} is not supported",
                    clip(other)
                ))
            })?,
        };
        let issuer = payload.get("iss").and_then(Value::as_str).ok_or_else(|| {
            Refusal::auth("the token has no \"iss\" claim, so no provider can verify it")
        })?;
        let provider = self
            .providers
            .get(issuer)
            .ok_or_else(|| Refusal::auth(format!("issuer {:?} is not configured", clip(issuer))))?;

        let key = provider
            .keys
            .key(header.kid.as_deref())
            .await
            .map_err(|e| match e {
                KeyError::Unavailable { .. } => Refusal::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!("cannot verify the token now: {e}"),
                ),
                _ => Refusal::auth(e.to_string()),
            })?;
        if !key.kind.fits(alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(Refusal::auth(format!(
                "token algorithm {alg:?} does not match key {:?} of {}",
                key.kid.as_deref().unwrap_or(""),
                provider.issuer
            )));
        }

        let mut validation = Validation::new(alg);
        validation.leeway = provider.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&provider.issuer]);
        if provider.audience.is_empty() {
            validation.validate_aud = false;
            validation.set_required_spec_claims(&["exp", "iss"]);
        } else {
            validation.set_audience(&provider.audience);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| refusal_for(e.into_kind(), &payload, provider))?;
        let expires_at = data
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|exp| *exp >= 0.0)
            .ok_or_else(|| Refusal::auth("the token's \"exp\" claim is not a number"))?
            as u64;
        Ok(VerifiedToken {
            claims: data.claims,
            expires_at,
        })
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

/// Decodes header and payload without trusting them: they only choose the
/// provider and key that then verify the whole token.
fn split(token: &str) -> Result<(Header, Map<String, Value>), Refusal> {
    let not_jwt = || {
        Refusal::auth("the password is not a JWT (expected header.payload.signature in base64url)")
    };
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let header: Header = decode_part(header).ok_or_else(not_jwt)?;
    let payload: Map<String, Value> = decode_part(payload).ok_or_else(not_jwt)?;
    Ok((header, payload))
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn refusal_for(kind: ErrorKind, payload: &Map<String, Value>, provider: &Provider) -> Refusal {
    let time_claim = |name: &str| {
        payload
            .get(name)
            .and_then(Value::as_f64)
            .map_or_else(|| "?".to_owned(), |t| format_time(t as u64))
    };
    let message = match kind {
        ErrorKind::ExpiredSignature => format!("token expired at {}", time_claim("exp")),
        ErrorKind::ImmatureSignature => format!("token is not valid before {}", time_claim("nbf")),
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
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's {claim:?} claim is malformed"),
        ErrorKind::InvalidSignature => format!(
            "token signature does not verify with the key of {}",
            provider.issuer
        ),
        ErrorKind::InvalidAlgorithm => "token algorithm does not match its key".to_owned(),
        other => {
            return Refusal::auth("the token is malformed").with_detail(format!("{other:?}"));
        }
    };
    Refusal::auth(message)
}

/// A short, stable name for a token in logs: never the token itself.
pub fn fingerprint(token: &str) -> String {
    hex::encode(&digest::digest(&digest::SHA256, token.as_bytes()).as_ref()[..6])
}

pub fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Untrusted text echoed in a message, cut to a readable length.
fn clip(text: &str) -> String {
    text.chars().take(100).collect()
}
