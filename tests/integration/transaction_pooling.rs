//! `[pool] mode = "transaction"`: a client holds a backend only while a
//! transaction runs, its claims are bound to that backend for exactly that
//! transaction, and no session state crosses from one client to the next
//! (README's state table for transaction pooling is the contract).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::{join, try_join_all};
use postgres_protocol::message::frontend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use crate::support::wire::{self, RawSession};
use crate::support::{
    Harness, WAIT, connect, db_error, envelope_payload, http_get, login_with, metric, refusal,
    simple_rows, unix_now, user_id_of,
};

/// Transaction pooling over at most `size` backends, as `[pool]` lines.
fn transaction_mode(size: usize) -> String {
    format!("[pool]\nmode = \"transaction\"\nsize = {size}\n")
}

async fn start(size: usize) -> Harness {
    Harness::start_with(&transaction_mode(size)).await
}

/// The rows of a simple query, as text; its failing is a failure.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    simple_rows(&messages)
}

/// The first value of the first row of a simple query.
async fn value(client: &Client, sql: &str) -> Option<String> {
    rows(client, sql)
        .await
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql} returned no row"))
        .into_iter()
        .next()
        .unwrap()
}

async fn pid_of(client: &Client) -> i32 {
    let pid = value(client, "select pg_backend_pid()").await;
    pid.and_then(|pid| pid.parse().ok()).expect("a backend pid")
}

/// The SQLSTATE and message `sql` fails with; its succeeding is a failure.
async fn error_of(client: &Client, sql: &str) -> (String, String) {
    match client.simple_query(sql).await {
        Ok(_) => panic!("{sql} must fail"),
        Err(e) => db_error(&e),
    }
}

/// `sql` is refused as transaction pooling refuses session state: 0A000,
/// with a message that says why.
fn assert_refused((code, message): &(String, String), sql: &str) {
    assert_eq!(code, "0A000", "{sql}: {message}");
    assert!(
        message.to_lowercase().contains("transaction pooling"),
        "{sql}: the message must name transaction pooling: {message}"
    );
}

/// `sql`, outside a transaction, is refused and the connection stays usable.
async fn refused(client: &Client, sql: &str) {
    assert_refused(&error_of(client, sql).await, sql);
    assert_eq!(
        value(client, "select 'still usable'").await.as_deref(),
        Some("still usable"),
        "after {sql}"
    );
}

/// `sql`, inside a transaction block, is refused and aborts the transaction
/// as any error would: 25P02 until ROLLBACK, then the connection works.
async fn refused_in_a_transaction(client: &Client, sql: &str) {
    client.batch_execute("begin").await.unwrap();
    assert_refused(&error_of(client, sql).await, sql);
    let (code, message) = error_of(client, "select 1").await;
    assert_eq!(code, "25P02", "after {sql} in a transaction: {message}");
    client.batch_execute("rollback").await.unwrap();
    assert_eq!(
        value(client, "select 'still usable'").await.as_deref(),
        Some("still usable")
    );
}

/// [`refused`] and [`refused_in_a_transaction`] by the extended protocol,
/// as drivers send statements.
async fn refused_by_the_extended_protocol(client: &mut Client, sql: &str) {
    let e = client.execute(sql, &[]).await.expect_err(sql);
    assert_refused(&db_error(&e), sql);
    let tx = client.transaction().await.unwrap();
    let e = tx.execute(sql, &[]).await.expect_err(sql);
    assert_refused(&db_error(&e), sql);
    let e = tx.execute("select 1", &[]).await.expect_err("aborted");
    assert_eq!(db_error(&e).0, "25P02", "after {sql} in a transaction");
    tx.rollback().await.unwrap();
    let row = client
        .query_one("select 'still usable'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "still usable", "after {sql}");
}

/// Begins a transaction in each of `holders` until one runs on backend
/// `pid`, and commits the others: that one holds the backend until it
/// commits. Its index.
async fn hold_backend(holders: &[Client], pid: i32) -> usize {
    let mut others = Vec::new();
    let mut found = None;
    for (i, holder) in holders.iter().enumerate() {
        holder.batch_execute("begin").await.unwrap();
        if pid_of(holder).await == pid {
            found = Some(i);
            break;
        }
        others.push(holder);
    }
    for other in others {
        other.batch_execute("commit").await.unwrap();
    }
    found.unwrap_or_else(|| {
        panic!(
            "none of {} clients in a transaction ran on backend {pid}: more backends than [pool] size?",
            holders.len()
        )
    })
}

/// What a background task saw in pg_stat_activity of the test's database
/// while it ran: the most backends of the proxy's upstream user open at
/// once, and every query text.
struct Watched {
    most_backends: i64,
    queries: BTreeSet<String>,
}

struct Watch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Watched>,
}

impl Watch {
    async fn start(h: &Harness) -> Watch {
        let admin = h.admin().await;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let statement = admin
                .prepare(
                    "select usename::text, query from pg_stat_activity \
                     where datname = current_database() and pid <> pg_backend_pid()",
                )
                .await
                .unwrap();
            let mut watched = Watched {
                most_backends: 0,
                queries: BTreeSet::new(),
            };
            while !stopped.load(Ordering::Relaxed) {
                let rows = admin.query(&statement, &[]).await.unwrap();
                let backends = rows
                    .iter()
                    .filter(|r| r.get::<_, Option<String>>(0).as_deref() == Some("authenticated"))
                    .count();
                watched.most_backends = watched.most_backends.max(backends as i64);
                watched
                    .queries
                    .extend(rows.iter().filter_map(|r| r.get::<_, Option<String>>(1)));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            watched
        });
        Watch { stop, task }
    }

    async fn stop(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the pg_stat_activity watch")
    }
}

// Isolation under interleaving.

const CLIENTS: usize = 500;
const POOL_SIZE: usize = 10;
/// Operations each client runs, besides its last read.
const ROUNDS: usize = 10;
const SEED: u64 = 14;

/// One interleaving client: who it is, and the titles of the rows it
/// committed (each `SUB #N`), which it, and only it, must read back.
struct Own {
    sub: String,
    rows: BTreeSet<String>,
    written: usize,
}

impl Own {
    fn title(&mut self) -> String {
        self.written += 1;
        format!("{} #{}", self.sub, self.written)
    }

    /// `read` (user_id, title, auth.user_id()) are exactly this client's
    /// committed rows and `pending`, and the claims were its own.
    fn check(&self, read: &[[Option<String>; 3]], pending: &[&String], what: &str) {
        let mut titles = BTreeSet::new();
        for [owner, title, claimed] in read {
            assert_eq!(
                (owner.as_ref(), claimed.as_ref()),
                (Some(&self.sub), Some(&self.sub)),
                "{what}: {} read {title:?} with these owner and claims",
                self.sub
            );
            titles.insert(title.clone().unwrap());
        }
        let mut expected = self.rows.clone();
        expected.extend(pending.iter().map(|t| t.to_string()));
        assert_eq!(titles, expected, "{what}: what {} read", self.sub);
    }
}

fn three(row: &tokio_postgres::Row) -> [Option<String>; 3] {
    [row.get(0), row.get(1), row.get(2)]
}

fn three_text(row: Vec<Option<String>>) -> [Option<String>; 3] {
    row.try_into().expect("three columns")
}

const READ_ALL: &str = "select user_id, title, auth.user_id() from todos";

