//! The todo scenario: each user sees and changes only their own rows, with
//! the policies written against `auth.user_id()`.

use crate::support::{Harness, db_error, user_id_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_and_bob_each_see_only_their_own_todos() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;

    alice
        .execute(
            "insert into todos (user_id, title) values ('alice', 'buy milk')",
            &[],
        )
        .await
        .unwrap();
    alice
        .execute("insert into todos (title) values ('walk the dog')", &[])
        .await
        .unwrap();
    bob.execute(
        "insert into todos (user_id, title) values ('bob', 'fix the bike')",
        &[],
    )
    .await
    .unwrap();

    let titles = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        titles(
            alice
                .query("select title from todos order by id", &[])
                .await
                .unwrap()
        ),
        ["buy milk", "walk the dog"]
    );
    assert_eq!(
        titles(
            bob.query("select title from todos order by id", &[])
                .await
                .unwrap()
        ),
        ["fix the bike"]
    );

    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    // The rows really are there: the superuser sees all three.
    let all: i64 = h
        .admin()
        .await
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(all, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_cannot_change_or_delete_alices_todos() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    alice
        .execute("insert into todos (title) values ('secret plan')", &[])
        .await
        .unwrap();

    let updated = bob
        .execute(
            "update todos set title = 'hacked' where user_id = 'alice'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 0);
    let deleted = bob
        .execute("delete from todos where user_id = 'alice'", &[])
        .await
        .unwrap();
    assert_eq!(deleted, 0);

    let title: String = alice
        .query_one("select title from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "secret plan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserting_a_todo_for_someone_else_violates_the_policy() {
    let h = Harness::start().await;
    let bob = h.connect_as("bob").await;
    let err = bob
        .execute(
            "insert into todos (user_id, title) values ('alice', 'planted')",
            &[],
        )
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "42501");
    assert!(message.contains("row-level security"), "{message}");
    // The session stays usable after the error.
    let n: i64 = bob
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_todo_scenario_works_through_psql() {
    let h = Harness::start().await;
    let alice = h.token("alice");
    let bob = h.token("bob");

    h.psql_ok(
        "authenticated",
        &alice,
        "insert into todos (title) values ('alice via psql')",
    );
    h.psql_ok(
        "authenticated",
        &bob,
        "insert into todos (title) values ('bob via psql')",
    );

    let sql = "select user_id || ':' || title from todos";
    assert_eq!(
        h.psql_ok("authenticated", &alice, sql),
        "alice:alice via psql"
    );
    assert_eq!(h.psql_ok("authenticated", &bob, sql), "bob:bob via psql");

    let sql = "update todos set title = 'x' where user_id = 'alice' returning id";
    assert_eq!(h.psql_ok("authenticated", &bob, sql), "");

    let stderr = h.psql_err(
        "authenticated",
        &bob,
        "insert into todos (user_id, title) values ('alice', 'planted')",
    );
    assert!(stderr.contains("row-level security"), "{stderr}");
}
