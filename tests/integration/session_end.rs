//! How sessions end: with their token, and with the proxy.

use std::time::Duration;

use crate::support::{
    Harness, POOL_MODES, WAIT, client_config, db_error, envelope_payload, refusal,
    stream_until_ended, unix_now, user_id_of,
};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;
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
    let (received, err) = stream_until_ended(&client).await;
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

/// Backends of `authenticated` other than the asking one that run `needle`.
async fn running(admin: &tokio_postgres::Client, needle: &str) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_stat_activity \
             where usename = 'authenticated' and pid <> pg_backend_pid() \
               and datname = current_database() \
               and query like '%' || $1 || '%'",
            &[&needle],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until a backend runs `needle`; a failure after [`WAIT`].
async fn until_running(admin: &tokio_postgres::Client, needle: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while running(admin, needle).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backend runs {needle:?} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no backend runs `needle`; a failure after [`WAIT`].
async fn until_none_runs(admin: &tokio_postgres::Client, needle: &str, context: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while running(admin, needle).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{context}: a backend still runs {needle:?} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// At expiry the statement still running is cancelled before the backend
/// is told to end, so what it would have written after expiry is never
/// committed; in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_in_flight_at_expiry_is_cancelled_and_never_commits() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let admin = h.admin().await;
        let client = h
            .connect("authenticated", &short_lived(&h, 2))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        // Sleeps past the expiry (2 s + 2 s leeway), then writes.
        let err = client
            .simple_query("insert into scratch (id, body) select 1, 'late' from pg_sleep(7)")
            .await
            .unwrap_err();
        assert_token_expired(&err);
        until_none_runs(&admin, "pg_sleep(7)", mode).await;
        // Past the moment the statement would have finished on its own.
        tokio::time::sleep_until(started + Duration::from_secs(8)).await;
        let written: i64 = admin
            .query_one("select count(*) from scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            written, 0,
            "{mode}: a statement committed after its token expired"
        );
    }
}

/// A client that leaves in the middle of a statement leaves no backend
/// behind: the statement is cancelled and the backend ends, so one token
/// holder cannot pile up Postgres backends; in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_abandoned_by_its_client_is_cancelled_and_its_backend_ends() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let admin = h.admin().await;
        for _ in 0..3 {
            let mut session = h.raw_connect_as("alice").await;
            session.send_query("select pg_sleep(600)").await;
            until_running(&admin, "pg_sleep(600)").await;
            drop(session);
            until_none_runs(&admin, "pg_sleep(600)", mode).await;
        }
        // The proxy is still fine.
        let alice = h.connect_as("alice").await;
        assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    }
}

/// A cancel ends only the statement running when it arrives: one the
/// client pipelined behind it is cancelled too before the backend ends,
/// rather than left to run; in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_a_leaving_client_pipelined_are_all_cancelled() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let admin = h.admin().await;
        let mut session = h.raw_connect_as("alice").await;
        session.send_query("select pg_sleep(600)").await;
        session.send_query("select pg_sleep(601)").await;
        until_running(&admin, "pg_sleep(600)").await;
        drop(session);
        until_none_runs(&admin, "pg_sleep(600)", mode).await;
        until_none_runs(&admin, "pg_sleep(601)", mode).await;
    }
}

/// A session that outlives its envelope gets a fresh one ahead of its next
/// statement between transactions, and its claims go on working; in both
/// pool modes, with and without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_outlives_its_envelope_gets_a_fresh_one_between_transactions() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", |c| {
            pool(c);
            c.claims.envelope_lifetime = Duration::from_secs(3);
        })
        .await;
        let alice = h.connect_as("alice").await;
        let anonymous = h.connect("anonymous", "").await.unwrap();
        let first = envelope_payload(&alice).await["exp"].as_u64().unwrap();
        assert!(first <= unix_now() + 3, "{first}");
        // Past its expiry: the next statement still sees alice.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"), "{mode}");
        let second = envelope_payload(&alice).await["exp"].as_u64().unwrap();
        assert!(second > first, "{mode}: {second} after {first}");
        let row = anonymous.query_one("select auth.session()", &[]).await;
        assert!(row.is_ok(), "{mode}: {row:?}");
        // Prepared statements and the unnamed statement survive a refresh.
        let statement = alice.prepare("select auth.user_id()").await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let who: Option<String> = alice.query_one(&statement, &[]).await.unwrap().get(0);
        assert_eq!(who.as_deref(), Some("alice"), "{mode}");
    }
}

/// Inside a transaction the envelope is not replaced, and it expires by the
/// time of the statement, not of the transaction (which began before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_expires_inside_a_transaction_begun_before_its_expiry() {
    let h = Harness::start_configured("", |c| c.claims.envelope_lifetime = Duration::from_secs(3))
        .await;
    let alice = h.connect_as("alice").await;
    alice.batch_execute("begin").await.unwrap();
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let err = alice
        .query_one("select auth.user_id()", &[])
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("expired"), "{message}");
    alice.batch_execute("rollback").await.unwrap();
    assert_eq!(
        user_id_of(&alice).await.as_deref(),
        Some("alice"),
        "refreshed after"
    );
}

/// A session's slot is given back only once its backend has ended: with
/// `max_connections = 1`, the next client gets in only after the backend
/// of a client that left mid-statement is gone, even when that statement
/// takes its time to end after the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_free_only_once_the_backend_of_its_session_has_ended() {
    let h = Harness::start_with("[listen]\nmax_connections = 1").await;
    let admin = h.admin().await;
    let mut session = h.raw_connect_as("alice").await;
    // Cancelled, it still runs for two seconds before it reads Terminate.
    let slow_to_end = "do $$ begin perform pg_sleep(600); \
        exception when query_canceled then perform pg_sleep(2); end $$";
    session.send_query(slow_to_end).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while running(&admin, "query_canceled").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(session);
    let bob = loop {
        match h.connect("authenticated", &h.token("bob")).await {
            Ok(bob) => break bob,
            Err(e) => {
                assert_eq!(db_error(&e).0, "53300", "{e}");
                assert!(tokio::time::Instant::now() < deadline, "no slot came free");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        running(&admin, "query_canceled").await,
        0,
        "bob got a slot while alice's backend still ran"
    );
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}
