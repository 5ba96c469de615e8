//! Real clients through the proxy, unchanged: psql, pgbench, psycopg 3 with
//! psycopg_pool, asyncpg, node-postgres, postgres.js and pgjdbc. Each runs a
//! program under `clients/` with the connection details in its environment
//! and must exit 0. `clients/install.sh` installs what they need; the tests
//! run it first, and a prerequisite it cannot install is a failure that says
//! so. tokio-postgres is what the other test files use throughout.
//!
//! Each program runs twice, in two tests: over plaintext on loopback, and
//! (`…_over_tls_works_through_rlsgate`) against a proxy with a throwaway
//! certificate, with `RLSGATE_SSLMODE=require` in its environment: the
//! drivers' "require", encrypted without checking the certificate, and where
//! the driver can tell, each connection is checked to be encrypted. asyncpg's
//! program runs over plaintext only (see `check_asyncpg`).
//!
//! Each program runs once more (`…_works_through_rlsgate_in_transaction_mode`)
//! against a proxy with `[pool] mode = "transaction"` and
//! [`TRANSACTION_POOL_SIZE`] backends, fewer than the connections the
//! program opens, with `RLSGATE_POOL_MODE=transaction` and
//! `RLSGATE_POOL_SIZE` in its environment. There it runs the same checks,
//! and more: statements the proxy refuses in transaction mode get SQLSTATE
//! 0A000 and leave the connection usable, a session-level `SET` follows the
//! connection from backend to backend, and its prepared statements keep
//! working while its transactions are made to land on a different backend
//! each time (all other backends held by the program's other connections).
//!
//! Scenarios from psycopg's own test suite (`clients/python/scenarios.py`:
//! notifications and `conn.info.backend_pid`, cancelling, concurrent close,
//! broken connections) run against the proxy in all three pool modes.
//!
//! The last two tests check docs/clients.md: its code blocks are, verbatim,
//! the marked lines (`docs:begin NAME` … `docs:end`) of these programs, and
//! the files, tests and versions it names are the real ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::support::pki::TestPki;
use crate::support::{Harness, unix_now};
use rlsgate::dev::issuer::KeyKind;
use serde_json::json;

/// How long one client program may run before it is a failure.
const PROGRAM_TIME: Duration = Duration::from_secs(60);

/// Seconds until the short-lived token expires: long enough for a program
/// to start and open its sessions with it.
const SHORT_TOKEN_LIFETIME: u64 = 5;

/// Backends of a proxy in transaction mode: fewer than the connections
/// each program opens, so that its transactions share them.
const TRANSACTION_POOL_SIZE: usize = 2;

/// The title of the row bob owns before a program starts; alice must not see it.
const BOBS_ROW: &str = "bob's own todo";

pub(crate) const INSTALL_HINT: &str = "run `bash clients/install.sh` to install the client drivers";

pub(crate) fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn clients_dir(sub: &str) -> PathBuf {
    repo().join("clients").join(sub)
}

/// A harness with a row of bob's in `todos`, and the environment the
/// programs read: the proxy's address, tokens for alice and bob, an expired
/// one, and a short-lived one of alice's with the time the proxy ends its
/// sessions.
pub(crate) struct Setup {
    pub(crate) h: Harness,
    pub(crate) env: Vec<(&'static str, String)>,
    /// The certificate and key of a proxy with TLS.
    _pki: Option<TestPki>,
}

/// Over plaintext on loopback, or with TLS.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Transport {
    Plaintext,
    Tls,
}

