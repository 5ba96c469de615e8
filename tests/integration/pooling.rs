//! `[pool] mode = "session"`: upstream connections outlive their clients,
//! and nothing one client leaves behind reaches the next.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::wire::{self, RawSession};
use crate::support::{Harness, WAIT, login_with, pid_of, pooled, simple_rows, user_id_of};
use tokio_postgres::Client;

/// The backend pid a raw session's queries run on.
async fn raw_pid(session: &mut RawSession) -> i32 {
    let pid = session.query_value("select pg_backend_pid()").await;
    pid.and_then(|pid| pid.parse().ok()).expect("a backend pid")
}

/// One text value from a simple query.
async fn value(client: &Client, sql: &str) -> Option<String> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    simple_rows(&messages)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql} returned no row"))
        .into_iter()
        .next()
        .unwrap()
}

/// Waits until backend `pid` has exited.
async fn wait_until_gone(admin: &Client, pid: i32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = admin
            .query_opt("select 1 from pg_stat_activity where pid = $1", &[&pid])
            .await
            .unwrap();
        if row.is_none() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} was still there after {WAIT:?}: it must be closed, not pooled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alice connects and leaves; her backend's pid, once it is back in the pool.
async fn alices_backend_returned(h: &Harness, admin: &Client) -> i32 {
    let alice = h.connect_as("alice").await;
    let pid = pid_of(&alice).await;
    drop(alice);
    h.wait_until_pooled(admin, pid).await;
    pid
}

