//! Query cancellation through the proxy. A client's cancel key is its
//! upstream backend's real pid (what `pg_backend_pid()` and NOTIFY show) with
//! a secret of the proxy's: the right key cancels the statement running in
//! that backend, in both pool modes; a wrong one, or a pooled client's key
//! once it has left, cancels nothing; many sessions behind one address are
//! all cancelled at once, while guessing from one address is cut off.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::support::wire::{self, RawSession};
use crate::support::{
    Harness, POOL_MODES, WAIT, db_error, http_get, metric, poll_until, pooled, user_id_of,
};
use futures_util::future::join_all;
use rlsgate::session::cancel::GUESS_BUDGET;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

/// Sends a CancelRequest to the proxy by hand and waits until the proxy has
/// dealt with it (it closes the connection without an answer, as Postgres does).
pub(crate) async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    cancel_over(stream, pid, secret).await;
}

/// [`send_cancel`] from another loopback address, as another host would.
async fn send_cancel_from(source: Ipv4Addr, port: u16, pid: i32, secret: i32) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let stream = socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .unwrap();
    cancel_over(stream, pid, secret).await;
}

pub(crate) async fn cancel_over(mut stream: TcpStream, pid: i32, secret: i32) {
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

/// Waits until backend `pid` is running a statement.
pub(crate) async fn wait_until_active(admin: &Client, pid: i32) {
    wait_for_backend(admin, pid, "running a statement", |state, _| {
        state == "active"
    })
    .await;
}

async fn wait_for_backend(admin: &Client, pid: i32, what: &str, done: fn(&str, &str) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = admin
            .query_opt(
                "select coalesce(state, ''), query from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .unwrap();
        let seen: Option<(String, String)> = row.map(|r| (r.get(0), r.get(1)));
        if seen.as_ref().is_some_and(|(s, q)| done(s, q)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} was not {what} within {WAIT:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NotificationResponse: the notifying backend's pid, channel and payload.
fn notification(body: &[u8]) -> (i32, String, String) {
    let pid = i32::from_be_bytes(body[..4].try_into().unwrap());
    let mut strings = body[4..]
        .split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).unwrap());
    (pid, strings.next().unwrap(), strings.next().unwrap())
}

/// Runs `sql` in `raw` and returns the notifications it got by the time
/// the answer, and at least one notification, arrived.
async fn notified(raw: &mut RawSession, sql: &str) -> Vec<(i32, String, String)> {
    raw.send_query(sql).await;
    let mut found = Vec::new();
    let mut ready = false;
    while !ready || found.is_empty() {
        let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(&mut raw.stream))
            .await
            .expect("an answer and a notification within the timeout")
            .expect("a whole message");
        match kind {
            b'A' => found.push(notification(&body)),
            b'Z' => ready = true,
            b'E' => panic!("`{sql}` failed: {:?}", wire::error_response(&body)),
            _ => {}
        }
    }
    found
}

/// A tokio-postgres session of `sub`'s whose notifications come out of the
/// returned channel.
async fn listener(
    h: &Harness,
    sub: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = h
        .client_config("authenticated", &h.token(sub))
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("{sub} connects: {e}"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

/// Every message `stream` gets until the proxy closes it.
async fn until_closed(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, wire::read_message(stream))
            .await
            .expect("the proxy closes the connection within the timeout");
        match next {
            Ok(message) => messages.push(message),
            Err(_) => return messages,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_sleep_is_cancelled_with_the_cancel_token_and_returns_57014_within_two_seconds() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let alice = h.connect_as("alice").await;

        // Twice: once in the simple protocol, once in the extended one; the
        // key stays valid for the whole session.
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
            assert_eq!(code, "57014", "{mode}, round {round}: {message}");
            assert!(
                message.contains("canceling statement due to user request"),
                "{message}"
            );
            assert!(
                elapsed < Duration::from_secs(2),
                "{mode}, round {round}: cancelled after {elapsed:?}"
            );
            canceller
                .await
                .unwrap()
                .expect("the cancel request is sent");

            // The session is usable afterwards, with its claims intact.
            assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
        }
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

    // Near misses of a real key cancel nothing either; the right key then does.
    let admin = h.admin().await;
    let mut raw = h.raw_connect_as("bob").await;
    raw.send_query("select pg_sleep(1), 'done'").await;
    wait_until_active(&admin, raw.pid).await;
    send_cancel(port, raw.pid, raw.secret.wrapping_add(1)).await;
    send_cancel(port, raw.pid, !raw.secret).await;
    send_cancel(port, raw.pid ^ 1, raw.secret).await;
    let rows = raw
        .read_result()
        .await
        .expect("not cancelled by a wrong key");
    assert_eq!(rows, [vec![Some(String::new()), Some("done".to_owned())]]);

    raw.send_query("select pg_sleep(30)").await;
    wait_until_active(&admin, raw.pid).await;
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
async fn the_cancel_keys_pid_is_the_one_pg_backend_pid_and_notify_show_in_both_pool_modes() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let mut alice = h.raw_connect_as("alice").await;
        assert_eq!(upstream_pid(&mut alice).await, alice.pid, "{mode}");

        // Her own notification names her: clients skip theirs this way.
        let (bob, mut bobs_notifications) = listener(&h, "bob").await;
        bob.batch_execute("listen rlsgate_test").await.unwrap();
        let own = notified(
            &mut alice,
            "listen rlsgate_test; notify rlsgate_test, 'alice'",
        )
        .await;
        assert_eq!(
            own,
            [(alice.pid, "rlsgate_test".to_owned(), "alice".to_owned())],
            "{mode}"
        );
        // And so does the one another session receives.
        let seen = tokio::time::timeout(WAIT, bobs_notifications.recv())
            .await
            .expect("bob is notified")
            .unwrap();
        assert_eq!(
            (seen.process_id(), seen.payload()),
            (alice.pid, "alice"),
            "{mode}"
        );

        // Every session gets its own key.
        let other = h.raw_connect_as("alice").await;
        assert_ne!(other.pid, alice.pid, "{mode}");
        assert_ne!(other.secret, alice.secret, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_terminate_backend_with_the_keys_pid_ends_that_session_in_both_pool_modes() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let mut alice = h.raw_connect_as("alice").await;
        let bob = h.connect_as("bob").await;

        let ended: bool = bob
            .query_one("select pg_terminate_backend($1)", &[&alice.pid])
            .await
            .unwrap()
            .get(0);
        assert!(ended, "{mode}: pg_terminate_backend found the backend");
        // The backend's FATAL reaches alice, then her connection closes.
        let errors: Vec<_> = until_closed(&mut alice.stream)
            .await
            .into_iter()
            .filter(|(kind, _)| *kind == b'E')
            .map(|(_, body)| wire::error_response(&body))
            .collect();
        assert!(
            errors.iter().any(|e| e.code == "57P01"),
            "{mode}: alice is told her session was terminated: {errors:?}"
        );

        // Bob is untouched, and new sessions work.
        assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"), "{mode}");
        let carol = h.connect_as("carol").await;
        assert_eq!(user_id_of(&carol).await.as_deref(), Some("carol"), "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_clients_key_cancels_nothing_on_the_next_client_even_sent_as_it_leaves() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    let port = h.port();

    let alice = h.raw_connect_as("alice").await;
    let (pid, alices_secret) = (alice.pid, alice.secret);
    // A cancel on its way as she leaves cleanly: it must neither land on the
    // pool's reset (which would close the backend) nor later on bob's query.
    let racing = tokio::spawn(send_cancel(port, pid, alices_secret));
    alice.terminate().await;
    racing.await.unwrap();
    h.wait_until_pooled(&admin, pid).await;

    let mut bob = h.raw_connect_as("bob").await;
    assert_eq!(
        bob.pid, pid,
        "bob is lent alice's backend, and told its pid"
    );
    assert_ne!(bob.secret, alices_secret, "with a secret of his own");
    bob.send_query("select pg_sleep(1), 'done'").await;
    wait_until_active(&admin, pid).await;
    send_cancel(port, pid, alices_secret).await;
    let rows = bob
        .read_result()
        .await
        .expect("alice's old key does not cancel bob's statement");
    assert_eq!(rows, [vec![Some(String::new()), Some("done".to_owned())]]);

    // Bob's own key does.
    bob.send_query("select pg_sleep(30)").await;
    wait_until_active(&admin, pid).await;
    send_cancel(port, pid, bob.secret).await;
    let err = tokio::time::timeout(WAIT, bob.read_result())
        .await
        .expect("bob's statement ends once cancelled")
        .unwrap_err();
    assert_eq!(err.code, "57014");
    // PostgreSQL signals a cancelled backend twice (the process, then its
    // process group); on a busy machine the second signal can come late
    // enough to cancel the next statement too. That one may be retried.
    let mut user = bob.query("select auth.user_id()").await;
    if matches!(&user, Err(e) if e.code == "57014") {
        user = bob.query("select auth.user_id()").await;
    }
    assert_eq!(user.unwrap(), [vec![Some("bob".to_owned())]]);
}

/// The count of cancel requests forwarded to PostgreSQL, once it reaches
/// `n`: the proxy counts a request when PostgreSQL has closed the cancel
/// connection, which can be after the cancelled query's error has reached
/// its client.
async fn forwarded_once_counted(h: &Harness, n: u64) -> u64 {
    let what = format!("{n} cancel requests counted as forwarded");
    poll_until(WAIT, &what, || async {
        let forwarded = cancel_requests(h, "forwarded").await;
        (forwarded >= n).then_some(forwarded)
    })
    .await
}

/// `rlsgate_cancel_requests_total{result}`, 0 when not there yet.
async fn cancel_requests(h: &Harness, result: &str) -> u64 {
    let (status, text) = http_get(&h.admin_url("/metrics")).await;
    assert_eq!(status, 200, "{text}");
    metric(
        &text,
        "rlsgate_cancel_requests_total",
        &[("result", result)],
    )
    .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_behind_one_address_all_cancelled_at_once_end_with_57014() {
    const SESSIONS: usize = 30;
    let h = Harness::start_with_admin("").await;
    let admin = h.admin().await;
    let mut tokens = Vec::new();
    let mut queries = Vec::new();
    for i in 0..SESSIONS {
        let client = h.connect_as(&format!("user{i}")).await;
        tokens.push(client.cancel_token());
        queries.push(tokio::spawn(async move {
            client.batch_execute("select pg_sleep(30)").await
        }));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let running: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity \
                 where state = 'active' and query = 'select pg_sleep(30)' \
                   and datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == SESSIONS as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} sleeps running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every cancel request at once, all from 127.0.0.1.
    let sent = join_all(tokens.iter().map(|t| t.cancel_query(NoTls))).await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    for (i, query) in queries.into_iter().enumerate() {
        let ended = tokio::time::timeout(WAIT, query)
            .await
            .unwrap_or_else(|_| panic!("session {i}'s pg_sleep(30) was not cancelled"))
            .unwrap();
        let (code, message) = db_error(&ended.expect_err("the sleep is cancelled"));
        assert_eq!(code, "57014", "session {i}: {message}");
    }
    let sessions = SESSIONS as u64;
    assert_eq!(forwarded_once_counted(&h, sessions).await, sessions);
    assert_eq!(cancel_requests(&h, "rate_limited").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_from_one_address_is_cut_off_and_counted_but_not_other_addresses() {
    let h = Harness::start_with_admin("").await;
    let admin = h.admin().await;
    let port = h.port();
    let mut alice = h.raw_connect_as("alice").await;
    alice.send_query("select pg_sleep(30)").await;
    wait_until_active(&admin, alice.pid).await;

    // Guesses at alice's secret, from 127.0.0.1...
    let flood = u64::from(GUESS_BUDGET.burst) + 20;
    let started = Instant::now();
    for i in 0..flood {
        send_cancel(port, alice.pid, alice.secret ^ (i as i32 + 1)).await;
    }
    let refilled = (started.elapsed().as_secs_f64() * f64::from(GUESS_BUDGET.per_second)).ceil();
    // ...after which even the right key from there is ignored.
    send_cancel(port, alice.pid, alice.secret).await;

    let unknown = cancel_requests(&h, "unknown_key").await;
    let limited = cancel_requests(&h, "rate_limited").await;
    assert_eq!(unknown + limited, flood + 1, "every request is counted");
    assert!(
        unknown >= u64::from(GUESS_BUDGET.burst)
            && unknown as f64 <= f64::from(GUESS_BUDGET.burst) + refilled,
        "{unknown} unknown keys were looked up"
    );
    assert_eq!(
        cancel_requests(&h, "forwarded").await,
        0,
        "nothing reached the database"
    );
    wait_until_active(&admin, alice.pid).await;

    // The right key from another address cancels.
    send_cancel_from(Ipv4Addr::new(127, 0, 0, 2), port, alice.pid, alice.secret).await;
    let err = tokio::time::timeout(WAIT, alice.read_result())
        .await
        .expect("the query ends after the cancel")
        .unwrap_err();
    assert_eq!(err.code, "57014");
    assert_eq!(forwarded_once_counted(&h, 1).await, 1);
}
