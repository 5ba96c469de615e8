//! `rlsgate check`, run as the real binary against the test world: a
//! configuration that works passes, and each way of being wrong (no schema
//! `auth`, a signing key the database does not know, a table open to a
//! served role without RLS, a role it can become that escapes RLS, an
//! undeclared role setting, a provider that cannot be reached) fails with a
//! line that names the problem; what one user of a shared login role can do
//! to the others (large objects, its password) is a warning.

use std::net::SocketAddr;
use std::process::Stdio;

use crate::support::config_file::{edit_toml, role, set};
use crate::support::{Harness, SIGNING_KEY};

/// A signing key the test database has never been told about.
const OTHER_SIGNING_KEY: &str = "YW5vdGhlci1zaWduaW5nLWtleS10aGF0LWlzLTMyLWJ5dGVzIQ==";

/// The outcome of one `rlsgate check`.
struct Checked {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Checked {
    /// The report's lines that start with `label` (`ok`, `warn`, `FAIL`).
    fn lines(&self, label: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|line| line.split_whitespace().next() == Some(label))
            .collect()
    }

    /// The FAIL line mentioning every one of `words`; none is a failure.
    fn failure(&self, words: &[&str]) -> &str {
        self.lines("FAIL")
            .into_iter()
            .find(|line| words.iter().all(|w| line.contains(w)))
            .unwrap_or_else(|| panic!("no FAIL line mentions {words:?}:\n{self}"))
    }
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// The harness's configuration, with `signing_key`, and `extra_toml`
/// appended (where it lands in the `[[provider]]` unless it opens a section).
fn config_text(h: &Harness, signing_key: &str, extra_toml: &str) -> String {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut toml =
        rlsgate::dev::sample_config(listen, h.pg.port(), &h.issuer.issuer(), signing_key);
    toml.push_str(extra_toml);
    toml
}

/// Writes `toml` to a file and runs `rlsgate check` on it, for `database`.
async fn check(toml: &str, database: &str) -> Checked {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("rlsgate.toml");
    std::fs::write(&path, toml).expect("write the configuration");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rlsgate"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .args(["--database", database])
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run rlsgate check");
    let checked = Checked {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).expect("the report is UTF-8"),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    for secret in [
        SIGNING_KEY,
        OTHER_SIGNING_KEY,
        "authenticated-dev-password",
        "anonymous-dev-password",
    ] {
        assert!(
            !checked.stdout.contains(secret) && !checked.stderr.contains(secret),
            "rlsgate check printed a secret:\n{checked}"
        );
    }
    if !checked.success {
        assert_eq!(output.status.code(), Some(1), "{checked}");
    }
    checked
}

/// The harness's database without the test table `scratch`, which is granted
/// to `authenticated` without RLS.
///
/// Alone: these tests create roles, grant them to `authenticated` and change
/// its settings and password, and each `rlsgate check` inspects the roles of
/// the whole cluster.
async fn good_setup() -> Harness {
    let h = Harness::start_alone("").await;
    h.admin()
        .await
        .batch_execute("drop table scratch")
        .await
        .unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup() {
    let h = good_setup().await;
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(checked.success, "{checked}");
    assert!(checked.lines("FAIL").is_empty(), "{checked}");
    let ok = checked.lines("ok");
    let provider = format!("provider {}", h.issuer.issuer());
    assert!(
        ok.iter()
            .any(|line| line.contains(&provider) && line.contains("signing key")),
        "{checked}"
    );
    for role in ["authenticated", "anonymous"] {
        let subject = format!("role {role}:");
        for finding in [
            "logged in to database app",
            "schema auth is installed",
            "the database knows the configured signing key",
            "row-level security covers every table",
        ] {
            assert!(
                ok.iter()
                    .any(|line| line.contains(&subject) && line.contains(finding)),
                "no ok line for {role}: {finding}\n{checked}"
            );
        }
    }
    assert!(checked.stdout.contains("passed"), "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_without_the_auth_schema() {
    let h = good_setup().await;
    let admin = h.pg.connect("postgres").await.unwrap();
    admin.batch_execute("create database bare").await.unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "bare").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&["role authenticated", "schema auth is not installed"]);
    assert!(line.contains("rlsgate init-db"), "{line}");
    assert!(line.contains("/bare"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_with_a_wrong_signing_key() {
    let h = good_setup().await;
    let checked = check(&config_text(&h, OTHER_SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let key_id = rlsgate::auth::claims::SigningKey::from_base64(OTHER_SIGNING_KEY)
        .unwrap()
        .id()
        .to_owned();
    for role in ["role authenticated", "role anonymous"] {
        let line = checked.failure(&[
            role,
            "the database does not know the configured signing key",
        ]);
        assert!(line.contains(&key_id), "{line}");
        assert!(line.contains("rlsgate init-db"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_a_table_granted_to_authenticated_has_no_rls() {
    let h = good_setup().await;
    h.admin()
        .await
        .batch_execute(
            "create table notes (id int, body text); grant select on notes to authenticated;",
        )
        .await
        .unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&["role authenticated", "public.notes"]);
    assert!(line.contains("row-level security disabled"), "{line}");
    assert!(line.contains("SELECT"), "{line}");
    // anonymous has no privilege on it, and todos is under RLS.
    assert_eq!(checked.lines("FAIL").len(), 1, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_a_provider_is_unreachable() {
    let h = good_setup().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let extra = format!("\n[[provider]]\nissuer = \"{unreachable}\"\n");
    let checked = check(&config_text(&h, SIGNING_KEY, &extra), "app").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&[&format!("provider {unreachable}"), "cannot fetch"]);
    assert!(line.contains("refused"), "{line}");
    // The reachable provider is still reported as working.
    let working = format!("provider {}", h.issuer.issuer());
    assert!(
        checked.lines("ok").iter().any(|l| l.contains(&working)),
        "{checked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_role_that_can_set_role_to_a_bypassrls_role_fails() {
    let h = good_setup().await;
    h.admin()
        .await
        .batch_execute(
            "create role service_role nologin bypassrls; \
             grant select on todos to service_role; \
             grant service_role to authenticated; \
             insert into todos (user_id, title) values ('bob', 'bob''s secret');",
        )
        .await
        .unwrap();
    // The escape is real: through the proxy, alice reads bob's row.
    let alice = h.connect_as("alice").await;
    let rows = alice
        .simple_query("set role service_role; select title from todos")
        .await
        .unwrap();
    let seen: Vec<&str> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(seen, ["bob's secret"]);

    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&[
        "role authenticated",
        "authenticated can SET ROLE service_role",
        "BYPASSRLS",
    ]);
    assert!(
        line.contains("revoke service_role from authenticated"),
        "{line}"
    );
    // anonymous was granted nothing.
    assert!(
        checked
            .lines("FAIL")
            .iter()
            .all(|l| !l.contains("role anonymous")),
        "{checked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_grants_to_a_superuser_fails_and_names_the_path() {
    let h = good_setup().await;
    h.admin()
        .await
        .batch_execute(
            "create role root_like superuser nologin; \
             create role ops nologin; \
             grant root_like to ops; \
             grant ops to anonymous;",
        )
        .await
        .unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&[
        "role anonymous",
        "anonymous can SET ROLE root_like (through ops)",
        "superuser",
    ]);
    assert!(line.contains("revoke ops from anonymous"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_role_that_can_become_pg_read_all_data_or_pg_write_all_data_fails() {
    let h = good_setup().await;
    h.admin()
        .await
        .batch_execute(
            "grant pg_read_all_data to anonymous; grant pg_write_all_data to authenticated;",
        )
        .await
        .unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let read = checked.failure(&["role anonymous", "pg_read_all_data", "reads every table"]);
    assert!(
        read.contains("revoke pg_read_all_data from anonymous"),
        "{read}"
    );
    let write = checked.failure(&[
        "role authenticated",
        "pg_write_all_data",
        "writes every table",
    ]);
    assert!(
        write.contains("revoke pg_write_all_data from authenticated"),
        "{write}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_the_served_user_can_only_set_role_to_is_checked_like_the_user() {
    let h = good_setup().await;
    // NOINHERIT: authenticated holds none of reporting's privileges until
    // it runs `set role reporting`.
    h.admin()
        .await
        .batch_execute(
            "alter role authenticated noinherit; \
             create role reporting nologin; \
             grant reporting to authenticated; \
             create table ledger (id int, amount int); \
             insert into ledger values (1, 100); \
             grant select on ledger to reporting; \
             create table audit (id int); \
             alter table audit enable row level security; \
             alter table audit owner to reporting; \
             grant truncate on todos to reporting; \
             grant select on auth.signing_keys to reporting;",
        )
        .await
        .unwrap();
    let alice = h.connect_as("alice").await;
    let denied = alice
        .simple_query("select * from ledger")
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    alice
        .simple_query("set role reporting; select * from ledger")
        .await
        .expect("after set role reporting, alice reads ledger");

    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(!checked.success, "{checked}");
    let via = "authenticated can SET ROLE reporting";
    let ledger = checked.failure(&["role authenticated", via, "public.ledger"]);
    assert!(ledger.contains("row-level security disabled"), "{ledger}");
    let audit = checked.failure(&["role authenticated", "public.audit", "owned by reporting"]);
    assert!(
        audit.contains("which authenticated can SET ROLE to"),
        "{audit}"
    );
    assert!(audit.contains("force row level security"), "{audit}");
    let keys = checked.failure(&["role authenticated", via, "auth.signing_keys"]);
    assert!(
        keys.contains("revoke reporting from authenticated"),
        "{keys}"
    );
    assert!(
        checked.lines("warn").iter().any(|l| l.contains(via)
            && l.contains("TRUNCATE table public.todos")
            && l.contains("revoke truncate on public.todos from reporting")),
        "{checked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_roles_that_can_create_large_objects_are_warned_until_execute_is_revoked() {
    let h = good_setup().await;
    // The exposure is real: alice reads and deletes the large object bob made.
    let bob = h.connect_as("bob").await;
    let made = bob
        .query_one("select lo_from_bytea(0, 'bob''s secret')", &[])
        .await
        .unwrap();
    let oid: u32 = made.get(0);
    let alice = h.connect_as("alice").await;
    let read = alice
        .query_one("select convert_from(lo_get($1), 'UTF8')", &[&oid])
        .await
        .unwrap();
    assert_eq!(read.get::<_, String>(0), "bob's secret");

    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(checked.success, "warnings only:\n{checked}");
    let warned = |checked: &Checked, role: &str, words: &[&str]| {
        checked
            .lines("warn")
            .iter()
            .any(|l| l.contains(&format!("role {role}:")) && words.iter().all(|w| l.contains(w)))
    };
    for role in ["authenticated", "anonymous"] {
        assert!(
            warned(
                &checked,
                role,
                &[
                    "can create large objects",
                    "pg_catalog.lo_create(oid)",
                    "pg_catalog.lo_creat(integer)",
                    "pg_catalog.lo_from_bytea(oid, bytea)",
                    "revoke execute on function",
                ]
            ),
            "{checked}"
        );
    }
    assert!(
        warned(&checked, "authenticated", &["owns 1 large object(s)"]),
        "{checked}"
    );

    alice
        .query_one("select lo_unlink($1)", &[&oid])
        .await
        .expect("alice deletes bob's large object");
    h.admin()
        .await
        .batch_execute(
            "revoke execute on function lo_create(oid), lo_creat(integer), \
             lo_from_bytea(oid, bytea) from public",
        )
        .await
        .unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(checked.success, "{checked}");
    assert!(
        checked
            .lines("warn")
            .iter()
            .all(|l| !l.contains("large object")),
        "{checked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_logging_in_upstream_with_a_password_is_warned_that_a_token_holder_can_change_it() {
    let h = good_setup().await;
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(checked.success, "warnings only:\n{checked}");
    for role in ["authenticated", "anonymous"] {
        assert!(
            checked
                .lines("warn")
                .iter()
                .any(|l| l.contains(&format!("role {role}:"))
                    && l.contains("upstream_password")
                    && l.contains("tls_client_cert")
                    && l.contains("method cert")
                    && l.contains("method peer")),
            "no password warning for {role}:\n{checked}"
        );
    }
    // The exposure is real: one token holder locks every user out.
    let alice = h.connect_as("alice").await;
    alice
        .batch_execute("alter role authenticated password 'chosen-by-alice'")
        .await
        .unwrap();
    let refused = h.connect("authenticated", &h.token("bob")).await;
    assert!(refused.is_err(), "bob still connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_setting_made_through_a_session_fails_the_check_until_it_is_declared() {
    let h = good_setup().await;
    let alice = h.connect_as("alice").await;
    alice
        .batch_execute(
            "alter role authenticated set statement_timeout = '1ms'; \
             alter role authenticated in database app set search_path = public;",
        )
        .await
        .unwrap();
    let toml = config_text(&h, SIGNING_KEY, "");
    let checked = check(&toml, "app").await;
    assert!(!checked.success, "{checked}");
    let line = checked.failure(&["role authenticated", "statement_timeout=1ms"]);
    assert!(
        line.contains("alter role authenticated reset statement_timeout"),
        "{line}"
    );
    assert!(line.contains("upstream_settings"), "{line}");
    let line = checked.failure(&["role authenticated", "search_path=public"]);
    assert!(
        line.contains("alter role authenticated in database app reset search_path"),
        "{line}"
    );
    assert_eq!(checked.lines("FAIL").len(), 2, "{checked}");

    let declared = edit_toml(&toml, |doc| {
        let settings = vec!["statement_timeout=1ms", "search_path=public"];
        set(role(doc, "authenticated"), "upstream_settings", settings);
    });
    let checked = check(&declared, "app").await;
    assert!(checked.success, "{checked}");
    assert!(checked.lines("FAIL").is_empty(), "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_wide_setting_is_a_warning() {
    let h = good_setup().await;
    h.admin()
        .await
        .batch_execute("alter database app set lo_compat_privileges = on")
        .await
        .unwrap();
    let checked = check(&config_text(&h, SIGNING_KEY, ""), "app").await;
    assert!(checked.success, "warnings only:\n{checked}");
    let warns = checked.lines("warn");
    assert!(
        warns.iter().any(
            |l| l.contains("database app has the setting lo_compat_privileges=on")
                && l.contains("alter database app reset lo_compat_privileges")
        ),
        "{checked}"
    );
    assert!(
        warns
            .iter()
            .any(|l| l.contains("lo_compat_privileges is on")),
        "{checked}"
    );
}
