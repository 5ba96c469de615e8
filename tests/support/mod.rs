//! The world the integration tests run in: a throwaway PostgreSQL with the
//! `auth` schema and a `todos` table under RLS, a real token issuer over
//! HTTP, and the proxy between them, configured through its TOML format.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

use rlsgate::config::Config;
use rlsgate::dev::issuer::{DevIssuer, KeyKind};
use rlsgate::dev::postgres::TempPostgres;
use rlsgate::listener::RunningProxy;
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

pub const SIGNING_KEY: &str = "cmxzZ2F0ZS10ZXN0LXNpZ25pbmcta2V5LTMyLWJ5dGVzIQ==";

/// What the tests add to the sample application.
const TEST_SCHEMA: &str = "
grant select on todos to anonymous;
create table scratch (id int, body text);
grant all on scratch to authenticated;
";

pub struct Harness {
    pub pg: TempPostgres,
    pub issuer: DevIssuer,
    pub proxy: RunningProxy,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("").await
    }

    /// Starts everything; `extra_toml` is appended to the generated configuration.
    pub async fn start_with(extra_toml: &str) -> Harness {
        let pg = TempPostgres::start().await.expect("start PostgreSQL");
        let admin = pg.connect("postgres").await.expect("connect as superuser");
        admin.batch_execute("create database app").await.unwrap();
        let app = pg.connect("app").await.unwrap();
        let key = rlsgate::claims::SigningKey::from_base64(SIGNING_KEY).unwrap();
        rlsgate::init_db::install(&app, &[key.bytes().to_vec()])
            .await
            .expect("install schema auth");
        app.batch_execute(rlsgate::dev::SAMPLE_SCHEMA)
            .await
            .expect("create sample schema");
        app.batch_execute(TEST_SCHEMA)
            .await
            .expect("create test schema");

        let issuer = DevIssuer::start("127.0.0.1:0".parse().unwrap())
            .await
            .expect("start token issuer");
        let mut toml = rlsgate::dev::sample_config(
            "127.0.0.1:0".parse().unwrap(),
            pg.port(),
            &issuer.issuer(),
            SIGNING_KEY,
        );
        // Short enough that tests of expiry and refetching run quickly.
        toml.push_str("leeway = \"2s\"\nrefetch_cooldown = \"1s\"\n");
        let toml = merge_extra(&toml, extra_toml);
        let config = Config::parse(&toml).expect("test configuration parses");
        let proxy = RunningProxy::start(config).await.expect("start proxy");
        Harness { pg, issuer, proxy }
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
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port())
            .user(user)
            .password(password)
            .dbname("app")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connects through the proxy; the connection task runs in the background.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.client_config(user, password).connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    pub async fn connect_as(&self, sub: &str) -> Client {
        self.connect("authenticated", &self.token(sub))
            .await
            .unwrap_or_else(|e| panic!("{sub} connects: {e}"))
    }

    /// Runs `psql` through the proxy, with the token in PGPASSWORD.
    pub fn psql(&self, user: &str, token: &str, sql: &str) -> Output {
        Command::new(psql_binary())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname=app sslmode=disable",
                self.port()
            ))
            .args(["-c", sql])
            .env("PGPASSWORD", token)
            .env_remove("PGSERVICE")
            .output()
            .expect("run psql")
    }

    /// A superuser connection straight to Postgres, around the proxy.
    pub async fn admin(&self) -> Client {
        self.pg.connect("app").await.unwrap()
    }
}

/// Lines of `extra` that start a `key = value` under `[listen]` go there;
/// whole sections are appended.
fn merge_extra(base: &str, extra: &str) -> String {
    let extra = extra.trim();
    if extra.is_empty() {
        return base.to_owned();
    }
    if let Some(listen) = extra.strip_prefix("[listen]\n") {
        let (listen_lines, rest) = match listen.find("\n[") {
            Some(at) => (&listen[..at], &listen[at..]),
            None => (listen, ""),
        };
        let base = base.replacen(
            "address = \"127.0.0.1:0\"\n",
            &format!("address = \"127.0.0.1:0\"\n{listen_lines}\n"),
            1,
        );
        return format!("{base}\n{rest}\n");
    }
    format!("{base}\n{extra}\n")
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

/// The SQLSTATE and message of a failed connect or query.
pub fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a database error, got: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}
