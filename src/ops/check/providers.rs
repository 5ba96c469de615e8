//! Each provider's discovery document and keys, fetched as `serve` would.

use super::*;
use crate::auth::jwks::{JwksCache, http_client};
use crate::config::Config;

pub(super) async fn check_providers(config: &Config, report: &mut Report) {
    let http = http_client();
    for provider in &config.providers {
        let subject = format!("provider {}", provider.issuer);
        if !provider.has_jwks() {
            report.ok(
                &subject,
                "shared secret (HS256) only: no keys to fetch".to_owned(),
            );
            continue;
        }
        let cache = JwksCache::new(provider, http.clone());
        let (jwks_uri, keys) = match cache.fetch_once().await {
            Ok(fetched) => fetched,
            Err(reason) => {
                report.fail(&subject, format!("cannot fetch its signing keys: {reason}"));
                continue;
            }
        };
        let algorithms = provider.algorithms();
        let (usable, unusable): (Vec<_>, Vec<_>) = keys.iter().partition(|key| {
            algorithms
                .iter()
                .any(|&alg| key.kind.fits(alg) && key.alg.is_none_or(|declared| declared == alg))
        });
        if usable.is_empty() {
            let why = if keys.is_empty() {
                "it holds no signature keys".to_owned()
            } else {
                format!(
                    "none of its {} key(s) fits the accepted algorithms",
                    keys.len()
                )
            };
            report.fail(
                &subject,
                format!("{jwks_uri} has no usable signing keys: {why}"),
            );
            continue;
        }
        let kids: Vec<&str> = usable
            .iter()
            .map(|key| key.kid.as_deref().unwrap_or("(none)"))
            .collect();
        let mut message = format!(
            "{} signing key(s) (kid {}) from {jwks_uri}",
            usable.len(),
            kids.join(", ")
        );
        if !unusable.is_empty() {
            message.push_str(&format!(
                "; {} more fit(s) no accepted algorithm",
                unusable.len()
            ));
        }
        if provider.hs256_secret.is_some() {
            message.push_str("; and a shared secret (HS256)");
        }
        report.ok(&subject, message);
        if usable.len() > 1 && usable.iter().any(|key| key.kid.is_none()) {
            report.warn(
                &subject,
                "some keys have no kid, and tokens without a kid are refused while the set holds several keys",
            );
        }
    }
}
