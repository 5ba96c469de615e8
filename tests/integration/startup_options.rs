//! The client's `options` startup parameter is split as PostgreSQL splits
//! it, so that no identity setting rides through behind a separator the
//! proxy did not see: checked against a real server byte by byte, then
//! through the proxy, unpooled and pooled.

use std::path::{Path, PathBuf};

use crate::support::wire::{self, ErrorResponse};
use crate::support::{Harness, WAIT, connect};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// The bytes C's `isspace()` accepts in every locale.
const SPACE_BYTES: [u8; 6] = [b'\t', b'\n', 0x0b, 0x0c, b'\r', b' '];

/// The Unix socket of the harness's PostgreSQL, where the superuser logs in
/// without a password.
async fn postgres_socket(h: &Harness) -> PathBuf {
    let dir: String = h
        .admin()
        .await
        .query_one("select current_setting('unix_socket_directories')", &[])
        .await
        .unwrap()
        .get(0);
    let dir = dir.split(',').next().unwrap_or_default().trim();
    assert!(
        !dir.is_empty(),
        "the test PostgreSQL has no Unix socket (its directory path is too long)"
    );
    Path::new(dir).join(format!(".s.PGSQL.{}", h.pg.port()))
}

/// A StartupMessage for the superuser on `database`, with `options` as raw bytes.
fn startup_with_options(database: &str, options: &[u8]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (name, value) in [
        (&b"user"[..], &b"postgres"[..]),
        (b"database", database.as_bytes()),
        (b"options", options),
    ] {
        for part in [name, value] {
            body.extend_from_slice(part);
            body.push(0);
        }
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// Messages up to ReadyForQuery; an ErrorResponse on the way is returned.
async fn until_ready(stream: &mut UnixStream) -> Result<Vec<(u8, Vec<u8>)>, ErrorResponse> {
    let mut messages = Vec::new();
    loop {
        let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(stream))
            .await
            .expect("PostgreSQL answers within the wait")
            .expect("a whole message");
        match kind {
            b'E' => return Err(wire::error_response(&body)),
            b'Z' => return Ok(messages),
            _ => messages.push((kind, body)),
        }
    }
}

/// `search_path` of a session PostgreSQL itself started with `options`.
async fn search_path_with_options(socket: &Path, database: &str, options: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .write_all(&startup_with_options(database, options))
        .await
        .unwrap();
    until_ready(&mut stream)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL refused options {options:?}: {e:?}"));
    stream
        .write_all(&wire::query_message(
            "select current_setting('search_path')",
        ))
        .await
        .unwrap();
    let messages = until_ready(&mut stream).await.expect("the query");
    let row = messages
        .iter()
        .find(|(kind, _)| *kind == b'D')
        .expect("a row");
    let _ = stream.write_all(&wire::terminate_message()).await;
    wire::data_row(&row.1)[0].clone().expect("a value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_splits_options_wherever_postgres_does() {
    let h = Harness::start().await;
    let socket = postgres_socket(&h).await;
    let mut postgres_splits_at = Vec::new();
    for byte in 1..=0xffu8 {
        let options = [
            &b"-c application_name=a"[..],
            &[byte],
            b"-c",
            &[byte],
            b"search_path=z",
        ]
        .concat();
        if search_path_with_options(&socket, h.pg.name(), &options).await != "z" {
            continue;
        }
        postgres_splits_at.push(byte);
        let words = rlsgate::upstream::options::split_option_bytes(&options);
        assert!(
            words.iter().any(|w| w == b"search_path=z"),
            "PostgreSQL splits options at byte {byte:#04x}, the proxy does not: {words:?}"
        );
    }
    // Whatever the database's locale, these bytes separate words.
    for byte in SPACE_BYTES {
        assert!(
            postgres_splits_at.contains(&byte),
            "PostgreSQL did not split at {byte:#04x}: {postgres_splits_at:?}"
        );
    }
}

/// What a session is: who it runs as, whose claims it carries, and the
/// settings a smuggled option would change.
#[derive(Debug, Clone, PartialEq)]
struct Who {
    current_user: String,
    session_user: String,
    user_id: Option<String>,
    /// The claims the envelope bound to the session says (each session's
    /// envelope is its own: it names its backend).
    claims: String,
    jwt_claims: Option<String>,
    application_name: String,
}

async fn who(client: &tokio_postgres::Client) -> Who {
    let row = client
        .query_one(
            "select current_user::text, session_user::text, auth.user_id(), \
             auth.session()::text, \
             nullif(current_setting('request.jwt.claims', true), ''), \
             current_setting('application_name')",
            &[],
        )
        .await
        .expect("who is this session");
    Who {
        current_user: row.get(0),
        session_user: row.get(1),
        user_id: row.get(2),
        claims: row.get(3),
        jwt_claims: row.get(4),
        application_name: row.get(5),
    }
}

/// For each space byte and each identity setting, `-c application_name=x`
/// followed by the setting behind that byte: the harmless part arrives,
/// split where PostgreSQL splits it, and the session is exactly the
/// token's.
async fn smuggled_settings_never_take_effect(extra_toml: &str) {
    // Alone: it grants a role to `authenticated`, which other tests share.
    let h = Harness::start_alone(extra_toml).await;
    // A role `authenticated` could switch to, were `role` let through.
    h.admin()
        .await
        .batch_execute("create role smuggled nologin; grant smuggled to authenticated")
        .await
        .unwrap();
    let token = h.token("alice");
    let plain = connect(&h.client_config("authenticated", &token))
        .await
        .expect("alice connects");
    let baseline = who(&plain).await;
    assert_eq!(baseline.current_user, "authenticated");
    assert_eq!(baseline.user_id.as_deref(), Some("alice"));
    assert_eq!(baseline.jwt_claims, None);
    drop(plain);

    for byte in SPACE_BYTES {
        let s = char::from(byte);
        for smuggled in [
            "role=smuggled",
            "rlsgate.session=forged",
            "request.jwt.claims={\"sub\":\"bob\"}",
        ] {
            let options = format!("-c application_name=x{s}-c{s}{smuggled}");
            let client = connect(h.client_config("authenticated", &token).options(&options))
                .await
                .unwrap_or_else(|e| panic!("options {options:?}: {e}"));
            let seen = who(&client).await;
            assert_eq!(
                seen,
                Who {
                    application_name: "x".to_owned(),
                    ..baseline.clone()
                },
                "options {options:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_smuggled_behind_any_space_byte_never_takes_effect() {
    smuggled_settings_never_take_effect("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_smuggled_behind_any_space_byte_never_takes_effect_in_a_pooled_session() {
    smuggled_settings_never_take_effect("[pool]\nmode = \"session\"").await;
}
