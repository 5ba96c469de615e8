//! The HTTP front door (`POST /sql`) at the protocol level, with a plain
//! HTTP client: the JSON the serverless driver reads, a token per request
//! over shared upstream connections, connections left clean, errors as 400
//! with the SQLSTATE, limits, CORS, cancellation and database restarts.
//! The driver itself runs in `serverless.rs`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rlsgate::dev::issuer::KeyKind;
use serde_json::{Value, json};

use crate::support::pki::TestPki;
use crate::support::{Harness, WAIT, http_get, metric, poll_until, unix_now};

const HTTP: &str = "[http]\naddress = \"127.0.0.1:0\"\n";

/// A harness serving HTTP, with `extra` (sections) added.
async fn serving_http(extra: &str) -> Harness {
    Harness::start_with(&format!("{HTTP}{extra}")).await
}

/// One request to `/sql` as the driver sends it (raw text, array mode).
struct Call<'a> {
    /// `http://ADDRESS/sql`, with this client.
    address: SocketAddr,
    client: reqwest::Client,
    scheme: &'static str,
    role: &'a str,
    /// Appended to the connection string (`?application_name=…`).
    query: &'a str,
    token: Option<String>,
    headers: Vec<(&'static str, String)>,
}

impl<'a> Call<'a> {
    fn new(h: &Harness, token: Option<String>) -> Call<'a> {
        Call {
            address: h.proxy.http_address.expect("[http] address is set"),
            client: reqwest::Client::new(),
            scheme: "http",
            role: "authenticated",
            query: "",
            token,
            headers: vec![
                ("Neon-Raw-Text-Output", "true".into()),
                ("Neon-Array-Mode", "true".into()),
            ],
        }
    }

    fn as_user(h: &Harness, sub: &str) -> Call<'a> {
        Call::new(h, Some(h.token(sub)))
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_owned()));
        self
    }

    fn request(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(format!("{}://{}/sql", self.scheme, self.address))
            .header(
                "Neon-Connection-String",
                format!("postgresql://{}@db.example/app{}", self.role, self.query),
            )
            // The driver sends its JSON as text/plain.
            .header("Content-Type", "text/plain;charset=UTF-8")
            .body(body.to_string());
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// The status and the JSON body.
    async fn send(&self, body: Value) -> (u16, Value) {
        let response = self
            .request(&body)
            .send()
            .await
            .expect("the request is answered");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// The rows of one query that must succeed.
    async fn rows(&self, query: &str, params: Value) -> Vec<Value> {
        let (status, body) = self.send(json!({"query": query, "params": params})).await;
        assert_eq!(status, 200, "{query}: {body}");
        body["rows"].as_array().expect("rows").clone()
    }

    /// The single value of a query that must succeed.
    async fn value(&self, query: &str) -> Value {
        self.rows(query, json!([])).await[0][0].clone()
    }

    /// The SQLSTATE of a query that must fail with 400.
    async fn code(&self, body: Value) -> String {
        let (status, body) = self.send(body).await;
        assert_eq!(status, 400, "{body}");
        body["code"].as_str().expect("a code").to_owned()
    }
}

#[tokio::test]
async fn a_query_returns_fields_rows_and_the_command_as_the_driver_reads_them() {
    let h = serving_http("").await;
    let (status, body) = Call::as_user(&h, "alice")
        .send(json!({
            "query": "select $1::int4 + 1 as n, $2::text as t, null::int8 as nothing",
            "params": ["6", "x"]
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], json!([["7", "x", null]]));
    assert_eq!(body["command"], "SELECT");
    assert_eq!(body["rowCount"], 1);
    assert_eq!(body["rowAsArray"], true);
    let fields = body["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 3);
    assert_eq!(fields[0]["name"], "n");
    assert_eq!(fields[0]["dataTypeID"], 23);
    assert_eq!(fields[0]["dataTypeSize"], 4);
    assert_eq!(fields[0]["format"], "text");
    assert_eq!(fields[2]["dataTypeID"], 20);

    let (status, created) = Call::as_user(&h, "alice")
        .send(json!({"query": "create temp table t (a int)"}))
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["command"], "CREATE");
    assert_eq!(created["rowCount"], Value::Null);
    assert_eq!(created["fields"], json!([]));
}

#[tokio::test]
async fn without_raw_text_values_are_json_and_rows_are_objects() {
    let h = serving_http("").await;
    let call = Call::new(&h, Some(h.token("alice")))
        .header("Neon-Raw-Text-Output", "false")
        .header("Neon-Array-Mode", "false");
    let rows = call
        .rows(
            "select 1::int4 as i, 9007199254740993::int8 as big, true as b, \
             '{\"k\": [1]}'::jsonb as j, array[1, null]::int4[] as a, 'NaN'::float8 as f",
            json!([]),
        )
        .await;
    assert_eq!(
        rows,
        vec![
            json!({"i": 1, "big": "9007199254740993", "b": true, "j": {"k": [1]},
                    "a": [1, null], "f": "NaN"})
        ]
    );
}

#[tokio::test]
async fn each_request_sees_only_its_own_tokens_identity_on_shared_connections() {
    // Two connections for a hundred requests of two users, all at once.
    let h = serving_http("[pool]\nsize = 2\n").await;
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let sub = if i % 2 == 0 { "alice" } else { "bob" };
            (sub, Call::as_user(&h, sub))
        })
        .collect();
    let answers = futures_util::future::join_all(
        calls
            .iter()
            .map(|(sub, call)| async move { (*sub, call.value("select auth.user_id()").await) }),
    )
    .await;
    for (sub, seen) in answers {
        assert_eq!(seen, json!(sub));
    }
    let admin = h.admin().await;
    let backends: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity \
             where usename = 'authenticated' and datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        backends <= 2,
        "{backends} upstream connections for [pool] size = 2"
    );
}