/// Bob connects, as himself, on a backend other than `pid` (`why` not).
async fn bob_on_another_backend_than(h: &Harness, pid: i32, why: &str) {
    let bob = h.connect_as("bob").await;
    assert_ne!(pid_of(&bob).await, pid, "{why}");
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn user_b_on_alices_backend_sees_nothing_she_left_behind() {
    // Alone: it grants a role to `authenticated`, which other tests share.
    let h = Harness::start_alone_configured("", pooled).await;
    let admin = h.admin().await;
    admin
        .batch_execute("create role helper; grant helper to authenticated;")
        .await
        .unwrap();

    let alice = h.connect_as("alice").await;
    let pid = pid_of(&alice).await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    alice
        .batch_execute(
            "create temp table alice_notes (body text);
             insert into alice_notes values ('secret');
             prepare alice_statement as select body from alice_notes;
             set statement_timeout = '123s';
             select pg_advisory_lock(42);
             listen alice_channel;
             set role helper;
             set rlsgate.session = 'forged';",
        )
        .await
        .expect("alice leaves things behind");
    assert_eq!(
        value(&alice, "select current_user").await.as_deref(),
        Some("helper")
    );
    drop(alice);
    h.wait_until_pooled(&admin, pid).await;

    let bob = h.connect_as("bob").await;
    assert_eq!(
        pid_of(&bob).await,
        pid,
        "bob must get alice's pooled backend"
    );
    let checks = [
        (
            "select count(*) from pg_prepared_statements where name = 'alice_statement' or from_sql",
            "0",
        ),
        (
            "select count(*) from pg_class where relname = 'alice_notes'",
            "0",
        ),
        (
            "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.oid = pg_my_temp_schema()",
            "0",
        ),
        ("select current_setting('statement_timeout')", "0"),
        ("select current_user", "authenticated"),
        ("select session_user", "authenticated"),
        (
            "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
            "0",
        ),
        ("select count(*) from pg_listening_channels()", "0"),
        ("select auth.user_id()", "bob"),
    ];
    for (sql, expected) in checks {
        assert_eq!(value(&bob, sql).await.as_deref(), Some(expected), "{sql}");
    }
    // The lock is free for anyone else too.
    let other: bool = admin
        .query_one("select pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(other, "alice's advisory lock must be released");
}

#[tokio::test]
async fn a_client_that_leaves_mid_transaction_never_has_its_backend_reused() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    let alice = h.connect_as("alice").await;
    let pid = pid_of(&alice).await;
    alice
        .batch_execute("begin; insert into scratch values (1, 'uncommitted');")
        .await
        .unwrap();
    let bob = bob_after_alices_backend_ended(
        &h,
        &admin,
        alice,
        pid,
        "alice's transaction must have been rolled back",
    )
    .await;
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

/// Alice leaves mid-statement: her backend `pid` must end, and bob, on
/// another one, finds none of her rows in `scratch` (`why` not). Bob's client.
async fn bob_after_alices_backend_ended(
    h: &Harness,
    admin: &Client,
    alice: impl Sized,
    pid: i32,
    why: &str,
) -> Client {
    drop(alice);
    wait_until_gone(admin, pid).await;
    let bob = h.connect_as("bob").await;
    assert_ne!(pid_of(&bob).await, pid);
    assert_eq!(
        value(&bob, "select count(*) from scratch").await.as_deref(),
        Some("0"),
        "{why}"
    );
    bob
}

/// A raw session of `sub` in the middle of `copy scratch from stdin`, and
/// its backend's pid.
async fn copying_in(h: &Harness, sub: &str) -> (RawSession, i32) {
    let mut session = h.raw_connect_as(sub).await;
    let pid = raw_pid(&mut session).await;
    session.send_query("copy scratch from stdin").await;
    let (kind, _) = wire::read_message(&mut session.stream).await.unwrap();
    assert_eq!(kind, b'G', "CopyInResponse");
    (session, pid)
}

#[tokio::test]
async fn a_client_that_leaves_mid_copy_never_has_its_backend_reused() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    let (mut alice, pid) = copying_in(&h, "alice").await;
    // Some data, then the client goes away without CopyDone or Terminate.
    wire::send(
        &mut alice.stream,
        &[b'd', 0, 0, 0, 10, b'1', b'\t', b'x', b'y', b'\n', b'2'],
    )
    .await;
    bob_after_alices_backend_ended(
        &h,
        &admin,
        alice,
        pid,
        "alice's copy must have been rolled back",
    )
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_cleanly_has_its_backend_reused() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    let alice = h.connect_as("alice").await;
    let pid = pid_of(&alice).await;
    alice
        .batch_execute("begin; insert into scratch values (1, 'kept'); commit;")
        .await
        .unwrap();
    drop(alice);
    h.wait_until_pooled(&admin, pid).await;

    let mut bob = h.raw_connect_as("bob").await;
    assert_eq!(
        bob.query_value("select pg_backend_pid()").await,
        Some(pid.to_string())
    );
    assert_eq!(
        bob.query_value("select auth.user_id()").await.as_deref(),
        Some("bob")
    );
    bob.terminate().await;
    h.wait_until_pooled(&admin, pid).await;
}

#[tokio::test]
async fn dead_pooled_connections_are_replaced_after_an_upstream_restart() {
    let mut h = Harness::start_alone_configured("", pooled).await;
    let admin = h.admin().await;

    // Three backends in the pool.
    let clients = [
        h.connect_as("alice").await,
        h.connect_as("bob").await,
        h.connect_as("carol").await,
    ];
    let mut pids = Vec::new();
    for client in &clients {
        pids.push(pid_of(client).await);
    }
    drop(clients);
    for pid in &pids {
        h.wait_until_pooled(&admin, *pid).await;
    }
    drop(admin);

    h.pg.restart().await.expect("restart PostgreSQL");

    for sub in ["dave", "erin", "frank", "grace"] {
        let client = h.connect_as(sub).await;
        assert_eq!(user_id_of(&client).await.as_deref(), Some(sub));
        assert!(!pids.contains(&pid_of(&client).await));
    }
}

#[tokio::test]
async fn reset_all_on_a_pooled_session_fails_closed() {
    let h = Harness::start_configured("", pooled).await;
    for reset in ["reset all", "reset rlsgate.session", "discard all"] {
        let client = h.connect_as("alice").await;
        assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
        client.batch_execute(reset).await.unwrap();
        let e = client
            .query_one("select auth.user_id()", &[])
            .await
            .expect_err("claims cleared by a reset must not read as no claims");
        assert_eq!(crate::support::db_error(&e).0, "28000", "after {reset}");
    }
}

/// What the backend itself says of every parameter the client was told of.
async fn check_greeting_matches_backend(
    session: &mut RawSession,
    status: &BTreeMap<String, String>,
) {
    for (name, told) in status {
        let actual = session
            .query_value(&format!("select current_setting('{name}')"))
            .await;
        assert_eq!(actual.as_deref(), Some(told.as_str()), "{name}");
    }
}

#[tokio::test]
async fn parameter_status_matches_the_backend() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    let (mut alice, status) = login_with(
        &h,
        "alice",
        &[
            ("application_name", "alice-app"),
            ("TimeZone", "Pacific/Auckland"),
            ("options", "-c DateStyle=German"),
        ],
    )
    .await;
    assert_eq!(status["application_name"], "alice-app");
    assert_eq!(status["TimeZone"], "Pacific/Auckland");
    assert!(status["DateStyle"].starts_with("German"), "{status:?}");
    check_greeting_matches_backend(&mut alice, &status).await;
    let pid = raw_pid(&mut alice).await;
    // Changed during the session, to what happens to be the default.
    alice.query("set TimeZone = 'UTC'").await.unwrap();
    alice.terminate().await;
    h.wait_until_pooled(&admin, pid).await;

    // The same backend, told its own values: none of alice's.
    let (mut bob, status) = login_with(&h, "bob", &[("application_name", "bob-app")]).await;
    assert_eq!(
        bob.query_value("select pg_backend_pid()").await,
        Some(pid.to_string())
    );
    assert_eq!(status["application_name"], "bob-app");
    assert!(!status["DateStyle"].starts_with("German"), "{status:?}");
    assert_ne!(status["TimeZone"], "Pacific/Auckland");
    check_greeting_matches_backend(&mut bob, &status).await;
    assert_eq!(
        bob.query_value("select auth.user_id()").await.as_deref(),
        Some("bob")
    );
}

