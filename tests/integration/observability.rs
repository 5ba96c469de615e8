//! Observability: the admin endpoints (/metrics, /healthz, /readyz), the
//! counts they report, and logs that say what happened without ever showing
//! a token, a signature, key material or a password.
//!
//! Waits are bounded and polled: a test fails when something never happens,
//! not when a machine is slow.

use crate::support::config_file::{edit_toml, role, section, set};
use crate::support::process::Served;
use crate::support::{
    Harness, SIGNING_KEY, WAIT, client_config, connect, http_get, metric, metric_lines, poll_until,
    unix_now,
};
use rlsgate::dev::issuer::{DevIssuer, KeyKind, SigningKeyPair};
use serde_json::{Value, json};

async fn metrics_text(h: &Harness) -> String {
    let (status, text) = http_get(&h.admin_url("/metrics")).await;
    assert_eq!(status, 200, "{text}");
    text
}

/// /metrics once no connection is open any more (refused clients linger
/// for up to a second before the proxy closes).
async fn metrics_when_idle(h: &Harness) -> String {
    poll_until(WAIT, "every connection has closed", || async {
        let text = metrics_text(h).await;
        (metric(&text, "rlsgate_client_connections_active", &[]) == Some(0.0)).then_some(text)
    })
    .await
}

/// Readiness as the status and the JSON body of /readyz.
async fn readyz(h: &Harness) -> (u16, Value) {
    let (status, body) = http_get(&h.admin_url("/readyz")).await;
    let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, body)
}