/// A single statement, simple protocol.
async fn one_statement(client: &Client, own: &mut Own) {
    let title = own.title();
    let sql =
        format!("insert into todos (title) values ('{title}') returning user_id, auth.user_id()");
    let sub = Some(own.sub.clone());
    assert_eq!(rows(client, &sql).await, [[sub.clone(), sub]], "{sql}");
    own.rows.insert(title);
}

/// A transaction of several statements, extended protocol.
async fn multi_statement_transaction(client: &mut Client, own: &mut Own) {
    let (first, second) = (own.title(), own.title());
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "insert into todos (title) values ($1), ($2)",
        &[&first, &second],
    )
    .await
    .unwrap();
    let read: Vec<_> = tx.query(READ_ALL, &[]).await.unwrap();
    own.check(
        &read.iter().map(three).collect::<Vec<_>>(),
        &[&first, &second],
        "in a transaction",
    );
    tx.commit().await.unwrap();
    own.rows.extend([first, second]);
}

/// A whole transaction in one simple Query message.
async fn transaction_in_one_message(client: &Client, own: &mut Own) {
    let title = own.title();
    let sql = format!("begin; insert into todos (title) values ('{title}'); {READ_ALL}; commit");
    let read: Vec<_> = rows(client, &sql)
        .await
        .into_iter()
        .map(three_text)
        .collect();
    own.check(&read, &[&title], "in a one-message transaction");
    own.rows.insert(title);
}

/// `count` inserts with a prepared statement and an unprepared read of the
/// claims, pipelined: all sent before the first answer is read.
async fn pipelined_batch(client: &Client, insert: &Statement, own: &mut Own, count: usize) {
    let titles: Vec<String> = (0..count).map(|_| own.title()).collect();
    let params: Vec<[&(dyn ToSql + Sync); 1]> =
        titles.iter().map(|t| [t as &(dyn ToSql + Sync)]).collect();
    let inserts = try_join_all(params.iter().map(|p| client.query_one(insert, p)));
    let claims = client.query_one("select auth.user_id()", &[]);
    let (inserted, claims) = join(inserts, claims).await;
    for row in inserted.expect("the pipelined inserts") {
        assert_eq!(row.get::<_, String>(0), own.sub, "an insert's owner");
    }
    assert_eq!(claims.unwrap().get::<_, String>(0), own.sub);
    own.rows.extend(titles);
}

/// A transaction rolled back by the client, or aborted by an error and
/// then rolled back; either way nothing of it stays.
async fn rolled_back(client: &mut Client, own: &mut Own, by_error: bool) {
    let title = format!("{} rolled back", own.sub);
    if by_error {
        let sql = format!("begin; insert into todos (title) values ('{title}'); select 1/0");
        assert_eq!(error_of(client, &sql).await.0, "22012");
        assert_eq!(error_of(client, READ_ALL).await.0, "25P02");
        client.batch_execute("rollback").await.unwrap();
    } else {
        let tx = client.transaction().await.unwrap();
        tx.execute("insert into todos (title) values ($1)", &[&title])
            .await
            .unwrap();
        let read: Vec<_> = tx.query(READ_ALL, &[]).await.unwrap();
        own.check(
            &read.iter().map(three).collect::<Vec<_>>(),
            &[&title],
            "before a rollback",
        );
        tx.rollback().await.unwrap();
    }
}

/// Reads every row the client may see, in either protocol.
async fn reads_its_own(client: &Client, own: &Own, extended: bool) {
    let read: Vec<_> = if extended {
        let read = client.query(READ_ALL, &[]).await.unwrap();
        read.iter().map(three).collect()
    } else {
        rows(client, READ_ALL)
            .await
            .into_iter()
            .map(three_text)
            .collect()
    };
    own.check(&read, &[], "a read");
}

/// One of the interleaving clients, `index`: a seeded random mix of
/// operations. Who it is and the rows it committed.
async fn interleaving_client(config: tokio_postgres::Config, index: usize) -> Own {
    let mut own = Own {
        sub: format!("client-{index:03}"),
        rows: BTreeSet::new(),
        written: 0,
    };
    let mut client = connect(&config)
        .await
        .unwrap_or_else(|e| panic!("{} connects: {e}", own.sub));
    let insert = client
        .prepare("insert into todos (title) values ($1) returning user_id")
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(SEED + index as u64);
    for _ in 0..ROUNDS {
        match rng.random_range(0..7) {
            0 => one_statement(&client, &mut own).await,
            1 => multi_statement_transaction(&mut client, &mut own).await,
            2 => transaction_in_one_message(&client, &mut own).await,
            3 => pipelined_batch(&client, &insert, &mut own, rng.random_range(2..6)).await,
            4 => rolled_back(&mut client, &mut own, rng.random_bool(0.5)).await,
            _ => reads_its_own(&client, &own, rng.random_bool(0.5)).await,
        }
    }
    reads_its_own(&client, &own, true).await;
    own
}

/// Every row in `todos`, read as superuser, by owner; a row whose title
/// names another writer than its owner, or no writer, is a failure.
async fn stored_rows_by_owner(admin: &Client) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_owner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in admin
        .query("select user_id, title from todos", &[])
        .await
        .unwrap()
    {
        let (owner, title): (String, String) = (row.get(0), row.get(1));
        let writer = title
            .rsplit_once(" #")
            .unwrap_or_else(|| panic!("a row that must not be there: {title:?} of {owner}"))
            .0;
        assert_eq!(owner, writer, "{title:?} is owned by {owner}");
        by_owner.entry(owner).or_default().insert(title);
    }
    by_owner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_interleaved_clients_on_ten_backends_only_ever_read_and_write_their_own_rows()
{
    let h = Harness::start_with(&format!(
        "[listen]\nmax_startups = {CLIENTS}\nmax_startups_per_address = {CLIENTS}\n{}",
        transaction_mode(POOL_SIZE)
    ))
    .await;
    let admin = h.admin().await;
    let watch = Watch::start(&h).await;

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let token = h.token(&format!("client-{i:03}"));
            tokio::spawn(interleaving_client(
                h.client_config("authenticated", &token),
                i,
            ))
        })
        .collect();
    let mut committed = BTreeMap::new();
    for client in clients {
        let own = client.await.expect("an interleaving client");
        committed.insert(own.sub, own.rows);
    }
    let watched = watch.stop().await;

    let stored = stored_rows_by_owner(&admin).await;
    for (sub, rows) in &committed {
        let empty = BTreeSet::new();
        assert_eq!(stored.get(sub).unwrap_or(&empty), rows, "{sub}'s rows");
    }
    assert!(
        stored.keys().all(|owner| committed.contains_key(owner)),
        "rows of nobody who wrote: {:?}",
        stored.keys().collect::<Vec<_>>()
    );
    assert!(committed.values().map(BTreeSet::len).sum::<usize>() > CLIENTS);
    assert!(
        (1..=POOL_SIZE as i64).contains(&watched.most_backends),
        "{} backends open at once for [pool] size = {POOL_SIZE}",
        watched.most_backends
    );
}

// State does not cross.

/// Session state a client can change, then the backend it was read on.
const PROBE: &str = "select current_setting('search_path'), current_user::text, \
    current_setting('TimeZone'), current_setting('application_name'), \
    current_setting('statement_timeout'), current_setting('DateStyle'), \
    pg_backend_pid()::text";

