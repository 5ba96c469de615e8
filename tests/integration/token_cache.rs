//! The cache of verified tokens, seen from a client: a token verified before
//! connects again without its key (proof that the signature check was
//! skipped), but never past its `exp`, never with the cache turned off, and
//! never beyond `[listen] token_cache_entries` tokens.

use std::time::Duration;

use crate::support::{Harness, jwt_header, unix_now};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;

/// The harness's `leeway = "2s"`, in seconds.
const LEEWAY: u64 = 2;

/// Takes the current RS256 key out of the proxy's key set: the issuer stops
/// publishing it, and a token with an unpublished key (refused, so never
/// cached) makes the proxy refetch. A fresh token with the key is then
/// refused, so any token of that key that still connects came from the cache.
async fn take_away_the_key(h: &Harness) {
    let kid = h.issuer.current_kid(KeyKind::Rs256);
    h.issuer.retire(&kid);
    h.unknown_key_refused_after_one_refetch().await;

    let fresh = h
        .issuer
        .mint_with_kid(&kid, json!({"sub": "never-seen", "aud": "todo-app"}));
    let message = h.connect_refused("authenticated", &fresh).await;
    assert!(message.contains("no key"), "{message}");
    assert!(message.contains(&kid), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_seen_before_connects_from_the_cache_after_its_key_is_gone() {
    let h = Harness::start().await;
    let alice = h.token("alice");
    assert_eq!(h.user_id(&alice).await.unwrap(), "alice");

    take_away_the_key(&h).await;
    // Signed with the key just taken away.
    assert_eq!(
        jwt_header(&alice)["kid"],
        json!(h.issuer.current_kid(KeyKind::Rs256))
    );
    assert_eq!(
        h.user_id(&alice)
            .await
            .expect("the exact token seen before is served from the cache"),
        "alice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_a_token_seen_before_is_checked_again() {
    let h = Harness::start_with("[listen]\ntoken_cache_entries = 0").await;
    let alice = h.token("alice");
    assert_eq!(h.user_id(&alice).await.unwrap(), "alice");

    take_away_the_key(&h).await;
    let message = h.connect_refused("authenticated", &alice).await;
    assert!(message.contains("no key"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_although_it_is_cached() {
    let h = Harness::start().await;
    let exp = unix_now() + 1;
    let token = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "exp": exp}),
    );
    assert_eq!(h.user_id(&token).await.unwrap(), "alice");

    // Past exp and the leeway, in whole seconds.
    while unix_now() <= exp + LEEWAY {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.starts_with("token expired at "), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_holds_at_most_token_cache_entries_tokens() {
    let h = Harness::start_with("[listen]\ntoken_cache_entries = 2").await;
    let tokens: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|sub| h.token(sub))
        .collect();
    for (token, sub) in tokens.iter().zip(["alice", "bob", "carol"]) {
        assert_eq!(h.user_id(token).await.unwrap(), sub);
    }

    take_away_the_key(&h).await;
    // The first of three was evicted; the last two are still cached.
    let message = h.connect_refused("authenticated", &tokens[0]).await;
    assert!(message.contains("no key"), "{message}");
    assert_eq!(h.user_id(&tokens[1]).await.unwrap(), "bob");
    assert_eq!(h.user_id(&tokens[2]).await.unwrap(), "carol");
}
