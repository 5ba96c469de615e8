//! How sessions end: with their token, and with the proxy.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;
use support::{Harness, client_config, db_error, refusal, unix_now, user_id_of};
use tokio_postgres::NoTls;

/// A token for alice that expires `seconds` from now (the harness grants 2 s leeway).
fn short_lived(h: &Harness, seconds: u64) -> String {
    h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "exp": unix_now() + seconds}),
    )
}

fn assert_token_expired(e: &tokio_postgres::Error) {
    let message = refusal(e);
    assert!(message.starts_with("token expired at "), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_with_fatal_28000_when_its_token_expires() {
    let h = Harness::start().await;
    let token = short_lived(&h, 2);
    let (client, connection) = h
        .client_config("authenticated", &token)
        .connect(NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let who: String = client
        .query_one("select auth.user_id()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice");

    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the session ends after exp + leeway")
        .unwrap();
    assert_token_expired(&ended.expect_err("the proxy ends the session with an error"));
    assert!(client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_query_is_ended_by_expiry_inside_a_transaction() {
    let h = Harness::start().await;
    let mut client = h
        .connect("authenticated", &short_lived(&h, 2))
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("insert into todos (title) values ('never committed')", &[])
        .await
        .unwrap();
    let err = tx.query("select pg_sleep(20)", &[]).await.unwrap_err();
    assert_token_expired(&err);

    // The upstream session was terminated, so the transaction rolled back.
    let admin = h.admin().await;
    let left: i64 = admin
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_result_is_cut_between_messages_at_expiry() {
    let h = Harness::start().await;
    let client = h
        .connect("authenticated", &short_lived(&h, 2))
        .await
        .unwrap();
    let rows = client
        .query_raw(
            // In the select list the series streams; in FROM it would be
            // materialized before the first row.
            "select repeat('x', 3000), generate_series(1, 100000000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut received = 0u64;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(30), rows.next()).await {
            Ok(Some(Ok(row))) => {
                // Every row arrives whole: a FATAL spliced into a DataRow would
                // surface as a protocol error instead of the 28000 below.
                assert_eq!(row.get::<_, &str>(0).len(), 3000);
                received += 1;
            }
            Ok(Some(Err(e))) => break e,
            Ok(None) => panic!("a 300 GB result finished before the token expired"),
            Err(_) => panic!("the session did not end within 30 s of streaming"),
        }
    };
    assert!(received > 0, "rows were streaming when the token expired");
    assert_token_expired(&err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_idle_sessions_with_57p01_after_the_drain_time() {
    let Harness { pg, issuer, proxy } = Harness::start().await;
    let token = issuer.mint(KeyKind::Rs256, json!({"sub": "alice", "aud": "todo-app"}));
    let config = client_config(proxy.address, "authenticated", Some(&token));
    let (client, connection) = config.connect(NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client.query_one("select 1", &[]).await.unwrap();

    let stopping = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once shutdown begins.
    assert!(config.connect(NoTls).await.is_err());
    // The open session still works during the drain time...
    client.query_one("select 1", &[]).await.unwrap();

    // ...and then ends with 57P01.
    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the session ends after the drain time")
        .unwrap();
    let err = ended.expect_err("the proxy ends the session with an error");
    assert_eq!(db_error(&err).0, "57P01");
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("shutdown completes")
        .unwrap();
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_its_token_when_configured_to_and_keeps_its_claims() {
    let h = Harness::start_with("[listen]\nend_sessions_at_token_expiry = false").await;
    let token = short_lived(&h, 1);
    let client = h.connect("authenticated", &token).await.unwrap();
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));

    // Past exp and the 2 s leeway: the session, and its claims in the
    // database, are still there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
    client
        .execute("insert into todos (title) values ('after expiry')", &[])
        .await
        .unwrap();

    // The token itself is still refused for new connections.
    let err = h.connect("authenticated", &token).await.unwrap_err();
    assert!(refusal(&err).starts_with("token expired at "), "{err}");
}
