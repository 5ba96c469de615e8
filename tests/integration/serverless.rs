//! The serverless driver, `@neondatabase/serverless` with Drizzle's
//! `neon-http` and `neon-serverless`, against rlsgate's HTTP and WebSocket
//! front door (`[http] address`). Each test runs one scenario of
//! `clients/serverless/check_serverless.mjs`, which must exit 0; the
//! environment and the install step are those of the client suite
//! (`clients.rs`). The last two read what the database and the proxy's log
//! saw while the driver ran: never a token nor a signed envelope.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clients::{INSTALL_HINT, Setup, Transport, clients_dir, require_program, setup_with};
use crate::support::process::Served;
use crate::support::{SIGNING_KEY, WAIT};

/// The front door on a free loopback port, beside the wire listener.
const HTTP_TOML: &str = "[http]\naddress = \"127.0.0.1:0\"\n";

const PROGRAM: &str = "check_serverless.mjs";

/// How long the slow scenario's requests sleep in the database: long enough
/// to be seen in `pg_stat_activity` while they run.
const SLEEP_SECONDS: &str = "3";

/// The client suite's setup (a row of bob's, tokens for alice and bob and an
/// expired one) on a proxy with the front door, whose address the program
/// reads from `RLSGATE_HTTP`.
async fn serverless_setup() -> Setup {
    let mut s = setup_with(Transport::Plaintext, HTTP_TOML).await;
    let http =
        s.h.proxy
            .http_address
            .expect("a proxy with [http] address has an HTTP address");
    s.env.push(("RLSGATE_HTTP", http.to_string()));
    s
}

/// node, with the lock file's modules installed by `clients/install.sh`.
fn node() -> PathBuf {
    let node = require_program("node", "Node.js");
    let driver = clients_dir("serverless/node_modules/@neondatabase/serverless");
    assert!(
        driver.join("package.json").exists(),
        "{} not found: {INSTALL_HINT}",
        driver.display()
    );
    node
}

/// Runs the program's `scenarios`; returns what it printed.
async fn run_scenarios(s: &Setup, scenarios: &[&str]) -> String {
    let mut args = vec![PROGRAM];
    args.extend_from_slice(scenarios);
    let what = format!("clients/serverless/{PROGRAM} {}", scenarios.join(" "));
    s.run(&what, &node(), &args, &clients_dir("serverless"))
        .await
}