/// The state `PROBE` reads, and the backend pid.
async fn probe(client: &Client) -> (Vec<Option<String>>, i32) {
    let mut row = rows(client, PROBE).await.remove(0);
    let pid = row.pop().unwrap().unwrap().parse().unwrap();
    (row, pid)
}

fn texts(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

/// `a`'s state (`a_sees`, which differs from what a fresh client sees,
/// `baseline`, in at least five values) follows it and nobody else sees it: with a
/// pool of two, another client on the backend `a` used last sees
/// `baseline`, while `a`, on the other backend, sees `a_sees`.
async fn state_follows_its_client_only(
    h: &Harness,
    a: &Client,
    a_sees: &[Option<String>],
    baseline: &[Option<String>],
) {
    let changed = a_sees.iter().zip(baseline).filter(|(a, b)| a != b);
    assert!(changed.count() >= 5, "{a_sees:?} / {baseline:?}");
    let (seen, last) = probe(a).await;
    assert_eq!(seen, a_sees, "the client on its next transaction");

    let holders = [h.connect_as("bob").await, h.connect_as("carol").await];
    let holder = &holders[hold_backend(&holders, last).await];
    let (seen, pid) = probe(holder).await;
    assert_eq!(pid, last, "another client on the backend it used");
    assert_eq!(seen, baseline, "another client on the backend it used");

    let (seen, pid) = probe(a).await;
    assert_ne!(pid, last, "the other backend, while its last one is held");
    assert_eq!(seen, a_sees, "the client on another backend");
    holder.batch_execute("commit").await.unwrap();

    for other in &holders {
        assert_eq!(probe(other).await.0, baseline, "another client, later");
    }
}

#[tokio::test]
async fn set_and_reset_follow_their_client_to_every_backend_and_reach_nobody_else() {
    // Alone: it grants a role to `authenticated`, which other tests share.
    let h = Harness::start_alone(&transaction_mode(2)).await;
    h.admin()
        .await
        .batch_execute("create role helper; grant helper to authenticated;")
        .await
        .unwrap();
    let (baseline, _) = probe(&h.connect_as("dave").await).await;

    let alice = h.connect_as("alice").await;
    alice
        .batch_execute(
            "set search_path = private, public; set role helper; \
             set TimeZone = 'Pacific/Auckland'; set application_name = 'alice-app'; \
             set statement_timeout = '123s'; set DateStyle = German;",
        )
        .await
        .unwrap();
    let mine = texts(&[
        "private, public",
        "helper",
        "Pacific/Auckland",
        "alice-app",
        "123s",
        "German, DMY",
    ]);
    state_follows_its_client_only(&h, &alice, &mine, &baseline).await;

    // What she resets is reset wherever she runs next, and she alone.
    alice
        .batch_execute("reset role; reset TimeZone; set application_name to default")
        .await
        .unwrap();
    let mut after = mine.clone();
    after[1] = baseline[1].clone();
    after[2] = baseline[2].clone();
    after[3] = baseline[3].clone();
    for _ in 0..3 {
        assert_eq!(probe(&alice).await.0, after, "after RESET");
    }
    alice.batch_execute("reset all").await.unwrap();
    assert_eq!(probe(&alice).await.0, baseline, "after RESET ALL");
    // RESET ALL clears the claims too: they may be bound again, or fail
    // closed, but never read as anyone else's or as none.
    match alice.query_one("select auth.user_id()", &[]).await {
        Ok(row) => assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("alice")),
        Err(e) => assert_eq!(db_error(&e).0, "28000", "{e}"),
    }
}

#[tokio::test]
async fn set_sent_with_the_extended_protocol_or_in_another_syntax_follows_its_client_too() {
    let (_h, alice, bob) = two_on_one_backend().await;
    const SEEN: &str = "select current_setting('TimeZone') || '|' \
        || current_setting('default_transaction_isolation') || '|' \
        || current_setting('application_name')";
    let fresh = value(&bob, SEEN).await.unwrap();
    let mine = "Asia/Tokyo|repeatable read|alice-app";
    assert_ne!(fresh, mine);

    // Prepared in one transaction, run in the next: a Parse, then a Bind.
    let zone = alice.prepare("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    alice.execute(&zone, &[]).await.unwrap();
    alice
        .execute(
            "set session characteristics as transaction isolation level repeatable read",
            &[],
        )
        .await
        .unwrap();
    alice
        .query_one("select set_config('application_name', $1, false)", &[&"x"])
        .await
        .unwrap();
    alice
        .execute("set application_name = 'alice-app'", &[])
        .await
        .unwrap();
    for _ in 0..2 {
        same_backend(&alice, &bob).await;
        assert_eq!(value(&bob, SEEN).await.unwrap(), fresh, "bob");
        assert_eq!(value(&alice, SEEN).await.as_deref(), Some(mine), "alice");
    }
}

#[tokio::test]
async fn startup_parameters_and_options_follow_their_client_to_every_backend_and_reach_nobody_else()
{
    let h = start(2).await;
    let (baseline, _) = probe(&h.connect_as("dave").await).await;
    let mut config = h.client_config("authenticated", &h.token("alice"));
    config.application_name("alice-app").options(
        "-c search_path=private -c TimeZone=Asia/Tokyo -c statement_timeout=77s -c DateStyle=German",
    );
    let alice = connect(&config).await.expect("alice connects");
    // Everything but the role, which startup settings cannot change.
    let mut mine = texts(&[
        "private",
        "",
        "Asia/Tokyo",
        "alice-app",
        "77s",
        "German, DMY",
    ]);
    mine[1] = baseline[1].clone();
    state_follows_its_client_only(&h, &alice, &mine, &baseline).await;
}

/// The name and value of a ParameterStatus body.
fn parameter_status(body: &[u8]) -> (String, String) {
    let mut parts = body.split(|&b| b == 0).map(String::from_utf8_lossy);
    let name = parts.next().unwrap().into_owned();
    (name, parts.next().unwrap_or_default().into_owned())
}

/// Runs `sql` by hand: its first value, and every ParameterStatus that came
/// with the answer.
async fn query_with_reports(session: &mut RawSession, sql: &str) -> (Option<String>, Vec<String>) {
    session.send_query(sql).await;
    let (mut first, mut reports) = (None, Vec::new());
    loop {
        let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(&mut session.stream))
            .await
            .expect("an answer in time")
            .unwrap();
        match kind {
            b'D' if first.is_none() => first = wire::data_row(&body).remove(0),
            b'S' => {
                let (name, value) = parameter_status(&body);
                reports.push(format!("{name}={value}"));
            }
            b'E' => panic!("{sql}: {:?}", wire::error_response(&body)),
            b'Z' => return (first, reports),
            _ => {}
        }
    }
}

