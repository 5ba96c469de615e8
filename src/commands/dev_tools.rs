//! `rlsgate keygen`, `token` and `issuer`: a local identity provider for
//! testing without a real one. The keys and the issuer themselves live in
//! [`crate::dev`], shared with `demo` and the tests; here is what the
//! commands add: files, printed output, flags and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::clock::unix_now;
use crate::dev::issuer::DevIssuer;
use crate::dev::keys::{KeyKind, SigningKeyPair, jwks};
use crate::session::shutdown;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::cli=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::cli";

/// `rlsgate keygen`: writes `out/issuer.pem` and `out/jwks.json` and prints
/// how to use them.
pub(crate) fn keygen(out: &Path, kind: KeyKind, force: bool) -> anyhow::Result<()> {
    let key_path = out.join("issuer.pem");
    let jwks_path = out.join("jwks.json");
    if !force {
        // Both are checked before either is written, so a refusal leaves both as they were.
        for path in [&key_path, &jwks_path] {
            anyhow::ensure!(
                path.symlink_metadata().is_err(),
                "{} already exists; pass --force to replace it (tokens signed with the \
                 old key stop verifying)",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = SigningKeyPair::generate(kind)?;
    key.save(&key_path, force)?;
    let set = serde_json::to_string_pretty(&jwks([&key]))? + "\n";
    std::fs::write(&jwks_path, set)
        .with_context(|| format!("cannot write {}", jwks_path.display()))?;
    let (key_path, jwks_path) = (key_path.display(), jwks_path.display());
    println!("kid   {}", key.kid());
    println!(
        "key   {key_path}  (private, {}; keep it secret)",
        kind.alg_name()
    );
    println!("jwks  {jwks_path}");
    println!();
    println!("serve it:    rlsgate issuer --key {key_path} --listen 127.0.0.1:8080");
    println!(
        "mint tokens: rlsgate token --key {key_path} --issuer http://127.0.0.1:8080 --sub alice"
    );
    Ok(())
}

/// What `rlsgate token` puts in a token besides `iat`, which is now.
pub(crate) struct TokenClaims {
    pub(crate) issuer: String,
    pub(crate) sub: String,
    pub(crate) aud: Vec<String>,
    /// From `--claim`, in the order given.
    pub(crate) extra: Vec<(String, Value)>,
    pub(crate) ttl: Duration,
}

/// `rlsgate token`: prints a token signed with the key at `key`.
pub(crate) fn token(key: &Path, claims: TokenClaims) -> anyhow::Result<()> {
    let key = SigningKeyPair::load(key)?;
    let mut payload = Map::new();
    for (name, value) in claims.extra {
        anyhow::ensure!(
            payload.insert(name.clone(), value).is_none(),
            "--claim {name} is given twice"
        );
    }
    let now = unix_now();
    let exp = now
        .checked_add(claims.ttl.as_secs())
        .filter(|&exp| exp < 1 << 53)
        .context("--ttl is too long")?;
    payload.insert("iss".into(), json!(claims.issuer));
    payload.insert("sub".into(), json!(claims.sub));
    match claims.aud.as_slice() {
        [] => {}
        [one] => {
            payload.insert("aud".into(), json!(one));
        }
        many => {
            payload.insert("aud".into(), json!(many));
        }
    }
    payload.insert("iat".into(), json!(now));
    payload.insert("exp".into(), json!(exp));
    println!("{}", key.sign(&Value::Object(payload)));
    Ok(())
}

/// Why a `--claim` is refused; clap shows it with the argument.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimArgError {
    #[error("expected KEY=VALUE, e.g. role=admin or tier=3")]
    NoEquals,
    #[error("the claim name before '=' is empty")]
    EmptyName,
    /// A claim another flag sets, named with that flag.
    #[error("{name} is set by {owner}, not by --claim")]
    SetElsewhere { name: String, owner: &'static str },
}

/// `--claim KEY=VALUE`: VALUE as JSON when it parses, else as a string.
/// The claims other flags set are refused, so that none is overridden
/// behind the user's back.
pub(crate) fn parse_claim(text: &str) -> Result<(String, Value), ClaimArgError> {
    let (name, value) = text.split_once('=').ok_or(ClaimArgError::NoEquals)?;
    if name.is_empty() {
        return Err(ClaimArgError::EmptyName);
    }
    let owner = match name {
        "iss" => Some("--issuer"),
        "sub" => Some("--sub"),
        "aud" => Some("--aud"),
        "exp" => Some("--ttl"),
        "iat" => Some("the current time"),
        _ => None,
    };
    if let Some(owner) = owner {
        return Err(ClaimArgError::SetElsewhere {
            name: name.to_owned(),
            owner,
        });
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

/// Why a `--ttl` is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TtlArgError {
    #[error(transparent)]
    Unreadable(#[from] humantime::DurationError),
    #[error("a token must live at least 1s")]
    TooShort,
}

pub(crate) fn parse_ttl(text: &str) -> Result<Duration, TtlArgError> {
    let ttl = humantime::parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(TtlArgError::TooShort);
    }
    Ok(ttl)
}

/// `rlsgate issuer`: serves discovery and a JWKS for the keys at `paths`
/// until SIGINT or SIGTERM.
pub(crate) async fn issuer(
    paths: Vec<PathBuf>,
    listen: SocketAddr,
    issuer_url: Option<String>,
) -> anyhow::Result<()> {
    let keys = load_distinct(&paths)?;
    if issuer_url.is_none() && listen.ip().is_unspecified() {
        tracing::warn!(
            target: LOG_TARGET,
            "the issuer URL defaults to http://{listen}, which other hosts cannot reach; \
             pass --issuer with the URL proxies use for this server"
        );
    }
    let issuer = DevIssuer::start_with(listen, issuer_url, keys).await?;
    tracing::info!(
        target: LOG_TARGET,
        issuer = %issuer.issuer(),
        discovery = %issuer.discovery_url(),
        jwks = %issuer.jwks_url(),
        kids = ?issuer.published_kids(),
        address = %issuer.local_addr(),
        "token issuer listening"
    );
    shutdown::signal().await;
    tracing::info!(target: LOG_TARGET, "token issuer stopping");
    issuer.shutdown().await;
    Ok(())
}

/// The keys at `paths`, refusing one given twice under different names.
fn load_distinct(paths: &[PathBuf]) -> anyhow::Result<Vec<SigningKeyPair>> {
    let mut keys: Vec<SigningKeyPair> = Vec::with_capacity(paths.len());
    for (index, path) in paths.iter().enumerate() {
        let key = SigningKeyPair::load(path)?;
        if let Some(first) = keys.iter().position(|k| k.kid() == key.kid()) {
            anyhow::bail!(
                "{} and {} hold the same key",
                paths[first].display(),
                paths[index].display()
            );
        }
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_json_when_it_parses_and_a_string_otherwise() {
        let (name, value) = parse_claim("tier=3").unwrap();
        assert_eq!((name.as_str(), value), ("tier", json!(3)));
        let (_, value) = parse_claim("org=\"42\"").unwrap();
        assert_eq!(value, json!("42"));
        let (_, value) = parse_claim("role=admin=yes").unwrap();
        assert_eq!(value, json!("admin=yes"));
    }

    #[test]
    fn a_claim_another_flag_sets_is_refused_naming_that_flag() {
        let refused = parse_claim("exp=1").unwrap_err();
        assert!(
            matches!(&refused, ClaimArgError::SetElsewhere { name, owner: "--ttl" } if name == "exp"),
            "{refused:?}"
        );
        assert_eq!(refused.to_string(), "exp is set by --ttl, not by --claim");
        assert!(matches!(parse_claim("role"), Err(ClaimArgError::NoEquals)));
        assert!(matches!(parse_claim("=x"), Err(ClaimArgError::EmptyName)));
    }

    #[test]
    fn a_ttl_under_a_second_or_unreadable_is_refused() {
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        let short = parse_ttl("500ms").unwrap_err();
        assert!(matches!(short, TtlArgError::TooShort), "{short:?}");
        assert_eq!(short.to_string(), "a token must live at least 1s");
        assert!(matches!(parse_ttl("soon"), Err(TtlArgError::Unreadable(_))));
    }
}