/// A fresh proxy with the front door, and one scenario run against it.
async fn scenario(name: &str) -> Setup {
    let s = serverless_setup().await;
    run_scenarios(&s, &[name]).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_and_bob_each_see_only_their_todos_through_drizzle_over_http() {
    let s = scenario("todos").await;
    s.assert_rows_sound().await;
    let admin = s.h.admin().await;
    let alices: Vec<(String, bool)> = admin
        .query(
            "select title, done from todos where user_id = 'alice' order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(alices.len(), 2, "alice's two todos: {alices:?}");
    assert!(
        alices.iter().all(|(_, done)| !done),
        "bob's update changed none of alice's todos: {alices:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tampered_and_missing_tokens_are_refused_over_http_with_28000() {
    scenario("refused-tokens").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_through_http_as_the_serverless_driver_parses_them() {
    scenario("types").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_halfway_leaves_nothing_and_its_isolation_and_read_only_reach_the_transaction()
 {
    let s = scenario("batches").await;
    s.assert_rows_sound().await;
    let kept: Vec<String> =
        s.h.admin()
            .await
            .query(
                "select title from todos where title like '%: batch %' order by title",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .map(|t| t.rsplit(": batch ").next().unwrap_or_default().to_owned())
            .collect();
    assert_eq!(kept, ["drizzle kept", "kept"], "the batches' rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_of_alternating_users_each_see_only_their_own_identity() {
    scenario("concurrent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_set_by_one_http_request_is_invisible_to_the_next() {
    scenario("session-state").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_pool_runs_queries_and_interactive_transactions_and_refuses_an_expired_token() {
    let s = scenario("websocket").await;
    s.assert_rows_sound().await;
}

/// The envelopes the slow scenario's requests ran with, as it printed them
/// (`envelope http …`, `envelope websocket …`).
fn printed_envelopes(stdout: &str) -> Vec<String> {
    let envelopes: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("envelope "))
        .filter_map(|l| l.split_once(' '))
        .map(|(_, envelope)| envelope.trim().to_owned())
        .collect();
    assert_eq!(envelopes.len(), 2, "two envelopes printed:\n{stdout}");
    for envelope in &envelopes {
        assert_eq!(
            envelope.split('.').filter(|p| !p.is_empty()).count(),
            3,
            "an envelope is KID.PAYLOAD.MAC: {envelope:?}"
        );
    }
    envelopes
}

/// What must never be shown: the tokens of `s`, their signatures, the
/// `envelopes` and their MACs, and the claims signing key.
fn secrets(s: &Setup, envelopes: &[String]) -> Vec<(&'static str, String)> {
    let mut secrets = vec![("the claims signing key", SIGNING_KEY.to_owned())];
    for (name, value) in &s.env {
        if name.ends_with("_TOKEN") {
            secrets.push(("a token", value.clone()));
            let signature = value.rsplit('.').next().unwrap_or_default();
            secrets.push(("a token's signature", signature.to_owned()));
        }
    }
    for envelope in envelopes {
        secrets.push(("an envelope", envelope.clone()));
        let mac = envelope.rsplit('.').next().unwrap_or_default();
        secrets.push(("an envelope's MAC", mac.to_owned()));
    }
    assert!(secrets.iter().all(|(_, s)| s.len() >= 16), "{secrets:?}");
    secrets
}

fn assert_nowhere(text: &str, secrets: &[(&str, String)], place: &str) {
    for (what, secret) in secrets {
        assert!(!text.contains(secret.as_str()), "{place} shows {what}");
    }
}

/// `pg_stat_activity` of the test's database as text, once both slow
/// requests are running in it (`None` if they were not within `WAIT`).
async fn activity_during_the_slow_requests(s: &Setup) -> Option<String> {
    let admin = s.h.admin().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let row = admin
            .query_one(
                "select json_agg(a)::text, count(*) filter (where state = 'active' \
                 and query like '%pg_sleep%' and pid <> pg_backend_pid()) \
                 from pg_stat_activity a where datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(1) >= 2 {
            return Some(row.get(0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_the_token_nor_the_envelope_appears_in_pg_stat_activity() {
    let mut s = serverless_setup().await;
    s.env.push(("SLEEP_SECONDS", SLEEP_SECONDS.to_owned()));
    let (stdout, during) = tokio::join!(
        run_scenarios(&s, &["slow"]),
        activity_during_the_slow_requests(&s)
    );
    let during = during.expect("the HTTP and WebSocket requests sleeping in pg_stat_activity");
    // Afterwards each idle backend shows the last statement it ran,
    // including the proxy's own.
    let after: String = s
        .h
        .admin()
        .await
        .query_one(
            "select json_agg(a)::text from pg_stat_activity a where datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let secrets = secrets(&s, &printed_envelopes(&stdout));
    assert_nowhere(&during, &secrets, "pg_stat_activity during the requests");
    assert_nowhere(&after, &secrets, "pg_stat_activity after the requests");
}

/// The real binary serving the harness's configuration with the front door
/// on `http`, logging JSON at debug level.
async fn served_with_http(s: &Setup, dir: &Path, http: SocketAddr) -> Served {
    let config = dir.join("rlsgate.toml");
    let toml = s.h.config_toml(&format!("[http]\naddress = \"{http}\"\n"));
    std::fs::write(&config, toml).unwrap();
    Served::start_logging(&config, "debug").await
}

/// A loopback address with a port that was free a moment ago: the
/// "rlsgate listening" line does not name the front door's address, so
/// `rlsgate serve` cannot be given port 0 for it.
fn free_loopback_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_tokens_nor_envelopes_appear_in_the_log_of_the_front_door() {
    let mut s = serverless_setup().await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_loopback_address();
    let served = served_with_http(&s, dir.path(), http).await;
    s.env.retain(|(name, _)| *name != "RLSGATE_HTTP");
    s.env.push(("RLSGATE_HTTP", http.to_string()));
    s.env.push(("SLEEP_SECONDS", "0".to_owned()));
    let stdout = run_scenarios(&s, &["slow", "refused-tokens", "websocket"]).await;
    // The scenarios' refusals: four requests over HTTP (expired, tampered,
    // missing, and expired through Drizzle), one WebSocket session.
    let counts = (
        served.logged_exactly("refused a request").len(),
        served.logged_exactly("refused").len(),
    );
    assert_eq!(counts, (4, 1), "the refusals logged:\n{}", served.text());
    let log = served.stop().await;
    assert_nowhere(
        &log,
        &secrets(&s, &printed_envelopes(&stdout)),
        "the proxy's log",
    );
}

/// The README's serverless section quotes the program, verbatim, through
/// `<!-- snippet: PATH NAME -->` markers, and quotes every region of it.
#[test]
fn the_readmes_serverless_snippets_are_the_code_that_runs() {
    let readme = std::fs::read_to_string(crate::clients::repo().join("README.md")).unwrap();
    let program = "clients/serverless/check_serverless.mjs";
    let regions = crate::clients::program_snippets(&crate::clients::repo().join(program));
    let lines: Vec<&str> = readme.lines().collect();
    let mut quoted = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .trim()
            .strip_prefix(&format!("<!-- snippet: {program} "))
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        assert!(
            lines[i + 1].starts_with("```"),
            "README line {}: a code block must follow",
            i + 2
        );
        let block: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        let code = regions
            .get(name)
            .unwrap_or_else(|| panic!("{program} has no region {name}"));
        assert_eq!(
            &block.join("\n"),
            code,
            "the README's snippet {name} differs from {program}"
        );
        quoted.push(name.to_owned());
    }
    for name in regions.keys() {
        assert!(
            quoted.contains(name),
            "{program}'s region {name} is not quoted in the README"
        );
    }
}