#[tokio::test]
async fn row_level_security_applies_to_each_requests_user() {
    let h = serving_http("").await;
    let alice = Call::as_user(&h, "alice");
    let bob = Call::as_user(&h, "bob");
    alice
        .rows("insert into todos (title) values ($1)", json!(["alice's"]))
        .await;
    let (status, update) = bob
        .send(json!({"query": "update todos set title = 'mine' where user_id = 'alice'"}))
        .await;
    assert_eq!(status, 200, "{update}");
    assert_eq!(update["rowCount"], 0);
    let forged = json!({"query": "insert into todos (user_id, title) values ('alice', 'x')"});
    assert_eq!(bob.code(forged).await, "42501");
    assert_eq!(
        alice.rows("select title from todos", json!([])).await,
        vec![json!(["alice's"])]
    );
    assert_eq!(
        bob.rows("select title from todos", json!([])).await,
        Vec::<Value>::new()
    );
}

#[tokio::test]
async fn session_state_left_by_a_request_is_gone_for_the_next() {
    // One connection, so every request gets the one the last request used.
    let h = serving_http("[pool]\nsize = 1\n").await;
    let admin = h.admin().await;
    let alice = Call::as_user(&h, "alice");
    for leave_behind in [
        "set application_name = 'left behind'",
        "create temp table left_behind (a int)",
        "prepare left_behind as select 1",
        "select pg_advisory_lock(42)",
        "begin",
    ] {
        alice.rows(leave_behind, json!([])).await;
        let seen = alice
            .rows(
                "select current_setting('application_name'), \
                 (select count(*) from pg_prepared_statements), \
                 to_regclass('pg_temp.left_behind') is null, \
                 (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())",
                json!([]),
            )
            .await;
        assert_eq!(
            seen,
            vec![json!(["", "0", "t", "0"])],
            "after {leave_behind}"
        );
        let in_transaction: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity \
                 where datname = current_database() and state like 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(in_transaction, 0, "after {leave_behind}");
    }
}

#[tokio::test]
async fn the_connection_strings_application_name_is_set_for_its_request_only() {
    let h = serving_http("[pool]\nsize = 1\n").await;
    let mut named = Call::as_user(&h, "alice");
    named.query = "?application_name=todo%20app";
    assert_eq!(
        named
            .value("select current_setting('application_name')")
            .await,
        json!("todo app")
    );
    let plain = Call::as_user(&h, "alice");
    assert_eq!(
        plain
            .value("select current_setting('application_name')")
            .await,
        json!("")
    );
}