/// Polls /readyz until `accept` takes it.
async fn readyz_until(h: &Harness, what: &str, accept: impl Fn(u16, &Value) -> bool) -> Value {
    poll_until(WAIT * 2, what, || async {
        let (status, body) = readyz(h).await;
        accept(status, &body).then_some(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_sessions_and_refusals_that_happened() {
    let h = Harness::start_with_admin("").await;
    let issuer = h.issuer.issuer();

    for sub in ["alice", "bob"] {
        let client = h.connect_as(sub).await;
        assert_eq!(
            crate::support::user_id_of(&client).await.as_deref(),
            Some(sub)
        );
        drop(client);
    }
    let expired = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "carol", "aud": "todo-app", "exp": unix_now() - 3600}),
    );
    let message = h.connect_refused("authenticated", &expired).await;
    assert!(message.contains("expired"), "{message}");
    let stranger = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "dave", "aud": "todo-app", "iss": "https://unknown.example.com"}),
    );
    let message = h.connect_refused("authenticated", &stranger).await;
    assert!(message.contains("not configured"), "{message}");

    let text = poll_until(WAIT, "both sessions are counted as ended", || async {
        let text = metrics_when_idle(&h).await;
        let ended = metric_lines(&text, "rlsgate_client_sessions_total").len();
        (ended > 0).then_some(text)
    })
    .await;

    let sessions = metric_lines(&text, "rlsgate_client_sessions_total");
    assert_eq!(
        metric(
            &text,
            "rlsgate_client_sessions_total",
            &[("role", "authenticated"), ("outcome", "client_closed")]
        ),
        Some(2.0),
        "{sessions:?}"
    );
    assert_eq!(sessions.len(), 1, "{sessions:?}");

    let refusals = metric_lines(&text, "rlsgate_refusals_total");
    assert_eq!(
        metric(&text, "rlsgate_refusals_total", &[("reason", "expired")]),
        Some(1.0),
        "{refusals:?}"
    );
    assert_eq!(
        metric(
            &text,
            "rlsgate_refusals_total",
            &[("reason", "unknown_issuer")]
        ),
        Some(1.0),
        "{refusals:?}"
    );
    assert_eq!(refusals.len(), 2, "{refusals:?}");

    // Four tokens were checked; two sessions reached the upstream and relayed.
    for (histogram, samples) in [
        ("rlsgate_token_verification_seconds", 4.0),
        ("rlsgate_upstream_connect_seconds", 2.0),
        ("rlsgate_session_duration_seconds", 2.0),
    ] {
        assert_eq!(
            metric(&text, &format!("{histogram}_count"), &[]),
            Some(samples),
            "{histogram}: {:?}",
            metric_lines(&text, &format!("{histogram}_count"))
        );
        assert!(
            text.contains(&format!("# TYPE {histogram} histogram")),
            "{histogram} is a histogram"
        );
    }
    assert_eq!(
        metric(&text, "rlsgate_token_cache_misses_total", &[]),
        Some(4.0)
    );
    assert_eq!(
        metric(&text, "rlsgate_token_cache_hits_total", &[]),
        Some(0.0)
    );

    assert_eq!(
        metric(
            &text,
            "rlsgate_client_sessions_active",
            &[("role", "authenticated")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "rlsgate_client_connections_active", &[]),
        Some(0.0)
    );
    for direction in ["client_to_server", "server_to_client"] {
        let bytes = metric(
            &text,
            "rlsgate_relayed_bytes_total",
            &[("direction", direction)],
        )
        .unwrap_or_default();
        assert!(bytes > 0.0, "bytes {direction}: {bytes}");
    }
    let fetched = metric(
        &text,
        "rlsgate_jwks_fetches_total",
        &[("provider", issuer.as_str()), ("result", "ok")],
    )
    .unwrap_or_default();
    assert!(fetched >= 1.0, "{text}");
    assert!(
        metric(
            &text,
            "rlsgate_jwks_key_age_seconds",
            &[("provider", issuer.as_str())]
        )
        .is_some(),
        "{text}"
    );

    let (status, body) = http_get(&h.admin_url("/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_keys_are_past_max_stale_or_the_upstream_is_down_and_recovers() {
    // Alone: it stops the server.
    let mut h =
        Harness::start_alone_with_admin("jwks_max_age = \"1s\"\njwks_max_stale = \"2s\"").await;
    let issuer = h.issuer.issuer();

    // Ready without any client: /readyz fetches the keys itself.
    let body = readyz_until(&h, "ready at start", |status, _| status == 200).await;
    assert_eq!(
        body,
        json!({"ready": true, "providers": {issuer.as_str(): "ok"}, "upstream": "ok"})
    );

    h.issuer.set_down(true);
    let body = readyz_until(
        &h,
        "not ready once the keys are past max_stale",
        |status, _| status == 503,
    )
    .await;
    assert_eq!(body["ready"], json!(false), "{body}");
    assert_eq!(body["upstream"], json!("ok"), "{body}");
    let state = body["providers"][&issuer].as_str().unwrap_or_default();
    assert!(state.starts_with("no usable keys: "), "{body}");
    assert!(state.contains("503"), "{body}");

    h.issuer.set_down(false);
    readyz_until(&h, "ready again once the issuer is back", |status, _| {
        status == 200
    })
    .await;

    h.pg.pause();
    let body = readyz_until(&h, "not ready while the upstream is down", |status, _| {
        status == 503
    })
    .await;
    assert_eq!(body["ready"], json!(false), "{body}");
    assert_eq!(body["providers"][&issuer], json!("ok"), "{body}");
    let upstream = body["upstream"].as_str().unwrap_or_default();
    assert!(
        upstream.contains(&format!("127.0.0.1:{}", h.pg.port())),
        "{body}"
    );

    h.pg.resume().await.expect("restart PostgreSQL");
    let body = readyz_until(&h, "ready again once the upstream is back", |status, _| {
        status == 200
    })
    .await;
    assert_eq!(body["upstream"], json!("ok"), "{body}");
    let client = h.connect_as("alice").await;
    assert_eq!(
        crate::support::user_id_of(&client).await.as_deref(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_metrics_of_the_real_binary_never_show_tokens_signatures_keys_or_passwords() {
    let h = Harness::start().await;
    let key = SigningKeyPair::generate(KeyKind::Es256).unwrap();
    let private_pem = key.to_pem();
    let issuer = DevIssuer::start_with("127.0.0.1:0".parse().unwrap(), None, vec![key])
        .await
        .expect("start a token issuer");

    // The anonymous role's upstream password is wrong, so Postgres refuses it.
    let wrong_upstream_password = "wrong-upstream-password-5e1f0c";
    let toml = crate::support::sample_config_toml(
        "127.0.0.1:0".parse().unwrap(),
        &h.pg,
        &issuer.issuer(),
        SIGNING_KEY,
    );
    let toml = edit_toml(&toml, |doc| {
        set(section(doc, "listen"), "admin_address", "127.0.0.1:0");
        set(
            role(doc, "anonymous"),
            "upstream_password",
            wrong_upstream_password,
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rlsgate.toml");
    std::fs::write(&config, toml).unwrap();

    // Debug for everything but the key cache, which is filtered down to warnings.
    let proxy = Served::start_logging(&config, "debug,rlsgate::jwks=warn").await;
    let address = proxy.address;
    let admin = proxy
        .admin
        .unwrap_or_else(|| {
            panic!(
                "the listening line names the admin address: {}",
                proxy.text()
            )
        })
        .to_string();

    let good = issuer.mint(KeyKind::Es256, json!({"sub": "alice", "aud": "todo-app"}));
    let other = issuer.mint(KeyKind::Es256, json!({"sub": "mallory", "aud": "todo-app"}));
    let (good_head, good_signature) = good.rsplit_once('.').unwrap();
    let other_signature = other.rsplit_once('.').unwrap().1;
    let forged = format!("{good_head}.{other_signature}");
    let expired = issuer.mint(
        KeyKind::Es256,
        json!({"sub": "carol", "aud": "todo-app", "exp": unix_now() - 3600}),
    );
    let not_a_token = "hunter2-not-a-token-password";

    let client = connect(&client_config(address, "authenticated", Some(&good)))
        .await
        .expect("a good token connects");
    let seen: String = client
        .query_one("select auth.user_id()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, "alice");
    drop(client);
    proxy.wait_for_exactly("session ended", 1).await;

    for (user, password) in [
        ("authenticated", Some(forged.as_str())),
        ("authenticated", Some(expired.as_str())),
        ("authenticated", Some(not_a_token)),
        ("anonymous", None),
    ] {
        let refused = connect(&client_config(address, user, password)).await;
        assert!(refused.is_err(), "{user} must be refused");
    }
    let refusals = proxy.wait_for_exactly("refused", 4).await;
    let (_, metrics) = http_get(&format!("http://{admin}/metrics")).await;

    // One session, logged at its start and its end with what it did.
    let started = proxy.logged_exactly("session started");
    assert_eq!(started.len(), 1, "{started:?}");
    let fields = &started[0]["fields"];
    assert_eq!(fields["role"], "authenticated", "{fields}");
    assert_eq!(fields["sub"], "alice", "{fields}");
    assert_eq!(fields["iss"], json!(issuer.issuer()), "{fields}");
    assert_eq!(
        fields["token"],
        json!(rlsgate::auth::token_check::fingerprint(&good)),
        "{fields}"
    );
    assert!(
        started[0]["span"]["peer"].as_str().is_some(),
        "the client address is on the line: {}",
        started[0]
    );
    let ended = proxy.logged_exactly("session ended");
    let fields = &ended[0]["fields"];
    assert_eq!(fields["outcome"], "client_closed", "{fields}");
    assert!(fields["client_to_server"].as_u64() > Some(0), "{fields}");
    assert!(fields["server_to_client"].as_u64() > Some(0), "{fields}");
    assert!(fields["duration"].is_string(), "{fields}");

    // Each refusal once, with its precise reason.
    let mut reasons: Vec<&str> = refusals
        .iter()
        .map(|r| r["fields"]["reason"].as_str().unwrap_or_default())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["bad_signature", "expired", "malformed", "upstream"],
        "{refusals:?}"
    );
    let upstream = refusals
        .iter()
        .find(|r| r["fields"]["reason"] == "upstream")
        .unwrap();
    assert!(
        upstream["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("28P01")),
        "the log says that Postgres refused the proxy's password: {upstream}"
    );
    assert!(proxy.logged_exactly("token refused").is_empty());
    assert!(proxy.logged_exactly("token accepted").is_empty());
    // RUST_LOG is honoured per target.
    assert!(proxy.logged_exactly("fetched signing keys").is_empty());
    assert!(
        proxy.logs().iter().any(|entry| entry["level"] == "DEBUG"),
        "RUST_LOG=debug shows debug lines"
    );

    assert!(
        metrics.contains("rlsgate_refusals_total{reason=\"bad_signature\"} 1"),
        "{metrics}"
    );
    let output = proxy.stop().await;

    let mut secrets: Vec<(&str, String)> = vec![
        ("a token", good.clone()),
        ("a token", forged.clone()),
        ("a token", expired.clone()),
        ("a token", other.clone()),
        ("a signature", good_signature.to_owned()),
        ("a signature", other_signature.to_owned()),
        (
            "a signature",
            expired.rsplit_once('.').unwrap().1.to_owned(),
        ),
        ("a password", not_a_token.to_owned()),
        ("a password", wrong_upstream_password.to_owned()),
        ("a password", "authenticated-dev-password".to_owned()),
        ("a password", h.pg.superuser_password().to_owned()),
        ("the claims signing key", SIGNING_KEY.to_owned()),
    ];
    secrets.extend(
        private_pem
            .lines()
            .filter(|line| !line.starts_with("-----") && line.len() >= 16)
            .map(|line| ("the issuer's private key", line.to_owned())),
    );
    assert!(secrets.len() > 12, "the private key has a body");
    for (what, secret) in &secrets {
        assert!(!output.contains(secret.as_str()), "the logs show {what}");
        assert!(!metrics.contains(secret.as_str()), "/metrics shows {what}");
    }
    issuer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_gauges_follow_an_open_session_and_cancel_requests_are_counted_by_result() {
    let h = Harness::start_with_admin("").await;
    let session = h.raw_connect_as("alice").await;
    // The session counts itself once its greeting is on its way: on a busy
    // machine, a moment after the client has read it.
    let text = poll_until(WAIT, "the session is counted", || async {
        let text = metrics_text(&h).await;
        metric(
            &text,
            "rlsgate_client_sessions_active",
            &[("role", "authenticated")],
        )
        .is_some()
        .then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "rlsgate_client_sessions_active",
            &[("role", "authenticated")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "rlsgate_client_connections_active", &[]),
        Some(1.0),
        "{text}"
    );

    // A key that cancels nothing is ignored, and counted as such.
    let mut cancel = tokio::net::TcpStream::connect(h.proxy.address)
        .await
        .unwrap();
    crate::support::wire::send(
        &mut cancel,
        &crate::support::wire::cancel_request(session.pid ^ 1, session.secret),
    )
    .await;
    let text = poll_until(WAIT, "the cancel request is counted", || async {
        let text = metrics_text(&h).await;
        metric(
            &text,
            "rlsgate_cancel_requests_total",
            &[("result", "unknown_key")],
        )
        .is_some()
        .then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "rlsgate_cancel_requests_total",
            &[("result", "unknown_key")]
        ),
        Some(1.0),
        "{text}"
    );
    drop(cancel);

    session.terminate().await;
    let text = poll_until(WAIT, "the session has ended", || async {
        let text = metrics_when_idle(&h).await;
        metric(
            &text,
            "rlsgate_client_sessions_active",
            &[("role", "authenticated")],
        )
        .is_some_and(|active| active == 0.0)
        .then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "rlsgate_client_sessions_total",
            &[("role", "authenticated"), ("outcome", "client_closed")]
        ),
        Some(1.0),
        "{text}"
    );
}
