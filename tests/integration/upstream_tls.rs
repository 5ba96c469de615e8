//! TLS between the proxy and Postgres, per `[upstream] tls` with libpq's
//! `sslmode` meanings. The TLS servers here accept TCP connections only over
//! TLS (`hostssl`), so a session that works is a session that is encrypted;
//! `pg_stat_ssl` confirms it from the server's side.

use crate::support::pki::TestPki;
use crate::support::{
    Harness, SIGNING_KEY, a_cancel_request_ends, db_error, toml_path, user_id_of,
};
use rlsgate::dev::postgres::TempPostgres;

/// A proxy in front of a TLS-only PostgreSQL with `server`'s certificate,
/// with `[upstream] tls = mode`, trusting `trusted`'s CA, plus `extra` lines.
async fn proxy_to(server: &TestPki, mode: &str, trusted: &TestPki, extra: &str) -> Harness {
    let upstream = format!(
        "[upstream]\ntls = \"{mode}\"\ntls_ca_file = {}\n{extra}",
        toml_path(&trusted.ca_pem)
    );
    Harness::start_on(server.postgres().await, upstream.trim_end()).await
}

/// The SQLSTATE and message with which the proxy refuses `alice`.
async fn refused(harness: &Harness) -> (String, String) {
    match harness
        .connect("authenticated", &harness.token("alice"))
        .await
    {
        Ok(_) => panic!("the proxy opened a session it must refuse"),
        Err(e) => db_error(&e),
    }
}

#[tokio::test]
async fn verify_full_with_the_right_ca_connects_over_tls() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = proxy_to(&ca, "verify-full", &ca, "").await;
    let client = harness.connect_as("alice").await;
    assert!(Harness::upstream_ssl(&client).await);
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_from_an_untrusted_ca() {
    let server_ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let other_ca = TestPki::generate_named("some other CA", &[]);
    let harness = proxy_to(&server_ca, "verify-full", &other_ca, "").await;
    let (code, message) = refused(&harness).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("certificate is not trusted"), "{message}");
    assert!(message.contains("[upstream] tls_ca_file"), "{message}");
    // The server's file paths stay in the proxy's log.
    assert!(!message.contains(".pem"), "{message}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_name() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = proxy_to(
        &ca,
        "verify-full",
        &ca,
        "tls_server_name = \"db.example.com\"",
    )
    .await;
    let (code, message) = refused(&harness).await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains("not valid for the name \"db.example.com\""),
        "{message}"
    );
    assert!(message.contains("localhost"), "{message}");
}

#[tokio::test]
async fn verify_ca_accepts_a_trusted_certificate_for_another_name() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = proxy_to(
        &ca,
        "verify-ca",
        &ca,
        "tls_server_name = \"db.example.com\"",
    )
    .await;
    let client = harness.connect_as("alice").await;
    assert!(Harness::upstream_ssl(&client).await);
}

#[tokio::test]
async fn verify_ca_still_refuses_an_untrusted_certificate() {
    let server_ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let other_ca = TestPki::generate_named("some other CA", &[]);
    let harness = proxy_to(&server_ca, "verify-ca", &other_ca, "").await;
    let (code, message) = refused(&harness).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("certificate is not trusted"), "{message}");
}

#[tokio::test]
async fn require_encrypts_without_checking_the_certificate() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = Harness::start_on(ca.postgres().await, "[upstream]\ntls = \"require\"").await;
    let client = harness.connect_as("alice").await;
    assert!(Harness::upstream_ssl(&client).await);
    // Tokenless roles go the same way.
    let anonymous = harness.connect("anonymous", "").await.unwrap();
    assert!(Harness::upstream_ssl(&anonymous).await);
}

#[tokio::test]
async fn prefer_is_the_default_and_uses_tls_when_the_database_offers_it() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = Harness::start_on(ca.postgres().await, "").await;
    let client = harness.connect_as("alice").await;
    assert!(Harness::upstream_ssl(&client).await);
}

#[tokio::test]
async fn prefer_falls_back_to_plaintext_when_the_database_has_no_tls() {
    let harness = Harness::start_with("[upstream]\ntls = \"prefer\"").await;
    let client = harness.connect_as("alice").await;
    assert!(!Harness::upstream_ssl(&client).await);
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
}

#[tokio::test]
async fn require_refuses_a_database_without_tls() {
    let harness = Harness::start_with("[upstream]\ntls = \"require\"").await;
    let (code, message) = refused(&harness).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("the database refused TLS"), "{message}");
    assert!(message.contains("tls = \"require\""), "{message}");
}

#[tokio::test]
async fn disable_never_asks_for_tls() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = Harness::start_on(ca.postgres().await, "[upstream]\ntls = \"disable\"").await;
    // The server takes TCP connections over TLS only, so it refuses the proxy.
    let (code, message) = refused(&harness).await;
    assert_eq!(code, "08006", "{message}");
}

#[tokio::test]
async fn a_cancel_request_reaches_a_database_that_requires_tls() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let harness = proxy_to(&ca, "verify-full", &ca, "").await;
    a_cancel_request_ends(harness.connect_as("alice").await).await;
}

#[tokio::test]
async fn init_db_installs_over_verify_full_tls() {
    let ca = TestPki::generate_named("rlsgate upstream CA", &[]);
    let pg = ca.postgres().await;
    let admin = pg.connect("postgres").await.unwrap();
    admin.batch_execute("create database app").await.unwrap();
    let key = rlsgate::auth::claims::SigningKey::from_base64(SIGNING_KEY).unwrap();
    let keys = [key.bytes().to_vec()];

    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("app"),
        ca.ca_pem.display()
    );
    let report = rlsgate::commands::init_db::run(&url, None, &keys)
        .await
        .expect("init-db over TLS");
    assert_eq!(report.version_before, None);

    // The configuration's [upstream] applies when the URL says nothing.
    let config = rlsgate::config::Config::parse(&format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\nhost = \"127.0.0.1\"\n\
         tls = \"verify-full\"\ntls_ca_file = {}\n\
         [[role]]\nname = \"anonymous\"\ntoken = \"none\"\n\
         [claims]\nsigning_key = \"{SIGNING_KEY}\"\n",
        toml_path(&ca.ca_pem)
    ))
    .unwrap();
    let report = rlsgate::commands::init_db::run(&pg.url("app"), Some(&config.upstream), &keys)
        .await
        .expect("init-db with the configuration's TLS settings");
    assert_eq!(report.version_before, Some(report.version_after));

    // A CA that did not sign the server's certificate is refused, and said so.
    let other = TestPki::generate_named("some other CA", &[]);
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("app"),
        other.ca_pem.display()
    );
    let error = rlsgate::commands::init_db::run(&url, None, &keys)
        .await
        .expect_err("an untrusted certificate must be refused");
    let error = format!("{error:#}");
    assert!(error.contains("certificate is not trusted"), "{error}");
    assert!(error.contains("sslrootcert"), "{error}");
    assert!(!error.contains(pg.superuser_password()), "{error}");
}

#[tokio::test]
async fn init_db_refuses_plaintext_when_tls_is_required() {
    let pg = TempPostgres::start().await.unwrap();
    let key = rlsgate::auth::claims::SigningKey::from_base64(SIGNING_KEY).unwrap();
    let url = format!("{}?sslmode=require", pg.url("postgres"));
    let error = rlsgate::commands::init_db::run(&url, None, &[key.bytes().to_vec()])
        .await
        .expect_err("a server without TLS must be refused with sslmode=require");
    let error = format!("{error:#}");
    assert!(error.contains("TLS: require"), "{error}");
}