#[tokio::test]
async fn the_envelope_never_appears_in_pg_stat_activity() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    // Alice on a new pooled backend, bob on the same one after her.
    for sub in ["alice", "bob"] {
        let client = h.connect_as(sub).await;
        // Before the client's first query, the backend's last one is the
        // bind. It is sent with the greeting, so the backend may still be
        // on its way to it when the client is greeted.
        let deadline = Instant::now() + WAIT;
        loop {
            let queries: Vec<String> = admin
                .query(
                    "select query from pg_stat_activity \
                     where usename = 'authenticated' and datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            if queries == ["select pg_catalog.set_config($1, $2, false)"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sub}'s claims are bound with parameters: {queries:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = pid_of(&client).await;
        let envelope = value(&client, "select current_setting('rlsgate.session')")
            .await
            .unwrap();
        assert!(envelope.len() > 40, "the session has an envelope");
        let mac = envelope.rsplit('.').next().unwrap().to_owned();
        let payload = envelope.split('.').nth(1).unwrap().to_owned();
        for part in [&envelope, &payload, &mac] {
            let seen: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity where strpos(query, $1) > 0",
                    &[part],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(seen, 0, "the envelope is visible in pg_stat_activity");
        }
        drop(client);
        h.wait_until_pooled(&admin, pid).await;
    }
}

#[tokio::test]
async fn startup_settings_a_pooled_connection_cannot_take_get_a_connection_of_its_own() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    // Settable only when a backend starts, so not by set_config.
    let mut config = h.client_config("authenticated", &h.token("alice"));
    config.options("-c ignore_system_indexes=on");
    let alice = crate::support::connect(&config)
        .await
        .expect("alice connects");
    assert_eq!(
        value(&alice, "show ignore_system_indexes").await.as_deref(),
        Some("on")
    );
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    let pid = pid_of(&alice).await;
    drop(alice);
    wait_until_gone(&admin, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_token_expiry_has_its_backend_closed_not_pooled() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    let token = h.token_with(
        rlsgate::dev::issuer::KeyKind::Rs256,
        serde_json::json!({"sub": "alice", "aud": "todo-app", "exp": crate::support::unix_now() + 2}),
    );
    let (alice, connection) = h
        .client_config("authenticated", &token)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let pid = pid_of(&alice).await;
    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the session ends after exp + leeway")
        .unwrap();
    let message =
        crate::support::refusal(&ended.expect_err("the proxy ends the session with an error"));
    assert!(message.starts_with("token expired at "), "{message}");
    wait_until_gone(&admin, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_clients_cancel_key_reaches_the_backend_it_was_lent() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    // Alice's backend goes back to the pool, and bob is lent it.
    let pid = alices_backend_returned(&h, &admin).await;
    let bob = h.connect_as("bob").await;
    assert_eq!(pid_of(&bob).await, pid);

    let token = bob.cancel_token();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let e = bob
        .simple_query("select pg_sleep(30)")
        .await
        .expect_err("the sleep is cancelled");
    assert_eq!(crate::support::db_error(&e).0, "57014");
    cancel.await.unwrap().expect("the cancel request is sent");
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn idle_pooled_connections_are_closed_after_idle_timeout() {
    let h = Harness::start_configured("", |c| {
        pooled(c);
        c.pool.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let admin = h.admin().await;

    let pid = alices_backend_returned(&h, &admin).await;
    // Closed by the pool's sweep, with nobody asking for a connection.
    wait_until_gone(&admin, pid).await;

    bob_on_another_backend_than(&h, pid, "").await;
}

#[tokio::test]
async fn a_connection_past_max_lifetime_is_closed_instead_of_reused() {
    let h = Harness::start_configured("", |c| {
        pooled(c);
        c.pool.max_lifetime = Duration::from_secs(1);
    })
    .await;
    let admin = h.admin().await;

    let alice = h.connect_as("alice").await;
    let pid = pid_of(&alice).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(alice);
    wait_until_gone(&admin, pid).await;

    bob_on_another_backend_than(&h, pid, "").await;
}

#[tokio::test]
async fn a_reload_that_leaves_upstream_and_pool_alone_keeps_the_warm_connections() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    let pid = alices_backend_returned(&h, &admin).await;

    h.reload_configured("[[provider]]\nissuer = \"https://other.example\"", pooled)
        .expect("reload");

    let bob = h.connect_as("bob").await;
    assert_eq!(pid_of(&bob).await, pid, "bob gets alice's warm backend");
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn a_reload_that_changes_the_pool_starts_a_new_one() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    let pid = alices_backend_returned(&h, &admin).await;

    h.reload_configured("", |c| {
        pooled(c);
        c.pool.size = 2;
    })
    .expect("reload");

    bob_on_another_backend_than(&h, pid, "the new pool has no warm backend yet").await;
}

/// A session whose last statement was a COPY FROM STDIN leaves its backend
/// idle, and so does one after an extended-protocol COPY (where the client
/// sends a Sync the server ignores during the copy): the backend goes back
/// to the pool and serves the next client, for each form of COPY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_reused_after_each_form_of_copy_from_stdin() {
    use futures_util::SinkExt;
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;

    // Simple protocol, as psql's \copy: Query, CopyData, CopyDone.
    let (mut alice, pid) = copying_in(&h, "alice").await;
    wire::send(
        &mut alice.stream,
        &[b'd', 0, 0, 0, 9, b'1', b'\t', b'x', b'y', b'\n'],
    )
    .await;
    wire::send(&mut alice.stream, &[b'c', 0, 0, 0, 4]).await;
    assert!(alice.read_result().await.is_ok(), "the COPY failed");
    alice.terminate().await;
    h.wait_until_pooled(&admin, pid).await;

    // Extended protocol, as libpq's PQexecParams and tokio-postgres do.
    let bob = h.connect_as("bob").await;
    assert_eq!(
        pid_of(&bob).await,
        pid,
        "the backend came back after a simple COPY"
    );
    let sink = bob.copy_in("copy scratch from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"2\tz\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
    drop(bob);
    h.wait_until_pooled(&admin, pid).await;

    // psql's \copy, ending the session right after it.
    let carol = h.token("carol");
    h.psql_ok(
        "authenticated",
        &carol,
        "\\copy scratch (id) from program 'echo 3'",
    );
    h.wait_until_pooled(&admin, pid).await;
    let dave = h.connect_as("dave").await;
    assert_eq!(
        pid_of(&dave).await,
        pid,
        "the backend came back after the COPYs"
    );
    assert_eq!(
        value(&dave, "select count(*) from scratch")
            .await
            .as_deref(),
        Some("3")
    );
}

/// What a client read, by type and body, after sending its startup packet
/// (`parameters` besides user and database), its password (`sub`'s token)
/// and `sql` in one write, as the serverless driver does: everything up to
/// the second ReadyForQuery (the greeting's, then its query's), or up to
/// the end of the stream. The stream, for more.
async fn all_in_one_write(
    h: &Harness,
    sub: &str,
    parameters: &[(&str, &str)],
    sql: &str,
) -> (Vec<(u8, Vec<u8>)>, tokio::net::TcpStream) {
    let mut startup = wire::APP_STARTUP.to_vec();
    startup.extend_from_slice(parameters);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", h.port()))
        .await
        .unwrap();
    let mut write = wire::startup_message(&startup);
    write.extend(wire::password_message(&h.token(sub)));
    write.extend(wire::query_message(sql));
    wire::send(&mut stream, &write).await;
    let mut read = Vec::new();
    let mut readies = 0;
    while readies < 2 {
        let next = tokio::time::timeout(WAIT, wire::read_message(&mut stream))
            .await
            .unwrap_or_else(|_| panic!("{sub}: no answer within {WAIT:?} after {read:?}"));
        let Ok((kind, body)) = next else { break };
        readies += usize::from(kind == b'Z');
        read.push((kind, body));
    }
    (read, stream)
}

/// The types of `messages`, ParameterStatus and notices left out.
fn kinds(messages: &[(u8, Vec<u8>)]) -> String {
    messages
        .iter()
        .map(|(kind, _)| char::from(*kind))
        .filter(|kind| !matches!(kind, 'S' | 'N'))
        .collect()
}

/// The first value of each DataRow in `messages`.
fn values(messages: &[(u8, Vec<u8>)]) -> Vec<Option<String>> {
    messages
        .iter()
        .filter(|(kind, _)| *kind == b'D')
        .map(|(_, body)| wire::data_row(body).into_iter().next().unwrap())
        .collect()
}

/// `sub`'s startup, password and `select` of the todos it may see, in one
/// write: the client's first statement must see its claims (RLS lets it see
/// its own todo and no other), and read exactly its own answer: the
/// greeting, then one RowDescription, DataRow, CommandComplete and
/// ReadyForQuery, nothing of the bind's. Then one more query, and the end:
/// nothing else arrives. The backend's pid.
async fn first_statement_sees_claims(h: &Harness, sub: &str, parameters: &[(&str, &str)]) -> i32 {
    let sql = "select string_agg(title, ',') || ' ' || pg_backend_pid() from todos";
    let (read, mut stream) = all_in_one_write(h, sub, parameters, sql).await;
    assert_eq!(kinds(&read), "RRKZTDCZ", "{sub}: {read:?}");
    let value = values(&read).remove(0).unwrap();
    let (titles, pid) = value.rsplit_once(' ').unwrap();
    assert_eq!(
        titles,
        format!("{sub}'s todo"),
        "{sub} sees only their own todo"
    );
    wire::send(&mut stream, &wire::query_message("select 1")).await;
    let mut more = Vec::new();
    while more.last().is_none_or(|(kind, _)| *kind != b'Z') {
        more.push(wire::read_message(&mut stream).await.unwrap());
    }
    assert_eq!(kinds(&more), "TDCZ", "{sub}: {more:?}");
    wire::send(&mut stream, &wire::terminate_message()).await;
    let after = tokio::time::timeout(WAIT, wire::read_message(&mut stream))
        .await
        .expect("the session ends after Terminate");
    assert!(
        after.is_err(),
        "{sub}: nothing after the last answer: {after:?}"
    );
    pid.parse().unwrap()
}

/// A todo of each of these users, written past RLS by the superuser.
async fn todos_of(admin: &Client, subs: &[&str]) {
    for sub in subs {
        admin
            .execute(
                "insert into todos (user_id, title) values ($1, $1 || '''s todo')",
                &[sub],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_pooled_clients_first_statement_sent_with_its_startup_sees_its_claims() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    todos_of(&admin, &["alice", "bob", "carol"]).await;

    // A new backend, then the same one from the pool.
    let pid = first_statement_sees_claims(&h, "alice", &[]).await;
    h.wait_until_pooled(&admin, pid).await;
    assert_eq!(first_statement_sees_claims(&h, "bob", &[]).await, pid);
    h.wait_until_pooled(&admin, pid).await;

    // Startup settings: the first client with them waits for the bind's
    // answer; the next has its bind sent ahead of its greeting.
    let settings = [
        ("application_name", "carol-app"),
        ("TimeZone", "Asia/Tokyo"),
    ];
    for _ in 0..2 {
        assert_eq!(
            first_statement_sees_claims(&h, "carol", &settings).await,
            pid
        );
        h.wait_until_pooled(&admin, pid).await;
    }
}

#[tokio::test]
async fn a_greeting_sent_ahead_of_the_bind_tells_the_clients_own_settings() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    let settings = [
        ("application_name", "alice-app"),
        ("TimeZone", "Pacific/Auckland"),
        ("options", "-c DateStyle=German"),
    ];
    // Told by the bind's answer, then ahead of it, on the same backend.
    let mut pid = None;
    for sub in ["alice", "bob"] {
        let (mut session, status) = login_with(&h, sub, &settings).await;
        assert_eq!(status["application_name"], "alice-app");
        assert_eq!(status["TimeZone"], "Pacific/Auckland");
        assert!(status["DateStyle"].starts_with("German"), "{status:?}");
        check_greeting_matches_backend(&mut session, &status).await;
        let this = raw_pid(&mut session).await;
        assert_eq!(*pid.get_or_insert(this), this, "{sub} on the same backend");
        assert_eq!(
            session
                .query_value("select auth.user_id()")
                .await
                .as_deref(),
            Some(sub)
        );
        session.terminate().await;
        h.wait_until_pooled(&admin, this).await;
    }
}

#[tokio::test]
async fn an_idle_connection_whose_backend_was_terminated_is_replaced_invisibly() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    todos_of(&admin, &["bob"]).await;

    let pid = alices_backend_returned(&h, &admin).await;
    let terminated: bool = admin
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    wait_until_gone(&admin, pid).await;

    // No error: bob's statement, sent with his startup, runs on a new backend.
    assert_ne!(first_statement_sees_claims(&h, "bob", &[]).await, pid);
}

#[tokio::test]
async fn settings_refused_after_a_connection_took_them_fail_the_client_before_its_statement_runs() {
    let h = Harness::start_configured("", pooled).await;
    let admin = h.admin().await;
    admin
        .batch_execute("create text search configuration public.pipelined (copy = english)")
        .await
        .unwrap();
    let options = ("options", "-c default_text_search_config=public.pipelined");

    // Alice's bind waits for its answer, which says the setting was taken;
    // bob's goes ahead of his greeting.
    let mut pid = None;
    for sub in ["alice", "bob"] {
        let (mut session, _) = login_with(&h, sub, &[options]).await;
        let this = raw_pid(&mut session).await;
        assert_eq!(*pid.get_or_insert(this), this, "{sub} on the same backend");
        assert_eq!(
            session
                .query_value("show default_text_search_config")
                .await
                .as_deref(),
            Some("public.pipelined")
        );
        session.terminate().await;
        h.wait_until_pooled(&admin, this).await;
    }
    let pid = pid.unwrap();

    admin
        .batch_execute("drop text search configuration public.pipelined")
        .await
        .unwrap();
    // Carol is greeted, then refused; her statement never ran, and the
    // backend is closed, not pooled.
    let insert = "insert into scratch values (7, 'carol was here')";
    let (read, _stream) = all_in_one_write(&h, "carol", &[options], insert).await;
    assert_eq!(kinds(&read), "RRKZE", "{read:?}");
    let error = wire::error_response(&read.last().unwrap().1);
    assert_eq!(
        (error.severity.as_str(), error.code.as_str()),
        ("FATAL", "08006"),
        "{error:?}"
    );
    assert_eq!(
        error.message,
        "the database is unavailable; try again later"
    );
    wait_until_gone(&admin, pid).await;
    let rows: i64 = admin
        .query_one("select count(*) from scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "carol's statement must not have run");

    // Dave's bind waits for its answer again, and a connection of his own
    // is refused the setting, as without a pool.
    let mut config = h.client_config("authenticated", &h.token("dave"));
    config.options("-c default_text_search_config=public.pipelined");
    let e = crate::support::connect(&config)
        .await
        .expect_err("the setting is refused");
    let (code, message) = crate::support::db_error(&e);
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("default_text_search_config"), "{message}");
}

/// With `[listen] workers = 0` every session runs on the one shared
/// multi-threaded runtime (as before worker threads): claims, pooling and
/// cancel work there as on the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_worker_threads_sessions_share_one_runtime_and_pool_and_cancel_as_before() {
    let h = Harness::start_configured("", |config| {
        pooled(config);
        config.listen.workers = Some(0);
    })
    .await;
    let admin = h.admin().await;
    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    let pid = pid_of(&alice).await;

    let token = alice.cancel_token();
    let canceller = {
        let admin = h.admin().await;
        tokio::spawn(async move {
            let deadline = Instant::now() + WAIT;
            while admin
                .query_one(
                    "select count(*) from pg_stat_activity \
                     where pid = $1 and state = 'active' and query like '%pg_sleep(30)%'",
                    &[&pid],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
            {
                assert!(Instant::now() < deadline, "the query never started");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            token.cancel_query(tokio_postgres::NoTls).await
        })
    };
    let err = alice
        .batch_execute("select pg_sleep(30)")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    canceller
        .await
        .unwrap()
        .expect("the cancel request is sent");
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    drop(alice);
    h.wait_until_pooled(&admin, pid).await;
    let bob = h.connect_as("bob").await;
    assert_eq!(pid_of(&bob).await, pid, "the backend is pooled");
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}
