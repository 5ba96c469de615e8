//! The PostgreSQL protocol passes through the proxy untouched: simple and
//! extended queries, transactions, COPY in both directions, LISTEN/NOTIFY,
//! notices, large results, errors with their SQLSTATE, ParameterStatus, and
//! many sessions at once.

use std::time::Duration;

use crate::support::{Harness, WAIT, connect, db_error, psql_stdout, simple_rows, user_id_of};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// Connects through the proxy and drives the connection in a task that
/// forwards every asynchronous message (notifications, notices) to a channel.
async fn connect_with_messages(
    config: tokio_postgres::Config,
) -> (Client, mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .expect("connect through the proxy");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => {
                    let _ = tx.send(message);
                }
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

/// The row counts of the CommandComplete messages of a `simple_query` answer.
fn command_counts(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_query_protocols_pass_through() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    // Simple protocol: several statements in one Query message.
    alice
        .batch_execute(
            "insert into scratch values (1, 'one');
             insert into scratch values (2, 'two'), (3, 'three');
             insert into todos (title) values ('simple');",
        )
        .await
        .unwrap();
    let messages = alice
        .simple_query("select id, body from scratch order by id; select auth.user_id(), null::text")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(&messages),
        [
            vec![Some("1".to_owned()), Some("one".to_owned())],
            vec![Some("2".to_owned()), Some("two".to_owned())],
            vec![Some("3".to_owned()), Some("three".to_owned())],
            vec![Some("alice".to_owned()), None],
        ]
    );
    assert_eq!(command_counts(&messages), [3, 1]);

    // Extended protocol: one prepared statement, executed many times.
    let insert = alice
        .prepare("insert into scratch (id, body) values ($1, $2)")
        .await
        .unwrap();
    for id in 10..20i32 {
        let body = format!("body {id}");
        assert_eq!(alice.execute(&insert, &[&id, &body]).await.unwrap(), 1);
    }
    let by_id = alice
        .prepare("select id, body from scratch where id = $1")
        .await
        .unwrap();
    assert_eq!(by_id.params(), [tokio_postgres::types::Type::INT4]);
    for id in [2i32, 12, 19, 3, 15] {
        let rows = alice.query(&by_id, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1, "id {id}");
        assert_eq!(rows[0].get::<_, i32>(0), id);
        let expected = match id {
            2 => "two".to_owned(),
            3 => "three".to_owned(),
            _ => format!("body {id}"),
        };
        assert_eq!(rows[0].get::<_, String>(1), expected);
    }
    assert!(alice.query(&by_id, &[&999i32]).await.unwrap().is_empty());

    let range = alice
        .prepare("select array_agg(id order by id) from scratch where id between $1 and $2")
        .await
        .unwrap();
    let ids: Vec<i32> = alice
        .query_one(&range, &[&11i32, &14i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, [11, 12, 13, 14]);
    let ids: Vec<i32> = alice
        .query_one(&range, &[&1i32, &3i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, [1, 2, 3]);

    // Typed parameters and results in binary format round-trip.
    let row = alice
        .query_one(
            "select $1::bigint + 1, $2::text || '!', $3::bytea, $4::float8 * 2, $5::bool",
            &[&41i64, &"hé", &vec![0u8, 1, 255], &1.25f64, &true],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hé!");
    assert_eq!(row.get::<_, Vec<u8>>(2), [0u8, 1, 255]);
    assert_eq!(row.get::<_, f64>(3), 2.5);
    assert!(row.get::<_, bool>(4));

    // The extended protocol sees the claims as well, and RLS applies.
    let titles = alice
        .prepare("select user_id, title from todos")
        .await
        .unwrap();
    let rows = alice.query(&titles, &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "alice");
    assert_eq!(rows[0].get::<_, String>(1), "simple");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_leaves_nothing_and_a_committed_one_persists() {
    let h = Harness::start().await;
    let admin = h.admin().await;
    let mut alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    let scratch_count = async |client: &Client| -> i64 {
        client
            .query_one("select count(*) from scratch", &[])
            .await
            .unwrap()
            .get(0)
    };

    // Rolled back through the client API (extended protocol).
    let tx = alice.transaction().await.unwrap();
    tx.execute("insert into scratch values (1, 'never')", &[])
        .await
        .unwrap();
    tx.execute("insert into todos (title) values ('never')", &[])
        .await
        .unwrap();
    let inside: i64 = tx
        .query_one("select count(*) from scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(inside, 1, "the transaction sees its own row");
    assert_eq!(
        scratch_count(&admin).await,
        0,
        "nobody else sees an uncommitted row"
    );
    tx.rollback().await.unwrap();
    assert_eq!(scratch_count(&alice).await, 0);
    assert_eq!(scratch_count(&admin).await, 0);
    let todos: i64 = admin
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(todos, 0);

    // Rolled back through the simple protocol.
    alice
        .batch_execute("begin; insert into scratch values (2, 'gone'); rollback")
        .await
        .unwrap();
    assert_eq!(scratch_count(&admin).await, 0);

    // Committed: visible to the superuser and to a second proxied session.
    let tx = alice.transaction().await.unwrap();
    tx.execute("insert into scratch values (3, 'kept')", &[])
        .await
        .unwrap();
    tx.execute("insert into todos (title) values ('kept')", &[])
        .await
        .unwrap();
    assert_eq!(scratch_count(&bob).await, 0, "not visible before commit");
    tx.commit().await.unwrap();
    assert_eq!(scratch_count(&admin).await, 1);
    let body: String = bob
        .query_one("select body from scratch where id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "kept");
    let owner: String = admin
        .query_one("select user_id from todos where title = 'kept'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "alice");

    // A savepoint rolls back only its part.
    alice
        .batch_execute(
            "begin;
             insert into scratch values (4, 'before savepoint');
             savepoint s;
             insert into scratch values (5, 'after savepoint');
             rollback to savepoint s;
             commit;",
        )
        .await
        .unwrap();
    let ids: Vec<i32> = admin
        .query("select id from scratch order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_and_to_stdout_pass_through() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    // COPY FROM STDIN, in many CopyData messages of different sizes.
    const ROWS: i32 = 5000;
    let lines: Vec<String> = (1..=ROWS)
        .map(|i| {
            if i % 100 == 0 {
                format!("{i}\t\\N\n")
            } else {
                format!(
                    "{i}\trow {i}\\twith a tab, ünïcode and a backslash \\\\ {}\n",
                    "y".repeat((i % 37) as usize)
                )
            }
        })
        .collect();
    let sink = alice
        .copy_in("copy scratch (id, body) from stdin")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for chunk in lines.chunks(97) {
        sink.send(Bytes::from(chunk.concat())).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, ROWS as u64);

    let (nulls, tabs): (i64, i64) = {
        let row = h
            .admin()
            .await
            .query_one(
                "select count(*) filter (where body is null), count(*) filter (where body like '%' || chr(9) || '%') from scratch",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(nulls, 50);
    assert_eq!(
        tabs, 4950,
        "escapes in COPY text were decoded by the server"
    );

    // COPY TO STDOUT gives back exactly what went in.
    let stream = alice.copy_out("copy scratch to stdout").await.unwrap();
    let chunks: Vec<Bytes> = stream.map(|chunk| chunk.unwrap()).collect().await;
    let out = String::from_utf8(chunks.concat()).unwrap();
    let mut got: Vec<&str> = out.split_inclusive('\n').collect();
    got.sort_by_key(|line| line.split('\t').next().unwrap().parse::<i32>().unwrap());
    assert_eq!(got.len(), ROWS as usize);
    assert_eq!(got.concat(), lines.concat());

    // The session carries on normally after COPY.
    let n: i64 = alice
        .query_one("select count(*) from scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, ROWS as i64);

    // psql: \copy FROM a local file (CopyData from psql), then COPY TO STDOUT.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.tsv");
    let psql_lines: Vec<String> = (10_001..=11_000)
        .map(|i| format!("{i}\tvia psql {i}\n"))
        .collect();
    std::fs::write(&file, psql_lines.concat()).unwrap();
    let token = h.token("alice");
    h.psql_ok(
        "authenticated",
        &token,
        &format!("\\copy scratch (id, body) from '{}'", file.display()),
    );
    let out = h.psql(
        "authenticated",
        &token,
        "copy (select id, body from scratch where id > 10000 order by id) to stdout",
    );
    assert_eq!(psql_stdout(out), psql_lines.concat());

    // And psql reads back what tokio-postgres wrote.
    let out = h.psql(
        "authenticated",
        &token,
        "copy (select id, body from scratch where id <= 5000 order by id) to stdout",
    );
    assert_eq!(psql_stdout(out), lines.concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_two_proxied_sessions_delivers_the_payload() {
    let h = Harness::start().await;
    let (alice, mut messages) =
        connect_with_messages(h.client_config("authenticated", &h.token("alice"))).await;
    let bob = h.connect_as("bob").await;

    alice.batch_execute("listen todo_events").await.unwrap();
    let bob_pid: i32 = bob
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // A notification in a rolled-back transaction is never delivered; the
    // committed one is, with its payload.
    bob.batch_execute("begin; notify todo_events, 'rolled back'; rollback")
        .await
        .unwrap();
    bob.execute("select pg_notify('todo_events', $1)", &[&"hello from bob"])
        .await
        .unwrap();
    bob.batch_execute("notify other_channel, 'not for alice'")
        .await
        .unwrap();
    bob.batch_execute("notify todo_events, 'second'")
        .await
        .unwrap();

    let mut received = Vec::new();
    while received.len() < 2 {
        let message = tokio::time::timeout(WAIT, messages.recv())
            .await
            .expect("a notification within the timeout")
            .expect("the connection is still open");
        if let AsyncMessage::Notification(n) = message {
            received.push((
                n.channel().to_owned(),
                n.payload().to_owned(),
                n.process_id(),
            ));
        }
    }
    assert_eq!(
        received,
        [
            (
                "todo_events".to_owned(),
                "hello from bob".to_owned(),
                bob_pid
            ),
            ("todo_events".to_owned(), "second".to_owned(), bob_pid),
        ]
    );

    // After UNLISTEN nothing more arrives, and the session still answers.
    alice.batch_execute("unlisten todo_events").await.unwrap();
    bob.batch_execute("notify todo_events, 'too late'")
        .await
        .unwrap();
    let n: i32 = alice.query_one("select 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
    let late = tokio::time::timeout(Duration::from_millis(300), messages.recv()).await;
    assert!(
        !matches!(late, Ok(Some(AsyncMessage::Notification(_)))),
        "a notification arrived after UNLISTEN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client_as_asynchronous_messages() {
    let h = Harness::start().await;
    let (alice, mut messages) =
        connect_with_messages(h.client_config("authenticated", &h.token("alice"))).await;
    alice
        .batch_execute(
            "do $$ begin raise warning using message = 'careful, ' || auth.user_id(), errcode = '01R01'; end $$",
        )
        .await
        .unwrap();
    let notice = loop {
        let message = tokio::time::timeout(WAIT, messages.recv())
            .await
            .expect("a notice within the timeout")
            .expect("the connection is still open");
        if let AsyncMessage::Notice(notice) = message {
            break notice;
        }
    };
    assert_eq!(notice.severity(), "WARNING");
    assert_eq!(notice.code().code(), "01R01");
    assert_eq!(notice.message(), "careful, alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_result_arrives_complete_and_the_session_stays_usable() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    const MIB: usize = 1024 * 1024;

    // Ten rows of one MiB each, every row a different letter.
    let rows = alice
        .query(
            "select i, repeat(chr(97 + i), 1024 * 1024) from generate_series(0, 9) i order by i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 10);
    let mut total = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i32>(0), i as i32);
        let value: &str = row.get(1);
        assert_eq!(value.len(), MIB, "row {i}");
        let letter = (b'a' + i as u8) as char;
        assert!(
            value.chars().all(|c| c == letter),
            "row {i} is all {letter}"
        );
        total += value.len();
    }
    assert_eq!(total, 10 * MIB);

    // The same through the simple protocol (text format).
    let messages = alice
        .simple_query("select repeat('x', 1024 * 1024) || i::text from generate_series(1, 10) i")
        .await
        .unwrap();
    let rows = simple_rows(&messages);
    assert_eq!(rows.len(), 10);
    let total: usize = rows.iter().map(|r| r[0].as_ref().unwrap().len()).sum();
    assert_eq!(total, 10 * MIB + 9 + 2);
    assert!(rows[9][0].as_ref().unwrap().ends_with("x10"));

    // Many small rows: 200 000 of them, with a checksum.
    let rows = alice
        .query(
            "select i, md5(i::text) from generate_series(1, 200000) i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 200_000);
    let sum: i64 = rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).sum();
    assert_eq!(sum, 200_000 * 200_001 / 2);
    assert_eq!(
        rows[0].get::<_, &str>(1),
        "c4ca4238a0b923820dcc509a6f75849b"
    );

    // A large message in the other direction: a 5 MiB parameter.
    let big = "z".repeat(5 * MIB);
    let row = alice
        .query_one(
            "select length($1::text), md5($1::text) = md5(repeat('z', 5 * 1024 * 1024))",
            &[&big],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 5 * MIB as i32);
    assert!(row.get::<_, bool>(1));

    // Still usable.
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_reach_the_client_with_their_sqlstate_and_the_session_recovers() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    let err = alice.query("select 1/0", &[]).await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "22012");
    assert_eq!(message, "division by zero");

    let err = alice.batch_execute("selec 1").await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42601");
    assert!(message.contains("syntax error"), "{message}");

    // Errors in the extended protocol, at bind/execute time and at parse time.
    let err = alice
        .query("select 10 / $1::int", &[&0i32])
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "22012");
    let err = alice
        .prepare("select * from no_such_table")
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42P01");
    let n: i32 = alice
        .query_one("select 10 / $1::int", &[&5i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // An error inside a transaction aborts it until ROLLBACK.
    alice.batch_execute("begin").await.unwrap();
    alice
        .execute("insert into scratch values (1, 'doomed')", &[])
        .await
        .unwrap();
    let err = alice.batch_execute("select 1/0").await.unwrap_err();
    assert_eq!(db_error(&err).0, "22012");
    let err = alice.query("select 1", &[]).await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "25P02");
    assert!(
        message.contains("current transaction is aborted"),
        "{message}"
    );
    let err = alice.batch_execute("select 1").await.unwrap_err();
    assert_eq!(db_error(&err).0, "25P02");
    alice.batch_execute("rollback").await.unwrap();

    // Recovered: a normal query works and the aborted insert is gone.
    let n: i64 = alice
        .query_one("select count(*) from scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    // A row-level security violation is an error like any other.
    let err = alice
        .execute(
            "insert into todos (user_id, title) values ('bob', 'planted')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "42501");
    let messages = alice.simple_query("select 'fine'").await.unwrap();
    assert_eq!(simple_rows(&messages), [vec![Some("fine".to_owned())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_passes_through_at_startup_and_during_the_session() {
    let h = Harness::start().await;
    let mut config = h.client_config("authenticated", &h.token("alice"));
    config.application_name("proto-test");
    let (client, mut connection) = config.connect(NoTls).await.unwrap();

    // At startup: the upstream's ParameterStatus messages reach the client.
    assert_eq!(connection.parameter("application_name"), Some("proto-test"));
    assert_eq!(connection.parameter("client_encoding"), Some("UTF8"));
    assert_eq!(connection.parameter("integer_datetimes"), Some("on"));
    let version = connection
        .parameter("server_version")
        .expect("server_version reported");
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );

    // During the session: SET reports the new value with a ParameterStatus.
    // The connection is driven here, so that it can be inspected afterwards.
    {
        let set =
            client.batch_execute("set TimeZone = 'Asia/Tokyo'; set application_name = 'renamed'");
        futures_util::pin_mut!(set);
        let drive = async {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("connection failed: {e}"),
                    None => panic!("connection closed"),
                }
            }
        };
        tokio::select! {
            result = tokio::time::timeout(WAIT, &mut set) => result.expect("SET within the timeout").unwrap(),
            () = drive => unreachable!(),
        }
    }
    assert_eq!(connection.parameter("TimeZone"), Some("Asia/Tokyo"));
    assert_eq!(connection.parameter("application_name"), Some("renamed"));
    tokio::spawn(async move {
        let _ = connection.await;
    });

    let row = client
        .query_one(
            "select current_setting('TimeZone'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Asia/Tokyo");
    assert_eq!(row.get::<_, String>(1), "renamed");
    let shown = simple_rows(&client.simple_query("show timezone").await.unwrap());
    assert_eq!(shown, [vec![Some("Asia/Tokyo".to_owned())]]);
    client.batch_execute("set TimeZone = 'UTC'").await.unwrap();
    let shown = simple_rows(&client.simple_query("show timezone").await.unwrap());
    assert_eq!(shown, [vec![Some("UTC".to_owned())]]);

    // The application name set at connect time is what the server recorded.
    let bob = connect(
        h.client_config("authenticated", &h.token("bob"))
            .application_name("proto-test"),
    )
    .await
    .unwrap();
    let shown = simple_rows(&bob.simple_query("show application_name").await.unwrap());
    assert_eq!(shown, [vec![Some("proto-test".to_owned())]]);
    let pid: i32 = bob
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let recorded: String = h
        .admin()
        .await
        .query_one(
            "select application_name from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, "proto-test");

    // Settings passed in the startup packet's `options` reach the backend too.
    let mut config = h.client_config("authenticated", &h.token("carol"));
    config.options("-c TimeZone=Pacific/Auckland -c DateStyle=German");
    let (carol, connection) = config.connect(NoTls).await.unwrap();
    assert_eq!(connection.parameter("TimeZone"), Some("Pacific/Auckland"));
    assert_eq!(connection.parameter("DateStyle"), Some("German, DMY"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let shown = simple_rows(
        &carol
            .simple_query("show timezone; select date '2024-03-01'")
            .await
            .unwrap(),
    );
    assert_eq!(
        shown,
        [
            vec![Some("Pacific/Auckland".to_owned())],
            vec![Some("01.03.2024".to_owned())]
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_sessions_each_see_only_their_own_rows() {
    let h = Harness::start().await;
    const SESSIONS: usize = 20;
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let user = format!("user-{i:02}");
        let config = h.client_config("authenticated", &h.token(&user));
        tasks.push(tokio::spawn(async move {
            let client = connect(&config).await.expect("connect");
            let insert = client
                .prepare("insert into todos (title) values ($1)")
                .await
                .unwrap();
            for n in 0..5 {
                client
                    .execute(&insert, &[&format!("{user} #{n}")])
                    .await
                    .unwrap();
            }
            client
                .execute("insert into scratch values ($1, $2)", &[&(i as i32), &user])
                .await
                .unwrap();
            let titles: Vec<String> = client
                .query("select title from todos order by id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let expected: Vec<String> = (0..5).map(|n| format!("{user} #{n}")).collect();
            assert_eq!(titles, expected, "{user} sees exactly its own todos");
            assert_eq!(user_id_of(&client).await.as_deref(), Some(user.as_str()));
            let body: String = client
                .query_one("select body from scratch where id = $1", &[&(i as i32)])
                .await
                .unwrap()
                .get(0);
            assert_eq!(body, user);
            user
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        let user = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("session finished in time")
            .expect("session task succeeded");
        done.push(user);
    }
    assert_eq!(done.len(), SESSIONS);

    let admin = h.admin().await;
    let row = admin
        .query_one("select count(*), count(distinct user_id) from todos", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), (SESSIONS * 5) as i64);
    assert_eq!(row.get::<_, i64>(1), SESSIONS as i64);
    let n: i64 = admin
        .query_one("select count(*) from scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, SESSIONS as i64);
}
