//! The provider's signing keys as the proxy sees them: rotation picked up
//! without a restart, refetches bounded by the cooldown, cached keys serving
//! while the provider is down, and retired keys dropped on the next refetch.

use crate::support::{Harness, PAST_COOLDOWN, db_error, jwt_header};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;

fn kid_of(token: &str) -> String {
    jwt_header(token)["kid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_without_a_restart_and_the_old_key_keeps_working() {
    let h = Harness::start().await;
    let old_token = h.token("alice");
    let old_kid = kid_of(&old_token);
    assert_eq!(h.user_id(&old_token).await.unwrap(), "alice");
    let fetches = h.issuer.jwks_fetches();

    let new_kid = h.issuer.rotate(KeyKind::Rs256);
    assert_ne!(new_kid, old_kid);
    // The first fetch counts against the cooldown: an unknown kid within it
    // is not refetched for.
    tokio::time::sleep(PAST_COOLDOWN).await;

    let new_token = h.token("bob");
    assert_eq!(kid_of(&new_token), new_kid);
    assert_eq!(
        h.user_id(&new_token)
            .await
            .expect("a token signed with the new key is accepted"),
        "bob"
    );
    assert_eq!(
        h.issuer.jwks_fetches(),
        fetches + 1,
        "the unknown kid caused exactly one refetch"
    );

    // The old key is still published, and still accepted.
    let old_again = h
        .issuer
        .mint_with_kid(&old_kid, json!({"sub": "carol", "aud": "todo-app"}));
    assert_eq!(h.user_id(&old_again).await.unwrap(), "carol");
    assert_eq!(h.user_id(&old_token).await.unwrap(), "alice");
    // Both keys are now cached: no more fetches.
    assert_eq!(h.issuer.jwks_fetches(), fetches + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_unknown_kids_causes_at_most_one_fetch_per_cooldown() {
    let h = Harness::start().await;
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
    tokio::time::sleep(PAST_COOLDOWN).await;

    // Past the cooldown: a burst of 20 tokens with unknown kids, at once.
    let burst = |h: &Harness| {
        let tokens: Vec<String> = (0..20)
            .map(|i| {
                h.issuer.mint_with_unpublished_key(
                    KeyKind::Es256,
                    json!({"sub": format!("mallory-{i}"), "aud": "todo-app"}),
                )
            })
            .collect();
        let config = h.client_config("authenticated", "");
        async move {
            let attempts = tokens.into_iter().map(|token| {
                let mut config = config.clone();
                config.password(token);
                tokio::spawn(async move { config.connect(tokio_postgres::NoTls).await.err() })
            });
            let mut messages = Vec::new();
            for attempt in attempts.collect::<Vec<_>>() {
                let err = attempt
                    .await
                    .unwrap()
                    .expect("a token with an unknown kid is refused");
                let (code, message) = db_error(&err);
                assert_eq!(code, "28000", "{message}");
                assert!(message.contains("no key"), "{message}");
                assert!(message.contains("in the JWKS"), "{message}");
                messages.push(message);
            }
            messages
        }
    };

    let before = h.issuer.jwks_fetches();
    assert_eq!(burst(&h).await.len(), 20);
    let after_first = h.issuer.jwks_fetches();
    assert!(
        after_first - before <= 1,
        "20 unknown kids past the cooldown caused {} JWKS fetches, expected at most one",
        after_first - before
    );
    assert_eq!(
        after_first - before,
        1,
        "past the cooldown, an unknown kid is refetched for"
    );

    // Right after that refetch, within the cooldown: at most one more (none
    // unless the cooldown ran out while the bursts were being served).
    assert_eq!(burst(&h).await.len(), 20);
    assert!(
        h.issuer.jwks_fetches() - after_first <= 1,
        "a second burst within the cooldown caused {} fetches",
        h.issuer.jwks_fetches() - after_first
    );

    // Valid tokens are served throughout.
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_serving_while_the_provider_is_down() {
    let h = Harness::start().await;
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");

    h.issuer.set_down(true);
    assert_eq!(
        h.user_id(&h.token("bob"))
            .await
            .expect("known kid while the provider is down"),
        "bob"
    );
    for kind in [KeyKind::Es256, KeyKind::EdDsa] {
        let token = h.token_with(kind, json!({"sub": "carol", "aud": "todo-app"}));
        assert_eq!(h.user_id(&token).await.unwrap(), "carol");
    }

    // An unknown kid past the cooldown makes the proxy try (and fail) to
    // refetch; the failed attempt must not drop the cached keys.
    h.unknown_key_refused_after_one_refetch().await;
    assert_eq!(
        h.user_id(&h.token("dave"))
            .await
            .expect("cached keys survive a failed refetch"),
        "dave"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_their_max_age_keep_serving_while_the_provider_is_down() {
    // Text appended to the harness configuration lands in its [[provider]].
    let h = Harness::start_with("jwks_max_age = \"1s\"").await;
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
    let fetched = h.issuer.jwks_fetches();

    // Stale and past the cooldown: the next token makes the proxy refetch.
    h.issuer.set_down(true);
    tokio::time::sleep(PAST_COOLDOWN).await;
    assert_eq!(
        h.user_id(&h.token("bob"))
            .await
            .expect("stale keys serve while the provider is down"),
        "bob"
    );
    assert_eq!(
        h.issuer.jwks_fetches(),
        fetched + 1,
        "the stale set was refetched (and the attempt failed)"
    );

    // Up again: the next refresh succeeds and tokens keep working.
    h.issuer.set_down(false);
    tokio::time::sleep(PAST_COOLDOWN).await;
    assert_eq!(h.user_id(&h.token("carol")).await.unwrap(), "carol");
    assert_eq!(h.issuer.jwks_fetches(), fetched + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_key_is_refused_once_the_cache_refetches() {
    let h = Harness::start().await;
    let retiring = h.issuer.current_kid(KeyKind::Rs256);
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");

    let successor = h.issuer.rotate(KeyKind::Rs256);
    h.issuer.retire(&retiring);
    let retired_token = || {
        h.issuer
            .mint_with_kid(&retiring, json!({"sub": "alice", "aud": "todo-app"}))
    };

    // Until the proxy refetches, its cached set still holds the retired key:
    // the JWKS max age (1 h by default) or an unknown kid decides when.
    assert_eq!(
        h.user_id(&retired_token())
            .await
            .expect("cached until the next refetch"),
        "alice"
    );

    // An unknown kid past the cooldown (here: the successor's) refetches.
    tokio::time::sleep(PAST_COOLDOWN).await;
    let fetches = h.issuer.jwks_fetches();
    let successor_token = h.token("bob");
    assert_eq!(kid_of(&successor_token), successor);
    assert_eq!(h.user_id(&successor_token).await.unwrap(), "bob");
    assert_eq!(h.issuer.jwks_fetches(), fetches + 1);

    // The refetched set no longer holds the retired key.
    let message = h.connect_refused("authenticated", &retired_token()).await;
    assert!(message.contains("no key"), "{message}");
    assert!(message.contains(&retiring), "{message}");
    // And tokens of the current key still work.
    assert_eq!(h.user_id(&h.token("carol")).await.unwrap(), "carol");
}
