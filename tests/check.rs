//! `rlsgate check`, run as the real binary against the test world: a
//! configuration that works passes, and each way of being wrong (no schema
//! `auth`, a signing key the database does not know, a table open to a
//! served role without RLS, a provider that cannot be reached) fails with a
//! line that names the problem.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;

use support::{Harness, SIGNING_KEY};

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
async fn good_setup() -> Harness {
    let h = Harness::start().await;
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
    let key_id = rlsgate::claims::SigningKey::from_base64(OTHER_SIGNING_KEY)
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
