//! How the proxy logs in to Postgres, and what happens when a session
//! changes the shared login role: with a client certificate (pg_hba `cert`)
//! or by peer over a Unix socket, `ALTER ROLE … PASSWORD` locks nobody out;
//! with a password it does, and the proxy says so (log, `/readyz`, metrics)
//! until the password is set back.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::config_file::{edit_toml, section, set};
use crate::support::pki::TestPki;
use crate::support::process::Served;
use crate::support::{
    Harness, SIGNING_KEY, WAIT, a_cancel_request_ends, client_config, connect, db_error, http_get,
    metric, pid_of, pooled, toml_path, user_id_of, with_admin,
};
use rlsgate::config::Config;
use rlsgate::dev::postgres::TempPostgres;
use serde_json::{Value, json};

/// The sample configuration's password for the login role `authenticated`.
const CONFIGURED_PASSWORD: &str = "authenticated-dev-password";

/// The text of the proxy's configuration for the harness's world, with
/// `extra` placed as `Harness::start_with` places it, for a file.
fn config_toml(h: &Harness, extra: &str) -> String {
    crate::support::proxy_config_toml(
        "127.0.0.1".parse().unwrap(),
        &h.pg,
        &h.issuer.issuer(),
        extra,
    )
}

/// A configuration file in a directory that lives as long as the result.
fn config_file(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rlsgate.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

/// `rlsgate check` on `config` for database `app`: its report.
async fn check_report(config: &Path) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rlsgate"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(["--database", "app"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run rlsgate check");
    String::from_utf8(output.stdout).expect("the report is UTF-8")
}

/// Alice changes the login role's password in her session, then Bob, a
/// new session of the same role, must still get in.
async fn a_password_changed_in_a_session_locks_nobody_out(h: &Harness) {
    let alice = h.connect_as("alice").await;
    alice
        .batch_execute("alter role authenticated password 'changed-in-a-session'")
        .await
        .expect("a role may change its own password");
    let bob = h.connect_as("bob").await;
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
}

// --- client certificates -------------------------------------------------

/// pg_hba for client certificates: the superuser by password (the test
/// harness's own connections), every other role by certificate, through the
/// pg_ident map `proxy` from the certificate's CN to the roles it may be.
const CERT_HBA: &str = "hostssl all postgres 127.0.0.1/32 scram-sha-256\n\
                        hostssl all all 127.0.0.1/32 cert map=proxy\n";
const CERT_IDENT: &str = "proxy authenticated authenticated\n\
                          proxy authenticated anonymous\n\
                          proxy installer installer\n";

/// A TLS-only PostgreSQL with `ca`'s server certificate that logs roles in
/// by client certificates signed by `ca`.
async fn cert_postgres(ca: &TestPki) -> TempPostgres {
    let mut pg = ca.postgres().await;
    pg.set_authentication(CERT_HBA, CERT_IDENT, Some(&ca.ca_text()))
        .await
        .expect("configure certificate authentication");
    pg
}

