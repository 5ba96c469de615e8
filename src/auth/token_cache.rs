//! Tokens already verified, so that a client reconnecting with the same token
//! skips the signature check.
//!
//! An entry is keyed by the token's SHA-256, never the token itself, and
//! serves only while the token's `exp` has not passed (checked against the
//! clock on every hit). Past `exp` the entry is ignored and the token goes
//! through the full check, which applies the provider's leeway and refuses
//! it with the usual "token expired at …" once that too has run out.
//!
//! What a hit skips is what depends only on the token's bytes and the
//! provider's configuration: parsing, the key lookup, the signature, `iss`,
//! `aud` and `nbf`. Providers are read from the configuration at start and
//! only change with a restart, which empties this cache; the caller still
//! checks on every hit that the entry's issuer is configured, so that a
//! provider removed without a restart could never be served from here.
//! Anything that depends on the connection or the clock rather than the
//! token's bytes is not cached: `TokenChecker::check` runs the provider's
//! claim rules (the role connected as, `max_token_age`) on every hit, and
//! TLS and connection limits are decided before the token is read.
//!
//! A key the provider withdraws stops accepting new tokens at the next JWKS
//! refetch, but a token verified before then keeps connecting until its
//! `exp`, just as sessions opened with it keep running until then.
//! Refusals are never cached.
//!
//! Memory is bounded by the entry count: when full, the oldest entry is
//! evicted (first in, first out). Each entry holds one token's claims, which
//! `[listen] max_token_bytes` bounds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;

use crate::auth::token_check::VerifiedToken;

/// The SHA-256 of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub(crate) fn of(token: &str) -> TokenDigest {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
        TokenDigest(bytes)
    }

    /// What logs show of the token: the first 6 bytes of its SHA-256, in
    /// hex (see [`fingerprint`](crate::auth::token_check::fingerprint)).
    pub(crate) fn fingerprint(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

/// A token that passed the full check, and the issuer that verified it.
#[derive(Debug)]
pub(crate) struct CachedToken {
    pub(crate) verified: VerifiedToken,
    pub(crate) issuer: String,
}

/// A bounded map from token digests to verified tokens; `capacity` 0
/// disables it.
pub(crate) struct TokenCache {
    capacity: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<TokenDigest, Arc<CachedToken>>,
    /// Every key of `map`, oldest first.
    order: VecDeque<TokenDigest>,
}

impl TokenCache {
    pub(crate) fn new(capacity: usize) -> TokenCache {
        TokenCache {
            capacity,
            entries: Mutex::default(),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The entry for `digest` if its token has not expired at `now` (unix
    /// seconds). The lock is held only for the lookup: cloning the claims
    /// is the caller's, outside it.
    pub(crate) fn get(&self, digest: &TokenDigest, now: u64) -> Option<Arc<CachedToken>> {
        if !self.is_enabled() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.map.get(digest)?;
        (now <= entry.verified.expires_at).then(|| Arc::clone(entry))
    }

    /// Remembers a token that passed the full check, evicting the oldest
    /// entry when full. Expired entries are not removed early: they are
    /// never served, and leave in turn.
    pub(crate) fn insert(&self, digest: TokenDigest, verified: VerifiedToken, issuer: String) {
        if !self.is_enabled() {
            return;
        }
        let entry = Arc::new(CachedToken { verified, issuer });
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let Entries { map, order } = &mut *entries;
        if let Some(existing) = map.get_mut(&digest) {
            *existing = entry;
            return;
        }
        while map.len() >= self.capacity {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(digest, entry);
        order.push_back(digest);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.map.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn verified(sub: &str, expires_at: u64) -> VerifiedToken {
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::from(sub));
        VerifiedToken { claims, expires_at }
    }

    fn put(cache: &TokenCache, token: &str, expires_at: u64) {
        let digest = TokenDigest::of(token);
        cache.insert(
            digest,
            verified(token, expires_at),
            "https://id.example".into(),
        );
    }

    fn subject(cache: &TokenCache, token: &str, now: u64) -> Option<String> {
        let hit = cache.get(&TokenDigest::of(token), now)?;
        hit.verified.subject().map(str::to_owned)
    }

    #[test]
    fn an_entry_serves_until_its_exp_and_not_after() {
        let cache = TokenCache::new(10);
        put(&cache, "a", 1000);
        assert_eq!(subject(&cache, "a", 999).as_deref(), Some("a"));
        assert_eq!(subject(&cache, "a", 1000).as_deref(), Some("a"));
        assert_eq!(subject(&cache, "a", 1001), None);
        assert_eq!(subject(&cache, "b", 999), None);
        // A later verification of the same token replaces the entry.
        put(&cache, "a", 2000);
        assert_eq!(subject(&cache, "a", 1500).as_deref(), Some("a"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_oldest_entry_is_evicted_when_full() {
        let cache = TokenCache::new(2);
        put(&cache, "a", 1000);
        put(&cache, "b", 1000);
        put(&cache, "c", 1000);
        assert_eq!(cache.len(), 2);
        assert_eq!(subject(&cache, "a", 0), None);
        assert_eq!(subject(&cache, "b", 0).as_deref(), Some("b"));
        assert_eq!(subject(&cache, "c", 0).as_deref(), Some("c"));
        // Re-inserting a present token neither grows nor reorders the cache.
        put(&cache, "b", 1000);
        put(&cache, "d", 1000);
        assert_eq!(cache.len(), 2);
        assert_eq!(subject(&cache, "b", 0), None);
        assert_eq!(subject(&cache, "c", 0).as_deref(), Some("c"));
        assert_eq!(subject(&cache, "d", 0).as_deref(), Some("d"));
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = TokenCache::new(0);
        put(&cache, "a", 1000);
        assert!(cache.is_empty());
        assert_eq!(subject(&cache, "a", 0), None);
    }

    #[test]
    fn the_key_is_the_sha256_of_the_token() {
        let digest = TokenDigest::of("abc");
        assert_eq!(
            hex::encode(digest.0),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
