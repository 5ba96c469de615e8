//! Refusals: every token or startup the proxy does not accept ends in a FATAL
//! ErrorResponse whose SQLSTATE and message say what was wrong, and the proxy
//! keeps serving valid tokens afterwards.

use std::time::{Duration, UNIX_EPOCH};

use crate::support::wire;
use crate::support::{Harness, WAIT, client_config, connect, jwt_header, unix_now, user_id_of};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rlsgate::dev::issuer::KeyKind;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy still serves a valid token: alice connects and queries.
async fn still_serves_alice(h: &Harness) {
    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn parts(token: &str) -> (&str, &str, &str) {
    let mut it = token.split('.');
    let parts = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    assert!(it.next().is_none(), "a JWT has three parts");
    parts
}

fn rsa_jwk(h: &Harness) -> Value {
    let jwks = h.issuer.jwks();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "RSA")
        .cloned()
        .expect("the issuer publishes an RSA key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_with_its_expiry_time() {
    let h = Harness::start().await;
    // Well beyond the 2 s leeway.
    let exp = unix_now() - 60;
    let token = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "iat": exp - 3600, "exp": exp}),
    );
    let message = h.connect_refused("authenticated", &token).await;
    let when = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp)).to_string();
    assert!(message.contains("expired"), "{message}");
    assert!(
        message.contains(&when),
        "message names the expiry {when}: {message}"
    );
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_valid_yet_is_refused_with_its_nbf_time() {
    let h = Harness::start().await;
    let nbf = unix_now() + 600;
    let token = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "nbf": nbf}),
    );
    let message = h.connect_refused("authenticated", &token).await;
    let when = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(nbf)).to_string();
    assert!(message.contains("not valid before"), "{message}");
    assert!(
        message.contains(&when),
        "message names nbf {when}: {message}"
    );
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_an_unknown_issuer_is_refused_naming_the_issuer() {
    let h = Harness::start().await;
    let token = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "iss": "https://evil.example.com"}),
    );
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("https://evil.example.com"), "{message}");
    assert!(message.contains("not configured"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_refused_naming_the_audience() {
    let h = Harness::start().await;
    let token = h.token_with(KeyKind::Rs256, json!({"sub": "alice", "aud": "other-app"}));
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("audience"), "{message}");
    assert!(message.contains("other-app"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_audience_is_refused_when_an_audience_is_configured() {
    let h = Harness::start().await;
    let token = h.token_with(KeyKind::Rs256, json!({"sub": "alice"}));
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("aud"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_with_an_unpublished_key_is_refused_naming_the_kid() {
    let h = Harness::start().await;
    let token = h
        .issuer
        .mint_with_unpublished_key(KeyKind::Rs256, json!({"sub": "alice", "aud": "todo-app"}));
    let kid = jwt_header(&token)["kid"].as_str().unwrap().to_owned();
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("no key"), "{message}");
    assert!(message.contains(&kid), "message names kid {kid}: {message}");
    assert!(message.contains("JWKS"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_altered_signature_is_refused() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let (header, payload, signature) = parts(&token);

    // One character of the signature changed; the first character carries six
    // full bits, so the result is still canonical base64url.
    let mut altered = signature.as_bytes().to_vec();
    altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
    let altered = format!("{header}.{payload}.{}", String::from_utf8(altered).unwrap());
    let message = h.connect_refused("authenticated", &altered).await;
    assert!(message.contains("signature does not verify"), "{message}");

    // Alice's header and payload with bob's (valid, same key) signature.
    let bob = h.token("bob");
    let spliced = format!("{header}.{payload}.{}", parts(&bob).2);
    let message = h.connect_refused("authenticated", &spliced).await;
    assert!(message.contains("signature does not verify"), "{message}");

    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_alg_none_token_is_refused() {
    let h = Harness::start().await;
    let valid = h.token("alice");
    let payload = parts(&valid).1;
    let header = b64(&json!({"alg": "none", "typ": "JWT"}));
    let message = h
        .connect_refused("authenticated", &format!("{header}.{payload}."))
        .await;
    assert!(message.contains("alg \"none\""), "{message}");
    assert!(message.contains("not accepted"), "{message}");

    // The same with the kid of a published key, which must not matter.
    let kid = jwt_header(&valid)["kid"].clone();
    let header = b64(&json!({"alg": "none", "typ": "JWT", "kid": kid}));
    let message = h
        .connect_refused("authenticated", &format!("{header}.{payload}."))
        .await;
    assert!(message.contains("alg \"none\""), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_token_keyed_with_the_providers_public_key_is_refused() {
    let h = Harness::start().await;
    let jwk = rsa_jwk(&h);
    let kid = jwk["kid"].as_str().unwrap().to_owned();
    let n = jwk["n"].as_str().unwrap().to_owned();
    let claims = json!({
        "sub": "alice",
        "aud": "todo-app",
        "iss": h.issuer.issuer(),
        "iat": unix_now(),
        "exp": unix_now() + 3600,
    });
    // The classic key-confusion secrets: the JWK as published, its modulus as
    // text, and the modulus bytes.
    let secrets: Vec<Vec<u8>> = vec![
        serde_json::to_vec(&jwk).unwrap(),
        n.as_bytes().to_vec(),
        URL_SAFE_NO_PAD.decode(&n).unwrap(),
    ];
    for secret in secrets {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
        let message = h.connect_refused("authenticated", &token).await;
        assert!(message.contains("HS256"), "{message}");
        assert!(message.contains("not accepted"), "{message}");
    }
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_that_is_not_a_jwt_is_refused() {
    let h = Harness::start().await;
    let message = h.connect_refused("authenticated", "hunter2").await;
    assert!(message.contains("not a JWT"), "{message}");
    // Three parts that are not base64url JSON are not a JWT either.
    let message = h.connect_refused("authenticated", "a.b.c").await;
    assert!(message.contains("not a JWT"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_password_is_refused_for_a_role_that_requires_a_token() {
    let h = Harness::start().await;
    let message = h.connect_refused("authenticated", "").await;
    assert!(message.contains("token is required"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_exp_is_refused() {
    let h = Harness::start().await;
    let token = h.issuer.mint_exact(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "iss": h.issuer.issuer(), "iat": unix_now()}),
    );
    let message = h.connect_refused("authenticated", &token).await;
    assert!(message.contains("\"exp\""), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_the_proxy_does_not_serve_is_refused_by_name() {
    let h = Harness::start().await;
    let message = h.connect_refused("postgres", &h.token("alice")).await;
    assert!(message.contains("\"postgres\""), "{message}");
    assert!(message.contains("not served"), "{message}");
    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_all_three_key_kinds_are_accepted() {
    let h = Harness::start().await;
    for (kind, sub) in [
        (KeyKind::Rs256, "rsa-user"),
        (KeyKind::Es256, "ec-user"),
        (KeyKind::EdDsa, "ed-user"),
    ] {
        let token = h.token_with(kind, json!({"sub": sub, "aud": "todo-app"}));
        assert_eq!(jwt_header(&token)["alg"], kind.alg_name());
        let client = h
            .connect("authenticated", &token)
            .await
            .unwrap_or_else(|e| panic!("{kind:?} token is accepted: {e}"));
        assert_eq!(user_id_of(&client).await.as_deref(), Some(sub));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connects_without_a_password_and_has_no_session() {
    let h = Harness::start().await;
    // No password at all: tokio-postgres fails if one is asked for.
    let client = connect(&client_config(h.proxy.address, "anonymous", None))
        .await
        .expect("anonymous connects without a password");
    let no_session: bool = client
        .query_one("select auth.session() is null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(no_session, "auth.session() is NULL for anonymous");
    let user: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "anonymous");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_over_the_token_limit_is_refused_naming_the_limit() {
    let h = Harness::start_with("[listen]\nmax_token_bytes = 1024").await;
    let long = "x".repeat(2000);
    let message = h.connect_refused("authenticated", &long).await;
    assert!(message.contains("1024"), "{message}");
    assert!(message.contains("limit"), "{message}");
    // A real token fits under the limit.
    still_serves_alice(&h).await;
}

/// What the proxy answered on a raw socket before closing it.
#[derive(Debug)]
enum RawAnswer {
    Error { code: String, message: String },
    Closed,
}

/// Sends `bytes` (then closes our sending side if `half_close`), and reads
/// until the proxy closes. The proxy must answer within 10 s: its startup
/// timeout (30 s) must not be what ends the exchange.
async fn raw_exchange(h: &Harness, bytes: &[u8], half_close: bool) -> RawAnswer {
    let mut tcp = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    if half_close {
        tcp.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                // A reset after an unread remainder counts as closing.
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the proxy neither answered nor closed within 10 s after {bytes:?}"
    );
    if answer.is_empty() {
        return RawAnswer::Closed;
    }
    match wire::read_message(&mut answer.as_slice()).await {
        Ok((b'E', body)) => {
            let error = wire::error_response(&body);
            RawAnswer::Error {
                code: error.code,
                message: error.message,
            }
        }
        _ => panic!("expected an ErrorResponse or nothing, got {answer:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused_and_the_proxy_keeps_serving() {
    let h = Harness::start().await;

    // Lengths outside what PostgreSQL accepts before authentication.
    for len in [3u32, 100_000] {
        match raw_exchange(&h, &len.to_be_bytes(), false).await {
            RawAnswer::Error { code, message } => {
                assert_eq!(code, "08P01", "{message}");
                assert!(
                    message.contains(&format!("invalid length of startup packet: {len}")),
                    "{message}"
                );
            }
            RawAnswer::Closed => panic!("length {len}: expected an ErrorResponse"),
        }
    }

    // Garbage: text that is no packet at all, and an unknown request code.
    let answer = raw_exchange(&h, b"hello, is this postgres?\r\n", false).await;
    if let RawAnswer::Error { code, message } = &answer {
        assert_eq!(code, "08P01", "{message}");
    }
    let mut unknown = 8u32.to_be_bytes().to_vec();
    unknown.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    let answer = raw_exchange(&h, &unknown, false).await;
    if let RawAnswer::Error { code, message } = &answer {
        assert_eq!(code, "0A000", "{message}");
        assert!(message.contains("protocol"), "{message}");
    }

    // A StartupMessage whose parameters are not terminated.
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0authenticated");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let answer = raw_exchange(&h, &packet, false).await;
    if let RawAnswer::Error { code, message } = &answer {
        assert_eq!(code, "08P01", "{message}");
    }

    // A packet announced as 50 bytes, cut off after 10, then the client leaves.
    let mut truncated = 50u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&196_608u32.to_be_bytes());
    truncated.extend_from_slice(b"user\0\0");
    let answer = raw_exchange(&h, &truncated, true).await;
    if let RawAnswer::Error { code, message } = &answer {
        assert_eq!(code, "08P01", "{message}");
        assert!(message.contains("incomplete"), "{message}");
    }

    // A connection that sends nothing and closes.
    let answer = raw_exchange(&h, b"", true).await;
    if let RawAnswer::Error { code, message } = &answer {
        assert_eq!(code, "08P01", "{message}");
    }

    still_serves_alice(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_the_refusal_message() {
    let h = Harness::start().await;
    let stderr = h.psql_err("authenticated", "hunter2", "select 1");
    assert!(stderr.contains("FATAL"), "{stderr}");
    assert!(stderr.contains("not a JWT"), "{stderr}");

    // And a valid token through psql works on the same proxy.
    let who = h.psql_ok("authenticated", &h.token("alice"), "select auth.user_id()");
    assert_eq!(who, "alice");
}
