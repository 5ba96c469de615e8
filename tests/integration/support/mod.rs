//! The world the integration tests run in: a throwaway PostgreSQL with the
//! `auth` schema and a `todos` table under RLS, a real token issuer over
//! HTTP, and the proxy between them, configured through its TOML format.
#![allow(dead_code)]

pub mod cluster;
pub mod config_file;
pub mod pki;
pub mod process;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cluster::TestDb;
use rlsgate::config::{Config, PoolMode};
use rlsgate::dev::issuer::{DevIssuer, KeyKind};
use rlsgate::dev::postgres::TempPostgres;
use rlsgate::session::listener::RunningProxy;
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

pub const SIGNING_KEY: &str = "cmxzZ2F0ZS10ZXN0LXNpZ25pbmcta2V5LTMyLWJ5dGVzIQ==";

/// How long any single wait in these tests may take before it is a failure.
pub const WAIT: Duration = Duration::from_secs(10);

/// Longer than the harness's `refetch_cooldown = "1s"`.
pub const PAST_COOLDOWN: Duration = Duration::from_millis(1300);

/// What the tests add to the sample application.
const TEST_SCHEMA: &str = "
grant select on todos to anonymous;
create table scratch (id int, body text);
grant all on scratch to authenticated;
";

pub struct Harness {
    pub pg: TestDb,
    pub issuer: DevIssuer,
    pub proxy: RunningProxy,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("").await
    }

    /// Starts everything; `extra_toml` is merged into the generated
    /// configuration (see `proxy_config`).
    pub async fn start_with(extra_toml: &str) -> Harness {
        Self::start_edited(TestDb::shared().await, extra_toml, |_| {}).await
    }

    /// Like [`Harness::start_with`], on a PostgreSQL cluster of the test's
    /// own, for a test that changes the server or cluster-wide state (roles,
    /// their settings and passwords), which other tests must not see.
    pub async fn start_alone(extra_toml: &str) -> Harness {
        let pg = TempPostgres::start().await.expect("start PostgreSQL");
        Self::start_on(pg, extra_toml).await
    }

    /// A second proxy in front of the same Postgres and issuer, configured
    /// like the harness's but listening on `ip`.
    pub async fn another_proxy(&self, ip: IpAddr, extra_toml: &str) -> RunningProxy {
        let config = proxy_config(ip, &self.pg, &self.issuer.issuer(), extra_toml);
        RunningProxy::start(config)
            .await
            .unwrap_or_else(|e| panic!("start a proxy on {ip}: {e:#}"))
    }

    /// Reloads the proxy with the configuration `start_with(extra_toml)`
    /// would have given it.
    pub fn reload_with(&self, extra_toml: &str) -> anyhow::Result<()> {
        self.reload_configured(extra_toml, |_| {})
    }

    /// Reloads the proxy with the configuration `start_configured(extra_toml,
    /// edit)` would have given it.
    pub fn reload_configured(
        &self,
        extra_toml: &str,
        edit: impl FnOnce(&mut Config),
    ) -> anyhow::Result<()> {
        let ip = self.proxy.address.ip();
        let mut config = proxy_config(ip, &self.pg, &self.issuer.issuer(), extra_toml);
        edit(&mut config);
        self.proxy.reload(config)
    }

    pub fn port(&self) -> u16 {
        self.proxy.address.port()
    }

    /// A token for `sub`, signed with the issuer's RS256 key, for the test audience.
    pub fn token(&self, sub: &str) -> String {
        self.issuer
            .mint(KeyKind::Rs256, json!({"sub": sub, "aud": "todo-app"}))
    }

    pub fn token_with(&self, kind: KeyKind, claims: Value) -> String {
        self.issuer.mint(kind, claims)
    }

    pub fn client_config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        client_config(self.proxy.address, user, Some(password))
    }

    /// Connects through the proxy; the connection task runs in the background.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        connect(&self.client_config(user, password)).await
    }

    pub async fn connect_as(&self, sub: &str) -> Client {
        self.connect("authenticated", &self.token(sub))
            .await
            .unwrap_or_else(|e| panic!("{sub} connects: {e}"))
    }

    /// Connects as `user` with `password`, expecting a refusal (see `refusal`),
    /// and returns its message.
    pub async fn connect_refused(&self, user: &str, password: &str) -> String {
        match self.connect(user, password).await {
            Ok(_) => panic!("the proxy accepted a connection as {user} that it must refuse"),
            Err(e) => refusal(&e),
        }
    }

    /// A session spoken by hand, as `authenticated` with `sub`'s token.
    pub async fn raw_connect_as(&self, sub: &str) -> wire::RawSession {
        wire::RawSession::connect(self.port(), wire::APP_STARTUP, &self.token(sub))
            .await
            .unwrap_or_else(|e| panic!("{sub} connects: {e:?}"))
    }

    /// A libpq connection string for `user` on database `app`, without TLS.
    pub fn conninfo(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=app sslmode=disable",
            self.port()
        )
    }

    /// Runs `psql` through the proxy, with the token in PGPASSWORD.
    pub fn psql(&self, user: &str, token: &str, sql: &str) -> Output {
        psql(&self.conninfo(user), token, &[sql])
    }

    /// psql's trimmed output; its failing is a failure, with its stderr.
    pub fn psql_ok(&self, user: &str, token: &str, sql: &str) -> String {
        psql_ok(&self.conninfo(user), token, &[sql])
    }

    /// psql's stderr; its succeeding is a failure.
    pub fn psql_err(&self, user: &str, token: &str, sql: &str) -> String {
        psql_err(&self.conninfo(user), token, &[sql])
    }

    /// Connects with `token` and returns the user id the database sees.
    pub async fn user_id(&self, token: &str) -> Result<String, tokio_postgres::Error> {
        let client = self.connect("authenticated", token).await?;
        Ok(client.query_one("select auth.user_id()", &[]).await?.get(0))
    }

    /// A superuser connection straight to Postgres, around the proxy, to
    /// the test's database.
    pub async fn admin(&self) -> Client {
        self.pg.connect(self.pg.name()).await.unwrap()
    }

    /// Waits until backend `pid` is back in the session pool: idle after the
    /// pool's reset in `pg_stat_activity`, and the proxy counting as many
    /// idle backends as the database shows, since it files a backend only
    /// after reading the reset's answer. Needs [`pooled`]'s admin listener.
    pub async fn wait_until_pooled(&self, admin: &Client, pid: i32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let row = admin
                .query_one(
                    "select (select coalesce(state, '') || ' ' || query from pg_stat_activity \
                             where pid = $1), \
                            (select count(*) from pg_stat_activity \
                             where datname = current_database() and state = 'idle' \
                               and query = 'DISCARD ALL')",
                    &[&pid],
                )
                .await
                .unwrap();
            let (seen, resting): (Option<String>, i64) = (row.get(0), row.get(1));
            let back = seen.as_deref() == Some("idle DISCARD ALL");
            let pooled = if back {
                self.session_pool_idle().await
            } else {
                0
            };
            if back && pooled >= resting {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backend {pid} was not returned to the pool within {WAIT:?}: it is {seen:?}, \
                 the proxy counts {pooled} idle of the {resting} the database shows"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `rlsgate_pool_backends{pool="session",state="idle"}` for the test's
    /// database, summed over upstream users.
    async fn session_pool_idle(&self) -> i64 {
        let (status, text) = http_get(&self.admin_url("/metrics")).await;
        assert_eq!(status, 200, "{text}");
        let database = format!("database=\"{}\"", self.pg.name());
        metric_lines(&text, "rlsgate_pool_backends")
            .into_iter()
            .filter(|line| {
                [r#"pool="session""#, r#"state="idle""#, &database]
                    .iter()
                    .all(|label| line.contains(label))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as i64
    }

    /// The text of the harness's proxy configuration, as `start_with(extra_toml)`
    /// would have it, for tests of a configuration file.
    pub fn config_toml(&self, extra_toml: &str) -> String {
        proxy_config_toml(
            self.proxy.address.ip(),
            &self.pg,
            &self.issuer.issuer(),
            extra_toml,
        )
    }
}

/// The configuration [`Harness::another_proxy`] gives a proxy on loopback
/// with `extra_toml`, for a reload of one.
pub fn proxy_config_for(h: &Harness, extra_toml: &str) -> Config {
    proxy_config(
        Ipv4Addr::LOCALHOST.into(),
        &h.pg,
        &h.issuer.issuer(),
        extra_toml,
    )
}

/// The proxy's configuration: the sample one, listening on `ip` (any port)
/// in front of `pg_port` and `issuer`, with a leeway and refetch cooldown
/// short enough that tests of expiry and refetching run quickly. Lines of
/// `extra_toml` under a leading `[upstream]`, then under a leading
/// `[listen]`, go into those sections; the rest is appended (and so lands in the `[[provider]]`, unless it opens a section).
fn proxy_config(ip: IpAddr, pg: &TestDb, issuer: &str, extra_toml: &str) -> Config {
    let toml = proxy_config_toml(ip, pg, issuer, extra_toml);
    Config::parse(&toml).expect("test configuration parses")
}

/// The text of [`proxy_config`]; sessions go to the test's database
/// (`[upstream] database`), whichever one the client asks for.
pub fn proxy_config_toml(ip: IpAddr, pg: &TestDb, issuer: &str, extra_toml: &str) -> String {
    let mut toml = sample_config_toml(SocketAddr::new(ip, 0), pg, issuer, SIGNING_KEY);
    toml.push_str("leeway = \"2s\"\nrefetch_cooldown = \"1s\"\n");
    let (mut toml, extra) = place_upstream_lines(toml, extra_toml.trim());
    let extra = extra.as_str();
    if let Some(listen) = extra.strip_prefix("[listen]\n") {
        let (listen_lines, rest) = match listen.find("\n[") {
            Some(at) => (&listen[..at], &listen[at..]),
            None => (listen, ""),
        };
        assert!(toml.starts_with("[listen]\n"), "{toml}");
        toml = toml.replacen("[listen]\n", &format!("[listen]\n{listen_lines}\n"), 1);
        toml = format!("{toml}\n{rest}\n");
    } else if !extra.is_empty() {
        toml = format!("{toml}\n{extra}\n");
    }
    toml
}

/// `rlsgate::dev::sample_config` in front of the test's database.
pub fn sample_config_toml(
    listen: SocketAddr,
    pg: &TestDb,
    issuer: &str,
    signing_key_base64: &str,
) -> String {
    let toml = rlsgate::dev::sample_config(listen, pg.port(), issuer, signing_key_base64);
    match pg.upstream_database() {
        Some(name) => toml.replacen(
            "[upstream]\n",
            &format!("[upstream]\ndatabase = \"{name}\"\n"),
            1,
        ),
        None => toml,
    }
}

/// A client configuration for the proxy at `address`; without a password,
/// tokio-postgres fails if one is asked for.
pub fn client_config(
    address: SocketAddr,
    user: &str,
    password: Option<&str>,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(address.ip().to_string())
        .port(address.port())
        .user(user)
        .dbname("app")
        .connect_timeout(WAIT);
    if let Some(password) = password {
        config.password(password);
    }
    config
}

/// Connects; the connection task runs in the background.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// psql from the PostgreSQL client package; missing it is a failure that
/// says how to install it.
pub fn psql_binary() -> std::path::PathBuf {
    let candidates = ["/usr/bin/psql", "/usr/local/bin/psql"];
    if let Some(found) = candidates
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
    {
        return found;
    }
    if let Ok(bindir) = rlsgate::dev::postgres::find_server_binaries() {
        let psql = bindir.join("psql");
        if psql.exists() {
            return psql;
        }
    }
    panic!("psql not found: install the PostgreSQL client (apt-get install postgresql-client)");
}

/// psql with a libpq connection string, the token in PGPASSWORD and one
/// `-c` per command, ready for more arguments or environment.
pub fn psql_command(conninfo: &str, token: &str, commands: &[&str]) -> Command {
    let mut command = Command::new(psql_binary());
    command
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(conninfo);
    for c in commands {
        command.args(["-c", c]);
    }
    command
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", WAIT.as_secs().to_string())
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT");
    command
}

pub fn psql(conninfo: &str, token: &str, commands: &[&str]) -> Output {
    psql_command(conninfo, token, commands)
        .output()
        .expect("run psql")
}

/// psql's trimmed output; its failing is a failure, with its stderr.
pub fn psql_ok(conninfo: &str, token: &str, commands: &[&str]) -> String {
    psql_stdout(psql(conninfo, token, commands))
        .trim()
        .to_owned()
}

/// psql's stderr; its succeeding is a failure.
pub fn psql_err(conninfo: &str, token: &str, commands: &[&str]) -> String {
    let out = psql(conninfo, token, commands);
    assert!(
        !out.status.success(),
        "psql must fail, but it printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The whole output of a psql that succeeded; its failing is a failure,
/// with its stderr.
pub fn psql_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("psql prints UTF-8")
}

/// The SQLSTATE and message of a failed connect or query.
pub fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a database error, got: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// The message of a refusal: `e` must be a FATAL error with SQLSTATE 28000.
pub fn refusal(e: &tokio_postgres::Error) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected FATAL 28000, got: {e}"));
    assert_eq!(db.code().code(), "28000", "SQLSTATE for {:?}", db.message());
    assert_eq!(db.severity(), "FATAL", "severity for {:?}", db.message());
    db.message().to_owned()
}

/// `auth.user_id()` as the session sees it.
pub async fn user_id_of(client: &Client) -> Option<String> {
    client
        .query_one("select auth.user_id()", &[])
        .await
        .expect("select auth.user_id()")
        .get(0)
}

/// The pid of the backend serving `client` (`pg_backend_pid()`).
pub async fn pid_of(client: &Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("select pg_backend_pid()")
        .get(0)
}

/// The rows of a `simple_query` answer, as text.
pub fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The decoded header of a JWT.
/// The payload of the claims envelope bound to `client`'s session.
pub async fn envelope_payload(client: &Client) -> Value {
    let envelope: String = client
        .query_one("select current_setting('rlsgate.session')", &[])
        .await
        .unwrap()
        .get(0);
    let payload = envelope.split('.').nth(1).expect("KID.PAYLOAD.MAC");
    let json = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .expect("base64 payload");
    serde_json::from_slice(&json).expect("JSON payload")
}

pub fn jwt_header(token: &str) -> Value {
    let header = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap()
}

/// Seconds since the Unix epoch, as in `exp` and `nbf`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Connects carol as `user`, retrying while the proxy still counts a session
/// that just closed (it frees the slot once it sees the end), and returns
/// who the session is.
pub async fn carol_once_a_slot_frees(h: &Harness, user: &str) -> String {
    for _ in 0..50 {
        match h.connect(user, &h.token("carol")).await {
            Ok(carol) => return user_id_of(&carol).await.unwrap(),
            Err(e) => {
                assert_eq!(db_error(&e).0, "53300", "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    panic!("no slot freed within 5 s of a session closing");
}

impl Harness {
    /// Like [`Harness::start_with`], with the admin listener on a free
    /// loopback port (see [`Harness::admin_url`]).
    pub async fn start_with_admin(extra_toml: &str) -> Harness {
        Harness::start_configured(extra_toml, with_admin).await
    }

    /// [`Harness::start_with_admin`] on a cluster of the test's own (see
    /// [`Harness::start_alone`]).
    pub async fn start_alone_with_admin(extra_toml: &str) -> Harness {
        Harness::start_alone_configured(extra_toml, with_admin).await
    }

    /// `http://127.0.0.1:PORT{path}` on the proxy's admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        let admin = self
            .proxy
            .admin_address
            .expect("the proxy has an admin listener (Harness::start_with_admin)");
        format!("http://{admin}{path}")
    }
}

/// Session pooling (`[pool] mode = "session"`), keeping up to 4 idle
/// upstream connections, with the admin listener whose metrics show them
/// ([`Harness::wait_until_pooled`]).
pub fn pooled(config: &mut Config) {
    config.pool.mode = PoolMode::Session;
    config.pool.size = 4;
    with_admin(config);
}

/// No pooling: the configuration as it is, beside [`pooled`] for tests that
/// run both ways.
pub fn unpooled(_: &mut Config) {}

/// An edit of the parsed configuration, as [`Harness::start_configured`] takes.
pub type Edit = fn(&mut Config);

/// Both pool modes, each with its name for messages.
pub const POOL_MODES: [(&str, Edit); 2] = [("unpooled", unpooled), ("pooled", pooled)];

/// The admin listener on a free loopback port (see [`Harness::admin_url`]).
pub fn with_admin(config: &mut Config) {
    config.listen.admin_address = Some((Ipv4Addr::LOCALHOST, 0).into());
}

/// The status and body of a GET.
pub async fn http_get(url: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(WAIT)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("a response body"))
}

/// The value of the sample `name` whose labels are exactly `labels` in a
/// Prometheus text exposition, if there is one.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, mut found) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            found.sort();
            (metric_name == name && found == wanted).then(|| value.parse().ok())?
        })
}

/// Every sample of `name` in a Prometheus text exposition, as whole lines.
pub fn metric_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

impl Harness {
    /// Starts the issuer and the proxy in front of `pg`, which gets the
    /// sample application; `extra_toml` as in `start_with`.
    pub async fn start_on(pg: TempPostgres, extra_toml: &str) -> Harness {
        Self::start_edited(TestDb::own(pg).await, extra_toml, |_| {}).await
    }

    /// [`Harness::start_on`], with the parsed configuration edited by `edit`.
    pub async fn start_on_configured(
        pg: TempPostgres,
        extra_toml: &str,
        edit: impl FnOnce(&mut Config),
    ) -> Harness {
        Self::start_edited(TestDb::own(pg).await, extra_toml, edit).await
    }

    /// Starts everything, with the parsed configuration edited by `edit`
    /// (for settings the TOML merge of `extra_toml` cannot reach).
    pub async fn start_configured(extra_toml: &str, edit: impl FnOnce(&mut Config)) -> Harness {
        Self::start_edited(TestDb::shared().await, extra_toml, edit).await
    }

    /// [`Harness::start_configured`] on a cluster of the test's own (see
    /// [`Harness::start_alone`]).
    pub async fn start_alone_configured(
        extra_toml: &str,
        edit: impl FnOnce(&mut Config),
    ) -> Harness {
        let pg = TempPostgres::start().await.expect("start PostgreSQL");
        Self::start_edited(TestDb::own(pg).await, extra_toml, edit).await
    }

    async fn start_edited(pg: TestDb, extra_toml: &str, edit: impl FnOnce(&mut Config)) -> Harness {
        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .expect("start token issuer");
        let mut config = proxy_config(
            Ipv4Addr::LOCALHOST.into(),
            &pg,
            &issuer.issuer(),
            extra_toml,
        );
        edit(&mut config);
        let proxy = RunningProxy::start(config).await.expect("start proxy");
        Harness { pg, issuer, proxy }
    }

    /// Whether this session's upstream connection uses TLS, as Postgres sees it.
    pub async fn upstream_ssl(client: &Client) -> bool {
        client
            .query_one(
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("read pg_stat_ssl")
            .get(0)
    }
}

/// Lines of `extra` under a leading `[upstream]` go into the sample
/// configuration's `[upstream]`; returns the configuration and the rest.
fn place_upstream_lines(toml: String, extra: &str) -> (String, String) {
    let Some(upstream) = extra.strip_prefix("[upstream]\n") else {
        return (toml, extra.to_owned());
    };
    let (lines, rest) = match upstream.find("\n[") {
        Some(at) => (&upstream[..at], upstream[at..].trim()),
        None => (upstream, ""),
    };
    let toml = toml.replacen("[upstream]\n", &format!("[upstream]\n{lines}\n"), 1);
    (toml, rest.to_owned())
}

/// Calls `attempt` every 100 ms until it gives `Some`, failing after `limit`.
pub async fn poll_until<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A path as a TOML string.
pub fn toml_path(path: &std::path::Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Sleeps in `client`'s session and cancels it through the proxy.
pub async fn a_cancel_request_ends(client: Client) {
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    // Let the statement start before cancelling it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel
        .cancel_query(NoTls)
        .await
        .expect("send the cancel request to the proxy");
    let result = tokio::time::timeout(WAIT, sleeping)
        .await
        .expect("the statement was cancelled in time")
        .unwrap();
    let error = result.expect_err("pg_sleep(60) must be cancelled");
    assert_eq!(db_error(&error).0, "57014");
}

impl Harness {
    /// Once the refetch cooldown has passed, a token signed with a key the
    /// issuer never published is refused for want of a key, after exactly
    /// one refetch of the JWKS.
    pub async fn unknown_key_refused_after_one_refetch(&self) {
        tokio::time::sleep(PAST_COOLDOWN).await;
        let before = self.issuer.jwks_fetches();
        let unknown = self.issuer.mint_with_unpublished_key(
            KeyKind::Rs256,
            json!({"sub": "mallory", "aud": "todo-app"}),
        );
        let message = self.connect_refused("authenticated", &unknown).await;
        assert!(message.contains("no key"), "{message}");
        assert_eq!(
            self.issuer.jwks_fetches(),
            before + 1,
            "the JWKS was refetched once"
        );
    }
}

/// pgbench, from PATH or beside the PostgreSQL server binaries the harness
/// starts; missing it is a failure that says how to install it.
pub fn pgbench_binary() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let beside_server = rlsgate::dev::postgres::find_server_binaries().ok();
    on_path
        .into_iter()
        .chain(beside_server)
        .map(|dir| dir.join("pgbench"))
        .find(|pgbench| pgbench.is_file())
        .unwrap_or_else(|| {
            panic!("pgbench not found: install the PostgreSQL server package (apt-get install postgresql-15)")
        })
}

/// Logs in by hand with `parameters` besides user and database, returning
/// the session and the ParameterStatus values it was greeted with.
pub async fn login_with(
    h: &Harness,
    sub: &str,
    parameters: &[(&str, &str)],
) -> (wire::RawSession, std::collections::BTreeMap<String, String>) {
    let mut all = wire::APP_STARTUP.to_vec();
    all.extend_from_slice(parameters);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", h.port()))
        .await
        .unwrap();
    wire::send(&mut stream, &wire::startup_message(&all)).await;
    let (kind, _) = wire::read_message(&mut stream).await.unwrap();
    assert_eq!(kind, b'R');
    wire::send(&mut stream, &wire::password_message(&h.token(sub))).await;
    let mut status = std::collections::BTreeMap::new();
    let mut key = (0, 0);
    loop {
        let (kind, body) = wire::read_message(&mut stream).await.unwrap();
        match kind {
            b'R' | b'N' => {}
            b'S' => {
                let mut parts = body.split(|&b| b == 0);
                let name = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
                let value = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
                status.insert(name, value);
            }
            b'K' => key = wire::backend_key_data(&body),
            b'Z' => break,
            b'E' => panic!("refused: {:?}", wire::error_response(&body)),
            other => panic!("unexpected {:?} during login", other as char),
        }
    }
    let session = wire::RawSession {
        stream,
        pid: key.0,
        secret: key.1,
    };
    (session, status)
}

/// Streams rows of 3 000 bytes each until the session ends it, checking
/// that every row arrives whole (a FATAL spliced into a DataRow would
/// surface as a protocol error instead); returns the rows received and the
/// error the stream ended with.
pub async fn stream_until_ended(client: &Client) -> (u64, tokio_postgres::Error) {
    use futures_util::StreamExt;
    let rows = client
        .query_raw(
            // In the select list the series streams; in FROM it would be
            // materialized before the first row.
            "select repeat('x', 3000), generate_series(1, 100000000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rows.next()).await {
            Ok(Some(Ok(row))) => {
                assert_eq!(row.get::<_, &str>(0).len(), 3000);
                received += 1;
            }
            Ok(Some(Err(e))) => return (received, e),
            Ok(None) => panic!("a 300 GB result finished before the session ended"),
            Err(_) => panic!("the session did not end within 30 s of streaming"),
        }
    }
}