#[tokio::test]
async fn each_greeting_tells_its_clients_own_settings_and_no_report_tells_another_clients() {
    let h = start(1).await;
    let alices = [
        ("application_name", "alice-app"),
        ("TimeZone", "Asia/Tokyo"),
        ("options", "-c DateStyle=German"),
    ];
    let (mut alice, greeting) = login_with(&h, "alice", &alices).await;
    assert_eq!(greeting["application_name"], "alice-app");
    assert_eq!(greeting["TimeZone"], "Asia/Tokyo");
    assert!(greeting["DateStyle"].starts_with("German"), "{greeting:?}");
    for (name, told) in &greeting {
        let sql = format!("select current_setting('{name}')");
        assert_eq!(
            query_with_reports(&mut alice, &sql).await.0.as_deref(),
            Some(told.as_str())
        );
    }

    let (mut bob, greeting) = login_with(&h, "bob", &[("application_name", "bob-app")]).await;
    assert_eq!(greeting["application_name"], "bob-app");
    assert_ne!(greeting["TimeZone"], "Asia/Tokyo");
    assert!(!greeting["DateStyle"].starts_with("German"), "{greeting:?}");
    // Taking turns on the one backend, each is told only of its own.
    for _ in 0..3 {
        let (who, reports) = query_with_reports(&mut bob, "select auth.user_id()").await;
        assert_eq!(who.as_deref(), Some("bob"));
        for report in &reports {
            assert!(
                !report.contains("alice")
                    && !report.contains("Tokyo")
                    && !report.contains("German"),
                "bob was told of alice's setting: {report}"
            );
        }
        let (zone, _) = query_with_reports(&mut alice, "show TimeZone").await;
        assert_eq!(zone.as_deref(), Some("Asia/Tokyo"));
    }
}

/// Alice and bob on a pool of one backend.
async fn two_on_one_backend() -> (Harness, Client, Client) {
    let h = start(1).await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    (h, alice, bob)
}

/// Bob runs on the backend alice ran on last.
async fn same_backend(alice: &Client, bob: &Client) {
    let pid = pid_of(alice).await;
    assert_eq!(pid_of(bob).await, pid, "bob on alice's backend");
}

#[tokio::test]
async fn set_config_and_set_in_a_function_last_the_transaction_and_never_reach_another_client() {
    let (h, alice, bob) = two_on_one_backend().await;
    create_sneak(&h).await;
    const SEEN: &str = "select coalesce(current_setting('app.tenant', true), '') \
        || '|' || current_setting('search_path') || '|' || current_setting('application_name')";
    let fresh = value(&bob, SEEN).await;

    // Local settings: the transaction, as in Postgres.
    alice
        .batch_execute(
            "begin; set local search_path = private; \
             select set_config('app.tenant', 'local', true);",
        )
        .await
        .unwrap();
    let inside = value(&alice, SEEN).await.unwrap();
    assert!(inside.starts_with("local|private|"), "{inside}");
    alice.batch_execute("commit").await.unwrap();
    assert_eq!(value(&alice, SEEN).await, fresh, "after the transaction");

    // Session-level, but not by SET: never another client's. (Alice on
    // the same backend may see it or not.)
    rows(
        &alice,
        "select set_config('app.tenant', 'alice', false), \
         set_config('search_path', 'sneaky, public', false), public.sneak()",
    )
    .await;
    same_backend(&alice, &bob).await;
    assert_eq!(
        value(&bob, SEEN).await,
        fresh,
        "bob after alice's set_config"
    );
}

/// `public.sneak()`, a function that sets application_name to
/// `sneaky-app` for the session, by a SET of its own.
async fn create_sneak(h: &Harness) {
    h.admin()
        .await
        .batch_execute(
            "create function public.sneak() returns void language plpgsql as \
             $$ begin set application_name = 'sneaky-app'; end $$;
             grant execute on function public.sneak() to authenticated;",
        )
        .await
        .unwrap();
}

/// After a transaction that ran `SET`, the proxy reads the session's
/// settings back: what `set_config` and a function's own `SET` left in that
/// same transaction follows the client too (README), and still reaches
/// nobody else.
#[tokio::test]
async fn set_config_beside_a_set_follows_its_client_like_the_set_and_reaches_nobody_else() {
    let h = start(2).await;
    create_sneak(&h).await;
    let alice = h.connect_as("alice").await;
    let holders = [h.connect_as("bob").await, h.connect_as("carol").await];
    const SEEN: &str = "select current_setting('search_path') || '|' \
        || current_setting('TimeZone') || '|' || current_setting('application_name')";
    let fresh = value(&holders[0], SEEN).await.unwrap();
    assert!(!fresh.contains("Asia/Tokyo"), "{fresh}");

    alice
        .batch_execute(
            "begin; set TimeZone = 'Asia/Tokyo'; \
             select set_config('search_path', 'sneaky, public', false), public.sneak(); commit",
        )
        .await
        .unwrap();
    let last = pid_of(&alice).await;
    let held = hold_backend(&holders, last).await;
    assert_eq!(value(&holders[held], SEEN).await.unwrap(), fresh, "bob");
    assert_ne!(pid_of(&alice).await, last);
    assert_eq!(
        value(&alice, SEEN).await.as_deref(),
        Some("sneaky, public|Asia/Tokyo|sneaky-app"),
        "alice's next transaction, on another backend"
    );
    holders[held].batch_execute("commit").await.unwrap();
}

#[tokio::test]
async fn a_startup_setting_postgres_refuses_refuses_the_login_with_its_own_error() {
    let h = start(1).await;
    let mut config = h.client_config("authenticated", &h.token("alice"));
    config.options("-c statement_timeout=banana");
    let e = connect(&config)
        .await
        .expect_err("statement_timeout=banana is refused");
    let (code, message) = db_error(&e);
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("statement_timeout"), "{message}");
    // The backend it was tried on serves the next client.
    assert_eq!(
        user_id_of(&h.connect_as("bob").await).await.as_deref(),
        Some("bob")
    );
}

#[tokio::test]
async fn temporary_tables_that_drop_on_commit_work_and_other_temporary_objects_are_refused() {
    let (h, mut alice, bob) = two_on_one_backend().await;
    alice
        .batch_execute(
            "begin; create temp table notes (body text) on commit drop; \
             insert into notes values ('scratch');",
        )
        .await
        .unwrap();
    assert_eq!(
        value(&alice, "select body from notes").await.as_deref(),
        Some("scratch")
    );
    alice.batch_execute("commit").await.unwrap();
    assert_eq!(
        value(&alice, "select to_regclass('pg_temp.notes')::text").await,
        None
    );

    for sql in [
        "create temp table kept (a int)",
        "create temporary table kept (a int) on commit preserve rows",
        "create temp table kept (a int) on commit delete rows",
        "create local temporary table kept as select 1 as a",
        "create temp view kept as select 1 as a",
        "create temp sequence kept",
        "CREATE TEMP TABLE kept (a int)",
        "select 1 as a into temp table kept",
        "select 1 as a into temporary kept",
    ] {
        refused(&alice, sql).await;
        refused_in_a_transaction(&alice, sql).await;
    }
    refused_by_the_extended_protocol(&mut alice, "create temp table kept (a int)").await;
    same_backend(&alice, &bob).await;
    let temporary: i64 = h
        .admin()
        .await
        .query_one(
            "select count(*) from pg_class where relpersistence = 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        temporary, 0,
        "a refused statement created a temporary object"
    );
}

#[tokio::test]
async fn listen_is_refused_and_notify_works() {
    let (_h, mut alice, bob) = two_on_one_backend().await;
    for sql in ["listen alice_channel", "LISTEN \"Alice\""] {
        refused(&alice, sql).await;
        refused_in_a_transaction(&alice, sql).await;
    }
    refused_by_the_extended_protocol(&mut alice, "listen alice_channel").await;
    alice
        .batch_execute("notify alice_channel, 'hello'; select pg_notify('alice_channel', 'again')")
        .await
        .expect("NOTIFY works");
    same_backend(&alice, &bob).await;
    assert_eq!(
        value(&bob, "select count(*) from pg_listening_channels()")
            .await
            .as_deref(),
        Some("0")
    );
}

