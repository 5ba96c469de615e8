//! Development parts shared by `rlsgate demo`, `keygen`, `token`, `issuer`
//! and the test suite: a throwaway PostgreSQL server, token signing keys, a
//! token issuer with a real discovery document and JWKS, and a sample todo
//! application protected by RLS.

pub mod issuer;
pub mod keys;
pub mod postgres;

use std::net::SocketAddr;

/// Roles `authenticated` and `anonymous`, and a `todos` table whose policies
/// use `auth.user_id()`. Needs schema `auth` installed first.
pub const SAMPLE_SCHEMA: &str = include_str!("sample.sql");

/// A configuration serving the sample roles against a local server and
/// issuer. The `[[provider]]` table comes last, so keys appended to the text
/// land in it.
pub fn sample_config(
    listen: SocketAddr,
    postgres_port: u16,
    issuer: &str,
    signing_key_base64: &str,
) -> String {
    format!(
        r#"[listen]
address = "{listen}"
shutdown_drain = "2s"

[upstream]
host = "127.0.0.1"
port = {postgres_port}

[[role]]
name = "authenticated"
token = "required"
upstream_password = "authenticated-dev-password"

[[role]]
name = "anonymous"
token = "none"
upstream_password = "anonymous-dev-password"

[claims]
signing_key = "{signing_key_base64}"

[[provider]]
issuer = "{issuer}"
audience = ["todo-app"]
"#
    )
}
