//! The provider key cache over real HTTP: freshness from the JWKS response's
//! Cache-Control within the configured bounds, a provider that is down or
//! slow, and the limit on how long stale keys are trusted.
//!
//! Waits are bounded and polled rather than timed exactly: a test fails when
//! something hangs or never happens, not when a machine is slow.

use std::future::Future;
use std::time::Duration;

use crate::support::{Harness, PAST_COOLDOWN, WAIT, db_error, poll_until};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;
use tokio::time::{sleep, timeout};

/// `future`'s output, or a failure naming `what` if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// The SQLSTATE and message of a connection with `token` that must be refused.
async fn refused(h: &Harness, token: &str) -> (String, String) {
    match within(WAIT, "a refusal", h.user_id(token)).await {
        Ok(sub) => panic!("the proxy accepted a token (sub {sub}) that it must refuse"),
        Err(e) => db_error(&e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_max_age_drops_a_retired_key_without_an_unknown_kid() {
    let h = Harness::start_with("jwks_min_age = \"1s\"").await;
    h.issuer.set_jwks_max_age(1);
    let retiring = h.issuer.current_kid(KeyKind::Rs256);
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
    let fetched = h.issuer.jwks_fetches();

    h.issuer.rotate(KeyKind::Rs256);
    h.issuer.retire(&retiring);
    // Only the retired kid, which the cache holds, is ever presented: the
    // refetch that drops it comes from the set's one-second freshness.
    let message = poll_until(WAIT * 2, "the retired key is refused", || async {
        let token = h
            .issuer
            .mint_with_kid(&retiring, json!({"sub": "alice", "aud": "todo-app"}));
        match h.user_id(&token).await {
            Ok(_) => None,
            Err(e) => Some(db_error(&e)),
        }
    })
    .await;
    assert_eq!(message.0, "28000", "{}", message.1);
    assert!(message.1.contains("no key"), "{}", message.1);
    assert!(message.1.contains(&retiring), "{}", message.1);
    assert!(h.issuer.jwks_fetches() > fetched);
    // The successor, published in the refetched set, is served.
    assert_eq!(h.user_id(&h.token("bob")).await.unwrap(), "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_max_age_is_cut_to_jwks_max_age() {
    let h = Harness::start_with("jwks_max_age = \"2s\"").await;
    h.issuer.set_jwks_max_age(3600);
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
    let fetched = h.issuer.jwks_fetches();

    // Known keys only: a refetch can only come from the clamped freshness.
    poll_until(WAIT * 2, "the JWKS is refetched", || async {
        assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
        (h.issuer.jwks_fetches() > fetched).then_some(())
    })
    .await;
    assert_eq!(h.user_id(&h.token("bob")).await.unwrap(), "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_down_at_start_is_a_clear_refusal_until_it_comes_back() {
    let h = Harness::start().await;
    h.issuer.set_down(true);

    for _ in 0..2 {
        let (code, message) = refused(&h, &h.token("alice")).await;
        assert_eq!(code, "08006", "{message}");
        assert!(
            message.contains(&format!(
                "the signing keys of {} cannot be fetched",
                h.issuer.issuer()
            )),
            "{message}"
        );
        assert!(message.contains("503"), "{message}");
        assert!(!message.contains("no key"), "{message}");
    }

    h.issuer.set_down(false);
    let sub = poll_until(
        WAIT,
        "a token is accepted once the provider is up",
        || async {
            match h.user_id(&h.token("alice")).await {
                Ok(sub) => Some(sub),
                Err(e) => {
                    let (code, message) = db_error(&e);
                    assert_eq!(code, "08006", "{message}");
                    None
                }
            }
        },
    )
    .await;
    assert_eq!(sub, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keys_serve_while_the_provider_is_down_until_jwks_max_stale() {
    let h = Harness::start_with("jwks_max_age = \"1s\"\njwks_max_stale = \"5s\"").await;
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");

    h.issuer.set_down(true);
    assert_eq!(
        h.user_id(&h.token("bob"))
            .await
            .expect("cached keys serve while the provider is down"),
        "bob"
    );
    let (code, message) = poll_until(WAIT * 2, "stale keys stop serving", || async {
        match h.user_id(&h.token("carol")).await {
            Ok(_) => None,
            Err(e) => Some(db_error(&e)),
        }
    })
    .await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains(&format!(
            "the signing keys of {} are older than 6s and it cannot be reached",
            h.issuer.issuer()
        )),
        "{message}"
    );
    // Past the limit, no stale key serves again while the provider is down.
    sleep(PAST_COOLDOWN).await;
    let (code, message) = refused(&h, &h.token("dave")).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("are older than"), "{message}");

    h.issuer.set_down(false);
    poll_until(WAIT, "keys serve again once the provider is up", || async {
        h.user_id(&h.token("erin")).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_never_holds_up_a_cached_key() {
    // The refresh may take 20 s: far longer than the bounded wait on each
    // connection, so a connection that waited for it would fail.
    let h = Harness::start_with("jwks_max_age = \"1s\"\nfetch_timeout = \"20s\"").await;
    assert_eq!(h.user_id(&h.token("alice")).await.unwrap(), "alice");
    let fetched = h.issuer.jwks_fetches();

    h.issuer.set_delay(Duration::from_secs(30));
    // Stale and past the cooldown: the next connection starts a refresh.
    sleep(PAST_COOLDOWN).await;
    for sub in ["bob", "carol", "dave"] {
        let got = within(
            WAIT,
            "a connection with a cached key",
            h.user_id(&h.token(sub)),
        )
        .await
        .unwrap_or_else(|e| panic!("{sub} connects while the provider is slow: {e}"));
        assert_eq!(got, sub);
    }
    let burst = (0..8).map(|i| {
        let token = h.token_with(
            KeyKind::Es256,
            json!({"sub": format!("user-{i}"), "aud": "todo-app"}),
        );
        let config = h.client_config("authenticated", &token);
        tokio::spawn(async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .query_one("select auth.user_id()", &[])
                .await
                .map(|row| row.get::<_, String>(0))
        })
    });
    for (i, task) in burst.collect::<Vec<_>>().into_iter().enumerate() {
        let got = within(WAIT, "a burst of cached-key connections", task)
            .await
            .unwrap()
            .expect("a cached key connects while the provider is slow");
        assert_eq!(got, format!("user-{i}"));
    }
    poll_until(WAIT, "the refresh reaches the provider", || async {
        (h.issuer.jwks_fetches() > fetched).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_fetch_is_refused_after_fetch_timeout() {
    let h = Harness::start_with("fetch_timeout = \"1s\"").await;
    h.issuer.set_delay(Duration::from_secs(3));

    let (code, message) = refused(&h, &h.token("alice")).await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains(&format!(
            "the signing keys of {} cannot be fetched",
            h.issuer.issuer()
        )),
        "{message}"
    );
    assert!(message.contains("within 1s (fetch_timeout)"), "{message}");

    h.issuer.set_delay(Duration::ZERO);
    let token = h.token("alice");
    let sub = poll_until(
        WAIT,
        "a token is accepted once the provider answers",
        || async { h.user_id(&token).await.ok() },
    )
    .await;
    assert_eq!(sub, "alice");
}
