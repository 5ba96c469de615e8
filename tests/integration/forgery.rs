//! Clients cannot forge claims (README.md, "Security model"): whatever a client does
//! with `SET`, `set_config`, `RESET`, `DISCARD`, `SET ROLE`, its startup
//! parameters or what it can read of other sessions, `auth.user_id()` is
//! either its own verified `sub` or an SQLSTATE 28000 error, never someone
//! else's identity and never a silent NULL.

use std::time::Duration;

use crate::support::wire::{APP_STARTUP, ErrorResponse, RawSession};
use crate::support::{
    Harness, POOL_MODES, connect, db_error, psql_command, simple_rows, user_id_of, with_admin,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rlsgate::auth::claims::{Backend, Identity, SigningKey};
use serde_json::Value;
use tokio_postgres::Client;

/// An SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The session's own envelope, as the proxy bound it.
async fn envelope_of(client: &Client) -> String {
    client
        .query_one("select current_setting('rlsgate.session')", &[])
        .await
        .unwrap()
        .get(0)
}

/// Asserts that `client` is alice, logged in and acting as `authenticated`.
async fn assert_is_alice(client: &Client, context: &str) {
    let row = client
        .query_one(
            "select auth.user_id(), current_user::text, session_user::text",
            &[],
        )
        .await
        .unwrap();
    let got: (Option<String>, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        got,
        (
            Some("alice".to_owned()),
            "authenticated".to_owned(),
            "authenticated".to_owned()
        ),
        "{context}"
    );
}

/// The three dot-separated parts of an envelope.
fn parts(envelope: &str) -> (String, String, String) {
    let parts: Vec<&str> = envelope.split('.').collect();
    assert_eq!(parts.len(), 3, "envelope is KID.PAYLOAD.MAC: {envelope}");
    (
        parts[0].to_owned(),
        parts[1].to_owned(),
        parts[2].to_owned(),
    )
}

fn payload_of(envelope: &str) -> Value {
    let (_, payload, _) = parts(envelope);
    serde_json::from_slice(&STANDARD.decode(payload).unwrap()).unwrap()
}

/// `envelope` with its payload edited by `edit`, keeping the original KID and MAC.
fn tampered(envelope: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (kid, _, mac) = parts(envelope);
    let mut payload = payload_of(envelope);
    edit(&mut payload);
    let payload = STANDARD.encode(serde_json::to_vec(&payload).unwrap());
    format!("{kid}.{payload}.{mac}")
}

/// What an envelope says, for sealing by hand.
fn identity(user: &str, claims: Option<serde_json::Map<String, Value>>) -> Identity {
    Identity {
        upstream_user: user.to_owned(),
        claims,
        valid_until: 4_000_000_000,
        lifetime: Duration::from_secs(3600),
    }
}

/// The backend an envelope is bound to.
fn backend_of(envelope: &str) -> Backend {
    let payload = payload_of(envelope);
    Backend {
        pid: payload["pid"].as_i64().expect("pid") as i32,
        started: payload["started"].as_i64().expect("started"),
    }
}

/// Values a client might try to put into `rlsgate.session` to become bob,
/// built from alice's own envelope.
fn forgeries(alice_envelope: &str) -> Vec<(&'static str, String)> {
    let (kid, _, mac) = parts(alice_envelope);
    let bob_payload = tampered(alice_envelope, |p| p["claims"]["sub"] = "bob".into());
    let (_, bob_payload_only, _) = parts(&bob_payload);
    // A correct HMAC, but under a key the database does not know, relabelled
    // with the real key id.
    let other_key = rlsgate::auth::claims::SigningKey::from_bytes(vec![42; 32]).unwrap();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "bob".into());
    let wrong_key_seal = other_key.seal(
        &identity("authenticated", Some(claims)),
        backend_of(alice_envelope),
        4_000_000_000,
    );
    let (other_kid, other_payload, other_mac) = parts(&wrong_key_seal);
    vec![
        (
            "alice's envelope with sub=bob, her kid and MAC",
            bob_payload.clone(),
        ),
        (
            "alice's envelope with sub=bob and a far expiry, her kid and MAC",
            tampered(alice_envelope, |p| {
                p["claims"]["sub"] = "bob".into();
                p["exp"] = 4_000_000_000u64.into();
            }),
        ),
        ("a made-up value", "forged".to_owned()),
        (
            "a made-up value of the right shape",
            format!("{kid}.{bob_payload_only}.{}", "0".repeat(64)),
        ),
        (
            "bob's payload with alice's MAC in upper case",
            format!("{kid}.{bob_payload_only}.{}", mac.to_uppercase()),
        ),
        ("a value sealed with an unknown key", wrong_key_seal.clone()),
        (
            "a foreign key's seal relabelled with the real kid",
            format!("{kid}.{other_payload}.{other_mac}"),
        ),
        ("a bare payload", bob_payload_only.clone()),
        ("four parts", format!("{bob_payload}.{mac}")),
        (
            "dots and a slash in the key id",
            format!("../{other_payload}.{other_mac}"),
        ),
        (
            "an overlong key id",
            format!("{other_kid}{kid}.{bob_payload_only}.{mac}"),
        ),
        ("whitespace", " ".to_owned()),
    ]
}