#[tokio::test]
async fn a_batch_is_one_transaction_and_a_failure_halfway_leaves_nothing_behind() {
    let h = serving_http("").await;
    let alice = Call::as_user(&h, "alice");
    let batch = json!({"queries": [
        {"query": "insert into todos (title) values ($1)", "params": ["first"]},
        {"query": "select 1/0"},
        {"query": "insert into todos (title) values ('third')"},
    ]});
    assert_eq!(alice.code(batch).await, "22012");
    assert_eq!(
        alice.rows("select title from todos", json!([])).await,
        Vec::<Value>::new()
    );

    let (status, body) = alice
        .send(json!({"queries": [
            {"query": "insert into todos (title) values ($1) returning title", "params": ["kept"]},
            {"query": "select count(*) from todos"},
        ]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["rows"], json!([["kept"]]));
    assert_eq!(body["results"][1]["rows"], json!([["1"]]));
    let (status, empty) = alice.send(json!({"queries": []})).await;
    assert_eq!((status, empty), (200, json!({"results": []})));
}

#[tokio::test]
async fn a_batchs_isolation_and_read_only_reach_its_transaction_and_no_further() {
    let h = serving_http("[pool]\nsize = 1\n").await;
    let settings = json!({"queries": [{"query":
        "select current_setting('transaction_isolation'), current_setting('transaction_read_only')"}]});
    let strict = Call::as_user(&h, "alice")
        .header("Neon-Batch-Isolation-Level", "Serializable")
        .header("Neon-Batch-Read-Only", "true");
    let response = strict.request(&settings).send().await.unwrap();
    assert_eq!(
        response.headers()["neon-batch-isolation-level"],
        "Serializable"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"][0]["rows"], json!([["serializable", "on"]]));
    let write = json!({"queries": [{"query": "insert into todos (title) values ('x')"}]});
    assert_eq!(strict.code(write).await, "25006");
    // The next request on the same connection has the defaults again.
    let (_, plain) = Call::as_user(&h, "alice").send(settings).await;
    assert_eq!(
        plain["results"][0]["rows"],
        json!([["read committed", "off"]])
    );
}

#[tokio::test]
async fn bad_tokens_and_bad_requests_get_a_400_with_the_sqlstate() {
    let h = serving_http("").await;
    let select = || json!({"query": "select 1"});
    let expired = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "exp": unix_now() - 60}),
    );
    let mut tampered = h.token("alice");
    tampered.insert(tampered.len() / 2, 'x');
    for token in [Some(expired), Some(tampered), None] {
        assert_eq!(Call::new(&h, token).code(select()).await, "28000");
    }
    let mut stranger = Call::as_user(&h, "alice");
    stranger.role = "postgres";
    assert_eq!(stranger.code(select()).await, "28000");
    let alice = Call::as_user(&h, "alice");
    assert_eq!(alice.code(json!({"sql": "select 1"})).await, "08P01");
    assert_eq!(
        alice.code(json!({"query": "select 1; select 2"})).await,
        "42601"
    );
    assert_eq!(
        alice
            .code(json!({"query": "select $1", "params": []}))
            .await,
        "08P01"
    );
    // A role served without a token needs none.
    let mut anonymous = Call::new(&h, None);
    anonymous.role = "anonymous";
    assert_eq!(anonymous.value("select 1").await, json!("1"));
}