/// Runs `clients/install.sh` once per test run, so that `cargo test` works on
/// a fresh machine: it installs only what is missing (about a second when
/// everything is there) and its failure says what could not be installed.
fn ensure_drivers_installed() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(repo().join("clients/install.sh"))
            .stdin(Stdio::null())
            .output()
            .expect("run bash clients/install.sh");
        assert!(
            out.status.success(),
            "bash clients/install.sh failed ({INSTALL_HINT} by hand to see why):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// `[pool] mode` of the proxy a program runs against.
#[derive(Clone, Copy, PartialEq)]
enum Pooling {
    /// A backend per client (the default).
    None,
    /// A client's backend is reset and kept for the next client.
    Session,
    /// A client holds a backend only while a transaction of its runs; the
    /// proxy has [`TRANSACTION_POOL_SIZE`] of them.
    Transaction,
}

impl Pooling {
    /// Its `[pool] mode`, which programs read from `RLSGATE_POOL_MODE`.
    fn mode(self) -> &'static str {
        match self {
            Pooling::None => "none",
            Pooling::Session => "session",
            Pooling::Transaction => "transaction",
        }
    }

    fn toml(self) -> String {
        let mode = self.mode();
        match self {
            Pooling::Transaction => {
                format!("[pool]\nmode = \"{mode}\"\nsize = {TRANSACTION_POOL_SIZE}\n")
            }
            _ => format!("[pool]\nmode = \"{mode}\"\n"),
        }
    }
}

/// [`setup_with`] a proxy in `pooling` mode, which the program finds in its
/// environment: `RLSGATE_POOL_MODE`, and with transaction pooling
/// `RLSGATE_POOL_SIZE`, the most backends the proxy opens.
async fn setup(transport: Transport, pooling: Pooling) -> Setup {
    let mut s = setup_with(transport, &pooling.toml()).await;
    s.env.push(("RLSGATE_POOL_MODE", pooling.mode().to_owned()));
    if pooling == Pooling::Transaction {
        s.env
            .push(("RLSGATE_POOL_SIZE", TRANSACTION_POOL_SIZE.to_string()));
    }
    s
}

/// The harness and environment of [`setup`], with `pool_toml` (a `[pool]` or
/// `[http]` section, or nothing) added to the proxy's configuration.
pub(crate) async fn setup_with(transport: Transport, pool_toml: &str) -> Setup {
    ensure_drivers_installed();
    let (h, pki) = match transport {
        Transport::Plaintext => (Harness::start_with(pool_toml).await, None),
        Transport::Tls => {
            let pki = TestPki::generate_named("rlsgate client checks CA", &[]);
            let toml = format!("{}\n{pool_toml}", pki.listen_toml());
            (Harness::start_with(&toml).await, Some(pki))
        }
    };
    let expired = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "exp": unix_now() - 60}),
    );
    h.connect_as("bob")
        .await
        .execute("insert into todos (title) values ($1)", &[&BOBS_ROW])
        .await
        .expect("bob inserts his row");
    // Sessions of this token end at exp + the harness's leeway (2 s).
    let short_exp = unix_now() + SHORT_TOKEN_LIFETIME;
    let short = h.token_with(
        KeyKind::Rs256,
        json!({"sub": "alice", "aud": "todo-app", "exp": short_exp}),
    );
    let mut env = vec![
        ("RLSGATE_HOST", "127.0.0.1".to_owned()),
        ("RLSGATE_PORT", h.port().to_string()),
        ("RLSGATE_DB", "app".to_owned()),
        ("ALICE_TOKEN", h.token("alice")),
        ("BOB_TOKEN", h.token("bob")),
        ("EXPIRED_TOKEN", expired),
        ("SHORT_TOKEN", short),
        ("SHORT_TOKEN_ENDS_AT", (short_exp + 2).to_string()),
    ];
    if transport == Transport::Tls {
        env.push(("RLSGATE_SSLMODE", "require".to_owned()));
    }
    Setup { h, env, _pki: pki }
}