/// Advisory locks held in the test's database, as the superuser sees them.
async fn advisory_locks(admin: &Client) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_locks where locktype = 'advisory' \
             and database = (select oid from pg_database where datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn session_advisory_locks_are_refused_and_transaction_advisory_locks_work() {
    let (h, mut alice, bob) = two_on_one_backend().await;
    let admin = h.admin().await;
    for sql in [
        "select pg_advisory_lock(7)",
        "select pg_advisory_lock(7, 8)",
        "select pg_advisory_lock_shared(7)",
        "select pg_try_advisory_lock(7)",
        "select pg_try_advisory_lock_shared(7, 8)",
        "SELECT PG_ADVISORY_LOCK(7)",
    ] {
        refused(&alice, sql).await;
        refused_in_a_transaction(&alice, sql).await;
    }
    refused_by_the_extended_protocol(&mut alice, "select pg_advisory_lock(7)").await;
    assert_eq!(advisory_locks(&admin).await, 0, "a refused lock was taken");

    alice
        .batch_execute(
            "begin; select pg_advisory_xact_lock(7); select pg_advisory_xact_lock_shared(8)",
        )
        .await
        .unwrap();
    assert_eq!(
        value(&alice, "select pg_try_advisory_xact_lock(9)::text")
            .await
            .as_deref(),
        Some("true")
    );
    assert_eq!(advisory_locks(&admin).await, 3, "alice's transaction locks");
    alice.batch_execute("commit").await.unwrap();
    assert_eq!(advisory_locks(&admin).await, 0, "released at commit");
    same_backend(&alice, &bob).await;
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn cursors_with_hold_are_refused_and_cursors_and_portals_work_inside_a_transaction() {
    let (_h, mut alice, bob) = two_on_one_backend().await;
    refused(&alice, "declare kept cursor with hold for select 1").await;
    refused_in_a_transaction(&alice, "declare kept cursor with hold for select 1").await;
    refused_in_a_transaction(
        &alice,
        "DECLARE kept NO SCROLL CURSOR WITH HOLD FOR SELECT 1",
    )
    .await;
    refused_by_the_extended_protocol(&mut alice, "declare kept cursor with hold for select 1")
        .await;

    alice
        .batch_execute("begin; declare numbers cursor for select generate_series(1, 5)")
        .await
        .unwrap();
    for expected in [["1", "2"], ["3", "4"]] {
        let fetched = rows(&alice, "fetch 2 from numbers").await;
        assert_eq!(fetched, [texts(&expected[..1]), texts(&expected[1..])]);
    }
    alice.batch_execute("commit").await.unwrap();
    let (code, message) = error_of(&alice, "fetch 1 from numbers").await;
    assert_eq!(
        code, "34000",
        "the cursor ends with its transaction: {message}"
    );

    // A portal of the extended protocol, read in parts within a transaction.
    let tx = alice.transaction().await.unwrap();
    let series = tx
        .prepare("select generate_series(1, $1::int)")
        .await
        .unwrap();
    let portal = tx.bind(&series, &[&5i32]).await.unwrap();
    for expected in [[1, 2], [3, 4]] {
        let part: Vec<i32> = tx
            .query_portal(&portal, 2)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(part, expected);
    }
    tx.commit().await.unwrap();
    same_backend(&alice, &bob).await;
    assert_eq!(
        value(&bob, "select count(*) from pg_cursors")
            .await
            .as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn sql_prepare_works_within_its_transaction_and_is_gone_after_it() {
    let (_h, alice, bob) = two_on_one_backend().await;
    alice
        .batch_execute("begin; prepare plus_one (int) as select $1 + 1")
        .await
        .unwrap();
    assert_eq!(
        value(&alice, "execute plus_one(41)").await.as_deref(),
        Some("42")
    );
    alice
        .batch_execute("deallocate plus_one; prepare plus_one (int) as select $1 + 2")
        .await
        .unwrap();
    assert_eq!(
        value(&alice, "execute plus_one(40)").await.as_deref(),
        Some("42")
    );
    alice.batch_execute("commit").await.unwrap();
    let (code, message) = error_of(&alice, "execute plus_one(1)").await;
    assert_eq!(code, "26000", "after its transaction: {message}");

    // A PREPARE of its own is a transaction of its own.
    alice
        .batch_execute("prepare alone as select 'alone'")
        .await
        .unwrap();
    let (code, message) = error_of(&alice, "execute alone").await;
    assert_eq!(code, "26000", "after its transaction: {message}");

    same_backend(&alice, &bob).await;
    assert_eq!(
        value(
            &bob,
            "select count(*) from pg_prepared_statements where from_sql"
        )
        .await
        .as_deref(),
        Some("0")
    );
}

#[tokio::test]
async fn currval_and_lastval_last_the_transaction_and_never_reach_another_client() {
    let (h, alice, bob) = two_on_one_backend().await;
    h.admin()
        .await
        .batch_execute("create sequence counter; grant usage on counter to authenticated;")
        .await
        .unwrap();
    alice
        .batch_execute("begin; select nextval('counter')")
        .await
        .unwrap();
    assert_eq!(
        rows(&alice, "select currval('counter'), lastval()").await,
        [texts(&["1", "1"])]
    );
    alice.batch_execute("commit").await.unwrap();
    same_backend(&alice, &bob).await;
    for sql in ["select currval('counter')", "select lastval()"] {
        let (code, message) = error_of(&bob, sql).await;
        assert_eq!(
            code, "55000",
            "{sql} as bob after alice's nextval: {message}"
        );
    }

    // An identity column's sequence, by a single statement.
    alice
        .batch_execute("insert into todos (title) values ('numbered')")
        .await
        .unwrap();
    same_backend(&alice, &bob).await;
    let (code, message) = error_of(&bob, "select lastval()").await;
    assert_eq!(
        code, "55000",
        "lastval as bob after alice's insert: {message}"
    );
}

// Claims per transaction.

/// One transaction of `sub` on `client`: its claims in every statement, its
/// rows only. The backend's pid and the envelope bound for it.
async fn transaction_of_its_own(client: &Client, sub: &str, round: usize) -> (i32, String) {
    client
        .batch_execute(&format!(
            "begin; insert into todos (title) values ('{sub} {round}')"
        ))
        .await
        .unwrap();
    let first = rows(
        client,
        "select auth.user_id(), pg_backend_pid()::text, current_setting('rlsgate.session')",
    )
    .await
    .remove(0);
    assert_eq!(first[0].as_deref(), Some(sub), "round {round}");
    let owners = rows(client, "select distinct user_id from todos").await;
    assert_eq!(
        owners,
        [texts(&[sub])],
        "round {round}: the rows {sub} sees"
    );
    let payload = envelope_payload(client).await;
    assert_eq!(payload["claims"]["sub"], sub, "round {round}: {payload}");
    assert_eq!(payload["pid"].to_string(), first[1].clone().unwrap());
    assert_eq!(user_id_of(client).await.as_deref(), Some(sub));
    client.batch_execute("commit").await.unwrap();
    let pid = first[1].as_ref().unwrap().parse().unwrap();
    (pid, first[2].clone().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_taking_turns_on_one_backend_each_see_only_their_own_claims_every_time() {
    let (h, alice, bob) = two_on_one_backend().await;
    let watch = Watch::start(&h).await;
    let mut pids = BTreeSet::new();
    let mut envelopes = BTreeSet::new();
    for round in 0..10 {
        for (client, sub) in [(&alice, "alice"), (&bob, "bob")] {
            let (pid, envelope) = transaction_of_its_own(client, sub, round).await;
            pids.insert(pid);
            envelopes.insert(envelope);
            // A single statement and an extended-protocol one between.
            assert_eq!(
                value(client, "select auth.user_id()").await.as_deref(),
                Some(sub)
            );
            assert_eq!(user_id_of(client).await.as_deref(), Some(sub));
        }
    }
    let watched = watch.stop().await;
    assert_eq!(pids.len(), 1, "one backend: {pids:?}");
    assert!(envelopes.len() >= 2, "an envelope each: {envelopes:?}");
    assert!(watched.queries.len() >= 2, "{:?}", watched.queries);
    for envelope in &envelopes {
        let payload = envelope.split('.').nth(1).expect("KID.PAYLOAD.MAC");
        let mac = envelope.rsplit('.').next().unwrap();
        for query in &watched.queries {
            for part in [envelope.as_str(), payload, mac] {
                assert!(
                    !query.contains(part),
                    "the envelope is visible in pg_stat_activity: {query}"
                );
            }
        }
    }
}

// Prepared statements across backends.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_prepared_statements_run_on_every_backend_it_is_lent_and_can_be_closed_and_prepared_again()
 {
    let h = start(2).await;
    let mut alice = h.connect_as("alice").await;
    let holders = [h.connect_as("bob").await, h.connect_as("carol").await];
    let theirs = [
        holders[0].prepare("select 'bob''s own'").await.unwrap(),
        holders[1].prepare("select 'carol''s own'").await.unwrap(),
    ];
    let add = alice
        .prepare("select $1::int + 1, pg_backend_pid(), auth.user_id()")
        .await
        .unwrap();
    let mut count = alice
        .prepare("select count(*) from todos where title = $1")
        .await
        .unwrap();
    let insert = alice
        .prepare("insert into todos (title) values ($1)")
        .await
        .unwrap();

    let mut last = pid_of(&alice).await;
    let mut pids = BTreeSet::from([last]);
    for round in 0..8i32 {
        // Someone else holds alice's last backend, and runs a statement of
        // their own there.
        let held = hold_backend(&holders, last).await;
        let own: String = holders[held]
            .query_one(&theirs[held], &[])
            .await
            .unwrap()
            .get(0);
        assert!(own.starts_with(["bob", "carol"][held]), "{own}");

        let title = format!("alice {round}");
        let tx = alice.transaction().await.unwrap();
        tx.execute(&insert, &[&title]).await.unwrap();
        let row = tx.query_one(&add, &[&round]).await.unwrap();
        let counted: i64 = tx.query_one(&count, &[&title]).await.unwrap().get(0);
        tx.commit().await.unwrap();
        holders[held].batch_execute("commit").await.unwrap();

        let (sum, pid, who): (i32, i32, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((sum, who.as_str(), counted), (round + 1, "alice", 1));
        assert_ne!(pid, last, "round {round}: alice's last backend was held");
        pids.insert(pid);
        last = pid;

        if round == 3 {
            // Closed (tokio-postgres sends Close as the statement drops),
            // then prepared again.
            drop(count);
            count = alice
                .prepare("select count(*) from todos where title = $1")
                .await
                .unwrap();
        }
    }
    assert!(pids.len() >= 2, "alice's statements ran on {pids:?}");
    let single: i32 = alice.query_one(&add, &[&41]).await.unwrap().get(0);
    assert_eq!(single, 42, "outside a transaction too");
}

#[tokio::test]
async fn more_named_statements_than_max_prepared_statements_all_keep_working() {
    let h = Harness::start_with(&format!(
        "{}max_prepared_statements = 2\n",
        transaction_mode(1)
    ))
    .await;
    let alice = h.connect_as("alice").await;
    let mut statements = Vec::new();
    for i in 0..5 {
        let sql = format!("select {i} + $1::int");
        statements.push(alice.prepare(&sql).await.unwrap());
    }
    for round in 0..3 {
        for (i, statement) in statements.iter().enumerate() {
            let sum: i32 = alice.query_one(statement, &[&round]).await.unwrap().get(0);
            assert_eq!(sum, i as i32 + round, "statement {i}, round {round}");
        }
    }
    // All five pipelined: each may need another closed to make room.
    let params: Vec<[&(dyn ToSql + Sync); 1]> = (0..5).map(|_| [&7i32 as _]).collect();
    let pipelined = try_join_all(
        statements
            .iter()
            .zip(&params)
            .map(|(statement, p)| alice.query_one(statement, p)),
    )
    .await
    .expect("the pipelined statements");
    let sums: Vec<i32> = pipelined.iter().map(|r| r.get(0)).collect();
    assert_eq!(sums, [7, 8, 9, 10, 11]);
    let prepared: i64 = value(&alice, "select count(*) from pg_prepared_statements")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(prepared <= 2, "{prepared} named statements on the backend");
}

/// Messages of the extended protocol, built by `write`, then Sync.
fn extended(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf);
    frontend::sync(&mut buf);
    buf.to_vec()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    extended(|buf| frontend::parse(name, sql, std::iter::empty(), buf).unwrap())
}

/// Bind of statement `name` to the unnamed portal, with no parameters, and
/// Execute.
fn run(name: &str) -> Vec<u8> {
    extended(|buf| {
        frontend::bind(
            "",
            name,
            std::iter::empty(),
            std::iter::empty::<Option<&[u8]>>(),
            |_, _| Ok(postgres_protocol::IsNull::Yes),
            std::iter::empty(),
            buf,
        )
        .map_err(|_| ())
        .unwrap();
        frontend::execute("", 0, buf).unwrap();
    })
}

fn close(name: &str) -> Vec<u8> {
    extended(|buf| frontend::close(b'S', name, buf).unwrap())
}

/// Sends `messages` and reads up to ReadyForQuery: the kinds of what came
/// (ParameterStatus and notices left out), the rows, and any error.
async fn exchange(
    session: &mut RawSession,
    messages: &[u8],
) -> (
    String,
    Vec<Vec<Option<String>>>,
    Option<wire::ErrorResponse>,
) {
    wire::send(&mut session.stream, messages).await;
    let (mut kinds, mut rows, mut error) = (String::new(), Vec::new(), None);
    loop {
        let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(&mut session.stream))
            .await
            .expect("an answer in time")
            .expect("an answer");
        match kind {
            b'S' | b'N' => continue,
            b'D' => rows.push(wire::data_row(&body)),
            b'E' => error = Some(wire::error_response(&body)),
            _ => {}
        }
        kinds.push(char::from(kind));
        if kind == b'Z' {
            return (kinds, rows, error);
        }
    }
}

/// Runs statement `name` on `session`, which must answer `expected`.
async fn runs(session: &mut RawSession, name: &str, expected: &[&str]) {
    let (kinds, rows, error) = exchange(session, &run(name)).await;
    assert_eq!((kinds.as_str(), error), ("2DCZ", None), "{name}");
    assert_eq!(rows, [texts(expected)], "{name}");
}

async fn parses(session: &mut RawSession, name: &str, sql: &str) {
    let (kinds, _, error) = exchange(session, &parse(name, sql)).await;
    assert_eq!((kinds.as_str(), error), ("1Z", None), "Parse {name}: {sql}");
}

#[tokio::test]
async fn two_clients_using_one_statement_name_for_different_sql_each_get_their_own_results() {
    let h = start(1).await;
    let mut alice = h.raw_connect_as("alice").await;
    let mut bob = h.raw_connect_as("bob").await;
    parses(&mut alice, "q", "select 'alice''s q', auth.user_id()").await;
    parses(&mut bob, "q", "select 'bob''s q', auth.user_id(), 2").await;
    for _ in 0..3 {
        runs(&mut alice, "q", &["alice's q", "alice"]).await;
        runs(&mut bob, "q", &["bob's q", "bob", "2"]).await;
    }
    let pid = alice.query_value("select pg_backend_pid()").await;
    assert_eq!(bob.query_value("select pg_backend_pid()").await, pid);

    // A name only alice has is not bob's to use, nor is her SQL his to see.
    parses(&mut alice, "only_alice", "select 'alice''s only'").await;
    let (_, _, error) = exchange(&mut bob, &run("only_alice")).await;
    assert_eq!(error.map(|e| e.code).as_deref(), Some("26000"));
    assert_eq!(
        bob.query_value(
            "select count(*) from pg_prepared_statements where statement like '%alice' || '''s%'"
        )
        .await
        .as_deref(),
        Some("0")
    );

    // Closed, the name is free for other SQL.
    let (kinds, _, error) = exchange(&mut alice, &close("q")).await;
    assert_eq!((kinds.as_str(), error), ("3Z", None), "Close q");
    parses(&mut alice, "q", "select 'alice''s new q'").await;
    runs(&mut alice, "q", &["alice's new q"]).await;
    runs(&mut bob, "q", &["bob's q", "bob", "2"]).await;
    runs(&mut alice, "only_alice", &["alice's only"]).await;

    // The unnamed statement ends with its Sync: bob cannot run alice's.
    parses(&mut alice, "", "select 'alice''s unnamed'").await;
    let (_, rows, error) = exchange(&mut bob, &run("")).await;
    assert_eq!(rows, Vec::<Vec<Option<String>>>::new(), "bob ran alice's");
    let error = error.expect("bob's Bind of an unnamed statement he never parsed fails");
    assert!(!error.message.contains("alice"), "{error:?}");
}

// The wait.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_while_another_holds_the_only_backend_and_runs_once_it_is_free() {
    let h = Harness::start_with_admin(&transaction_mode(1)).await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    let before = pool_metrics(&h).await;
    // A gauge shows once it is first set.
    assert_eq!(before.waiting.unwrap_or(0.0), 0.0, "nobody waits yet");
    alice
        .batch_execute("begin; insert into todos (title) values ('held')")
        .await
        .unwrap();
    let pid = pid_of(&alice).await;
    let waiting = tokio::spawn(async move {
        let seen = value(&bob, "select auth.user_id() || ' ' || pg_backend_pid()").await;
        (bob, seen)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "bob ran while the only backend was in alice's transaction"
    );
    let during = pool_metrics(&h).await;
    assert_eq!(during.waiting, Some(1.0), "bob waits");
    assert_eq!(during.in_use, Some(1.0), "alice's backend");
    alice.batch_execute("commit").await.unwrap();
    let (_bob, seen) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("bob runs once alice commits")
        .unwrap();
    assert_eq!(seen, Some(format!("bob {pid}")));

    let after = pool_metrics(&h).await;
    assert_eq!(after.waiting, Some(0.0), "nobody waits any more");
    let waits = after.waits.0 - before.waits.0;
    assert!(waits >= 1.0, "bob's wait is counted: {waits}");
    // Bob waited the half second alice held the backend, at least.
    let waited = after.waits.1 - before.waits.1;
    assert!(waited >= 0.4, "{waited} s of waiting recorded");
}

/// What /metrics tells of the harness's transaction pool.
struct PoolMetrics {
    /// Clients waiting for a backend now.
    waiting: Option<f64>,
    /// Backends lent now.
    in_use: Option<f64>,
    /// Waits recorded, and their seconds in all.
    waits: (f64, f64),
}

async fn pool_metrics(h: &Harness) -> PoolMetrics {
    let (status, text) = http_get(&h.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    let user = [("user", "authenticated")];
    let in_use = [
        ("pool", "transaction"),
        ("database", h.pg.name()),
        ("user", "authenticated"),
        ("state", "in_use"),
    ];
    let histogram = |part: &str| {
        metric(&text, &format!("rlsgate_pool_wait_seconds_{part}"), &[]).unwrap_or(0.0)
    };
    PoolMetrics {
        waiting: metric(&text, "rlsgate_pool_waiting_clients", &user),
        in_use: metric(&text, "rlsgate_pool_backends", &in_use),
        waits: (histogram("count"), histogram("sum")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_past_wait_timeout_gets_fatal_53300_naming_the_wait() {
    let h = Harness::start_with(&format!(
        "{}wait_timeout = \"500ms\"\n",
        transaction_mode(1)
    ))
    .await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    alice.batch_execute("begin").await.unwrap();
    let e = bob
        .simple_query("select 1")
        .await
        .expect_err("no backend came free");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(
        (db.severity(), db.code().code()),
        ("FATAL", "53300"),
        "{}",
        db.message()
    );
    assert!(
        db.message()
            .starts_with("no database connection came free within"),
        "{}",
        db.message()
    );
    crate::support::poll_until(WAIT, "bob's connection closes", || async {
        bob.is_closed().then_some(())
    })
    .await;
    // Alice's transaction went on meanwhile.
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    alice.batch_execute("commit").await.unwrap();
    assert_eq!(
        user_id_of(&h.connect_as("carol").await).await.as_deref(),
        Some("carol")
    );
}

// Cancel.

/// Waits until a backend runs a statement containing `needle`.
async fn until_running(admin: &Client, needle: &str) {
    crate::support::poll_until(WAIT, needle, || async {
        let running: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where state = 'active' \
                 and query like '%' || $1 || '%' and pid <> pg_backend_pid()",
                &[&needle],
            )
            .await
            .unwrap()
            .get(0);
        (running > 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_statement_its_client_runs_now_on_whichever_backend() {
    let h = start(2).await;
    let admin = h.admin().await;
    let alice = h.connect_as("alice").await;
    let holders = [h.connect_as("bob").await, h.connect_as("carol").await];
    let last = pid_of(&alice).await;
    // Alice's next statement runs on the other backend.
    let held = hold_backend(&holders, last).await;

    let cancel = alice.cancel_token();
    let sleeping = tokio::spawn(async move {
        let result = alice.simple_query("select pg_sleep(30)").await;
        (alice, result)
    });
    until_running(&admin, "pg_sleep(30)").await;
    cancel
        .cancel_query(NoTls)
        .await
        .expect("the cancel request is sent");
    let (alice, result) = tokio::time::timeout(WAIT, sleeping)
        .await
        .expect("the sleep is cancelled")
        .unwrap();
    let e = result.expect_err("pg_sleep(30) is cancelled");
    assert_eq!(db_error(&e).0, "57014");
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    assert_eq!(
        value(&holders[held], "select 'untouched'").await.as_deref(),
        Some("untouched"),
        "the holder's transaction goes on"
    );
    holders[held].batch_execute("commit").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_while_its_client_is_idle_cancels_nothing_on_the_backend_it_used_before() {
    let (h, alice, bob) = two_on_one_backend().await;
    let admin = h.admin().await;
    let pid = pid_of(&alice).await;
    bob.batch_execute("begin").await.unwrap();
    assert_eq!(pid_of(&bob).await, pid, "bob on alice's backend");
    let sleeping = tokio::spawn(async move {
        let result = bob.simple_query("select pg_sleep(1.5)").await;
        (bob, result)
    });
    until_running(&admin, "pg_sleep(1.5)").await;
    alice
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("the cancel request is sent");
    let (bob, result) = tokio::time::timeout(WAIT, sleeping)
        .await
        .expect("bob's sleep ends")
        .unwrap();
    result.expect("alice's cancel must not reach bob's statement");
    bob.batch_execute("commit").await.unwrap();
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

// pgbench.

/// pgbench through the proxy with clients/pgbench/todos.sql as alice, in
/// `mode` with `clients` clients for 3 s; the transactions it processed,
/// all of which must have succeeded.
async fn pgbench(h: &Harness, mode: &str, clients: usize) -> u64 {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/pgbench/todos.sql");
    let output = tokio::process::Command::new(crate::support::pgbench_binary())
        .args(["-n", "-h", "127.0.0.1", "-U", "authenticated", "-T", "3"])
        .args(["-p", &h.port().to_string(), "-M", mode, "-f", script])
        .args(["-c", &clients.to_string(), "-j", "2", "app"])
        .env("PGPASSWORD", h.token("alice"))
        .env("PGCONNECT_TIMEOUT", WAIT.as_secs().to_string())
        .env_remove("PGSSLMODE")
        .env_remove("PGSERVICE")
        .output()
        .await
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pgbench -M {mode}: {report}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in: {report}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(line("number of failed transactions: "), "0", "{report}");
    let processed: u64 = line("number of transactions actually processed: ")
        .parse()
        .unwrap();
    assert!(processed > 0, "{report}");
    processed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_with_100_clients_and_extended_with_20_run_through_transaction_pooling() {
    let h = start(10).await;
    let admin = h.admin().await;
    let mut processed = 0;
    for (mode, clients) in [("prepared", 100), ("extended", 20)] {
        processed += pgbench(&h, mode, clients).await;
        let owners: Vec<(String, i64)> = admin
            .query(
                "select user_id, count(*) from todos where title like 'pgbench %' group by 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // One insert per transaction, all alice's.
        assert_eq!(
            owners,
            [("alice".to_owned(), processed as i64)],
            "-M {mode}"
        );
    }
}

// Token expiry.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_holds_no_backend_and_its_session_ends_when_its_token_expires() {
    let (h, _, bob) = two_on_one_backend().await;
    let exp = unix_now() + 3;
    let token = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "erin", "aud": "todo-app", "exp": exp}),
    );
    let (erin, connection) = h
        .client_config("authenticated", &token)
        .connect(NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    assert_eq!(user_id_of(&erin).await.as_deref(), Some("erin"));
    // The envelope ends with the session: the token's expiry and the
    // harness's leeway of 2 s.
    let envelope_exp = envelope_payload(&erin).await["exp"].as_u64().unwrap();
    let exp = exp + 2;
    assert!(
        envelope_exp <= exp,
        "the envelope outlives the token: {envelope_exp} > {exp}"
    );

    // While erin is idle, bob has the only backend, in a transaction.
    bob.batch_execute("begin").await.unwrap();
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
    bob.batch_execute("commit").await.unwrap();

    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the session ends after exp + leeway")
        .unwrap();
    let message = refusal(&ended.expect_err("the proxy ends the session with an error"));
    assert!(message.starts_with("token expired at "), "{message}");
    assert!(erin.is_closed());
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

/// A client that pipelines thousands of statements, with more bytes each
/// way than the sockets' buffers hold, gets every answer, in order.
#[tokio::test]
async fn a_pipeline_deeper_than_the_socket_buffers_is_relayed_whole() {
    let h = start(1).await;
    let alice = h.connect_as("alice").await;
    // 3000 × 8 kB each way, sent before any answer is read.
    let statement = alice.prepare("select $1::text").await.unwrap();
    let text = "x".repeat(8192);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&text];
    let queries = (0..3000).map(|_| alice.query_one(&statement, &params));
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(queries),
    );
    for row in answered.await.expect("the pipeline is answered, not stuck") {
        let echoed: String = row.expect("every pipelined query is answered").get(0);
        assert_eq!(echoed.len(), text.len());
    }
}

#[tokio::test]
async fn an_unnamed_statement_parsed_in_one_transaction_can_be_bound_in_the_next_after_another_client_ran()
 {
    let (h, _alice, bob) = two_on_one_backend().await;
    let mut alice = h.raw_connect_as("alice").await;
    let (kinds, _, error) = exchange(&mut alice, &parse("", "select auth.user_id()")).await;
    assert_eq!((kinds.as_str(), error), ("1Z", None));
    // Bob's transaction leaves the backend his: it is reset (with the
    // proxy's own unnamed statements) before alice's next one.
    assert_eq!(
        value(&bob, "select auth.user_id()").await.as_deref(),
        Some("bob")
    );
    runs(&mut alice, "", &["alice"]).await;
    runs(&mut alice, "", &["alice"]).await;

    // A client that never prepared one finds none, as on its own connection.
    let mut dave = h.raw_connect_as("dave").await;
    let (_, _, error) = exchange(&mut dave, &run("")).await;
    assert_eq!(error.map(|e| e.code).as_deref(), Some("26000"));
}

#[tokio::test]
async fn when_a_clients_settings_can_no_longer_be_bound_its_statement_never_runs_and_its_session_ends()
 {
    // Alone: it grants a role to `authenticated`, which other tests share.
    let h = Harness::start_alone(&transaction_mode(1)).await;
    let admin = h.admin().await;
    admin
        .batch_execute(
            "create role helper; grant helper to authenticated; \
             create table public.ran (x int); grant insert on public.ran to public;",
        )
        .await
        .unwrap();
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    alice.batch_execute("set role helper").await.unwrap();
    admin
        .batch_execute("revoke helper from authenticated")
        .await
        .unwrap();
    // Bob's transaction takes the one backend: alice's next one is reset
    // and her settings bound again, which Postgres now refuses.
    assert_eq!(
        value(&bob, "select auth.user_id()").await.as_deref(),
        Some("bob")
    );

    let failed = alice
        .batch_execute("insert into public.ran values (1)")
        .await
        .expect_err("her role can no longer be set");
    let (code, _) = db_error(&failed);
    assert_eq!(code, "08006", "{failed}");
    let after = alice.simple_query("select 1").await;
    assert!(after.is_err(), "her session ended: {after:?}");
    let ran = value(&admin, "select count(*) from public.ran").await;
    assert_eq!(ran.as_deref(), Some("0"), "her statement never ran");
    assert_eq!(
        value(&bob, "select auth.user_id()").await.as_deref(),
        Some("bob")
    );
}