#[tokio::test]
async fn errors_carry_the_databases_fields() {
    let h = serving_http("").await;
    let (status, body) = Call::as_user(&h, "alice")
        .send(json!({"query": "select 1 from no_such_table"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "42P01");
    assert_eq!(body["severity"], "ERROR");
    assert_eq!(body["position"], "15");
    assert!(
        body["message"].as_str().unwrap().contains("no_such_table"),
        "{body}"
    );
    assert!(body["routine"].is_string(), "{body}");
    assert_eq!(body["hint"], Value::Null);
}

#[tokio::test]
async fn requests_and_responses_over_their_limits_get_413_and_507() {
    let h = serving_http("max_request_bytes = 1000\nmax_response_bytes = 2000\n").await;
    let alice = Call::as_user(&h, "alice");
    let long = "x".repeat(2000);
    let (status, _) = alice
        .send(json!({"query": format!("select '{long}'")}))
        .await;
    assert_eq!(status, 413);
    let (status, body) = alice
        .send(json!({"query": "select repeat('y', 100) from generate_series(1, 100)"}))
        .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["code"], "54000");
    // The connection was not left mid-response.
    assert_eq!(alice.value("select 'fine'").await, json!("fine"));
}

#[tokio::test]
async fn a_client_that_leaves_mid_query_has_its_query_cancelled() {
    let h = serving_http("").await;
    let admin = h.admin().await;
    let slow = json!({"query": "select pg_sleep(60), 'slow request'"});
    let leaving = Call::as_user(&h, "alice")
        .request(&slow)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(leaving.is_err(), "the client gave up first");
    let running = "select count(*) from pg_stat_activity \
                   where query like '%slow request%' and pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count: i64 = admin.query_one(running, &[]).await.unwrap().get(0);
        if count == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_waits_for_a_free_connection_and_is_refused_with_53300_when_none_frees() {
    let h = serving_http("[pool]\nsize = 1\nwait_timeout = \"300ms\"\n").await;
    let alice = Call::as_user(&h, "alice");
    let busy = alice.send(json!({"query": "select pg_sleep(2)"}));
    let waiting = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        alice.send(json!({"query": "select 1"})).await
    };
    let ((slow, _), (status, body)) = tokio::join!(busy, waiting);
    assert_eq!(slow, 200);
    assert_eq!(status, 400);
    assert_eq!(body["code"], "53300", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("[pool] size"),
        "{body}"
    );
}

#[tokio::test]
async fn requests_in_flight_count_against_max_connections_with_sessions() {
    let h = Harness::start_with(&format!("[listen]\nmax_connections = 1\n{HTTP}")).await;
    let session = h.connect_as("bob").await;
    let alice = Call::as_user(&h, "alice");
    let (status, body) = alice.send(json!({"query": "select 1"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "53300", "{body}");
    drop(session);
    let answered = poll_until(WAIT, "the session's slot is free", || async {
        let (status, _) = alice.send(json!({"query": "select 1"})).await;
        (status == 200).then_some(())
    })
    .await;
    assert_eq!(answered, ());
}

#[tokio::test]
async fn requests_go_on_after_the_database_restarts() {
    let mut h = Harness::start_alone(HTTP).await;
    let alice = Call::as_user(&h, "alice");
    assert_eq!(alice.value("select auth.user_id()").await, json!("alice"));
    h.pg.restart().await.expect("restart PostgreSQL");
    let alice = Call::as_user(&h, "alice");
    assert_eq!(alice.value("select auth.user_id()").await, json!("alice"));
}

#[tokio::test]
async fn the_cors_preflight_allows_the_drivers_headers_from_allowed_origins() {
    let h = serving_http("cors_origins = [\"https://app.example\"]\n").await;
    let address = h.proxy.http_address.unwrap();
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("http://{address}/sql"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert_eq!(allowed.status(), 204);
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    let allow_headers = headers["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "Authorization",
        "Neon-Connection-String",
        "Neon-Batch-Isolation-Level",
    ] {
        assert!(allow_headers.contains(name), "{allow_headers}");
    }
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn tokens_need_https_off_loopback_as_they_need_tls_on_the_wire() {
    let ip = crate::tls::non_loopback_ipv4();
    let pki = TestPki::generate(&[IpAddr::V4(ip)]);
    let h = serving_http("").await;
    let extra = format!("{}\n[http]\naddress = \"{ip}:0\"\n", pki.listen_toml());
    let proxy = h.another_proxy(ip.into(), &extra).await;
    let mut plain = Call::as_user(&h, "alice");
    plain.address = proxy.http_address.unwrap();
    let (status, body) = plain.send(json!({"query": "select 1"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "28000");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("TLS is required"),
        "{body}"
    );

    let ca = reqwest::Certificate::from_pem(pki.ca_text().as_bytes()).unwrap();
    let mut https = Call::as_user(&h, "alice");
    https.address = plain.address;
    https.scheme = "https";
    https.client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    assert_eq!(https.value("select auth.user_id()").await, json!("alice"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn requests_are_counted_by_outcome_and_status_and_refusals_by_reason() {
    let h = Harness::start_with_admin(HTTP).await;
    let alice = Call::as_user(&h, "alice");
    alice.value("select 1").await;
    alice.code(json!({"query": "select 1/0"})).await;
    Call::new(&h, None).code(json!({"query": "select 1"})).await;
    let text = poll_until(WAIT, "the requests are counted", || async {
        let (_, text) = http_get(&h.admin_url("/metrics")).await;
        let counted = |outcome: &str, status: &str| {
            metric(
                &text,
                "rlsgate_http_requests_total",
                &[("outcome", outcome), ("status", status)],
            )
        };
        (counted("ok", "200") == Some(1.0)
            && counted("database_error", "400") == Some(1.0)
            && counted("refused", "400") == Some(1.0))
        .then_some(text)
    })
    .await;
    assert_eq!(
        metric(&text, "rlsgate_http_requests_active", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "rlsgate_refusals_total", &[("reason", "malformed")]),
        Some(1.0)
    );
    assert!(
        text.contains("rlsgate_http_request_duration_seconds_count 3"),
        "{text}"
    );
    assert!(
        text.contains("rlsgate_http_upstream_wait_seconds_count 2"),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_and_takes_no_new_ones() {
    let h = serving_http("").await;
    let alice = Call::as_user(&h, "alice");
    let Harness { proxy, pg, issuer } = h;
    let in_flight = alice.send(json!({"query": "select pg_sleep(1), 'finished'"}));
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.shutdown().await;
    };
    let ((status, body), ()) = tokio::join!(in_flight, stop);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0][1], "finished");
    let refused = alice.request(&json!({"query": "select 1"})).send().await;
    assert!(refused.is_err(), "a request after shutdown is not served");
    drop((pg, issuer));
}

#[tokio::test]
async fn a_reload_applies_to_the_next_request() {
    let h = serving_http("").await;
    let alice = Call::as_user(&h, "alice");
    let long = json!({"query": format!("select '{}'", "x".repeat(2000))});
    assert_eq!(alice.send(long.clone()).await.0, 200);
    h.reload_with(&format!("{HTTP}max_request_bytes = 1000\n"))
        .expect("the reload applies");
    assert_eq!(alice.send(long).await.0, 413);
}

#[tokio::test]
async fn a_text_frame_in_the_tunnel_is_answered_with_close_code_1003() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let h = serving_http("").await;
    let address = h.proxy.http_address.unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/v2"))
        .await
        .expect("the tunnel opens");
    socket.send(Message::text("select 1")).await.unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(message) = socket.next().await {
            if let Ok(Message::Close(frame)) = message {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the tunnel answers");
    let frame = closed.expect("a close frame with a reason");
    assert_eq!(frame.code, CloseCode::Unsupported);
    assert!(frame.reason.contains("binary"), "{}", frame.reason);
}

#[tokio::test]
async fn copy_is_refused_with_0a000_and_its_connection_is_not_reused() {
    let h = serving_http("[pool]\nsize = 1\n").await;
    let alice = Call::as_user(&h, "alice");
    let pid = alice.value("select pg_backend_pid()").await;
    let (status, body) = alice.send(json!({"query": "copy todos to stdout"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "0A000", "{body}");
    assert!(body["message"].as_str().unwrap().contains("COPY"), "{body}");
    // The connection was left mid-COPY: closed, and the next request gets another.
    let next = alice.value("select pg_backend_pid()").await;
    assert_ne!(
        next, pid,
        "[pool] size = 1: the same pid would be the same connection"
    );
}