impl Setup {
    /// Runs `program` with `args` in `dir`, with the connection details in
    /// its environment; it must exit 0 within `PROGRAM_TIME`. Returns its
    /// standard output.
    pub(crate) async fn run(
        &self,
        what: &str,
        program: &Path,
        args: &[&str],
        dir: &Path,
    ) -> String {
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("PGSERVICE")
            .env_remove("PGSSLMODE")
            .env_remove("PGPASSWORD")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(PROGRAM_TIME, command.output())
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within {PROGRAM_TIME:?}"))
            .unwrap_or_else(|e| panic!("cannot run {what} ({}): {e}", program.display()));
        let Output {
            status,
            stdout,
            stderr,
        } = output;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
        assert!(
            status.success(),
            "{what} failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        println!("{stdout}");
        stdout.into_owned()
    }

    /// After a program: every row belongs to alice or bob, bob's row is
    /// untouched and alone, nothing rolled back was kept, and alice has rows.
    pub(crate) async fn assert_rows_sound(&self) -> BTreeMap<String, i64> {
        let admin = self.h.admin().await;
        let owners: BTreeMap<String, i64> = admin
            .query("select user_id, count(*) from todos group by user_id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            owners.keys().map(String::as_str).collect::<Vec<_>>(),
            ["alice", "bob"],
            "owners of the rows: {owners:?}"
        );
        let bobs: Vec<String> = admin
            .query("select title from todos where user_id = 'bob'", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(bobs, [BOBS_ROW], "bob's rows");
        let rolled_back: i64 = admin
            .query_one(
                "select count(*) from todos where title like '%rolled back%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(rolled_back, 0, "rows of rolled back transactions were kept");
        owners
    }

    /// After a program run in transaction mode: the proxy kept to its
    /// [`TRANSACTION_POOL_SIZE`] backends (what is left of them; the
    /// program's own checks saw its transactions move between them).
    async fn assert_backends_within_pool(&self) {
        let backends: i64 = self
            .h
            .admin()
            .await
            .query_one(
                "select count(*) from pg_stat_activity \
                 where datname = current_database() and usename = 'authenticated'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            (1..=TRANSACTION_POOL_SIZE as i64).contains(&backends),
            "{backends} backends of role authenticated, want 1 to {TRANSACTION_POOL_SIZE}"
        );
    }

    /// The checks every program's run ends with.
    async fn assert_sound(&self, pooling: Pooling) -> BTreeMap<String, i64> {
        let owners = self.assert_rows_sound().await;
        if pooling == Pooling::Transaction {
            self.assert_backends_within_pool().await;
        }
        owners
    }
}

/// `name` on PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub(crate) fn require_program(name: &str, package: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} not found ({package}): {INSTALL_HINT}"))
}

/// pgbench comes with the PostgreSQL server package, beside the binaries
/// the harness starts Postgres from.
fn pgbench_binary() -> PathBuf {
    if let Some(found) = find_program("pgbench") {
        return found;
    }
    if let Ok(bindir) = rlsgate::dev::postgres::find_server_binaries() {
        let pgbench = bindir.join("pgbench");
        if pgbench.exists() {
            return pgbench;
        }
    }
    panic!("pgbench not found (PostgreSQL server package): {INSTALL_HINT}");
}

/// `dir` first on PATH, for the shell scripts that call psql and pgbench.
fn path_with(dir: &Path) -> String {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .unwrap()
        .into_string()
        .expect("PATH is UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_rlsgate() {
    check_psql(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_works_through_rlsgate() {
    check_psql(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_rlsgate_in_transaction_mode() {
    check_psql(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_psql(transport: Transport, pooling: Pooling) {
    let psql = crate::support::psql_binary();
    let mut s = setup(transport, pooling).await;
    s.env
        .push(("PATH", path_with(psql.parent().expect("psql's directory"))));
    s.run(
        "clients/psql/check.sh",
        Path::new("bash"),
        &["check.sh"],
        &clients_dir("psql"),
    )
    .await;
    s.assert_sound(pooling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_works_through_rlsgate() {
    check_pgbench(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_over_tls_works_through_rlsgate() {
    check_pgbench(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_works_through_rlsgate_in_transaction_mode() {
    check_pgbench(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_pgbench(transport: Transport, pooling: Pooling) {
    let psql = crate::support::psql_binary();
    let pgbench = pgbench_binary();
    let mut s = setup(transport, pooling).await;
    s.env.push((
        "PATH",
        path_with(pgbench.parent().expect("pgbench's directory")),
    ));
    s.env.push(("PSQL", psql.display().to_string()));
    s.run(
        "clients/pgbench/check.sh",
        Path::new("bash"),
        &["check.sh"],
        &clients_dir("pgbench"),
    )
    .await;
    let owners = s.assert_sound(pooling).await;
    // Both runs (prepared and extended) of 4 clients × 50 transactions,
    // one insert each, all as alice.
    let admin = s.h.admin().await;
    let pgbench_rows: Vec<(String, i64)> = admin
        .query(
            "select user_id, count(*) from todos where title like 'pgbench %' group by user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(pgbench_rows, [("alice".to_owned(), 400)], "{owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_through_rlsgate() {
    check_psycopg(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_over_tls_works_through_rlsgate() {
    check_psycopg(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_through_rlsgate_in_transaction_mode() {
    check_psycopg(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_psycopg(transport: Transport, pooling: Pooling) {
    let python = psycopg_python();
    let s = setup(transport, pooling).await;
    s.run(
        "clients/python/check_psycopg.py",
        &python,
        &["check_psycopg.py"],
        &clients_dir("python"),
    )
    .await;
    s.assert_sound(pooling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopgs_notify_cancel_concurrent_close_and_broken_scenarios_pass_without_pooling() {
    check_psycopg_scenarios(Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopgs_notify_cancel_concurrent_close_and_broken_scenarios_pass_with_session_pooling() {
    check_psycopg_scenarios(Pooling::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopgs_notify_cancel_concurrent_close_and_broken_scenarios_pass_with_transaction_pooling()
 {
    check_psycopg_scenarios(Pooling::Transaction).await;
}

/// clients/python/scenarios.py against a proxy in `pooling` mode.
async fn check_psycopg_scenarios(pooling: Pooling) {
    let python = psycopg_python();
    let s = setup(Transport::Plaintext, pooling).await;
    s.run(
        "clients/python/scenarios.py",
        &python,
        &["scenarios.py"],
        &clients_dir("python"),
    )
    .await;
}

/// The virtual environment's python, with psycopg and psycopg_pool.
fn psycopg_python() -> PathBuf {
    venv_python(&["psycopg", "psycopg_pool"])
}

/// The virtual environment's python, with asyncpg.
fn asyncpg_python() -> PathBuf {
    venv_python(&["asyncpg"])
}

/// The python of clients/python/.venv, which must import `modules`.
fn venv_python(modules: &[&str]) -> PathBuf {
    ensure_drivers_installed();
    let python = clients_dir("python/.venv/bin/python");
    assert!(
        python.exists(),
        "{} not found (the Python drivers' virtual environment): {INSTALL_HINT}",
        python.display()
    );
    let imports = std::process::Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .expect("run the virtual environment's python");
    assert!(
        imports.status.success(),
        "{} missing from {}: {INSTALL_HINT}\n{}",
        modules.join(" or "),
        python.display(),
        String::from_utf8_lossy(&imports.stderr)
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_works_through_rlsgate() {
    check_asyncpg(Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_works_through_rlsgate_in_transaction_mode() {
    check_asyncpg(Pooling::Transaction).await;
}

/// clients/python/check_asyncpg.py, over plaintext only: a run over TLS
/// would take as long again (most of it waiting for the short-lived token
/// to expire), and the proxy's TLS is checked with the other drivers.
async fn check_asyncpg(pooling: Pooling) {
    let python = asyncpg_python();
    let s = setup(Transport::Plaintext, pooling).await;
    s.run(
        "clients/python/check_asyncpg.py",
        &python,
        &["check_asyncpg.py"],
        &clients_dir("python"),
    )
    .await;
    s.assert_sound(pooling).await;
}

/// node, with the lock file's modules installed.
fn node_with(module: &str) -> PathBuf {
    ensure_drivers_installed();
    let node = require_program("node", "Node.js");
    let installed = clients_dir("node/node_modules").join(module);
    assert!(
        installed.join("package.json").exists(),
        "{} not found: {INSTALL_HINT}",
        installed.display()
    );
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_works_through_rlsgate() {
    check_node_postgres(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_over_tls_works_through_rlsgate() {
    check_node_postgres(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_works_through_rlsgate_in_transaction_mode() {
    check_node_postgres(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_node_postgres(transport: Transport, pooling: Pooling) {
    let node = node_with("pg");
    let s = setup(transport, pooling).await;
    s.run(
        "clients/node/check_pg.js",
        &node,
        &["check_pg.js"],
        &clients_dir("node"),
    )
    .await;
    s.assert_sound(pooling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_works_through_rlsgate() {
    check_postgres_js(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_over_tls_works_through_rlsgate() {
    check_postgres_js(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_js_works_through_rlsgate_in_transaction_mode() {
    check_postgres_js(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_postgres_js(transport: Transport, pooling: Pooling) {
    let node = node_with("postgres");
    let s = setup(transport, pooling).await;
    s.run(
        "clients/node/check_postgres_js.js",
        &node,
        &["check_postgres_js.js"],
        &clients_dir("node"),
    )
    .await;
    s.assert_sound(pooling).await;
}

const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_works_through_rlsgate() {
    check_jdbc(Transport::Plaintext, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_over_tls_works_through_rlsgate() {
    check_jdbc(Transport::Tls, Pooling::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_works_through_rlsgate_in_transaction_mode() {
    check_jdbc(Transport::Plaintext, Pooling::Transaction).await;
}

async fn check_jdbc(transport: Transport, pooling: Pooling) {
    ensure_drivers_installed();
    let javac = require_program("javac", "a JDK");
    let java = require_program("java", "a JDK");
    assert!(
        Path::new(PGJDBC_JAR).exists(),
        "{PGJDBC_JAR} not found (pgjdbc, Debian package libpostgresql-jdbc-java): {INSTALL_HINT}"
    );
    let classes = tempfile::tempdir().unwrap();
    let compiled = std::process::Command::new(&javac)
        .args(["-cp", PGJDBC_JAR, "-d"])
        .arg(classes.path())
        .arg(clients_dir("jdbc/JdbcCheck.java"))
        .output()
        .expect("run javac");
    assert!(
        compiled.status.success(),
        "javac failed:\n{}{}",
        String::from_utf8_lossy(&compiled.stdout),
        String::from_utf8_lossy(&compiled.stderr)
    );
    let classpath = format!("{}:{PGJDBC_JAR}", classes.path().display());
    let s = setup(transport, pooling).await;
    s.run(
        "clients/jdbc/JdbcCheck.java",
        &java,
        &["-cp", &classpath, "JdbcCheck"],
        &clients_dir("jdbc"),
    )
    .await;
    s.assert_sound(pooling).await;
}

/// A snippet of docs/clients.md: the fenced block after a line
/// `<!-- snippet: PATH NAME -->`.
struct DocSnippet {
    file: String,
    name: String,
    text: String,
}

fn doc_snippets(doc: &str) -> Vec<DocSnippet> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut snippets = Vec::new();
    let mut in_block = false;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("```") {
            let marked = i > 0 && lines[i - 1].trim().starts_with("<!-- snippet:");
            assert!(
                in_block || marked,
                "docs/clients.md line {}: every code block must be a snippet of a program \
                 (`<!-- snippet: PATH NAME -->` on the line before)",
                i + 1
            );
            in_block = !in_block;
            continue;
        }
        let Some(reference) = line
            .trim()
            .strip_prefix("<!-- snippet:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let mut words = reference.split_whitespace();
        let (Some(file), Some(name), None) = (words.next(), words.next(), words.next()) else {
            panic!(
                "docs/clients.md line {}: want `<!-- snippet: PATH NAME -->`",
                i + 1
            );
        };
        let fence = lines.get(i + 1).copied().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "docs/clients.md line {}: a code block must follow the snippet marker",
            i + 2
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        snippets.push(DocSnippet {
            file: file.to_owned(),
            name: name.to_owned(),
            text: dedent(&body),
        });
    }
    snippets
}

/// The regions of a program between `docs:begin NAME` and `docs:end` (in
/// whatever comment the language has), by name.
pub(crate) fn program_snippets(path: &Path) -> BTreeMap<String, String> {
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut snippets = BTreeMap::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in source.lines() {
        if let Some(at) = line.find("docs:begin ") {
            assert!(open.is_none(), "{}: nested docs:begin", path.display());
            let name = line[at + "docs:begin ".len()..].trim().to_owned();
            open = Some((name, Vec::new()));
        } else if line.contains("docs:end") {
            let (name, body) = open
                .take()
                .unwrap_or_else(|| panic!("{}: docs:end without docs:begin", path.display()));
            snippets.insert(name, dedent(&body));
        } else if let Some((_, body)) = open.as_mut() {
            body.push(line);
        }
    }
    assert!(
        open.is_none(),
        "{}: docs:begin without docs:end",
        path.display()
    );
    snippets
}

/// `lines` without the indentation they all share.
fn dedent(lines: &[&str]) -> String {
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every program file under clients/ that can hold snippets.
fn program_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "node_modules" && !name.starts_with('.') {
                program_files(&path, found);
            }
        } else if [".py", ".js", ".java", ".sh", ".sql"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            found.push(path);
        }
    }
}

#[test]
fn the_snippets_in_docs_clients_md_are_the_code_that_runs() {
    let doc = std::fs::read_to_string(repo().join("docs/clients.md")).expect("docs/clients.md");
    let snippets = doc_snippets(&doc);
    assert!(
        snippets.len() >= 8,
        "docs/clients.md has {} snippets",
        snippets.len()
    );
    let mut quoted = Vec::new();
    for s in &snippets {
        let program = program_snippets(&repo().join(&s.file));
        let code = program.get(&s.name).unwrap_or_else(|| {
            panic!(
                "{} has no region `docs:begin {}` (it has {:?})",
                s.file,
                s.name,
                program.keys().collect::<Vec<_>>()
            )
        });
        assert_eq!(
            &s.text, code,
            "docs/clients.md's snippet {} differs from {}",
            s.name, s.file
        );
        quoted.push((s.file.clone(), s.name.clone()));
    }
    // And every marked region is in the doc.
    let mut files = Vec::new();
    program_files(&repo().join("clients"), &mut files);
    for file in files {
        let relative = file
            .strip_prefix(repo())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for name in program_snippets(&file).into_keys() {
            assert!(
                quoted.contains(&(relative.clone(), name.clone())),
                "{relative}'s region {name} is not quoted in docs/clients.md"
            );
        }
    }
}

#[test]
fn docs_clients_md_names_what_exists() {
    let doc = std::fs::read_to_string(repo().join("docs/clients.md")).expect("docs/clients.md");
    // Relative links lead to files of the repository.
    for (at, _) in doc.match_indices("](../") {
        let target = &doc[at + "](../".len()..];
        let target = &target[..target.find(')').expect("a link ends")];
        let path = target.split('#').next().unwrap();
        assert!(
            repo().join(path).exists(),
            "docs/clients.md links to {target}, which does not exist"
        );
    }
    // The tests it names are tests of this file.
    let tests = std::fs::read_to_string(repo().join("tests/integration/clients.rs")).unwrap();
    for (at, _) in doc.match_indices("_works_through_rlsgate") {
        let start = doc[..at].rfind('`').expect("a test name in backquotes") + 1;
        let end = at + doc[at..].find('`').expect("a test name in backquotes");
        let name = &doc[start..end];
        assert!(
            tests.contains(&format!("async fn {name}()")),
            "docs/clients.md names the test {name}, which tests/integration/clients.rs does not have"
        );
    }
    // The versions it gives are the pinned ones.
    let requirements = std::fs::read_to_string(clients_dir("python/requirements.txt")).unwrap();
    let package: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(clients_dir("node/package.json")).unwrap())
            .unwrap();
    let mut pins: Vec<(String, String)> = requirements
        .lines()
        .filter_map(|l| l.split_once("=="))
        .map(|(name, version)| (name.to_owned(), version.trim().to_owned()))
        .collect();
    for (name, version) in package["dependencies"].as_object().unwrap() {
        pins.push((name.clone(), version.as_str().unwrap().to_owned()));
    }
    assert_eq!(pins.len(), 5, "{pins:?}");
    for (name, version) in pins {
        assert!(
            doc.contains(&version),
            "docs/clients.md does not give {name}'s pinned version {version}"
        );
    }
}