/// The ways a client can change a setting.
#[derive(Clone, Copy, Debug)]
enum Way {
    Set,
    SetConfig,
    SetLocal,
    SetConfigLocal,
}

const WAYS: [Way; 4] = [Way::Set, Way::SetConfig, Way::SetLocal, Way::SetConfigLocal];

impl Way {
    fn is_local(self) -> bool {
        matches!(self, Way::SetLocal | Way::SetConfigLocal)
    }
}

/// Runs `sql` in `client` after putting `value` into `rlsgate.session` the
/// given way, then undoes the change (puts the session's own envelope back,
/// or rolls the transaction back).
async fn with_setting(
    client: &Client,
    way: Way,
    value: &str,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let own = envelope_of(client).await;
    if way.is_local() {
        client.batch_execute("begin").await.unwrap();
    }
    match way {
        Way::Set => client
            .batch_execute(&format!("set rlsgate.session = {}", literal(value)))
            .await
            .unwrap(),
        Way::SetLocal => client
            .batch_execute(&format!("set local rlsgate.session = {}", literal(value)))
            .await
            .unwrap(),
        Way::SetConfig | Way::SetConfigLocal => {
            let set: String = client
                .query_one(
                    "select set_config('rlsgate.session', $1, $2)",
                    &[&value, &way.is_local()],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(set, value);
        }
    }
    let result = client.simple_query(sql).await.map(|m| simple_rows(&m));
    if way.is_local() {
        client.batch_execute("rollback").await.unwrap();
    } else {
        client
            .execute("select set_config('rlsgate.session', $1, false)", &[&own])
            .await
            .unwrap();
    }
    result
}

/// Asserts that `sql` fails with 28000 under the setting `value`.
async fn assert_28000(client: &Client, way: Way, label: &str, value: &str, sql: &str) {
    match with_setting(client, way, value, sql).await {
        Ok(rows) => panic!(
            "{way:?} rlsgate.session to {label} ({value:?}): `{sql}` returned {rows:?} instead of 28000"
        ),
        Err(e) => {
            let (code, message) = db_error(&e);
            assert_eq!(code, "28000", "{way:?} {label}: `{sql}`: {message}");
            assert!(
                message.starts_with("rlsgate: session claims"),
                "{way:?} {label}: {message}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_bobs_claims_by_set_or_set_config_raises_28000() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;
    alice
        .execute("insert into todos (title) values ('alice plan')", &[])
        .await
        .unwrap();
    bob.execute("insert into todos (title) values ('bob secret')", &[])
        .await
        .unwrap();

    let envelope = envelope_of(&alice).await;
    assert_eq!(payload_of(&envelope)["claims"]["sub"], "alice");
    assert_eq!(payload_of(&envelope)["user"], "authenticated");

    for (label, value) in forgeries(&envelope) {
        for way in WAYS {
            for sql in [
                "select auth.user_id()",
                "select auth.session()::text",
                "select auth.jwt()::text",
                "select auth.uid()::text",
            ] {
                assert_28000(&alice, way, label, &value, sql).await;
            }
            // The policies fail closed: neither an empty result nor bob's rows.
            for sql in [
                "select user_id, title from todos",
                "select count(*) from todos",
                "select title from todos where user_id = 'bob'",
                "insert into todos (title) values ('planted') returning user_id",
                "update todos set title = 'hacked' returning user_id",
                "delete from todos where user_id = 'bob' returning title",
            ] {
                assert_28000(&alice, way, label, &value, sql).await;
            }
            // Undoing the change gives alice back, not bob.
            assert_eq!(
                user_id_of(&alice).await.as_deref(),
                Some("alice"),
                "{way:?} {label}"
            );
        }
    }

    let admin = h.admin().await;
    let rows = admin
        .query("select user_id, title from todos order by id", &[])
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [
            ("alice".to_owned(), "alice plan".to_owned()),
            ("bob".to_owned(), "bob secret".to_owned())
        ]
    );
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_setting_in_the_same_simple_query_as_the_read_raises_28000() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    h.connect_as("bob")
        .await
        .execute("insert into todos (title) values ('bob secret')", &[])
        .await
        .unwrap();
    let own = envelope_of(&alice).await;
    let forged = tampered(&own, |p| p["claims"]["sub"] = "bob".into());

    let err = alice
        .simple_query(&format!(
            "set rlsgate.session = {}; select title from todos",
            literal(&forged)
        ))
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "28000", "{}", db_error(&err).1);

    // The statements of one simple query form one implicit transaction: its
    // failure rolled the SET back, so alice is alice again.
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    // The same read as its own query after a committed SET fails too, and
    // stays failing until her own envelope is put back.
    alice
        .batch_execute(&format!("set rlsgate.session = {}", literal(&forged)))
        .await
        .unwrap();
    for _ in 0..2 {
        let err = alice
            .simple_query("select title from todos")
            .await
            .unwrap_err();
        assert_eq!(db_error(&err).0, "28000", "{}", db_error(&err).1);
    }
    alice
        .execute("select set_config('rlsgate.session', $1, false)", &[&own])
        .await
        .unwrap();
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

/// An authenticated session whose setting is emptied must not read as a
/// session without claims: the contract is "fail closed and loudly, never
/// silently NULL".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_alices_claims_by_set_raises_28000_instead_of_reading_as_no_claims() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    alice
        .execute("insert into todos (title) values ('alice plan')", &[])
        .await
        .unwrap();

    // Whatever happens, an empty setting never yields someone else's
    // identity or rows, nor lets alice write rows under anyone's name.
    for way in WAYS {
        for sql in ["select auth.user_id()", "select user_id from todos"] {
            if let Ok(rows) = with_setting(&alice, way, "", sql).await {
                assert!(
                    rows.iter().flatten().all(|v| v.is_none()),
                    "{way:?} `{sql}`: {rows:?}"
                );
            }
        }
        let sql = "insert into todos (title) values ('planted') returning user_id";
        if let Ok(rows) = with_setting(&alice, way, "", sql).await {
            panic!("{way:?}: inserted {rows:?}");
        }
    }
    let count: i64 = h
        .admin()
        .await
        .query_one("select count(*) from todos", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    for way in WAYS {
        for sql in [
            "select auth.user_id()",
            "select auth.session()::text",
            "select user_id, title from todos",
        ] {
            assert_28000(&alice, way, "the empty string", "", sql).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_alices_envelope_in_an_anonymous_session_raises_28000() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    alice
        .execute("insert into todos (title) values ('alice plan')", &[])
        .await
        .unwrap();
    let envelope = envelope_of(&alice).await;

    let anonymous = h
        .connect("anonymous", "")
        .await
        .expect("anonymous connects without a token");
    let (user, claims): (String, Option<String>) = {
        let row = anonymous
            .query_one("select current_user::text, auth.session()::text", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(user, "anonymous");
    assert_eq!(
        claims, None,
        "the proxy binds no claims to a role served without a token"
    );

    for way in WAYS {
        for sql in [
            "select auth.user_id()",
            "select auth.session()::text",
            "select auth.uid()::text",
        ] {
            match with_setting(&anonymous, way, &envelope, sql).await {
                Ok(rows) => panic!("{way:?}: anonymous replaying alice's envelope got {rows:?}"),
                Err(e) => {
                    let (code, message) = db_error(&e);
                    assert_eq!(code, "28000", "{way:?}: {message}");
                    assert!(message.contains("another login role"), "{way:?}: {message}");
                }
            }
        }
        // anonymous has no policy on todos, so it reads nothing at all,
        // with or without alice's envelope.
        let rows = with_setting(
            &anonymous,
            way,
            &envelope,
            "select user_id, title from todos",
        )
        .await
        .unwrap();
        assert!(rows.is_empty(), "{way:?}: {rows:?}");
    }
    // Undone, it is still not alice (what exactly it reads after a reset is
    // the next test's business).
    if let Ok(row) = anonymous.query_one("select auth.user_id()", &[]).await {
        assert_eq!(row.get::<_, Option<String>>(0), None);
    }
}

/// A role served without a token has no claims. Returning the setting to
/// its startup value (empty: the envelope is bound after login) fails
/// closed, like clearing it; a rolled-back SET LOCAL leaves the bound "no
/// claims" as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_session_fails_closed_after_reset_and_reads_no_claims_after_rollback() {
    let h = Harness::start().await;
    for undo in [
        "reset rlsgate.session",
        "reset all",
        "discard all",
        "set rlsgate.session to default",
    ] {
        let anonymous = h.connect("anonymous", "").await.unwrap();
        assert_eq!(user_id_of(&anonymous).await, None, "at startup");
        anonymous
            .batch_execute("set rlsgate.session = 'forged'")
            .await
            .unwrap();
        anonymous.batch_execute(undo).await.unwrap();
        let err = anonymous
            .query_one("select auth.session()::text", &[])
            .await
            .unwrap_err();
        let (code, message) = db_error(&err);
        assert_eq!(code, "28000", "after `{undo}`: {message}");
        assert!(
            message.contains("were cleared"),
            "after `{undo}`: {message}"
        );
    }
    let anonymous = h.connect("anonymous", "").await.unwrap();
    anonymous
        .batch_execute("begin; set local rlsgate.session = 'forged'")
        .await
        .unwrap();
    assert!(
        anonymous
            .query_one("select auth.user_id()", &[])
            .await
            .is_err()
    );
    anonymous.batch_execute("rollback").await.unwrap();
    let claims = anonymous
        .query_one("select auth.session()::text", &[])
        .await
        .map(|row| row.get::<_, Option<String>>(0))
        .map_err(|e| db_error(&e));
    assert_eq!(claims, Ok(None));
}

/// RESET, RESET ALL and DISCARD ALL return the setting to its startup
/// value, which is empty: alice's claims are gone (28000), and never
/// replaced by anyone else's, whatever was SET before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_reset_and_discard_all_clear_alices_claims_and_never_leave_another() {
    let h = Harness::start().await;
    for undo in [
        "reset all",
        "reset rlsgate.session",
        "discard all",
        "set rlsgate.session to default",
        "select set_config('rlsgate.session', null, false)",
    ] {
        for forge_first in [false, true] {
            let alice = h.connect_as("alice").await;
            let envelope = envelope_of(&alice).await;
            if forge_first {
                let forged = tampered(&envelope, |p| p["claims"]["sub"] = "bob".into());
                alice
                    .batch_execute(&format!("set rlsgate.session = {}", literal(&forged)))
                    .await
                    .unwrap();
            }
            alice.batch_execute(undo).await.unwrap();
            let context = format!("`{undo}` (forged first: {forge_first})");
            assert_eq!(envelope_of(&alice).await, "", "{context}");
            let err = alice
                .query_one("select auth.user_id()", &[])
                .await
                .unwrap_err();
            assert_eq!(db_error(&err).0, "28000", "{context}");
        }
    }

    // A transaction-local forgery ends with its transaction, committed or not.
    let alice = h.connect_as("alice").await;
    let forged = tampered(&envelope_of(&alice).await, |p| {
        p["claims"]["sub"] = "bob".into()
    });
    for end in ["commit", "rollback"] {
        alice
            .batch_execute(&format!(
                "begin; set local rlsgate.session = {}",
                literal(&forged)
            ))
            .await
            .unwrap();
        alice.batch_execute(end).await.unwrap();
        assert_eq!(
            user_id_of(&alice).await.as_deref(),
            Some("alice"),
            "after {end}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_cannot_read_keys_replace_auth_functions_or_change_role() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    let denied = [
        "select * from auth.signing_keys",
        "select inner_pad, outer_pad from auth.signing_keys",
        "select * from auth.schema_version",
        "insert into auth.signing_keys (key_id, inner_pad, outer_pad) values ('0123456789abcdef', '\\x00', '\\x00')",
        "delete from auth.signing_keys",
        "create or replace function auth.user_id() returns text language sql stable as $$ select 'bob'::text $$",
        "create or replace function auth.session() returns jsonb language sql stable as $$ select '{\"sub\":\"bob\"}'::jsonb $$",
        "alter function auth.session() security invoker",
        "create function auth.helper() returns text language sql as $$ select 'bob'::text $$",
        "set role postgres",
        "set session authorization postgres",
        "set role anonymous",
    ];
    let admin = h.admin().await;
    let has_schema_version: bool = admin
        .query_one("select to_regclass('auth.schema_version') is not null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        has_schema_version,
        "init-db records its version in auth.schema_version"
    );

    for sql in denied {
        let err = alice.batch_execute(sql).await.unwrap_err();
        let (code, message) = db_error(&err);
        assert_eq!(code, "42501", "`{sql}`: {message}");
    }

    assert_is_alice(&alice, "").await;

    // The functions are as installed.
    let body: String = admin
        .query_one(
            "select prosrc from pg_proc where oid = 'auth.user_id()'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(body.contains("auth.session()"), "{body}");
    let definer: bool = admin
        .query_one(
            "select prosecdef from pg_proc where oid = 'auth.session()'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(definer);
}

/// Every 20-character window of `s`.
fn windows(s: &str) -> Vec<&str> {
    (0..=s.len().saturating_sub(20))
        .map(|i| &s[i..(i + 20).min(s.len())])
        .collect()
}

/// What `client` can read about other sessions in `pg_stat_activity`.
async fn activity_seen_by(client: &Client) -> String {
    let mut seen = String::new();
    for sql in [
        "select coalesce(query, '') from pg_stat_activity",
        "select a::text from pg_stat_activity a",
    ] {
        for row in client.query(sql, &[]).await.unwrap() {
            seen.push_str(row.get::<_, &str>(0));
            seen.push('\n');
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sessions_never_see_alices_envelope_or_token_in_pg_stat_activity() {
    let h = Harness::start().await;
    let bob = h.connect_as("bob").await;
    let anonymous = h.connect("anonymous", "").await.unwrap();
    let alice_token = h.token("alice");

    // Right after alice's startup, before she has sent a query: whatever the
    // proxy did to bind her claims is her backend's last activity.
    let alice = h.connect("authenticated", &alice_token).await.unwrap();
    let alice_pid: i32 = {
        let seen_by_bob = activity_seen_by(&bob).await;
        let seen_by_anonymous = activity_seen_by(&anonymous).await;
        let envelope = envelope_of(&alice).await;
        for seen in [&seen_by_bob, &seen_by_anonymous] {
            assert_never_contains(seen, &envelope, &alice_token);
        }
        alice
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    };

    // After alice ran queries that return her envelope and her claims.
    let envelope = envelope_of(&alice).await;
    alice
        .query_one("select auth.session()::text", &[])
        .await
        .unwrap();
    alice
        .simple_query("select current_setting('rlsgate.session'), auth.user_id()")
        .await
        .unwrap();
    let seen_by_bob = activity_seen_by(&bob).await;
    let seen_by_anonymous = activity_seen_by(&anonymous).await;
    // The check is not vacuous: bob, as the same upstream role, does see
    // alice's query text.
    let alice_query: Option<String> = bob
        .query_one(
            "select query from pg_stat_activity where pid = $1",
            &[&alice_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        alice_query.as_deref(),
        Some("select current_setting('rlsgate.session'), auth.user_id()")
    );
    for seen in [&seen_by_bob, &seen_by_anonymous] {
        assert_never_contains(seen, &envelope, &alice_token);
    }

    // Bob's own settings show bob's envelope, not alice's.
    let bob_envelope = envelope_of(&bob).await;
    assert_ne!(bob_envelope, envelope);
    assert_eq!(payload_of(&bob_envelope)["claims"]["sub"], "bob");
    let in_pg_settings: Vec<String> = bob
        .query(
            "select setting from pg_settings where name = 'rlsgate.session'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        in_pg_settings.iter().all(|s| *s == bob_envelope),
        "pg_settings in bob's session: {in_pg_settings:?}"
    );
    let everything: String = bob
        .query_one("select string_agg(s::text, E'\\n') from pg_settings s", &[])
        .await
        .unwrap()
        .get(0);
    assert_never_contains(&everything, &envelope, &alice_token);
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

fn assert_never_contains(seen: &str, envelope: &str, token: &str) {
    let (_, payload, mac) = parts(envelope);
    assert!(!seen.contains(envelope), "the envelope is visible:\n{seen}");
    assert!(
        !seen.contains(&payload),
        "the envelope's payload is visible:\n{seen}"
    );
    for window in windows(&mac) {
        assert!(
            !seen.contains(window),
            "part of the MAC ({window}) is visible:\n{seen}"
        );
    }
    assert!(!seen.contains(token), "the JWT is visible:\n{seen}");
    let signature = token.rsplit('.').next().unwrap();
    for window in windows(signature) {
        assert!(
            !seen.contains(window),
            "part of the JWT signature ({window}) is visible:\n{seen}"
        );
    }
}

/// What an identity-bearing startup attempt led to.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    /// `current_user`, `session_user`, `auth.user_id()`, `current_setting('rlsgate.session')`.
    Session(Vec<Option<String>>),
}

const WHO: &str = "select current_user::text, session_user::text, auth.user_id(), current_setting('rlsgate.session')";

/// Either refused, or exactly alice as `authenticated` with a proxy-sealed envelope.
fn assert_not_elevated(label: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Refused(_) => {}
        Outcome::Session(row) => {
            assert_eq!(row[0].as_deref(), Some("authenticated"), "{label}: {row:?}");
            assert_eq!(row[1].as_deref(), Some("authenticated"), "{label}: {row:?}");
            assert_eq!(row[2].as_deref(), Some("alice"), "{label}: {row:?}");
            let envelope = row[3].as_deref().unwrap();
            assert_ne!(envelope, "forged", "{label}");
            assert_eq!(payload_of(envelope)["claims"]["sub"], "alice", "{label}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_options_in_the_startup_packet_gain_nothing() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let options = [
        "-c role=postgres",
        "-crole=postgres",
        "-c ROLE=postgres",
        "--role=postgres",
        "-c rlsgate.session=forged",
        "--rlsgate.session=forged",
        "-c rlsgate\\.session=forged",
        "-c RLSGATE.SESSION=forged",
        "-c session_authorization=postgres",
        "--session-authorization=postgres",
        "-c statement_timeout=5s -c role=postgres -c rlsgate.session=forged",
        "-c role=postgres -c session_authorization=anonymous",
    ];
    for option in options {
        let client = connect(
            h.client_config("authenticated", &token)
                .options(option)
                .application_name("forger"),
        )
        .await
        .unwrap_or_else(|e| panic!("options {option:?}: the harmless rest still connects: {e}"));
        let row = client.query_one(WHO, &[]).await.unwrap();
        let outcome = Outcome::Session((0..4).map(|i| row.get(i)).collect());
        assert_not_elevated(option, &outcome);
        let app: String = client
            .query_one("select current_setting('application_name')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(app, "forger", "harmless parameters pass");
        let timeout: String = client
            .query_one("select current_setting('statement_timeout')", &[])
            .await
            .unwrap()
            .get(0);
        let expected = if option.contains("statement_timeout") {
            "5s"
        } else {
            "0"
        };
        assert_eq!(timeout, expected, "harmless options pass: {option}");
    }
}

/// A StartupMessage with arbitrary parameters, straight over TCP, then `sql`.
async fn raw_session(port: u16, parameters: &[(&str, &str)], password: &str, sql: &str) -> Outcome {
    let refused = |e: ErrorResponse| Outcome::Refused(format!("{} {}", e.code, e.message));
    let mut session = match RawSession::connect(port, parameters, password).await {
        Ok(session) => session,
        Err(e) => return refused(e),
    };
    let mut rows = match session.query(sql).await {
        Ok(rows) => rows,
        Err(e) => return refused(e),
    };
    session.terminate().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    Outcome::Session(rows.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_parameters_in_a_raw_startup_message_gain_nothing() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let attempts: [&[(&str, &str)]; 9] = [
        &[("rlsgate.session", "forged")],
        &[("RLSGATE.SESSION", "forged")],
        &[("Rlsgate.Session", "forged")],
        &[("role", "postgres")],
        &[("ROLE", "postgres")],
        &[("session_authorization", "postgres")],
        &[
            ("request.jwt.claims", "{\"sub\":\"bob\"}"),
            ("pg_session_jwt.jwt", "x"),
        ],
        &[
            ("options", "-c role=postgres"),
            ("rlsgate.session", "forged"),
        ],
        &[("user", "postgres")],
    ];
    for extra in attempts {
        let mut parameters = APP_STARTUP.to_vec();
        parameters.extend_from_slice(extra);
        let outcome = raw_session(h.port(), &parameters, &token, WHO).await;
        assert_not_elevated(&format!("{extra:?}"), &outcome);
        if extra[0].0 != "user" {
            assert!(
                matches!(outcome, Outcome::Session(_)),
                "{extra:?}: {outcome:?}"
            );
        } else {
            // The second `user` names a role the proxy does not serve, or
            // it serves alice as authenticated: never postgres.
            if let Outcome::Refused(text) = &outcome {
                assert!(text.starts_with("28000"), "{text}");
            }
        }
    }

    // The raw client itself is sound: a plain startup is alice.
    let plain = raw_session(h.port(), APP_STARTUP, &token, WHO).await;
    assert!(matches!(plain, Outcome::Session(_)), "{plain:?}");
    assert_not_elevated("plain", &plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoptions_through_psql_gain_nothing() {
    let h = Harness::start().await;
    let token = h.token("alice");
    for options in [
        "-c role=postgres",
        "-c rlsgate.session=forged",
        "-c session_authorization=postgres",
        "--role=postgres",
    ] {
        let out = psql_command(&h.conninfo("authenticated"), &token, &[WHO])
            .args(["-F", "|"])
            .env("PGOPTIONS", options)
            .output()
            .expect("run psql");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let outcome = if out.status.success() {
            Outcome::Session(
                stdout
                    .trim()
                    .split('|')
                    .map(|s| Some(s.to_owned()))
                    .collect(),
            )
        } else {
            assert!(stdout.trim().is_empty(), "{options}: {stdout}");
            Outcome::Refused(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        assert!(
            matches!(outcome, Outcome::Session(_)),
            "{options}: {outcome:?}"
        );
        assert_not_elevated(options, &outcome);
    }
}

/// A role served without a token that logs in to Postgres as the same role
/// as `authenticated`.
const SHARED_LOGIN: &str = "[[role]]\nname = \"guest\"\ntoken = \"none\"\n\
    upstream_user = \"authenticated\"\nupstream_password = \"authenticated-dev-password\"\n";

/// An envelope is bound to the backend it was issued for: alice's, copied
/// into bob's session or into a session of a token-less role that logs in
/// as the same Postgres role, raises 28000, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alices_envelope_replayed_in_another_session_of_her_login_role_raises_28000() {
    for (mode, pool) in POOL_MODES {
        // Text: `upstream_user` is not a field a test can set.
        let h = Harness::start_configured(SHARED_LOGIN, pool).await;
        let alice = h.connect_as("alice").await;
        // A row, so that the policies on todos have something to check.
        alice
            .execute("insert into todos (title) values ('alice plan')", &[])
            .await
            .unwrap();
        let envelope = envelope_of(&alice).await;
        let bob = h.connect_as("bob").await;
        let guest = h.connect("guest", "").await.expect("guest needs no token");
        for (who, client) in [("bob", &bob), ("guest", &guest)] {
            for way in WAYS {
                for sql in ["select auth.user_id()", "select * from todos"] {
                    match with_setting(client, way, &envelope, sql).await {
                        Ok(rows) => {
                            panic!("{mode} {who} {way:?}: alice's envelope gave {rows:?}")
                        }
                        Err(e) => {
                            let (code, message) = db_error(&e);
                            assert_eq!(code, "28000", "{mode} {who} {way:?}: {message}");
                            assert!(message.contains("another session"), "{message}");
                        }
                    }
                }
            }
        }
        assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
        assert_eq!(user_id_of(&guest).await, None);
        assert_is_alice(&alice, "her own session still is hers").await;
    }
}

/// The backend is named by its process id and its start time, so an
/// envelope made for an earlier backend with the same process id is
/// refused; and every envelope expires within its lifetime (an hour by
/// default), even when sessions outlive their tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_names_its_backends_pid_and_start_and_expires_within_the_hour() {
    let h = Harness::start_with("[listen]\nend_sessions_at_token_expiry = false").await;
    let alice = h.connect_as("alice").await;
    let anonymous = h.connect("anonymous", "").await.unwrap();
    for client in [&alice, &anonymous] {
        let envelope = envelope_of(client).await;
        let payload = payload_of(&envelope);
        let row = client
            .query_one(
                "select pg_backend_pid(), \
                 (extract(epoch from backend_start) * 1000000)::bigint \
                 from pg_stat_activity where pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(payload["pid"].as_i64(), Some(row.get::<_, i32>(0).into()));
        assert_eq!(payload["started"].as_i64(), Some(row.get::<_, i64>(1)));
        let exp = payload["exp"].as_u64().expect("an expiry");
        let now = crate::support::unix_now();
        assert!(
            exp > now + 3500 && exp <= now + 3600,
            "exp {exp}, now {now}"
        );
    }

    // Sealed with the real key: for this backend it works (so the key is
    // right), for the same process id started a microsecond earlier it is
    // refused.
    let key = SigningKey::from_base64(crate::support::SIGNING_KEY).unwrap();
    let own = payload_of(&envelope_of(&alice).await);
    let claims = own["claims"].as_object().cloned();
    let mut backend = backend_of(&envelope_of(&alice).await);
    let exp = crate::support::unix_now() + 60;
    let right = key.seal(&identity("authenticated", claims.clone()), backend, exp);
    let rows = with_setting(&alice, Way::Set, &right, "select auth.user_id()")
        .await
        .expect("an envelope for this backend works");
    assert_eq!(rows, vec![vec![Some("alice".to_owned())]]);
    backend.started -= 1;
    let reused = key.seal(&identity("authenticated", claims), backend, exp);
    for way in WAYS {
        assert_28000(
            &alice,
            way,
            "an earlier backend's",
            &reused,
            "select auth.user_id()",
        )
        .await;
    }
}

/// Every role may `ALTER ROLE` itself, so a setting alice puts on the shared
/// login role would change every later session of every user. The proxy
/// refuses new upstream connections (unpooled and pooled alike) of a login
/// role with settings the configuration does not declare, and serves it
/// again once they are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_put_on_the_shared_login_role_from_a_session_is_refused_until_removed() {
    for (mode, pool) in POOL_MODES {
        // Alone: settings of `authenticated` reach every test's sessions.
        let h = Harness::start_alone_configured("", |c| {
            pool(c);
            with_admin(c);
        })
        .await;
        let admin = h.admin().await;
        // Everyone keeps their session, so each new one needs a new
        // upstream connection (the pooled ones made before are unaffected).
        let alice = h.connect_as("alice").await;
        let mut kept = Vec::new();
        for setting in [
            "alter role authenticated set statement_timeout = '1ms'",
            "alter role authenticated in database app set search_path = 'nowhere'",
        ] {
            alice.batch_execute(setting).await.unwrap();
            let err = h
                .connect("authenticated", &h.token("bob"))
                .await
                .expect_err(&format!(
                    "{mode}: a login role altered by `{setting}` is not served"
                ));
            let (code, message) = db_error(&err);
            assert_eq!(code, "08006", "{mode} after `{setting}`: {message}");
            assert!(message.contains("the database is unavailable"), "{message}");
            // The operator is told: /readyz names the role, the gauge is up.
            let (status, body) = crate::support::http_get(&h.admin_url("/readyz")).await;
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("undeclared_settings"), "{body}");
            let (_, metrics) = crate::support::http_get(&h.admin_url("/metrics")).await;
            let labels = [("kind", "undeclared_settings"), ("user", "authenticated")];
            assert_eq!(
                crate::support::metric(&metrics, "rlsgate_upstream_tampering", &labels),
                Some(1.0)
            );
            admin
                .batch_execute(
                    "alter role authenticated reset all; \
                                alter role authenticated in database app reset all",
                )
                .await
                .unwrap();
            let bob = h.connect_as("bob").await;
            assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"), "{mode}");
            let (status, body) = crate::support::http_get(&h.admin_url("/readyz")).await;
            assert_eq!(status, 200, "the alarm clears with the next login: {body}");
            kept.push(bob);
        }
    }
}

/// Settings the operator declares in `[[role]] upstream_settings` are
/// served; any other setting is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_login_role_settings_are_served_and_others_still_refused() {
    let h = Harness::start_alone_configured("", |config| {
        let role = config
            .roles
            .iter_mut()
            .find(|r| r.name == "authenticated")
            .unwrap();
        role.upstream_settings = vec!["statement_timeout=5min".to_owned()];
    })
    .await;
    let admin = h.admin().await;
    admin
        .batch_execute("alter role authenticated set statement_timeout = '5min'")
        .await
        .unwrap();
    let alice = h.connect_as("alice").await;
    let timeout: String = alice
        .query_one("show statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "5min");
    alice
        .batch_execute("alter role authenticated set statement_timeout = '1ms'")
        .await
        .unwrap();
    let err = h
        .connect("authenticated", &h.token("bob"))
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "08006");
}

/// The envelope is a bound parameter, not part of the startup packet (which
/// PostgreSQL caps at 10 000 bytes), so large claims are bound whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_larger_than_a_startup_packet_are_bound_whole() {
    for (mode, pool) in POOL_MODES {
        let h = Harness::start_configured("", pool).await;
        let groups = "g".repeat(10_000);
        let token = h.token_with(
            rlsgate::dev::issuer::KeyKind::Rs256,
            serde_json::json!({"sub": "alice", "aud": "todo-app", "groups": groups}),
        );
        let alice = h.connect("authenticated", &token).await.unwrap();
        let length: i32 = alice
            .query_one("select length(auth.session() ->> 'groups')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(length, 10_000, "{mode}");
    }
}