/// `[upstream]` lines for verify-full against `ca`, with a client
/// certificate when one is given.
fn cert_upstream(ca: &TestPki, client: Option<&(PathBuf, PathBuf)>) -> String {
    let mut lines = format!(
        "[upstream]\ntls = \"verify-full\"\ntls_ca_file = {}\n",
        toml_path(&ca.ca_pem)
    );
    if let Some((cert, key)) = client {
        lines.push_str(&format!(
            "tls_client_cert = {}\ntls_client_key = {}\n",
            toml_path(cert),
            toml_path(key)
        ));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_certificate_sessions_pooled_or_not_work_and_a_changed_password_locks_nobody_out()
 {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let client = ca.client_certificate("authenticated");
    let h = Harness::start_on(cert_postgres(&ca).await, &cert_upstream(&ca, Some(&client))).await;

    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    // Postgres saw the proxy's certificate on this very session.
    assert_eq!(
        client_dn(&alice).await.as_deref(),
        Some("/CN=authenticated")
    );
    // The same certificate logs in the other role, through pg_ident's map.
    let anonymous = h
        .connect("anonymous", "")
        .await
        .expect("anonymous connects");
    assert!(Harness::upstream_ssl(&anonymous).await);

    a_password_changed_in_a_session_locks_nobody_out(&h).await;
    a_cancel_request_ends(h.connect_as("carol").await).await;

    // Pooled connections log in the same way.
    h.reload_configured(&cert_upstream(&ca, Some(&client)), pooled)
        .expect("reload with pooling");
    let dave = h.connect_as("dave").await;
    assert_eq!(user_id_of(&dave).await.as_deref(), Some("dave"));
    assert_eq!(client_dn(&dave).await.as_deref(), Some("/CN=authenticated"));
}

/// The subject of the client certificate Postgres saw on this session.
async fn client_dn(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one(
            "select client_dn from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Alice is refused as when the database is down, and the proxy's log
/// says why, in words containing `detail`.
async fn refused_with(served: &Served, h: &Harness, detail: &str) {
    let config = client_config(served.address, "authenticated", Some(&h.token("alice")));
    let error = match connect(&config).await {
        Ok(_) => panic!("the proxy opened a session that Postgres must refuse"),
        Err(e) => e,
    };
    assert_eq!(
        db_error(&error),
        (
            "08006".to_owned(),
            "the database is unavailable; try again later".to_owned()
        )
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !served.logged("refused").iter().any(|r| {
        r["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(detail))
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal in the log says {detail:?}:\n{}",
            served.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_untrusted_client_certificate_is_refused_and_the_log_says_which() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let h = Harness::start_on(cert_postgres(&ca).await, "").await;
    let toml = |client: Option<&(PathBuf, PathBuf)>| {
        config_toml(&h, cert_upstream(&ca, client).trim_end())
    };
    let (_dir, path) = config_file(&toml(None));
    let served = Served::start(&path).await;
    // No certificate: Postgres's `cert` method refuses the login.
    refused_with(
        &served,
        &h,
        "connection requires a valid client certificate",
    )
    .await;
    assert!(
        served.logged("refused").iter().any(|r| r["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("[upstream] tls_client_cert"))),
        "the refusal names the setting to add:\n{}",
        served.text()
    );

    // A certificate from a CA the server does not trust: TLS refuses it.
    let stranger = TestPki::generate_named("some other CA", &[]);
    served
        .reload(&toml(Some(&stranger.client_certificate("authenticated"))))
        .await;
    refused_with(
        &served,
        &h,
        "refused the proxy's client certificate ([upstream] tls_client_cert)",
    )
    .await;

    // A reload reads the right one, and sessions work again.
    served
        .reload(&toml(Some(&ca.client_certificate("authenticated"))))
        .await;
    let config = client_config(served.address, "authenticated", Some(&h.token("bob")));
    let bob = connect(&config).await.expect("bob connects");
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
    // A refused certificate is not a changed password.
    assert!(served.logged("probably changed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_init_db_log_in_with_client_certificates() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let client = ca.client_certificate("authenticated");
    let h = Harness::start_on(cert_postgres(&ca).await, "").await;

    let (_dir, path) = config_file(&config_toml(
        &h,
        cert_upstream(&ca, Some(&client)).trim_end(),
    ));
    let report = check_report(&path).await;
    for role in ["authenticated", "anonymous"] {
        let line = format!(
            "ok    role {role}: logged in to database app on 127.0.0.1:{} as {role}",
            h.pg.port()
        );
        assert!(report.contains(&line), "no line {line:?}:\n{report}");
    }

    // init-db as the owner of a database, by certificate (libpq's sslcert
    // and sslkey in the URL).
    let admin = h.admin().await;
    admin
        .batch_execute("create role installer login")
        .await
        .unwrap();
    admin
        .batch_execute("create database owned owner installer")
        .await
        .unwrap();
    let (cert, key) = ca.client_certificate("installer");
    let keys = [rlsgate::auth::claims::SigningKey::from_base64(SIGNING_KEY)
        .unwrap()
        .bytes()
        .to_vec()];
    let url = format!(
        "postgresql://installer@127.0.0.1:{}/owned?sslmode=verify-full&sslrootcert={}",
        h.pg.port(),
        ca.ca_pem.display()
    );
    let without = rlsgate::commands::init_db::run(&url, None, &keys)
        .await
        .expect_err("without a certificate Postgres refuses the login");
    let without = format!("{without:#}");
    assert!(
        without.contains("requires a valid client certificate"),
        "{without}"
    );
    let with = format!("{url}&sslcert={}&sslkey={}", cert.display(), key.display());
    let report = rlsgate::commands::init_db::run(&with, None, &keys)
        .await
        .expect("init-db logs in with the certificate");
    assert_eq!(report.version_before, None);
}

// --- Unix socket, peer authentication ------------------------------------

/// The OS user running the tests (root in CI), whom peer authentication sees.
fn os_user() -> String {
    let output = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("run id -un");
    assert!(output.status.success(), "id -un failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A PostgreSQL that logs in over its Unix socket by peer, mapping the OS
/// user running the tests to the served roles (and the superuser, for
/// init-db); TCP stays for the harness's superuser. Returns the harness,
/// with a proxy over the socket, and the socket's directory.
async fn socket_harness(edit: impl FnOnce(&mut Config)) -> (Harness, String) {
    let mut pg = TempPostgres::start().await.expect("start PostgreSQL");
    let dir = pg
        .socket_dir()
        .expect("the temporary PostgreSQL has a Unix socket (its path is short enough)");
    let user = os_user();
    pg.set_authentication(
        "local all all peer map=proxy\nhost all all 127.0.0.1/32 scram-sha-256\n",
        &format!("proxy {user} authenticated\nproxy {user} anonymous\nproxy {user} postgres\n"),
        None,
    )
    .await
    .expect("configure peer authentication");
    let dir = dir.display().to_string();
    let h = Harness::start_on_configured(pg, "", |c| {
        c.upstream.host = dir.clone();
        edit(c);
    })
    .await;
    (h, dir)
}

/// The port of the session's client as Postgres sees it: -1 over a Unix socket.
async fn client_port(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_one(
            "select client_port from pg_stat_activity where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_unix_socket_with_peer_authentication_sessions_and_cancel_work_and_a_changed_password_locks_nobody_out()
 {
    let (h, _dir) = socket_harness(|_| {}).await;
    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    assert_eq!(client_port(&alice).await, Some(-1), "not over the socket");
    let anonymous = h
        .connect("anonymous", "")
        .await
        .expect("anonymous connects");
    assert_eq!(client_port(&anonymous).await, Some(-1));

    a_password_changed_in_a_session_locks_nobody_out(&h).await;
    a_cancel_request_ends(h.connect_as("carol").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_sessions_go_over_a_unix_socket() {
    let (h, _dir) = socket_harness(pooled).await;
    let alice = h.connect_as("alice").await;
    assert_eq!(client_port(&alice).await, Some(-1), "not over the socket");
    let mut seen = std::collections::HashSet::new();
    seen.insert(pid_of(&alice).await);
    drop(alice);
    // A later session gets a connection an earlier one left in the pool.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let bob = h.connect_as("bob").await;
        assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
        assert_eq!(client_port(&bob).await, Some(-1));
        if !seen.insert(pid_of(&bob).await) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pooled connection was reused"
        );
        drop(bob);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_probes_the_unix_socket() {
    let (mut h, dir) = socket_harness(with_admin).await;
    let (status, body) = http_get(&h.admin_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["upstream"], json!("ok"), "{body}");

    h.pg.pause();
    let (status, body) = http_get(&h.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let socket = format!("{dir}/.s.PGSQL.{}", h.pg.port());
    assert!(body.contains(&socket), "{body}");

    h.pg.resume().await.expect("start PostgreSQL again");
    let (status, body) = http_get(&h.admin_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_init_db_work_over_the_unix_socket() {
    let (h, dir) = socket_harness(|_| {}).await;
    let toml = edit_toml(&config_toml(&h, ""), |doc| {
        set(section(doc, "upstream"), "host", dir.as_str());
    });
    let (_config_dir, path) = config_file(&toml);
    let report = check_report(&path).await;
    for role in ["authenticated", "anonymous"] {
        let line = format!(
            "ok    role {role}: logged in to database app on {dir}/.s.PGSQL.{} as {role}",
            h.pg.port()
        );
        assert!(report.contains(&line), "no line {line:?}:\n{report}");
    }

    let keys = [rlsgate::auth::claims::SigningKey::from_base64(SIGNING_KEY)
        .unwrap()
        .bytes()
        .to_vec()];
    let conninfo = format!("host={dir} port={} user=postgres dbname=app", h.pg.port());
    let report = rlsgate::commands::init_db::run(&conninfo, None, &keys)
        .await
        .expect("init-db over the socket, by peer");
    assert_eq!(report.version_before, Some(report.version_after));
    // A socket has no TLS to require.
    let error =
        rlsgate::commands::init_db::run(&format!("{conninfo} sslmode=require"), None, &keys)
            .await
            .expect_err("sslmode=require cannot be met over a socket");
    assert!(format!("{error:#}").contains("Unix socket"), "{error:#}");
}

// --- passwords -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_from_inside_a_session_raises_an_alarm_until_it_is_set_back() {
    // Alone: it changes the password of `authenticated`, which other tests share.
    let h = Harness::start_alone("").await;
    let toml = config_toml(&h, "[listen]\nadmin_address = \"127.0.0.1:0\"");
    let (_dir, path) = config_file(&toml);
    let served = Served::start(&path).await;
    let session = |sub: &str| {
        let config = client_config(served.address, "authenticated", Some(&h.token(sub)));
        async move { connect(&config).await }
    };

    let alice = session("alice").await.expect("alice connects");
    alice
        .batch_execute("alter role authenticated password 'changed-in-a-session'")
        .await
        .expect("a role may change its own password");
    for sub in ["bob", "carol"] {
        let error = match session(sub).await {
            Ok(_) => panic!("{sub} logged in with a password Postgres no longer has"),
            Err(e) => e,
        };
        assert_eq!(
            db_error(&error),
            (
                "08006".to_owned(),
                "the database is unavailable; try again later".to_owned()
            )
        );
    }
    served.wait_for("refused", 2).await;
    // Sessions that were open go on.
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    // Said once, as a warning with what to do.
    let warnings = served.logged("probably changed from inside a session");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = &warnings[0];
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["fields"]["kind"], "password_rejected", "{warning}");
    assert_eq!(
        warning["fields"]["upstream_user"], "authenticated",
        "{warning}"
    );
    let text = warning["fields"]["message"].as_str().unwrap();
    for advice in [
        "ALTER ROLE authenticated PASSWORD",
        "tls_client_cert",
        "peer",
    ] {
        assert!(text.contains(advice), "{text}");
    }

    let (status, body) = http_get(&served.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], json!(false), "{body}");
    assert_eq!(body["upstream"], json!("ok"), "{body}");
    assert_eq!(body["tampering"][0]["kind"], "password_rejected", "{body}");
    assert_eq!(
        body["tampering"][0]["upstream_user"], "authenticated",
        "{body}"
    );
    let (_, metrics) = http_get(&served.admin_url("/metrics")).await;
    let labels = [("kind", "password_rejected"), ("user", "authenticated")];
    assert_eq!(
        metric(&metrics, "rlsgate_upstream_tampering", &labels),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "rlsgate_upstream_tampering_total",
            &[("kind", "password_rejected")]
        ),
        Some(2.0),
        "{metrics}"
    );

    // Set back by the superuser: the next login works, and the alarm is over.
    h.admin()
        .await
        .batch_execute(&format!(
            "alter role authenticated password '{CONFIGURED_PASSWORD}'"
        ))
        .await
        .unwrap();
    let dave = session("dave").await.expect("dave connects");
    assert_eq!(user_id_of(&dave).await.as_deref(), Some("dave"));
    served.wait_for("alarm cleared", 1).await;
    let (status, body) = http_get(&served.admin_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("tampering"), "{body}");
    let (_, metrics) = http_get(&served.admin_url("/metrics")).await;
    assert_eq!(
        metric(&metrics, "rlsgate_upstream_tampering", &labels),
        Some(0.0),
        "{metrics}"
    );

    let log = served.text();
    for password in [CONFIGURED_PASSWORD, "changed-in-a-session"] {
        assert!(!log.contains(password), "the log shows a password");
        assert!(!metrics.contains(password), "/metrics shows a password");
    }
}
