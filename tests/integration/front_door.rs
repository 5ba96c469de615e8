//! What a client meets before it is authenticated: protocol negotiation,
//! encryption requests, and the connection limit.

use crate::support::wire::{self, APP_STARTUP, RawSession};
use crate::support::{Harness, WAIT, db_error};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn connect(h: &Harness) -> TcpStream {
    TcpStream::connect(("127.0.0.1", h.port())).await.unwrap()
}

async fn one_byte_answer(stream: &mut TcpStream) -> u8 {
    tokio::time::timeout(WAIT, stream.read_u8())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_minor_version_and_pq_options_are_negotiated_down_to_3_0() {
    let h = Harness::start().await;
    let mut stream = connect(&h).await;
    let mut startup = wire::startup_message(&[
        ("user", "authenticated"),
        ("database", "app"),
        ("_pq_.test_option", "on"),
    ]);
    startup[4..8].copy_from_slice(&196_610u32.to_be_bytes()); // protocol 3.2
    wire::send(&mut stream, &startup).await;

    let (kind, body) = wire::read_message(&mut stream).await.unwrap();
    assert_eq!(kind, b'v', "NegotiateProtocolVersion first");
    let mut expected = 196_608u32.to_be_bytes().to_vec(); // 3.0
    expected.extend(1u32.to_be_bytes());
    expected.extend(b"_pq_.test_option\0");
    assert_eq!(body, expected);

    let (kind, body) = wire::read_message(&mut stream).await.unwrap();
    assert_eq!(
        (kind, body),
        (b'R', 3u32.to_be_bytes().to_vec()),
        "then the password request"
    );
    wire::send(&mut stream, &wire::password_message(&h.token("alice"))).await;
    loop {
        let (kind, _) = wire::read_message(&mut stream).await.unwrap();
        assert_ne!(kind, b'E');
        if kind == b'Z' {
            break;
        }
    }
    wire::send(&mut stream, &wire::query_message("select auth.user_id()")).await;
    let (kind, _) = wire::read_message(&mut stream).await.unwrap();
    assert_eq!(kind, b'T');
    let (kind, body) = wire::read_message(&mut stream).await.unwrap();
    assert_eq!(kind, b'D');
    assert_eq!(wire::data_row(&body), [Some("alice".to_owned())]);
}

/// Sends an encryption request that the proxy must decline with `N`, then
/// logs in as alice on the same connection.
async fn declined_then_logged_in(request: &[u8]) {
    let h = Harness::start().await;
    let mut stream = connect(&h).await;
    wire::send(&mut stream, request).await;
    assert_eq!(one_byte_answer(&mut stream).await, b'N');
    let mut session = RawSession::login(stream, APP_STARTUP, &h.token("alice"))
        .await
        .unwrap();
    let who = session.query_value("select auth.user_id()").await;
    assert_eq!(who.as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssapi_encryption_is_declined_and_the_startup_continues() {
    declined_then_logged_in(&GSSENC_REQUEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_declined_when_no_certificate_is_configured() {
    declined_then_logged_in(&SSL_REQUEST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_53300_until_one_closes() {
    let h = Harness::start_with("[listen]\nmax_connections = 2").await;
    let first = h.connect_as("alice").await;
    let _second = h.connect_as("bob").await;

    let err = h
        .connect("authenticated", &h.token("carol"))
        .await
        .unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected 53300, got {err}"));
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("at most 2"), "{}", db.message());
    // Cancel requests still get through at the limit.
    first
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();

    drop(first);
    assert_eq!(
        crate::support::carol_once_a_slot_frees(&h, "authenticated").await,
        "carol"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roles_own_limit_refuses_only_that_role() {
    let h = Harness::start_with(
        r#"
[[role]]
name = "reporting"
token = "required"
upstream_user = "authenticated"
upstream_password = "authenticated-dev-password"
max_connections = 1
"#,
    )
    .await;
    let first = h.connect("reporting", &h.token("alice")).await.unwrap();

    let err = h.connect("reporting", &h.token("bob")).await.unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "53300");
    assert!(message.contains("role \"reporting\""), "{message}");
    assert!(message.contains("at most 1"), "{message}");
    // Other roles are not limited by it.
    let bob = h.connect_as("bob").await;
    bob.query_one("select 1", &[]).await.unwrap();

    drop(first);
    assert_eq!(
        crate::support::carol_once_a_slot_frees(&h, "reporting").await,
        "carol"
    );
}
