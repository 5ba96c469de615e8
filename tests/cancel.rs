//! Query cancellation through the proxy: the client's cancel key (one the
//! proxy made up) cancels the statement running in its upstream backend; a
//! wrong key cancels nothing; the upstream's real key never reaches the client.

mod support;

use std::time::{Duration, Instant};

use support::wire::{self, RawSession};
use support::{Harness, WAIT, db_error, user_id_of};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// Sends a CancelRequest to the proxy by hand and waits until the proxy has
/// dealt with it (it closes the connection without an answer, as Postgres does).
async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    wire::send(&mut stream, &wire::cancel_request(pid, secret)).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes a cancel connection");
    assert!(
        read.is_err() || rest.is_empty(),
        "a cancel request gets no answer, got {rest:?}"
    );
}

/// The pid of the upstream backend serving `raw`.
async fn upstream_pid(raw: &mut RawSession) -> i32 {
    raw.query_value("select pg_backend_pid()")
        .await
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_sleep_is_cancelled_with_the_cancel_token_and_returns_57014_within_two_seconds() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    // Twice: once in the simple protocol, once in the extended one; the key
    // stays valid for the whole session.
    for round in 0..2 {
        let token = alice.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let started = Instant::now();
        let err = if round == 0 {
            alice
                .batch_execute("select pg_sleep(30)")
                .await
                .unwrap_err()
        } else {
            alice
                .query("select pg_sleep($1)", &[&30f64])
                .await
                .unwrap_err()
        };
        let elapsed = started.elapsed();
        let (code, message) = db_error(&err);
        assert_eq!(code, "57014", "round {round}: {message}");
        assert!(
            message.contains("canceling statement due to user request"),
            "{message}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "round {round}: cancelled after {elapsed:?}"
        );
        canceller
            .await
            .unwrap()
            .expect("the cancel request is sent");

        // The session is usable afterwards, with its claims intact.
        assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_session_leaves_another_running() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;

    let token = alice.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let (alice_result, bob_result) = tokio::join!(
        alice.batch_execute("select pg_sleep(30)"),
        bob.query_one("select pg_sleep(1.5)::text, auth.user_id()", &[]),
    );
    canceller.await.unwrap().unwrap();
    assert_eq!(db_error(&alice_result.unwrap_err()).0, "57014");
    let row = bob_result.expect("bob's statement is not cancelled");
    assert_eq!(row.get::<_, String>(1), "bob");
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_with_a_wrong_key_cancels_nothing() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    let port = h.port();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            send_cancel(port, rand::random(), rand::random()).await;
        }
    });
    let started = Instant::now();
    let row = alice
        .query_one("select pg_sleep(1)::text, 'done'", &[])
        .await
        .expect("the statement completes normally");
    assert_eq!(row.get::<_, String>(1), "done");
    assert!(started.elapsed() >= Duration::from_secs(1));
    sender.await.unwrap();

    // Near misses of a real key, and the upstream backend's real pid, cancel
    // nothing either; the right key then does.
    let mut raw = h.raw_connect_as("bob").await;
    let upstream_pid = upstream_pid(&mut raw).await;
    raw.send_query("select pg_sleep(1), 'done'").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_cancel(port, raw.pid, raw.secret.wrapping_add(1)).await;
    send_cancel(port, raw.pid ^ 1, raw.secret).await;
    send_cancel(port, upstream_pid, raw.secret).await;
    let rows = raw
        .read_result()
        .await
        .expect("not cancelled by a wrong key");
    assert_eq!(rows, [vec![Some(String::new()), Some("done".to_owned())]]);

    raw.send_query("select pg_sleep(30)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    send_cancel(port, raw.pid, raw.secret).await;
    assert_eq!(raw.read_result().await.unwrap_err().code, "57014");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Both sessions are still usable.
    let n: i32 = alice.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(
        raw.query("select auth.user_id()").await.unwrap(),
        [vec![Some("bob".to_owned())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_key_given_to_the_client_is_not_the_upstream_backends() {
    let h = Harness::start().await;
    let mut raw = h.raw_connect_as("alice").await;
    let upstream_pid = upstream_pid(&mut raw).await;
    assert_ne!(
        raw.pid, upstream_pid,
        "the client must not get the upstream backend's pid"
    );

    // No backend at all has the pid the client was given.
    let admin = h.admin().await;
    let backends: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where pid = $1",
            &[&raw.pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(backends, 0);
    let upstream_user: String = admin
        .query_one(
            "select usename::text from pg_stat_activity where pid = $1",
            &[&upstream_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(upstream_user, "authenticated");

    // Every session gets its own key.
    let other = h.raw_connect_as("alice").await;
    assert_ne!((other.pid, other.secret), (raw.pid, raw.secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_beyond_the_per_address_rate_are_ignored_until_the_window_passes() {
    let h = Harness::start().await;
    let mut alice = h.raw_connect_as("alice").await;
    alice.send_query("select pg_sleep(30)").await;

    // Use up this address's budget with keys that cancel nothing...
    for _ in 0..rlsgate::cancel::RATE_LIMIT {
        send_cancel(h.port(), alice.pid ^ 1, alice.secret).await;
    }
    // ...so that even the right key is now ignored.
    send_cancel(h.port(), alice.pid, alice.secret).await;
    let mut first = [0u8; 1];
    let answered =
        tokio::time::timeout(Duration::from_millis(1500), alice.stream.peek(&mut first)).await;
    assert!(
        answered.is_err(),
        "the over-rate cancel request was ignored"
    );

    // A new window: the right key cancels.
    send_cancel(h.port(), alice.pid, alice.secret).await;
    let err = tokio::time::timeout(WAIT, alice.read_result())
        .await
        .expect("the query ends after the cancel")
        .unwrap_err();
    assert_eq!(err.code, "57014");
}
