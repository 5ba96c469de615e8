//! `rlsgate init-db`: installs schema `auth` (see `auth_schema.sql`) and
//! registers the claims signing keys in it.
//!
//! The database only ever receives the two HMAC pads of a key, computed here,
//! so the SQL can verify `rlsgate.session` with the core `sha256()` and no
//! extension. The pads are as secret as the key: they live in
//! `auth.signing_keys`, readable only by the role that ran init-db, and reach
//! the server as bind parameters, never in query text.
//!
//! `auth.session()` runs as, and the key table belongs to, the role that runs
//! init-db. The roles the proxy logs in as upstream must not be that role, a
//! member of it or a superuser: they could read the pads and forge claims.
//! Retiring a key is a manual `delete from auth.signing_keys where key_id = …`.

use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::auth::claims::{SigningKey, key_pads};
use crate::config::{self, Config, Upstream};
use crate::upstream::tls::{UpstreamTls, UrlTls};

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::init_db=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::init_db";

/// The schema migrations, in order; each runs once, recorded in
/// `auth.schema_version`.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("auth_schema.sql")),
    (2, include_str!("auth_schema_v2.sql")),
];

/// The version of schema `auth` this build installs and expects.
pub(crate) const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Serializes concurrent installs into one database ("rlsgate" in ASCII).
const ADVISORY_LOCK_KEY: i64 = 0x726c_7367_6174_6500;

/// What an install changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// `None` when schema `auth` was not installed before.
    pub version_before: Option<i32>,
    pub version_after: i32,
    /// Ids of the keys that were not registered before.
    pub keys_added: Vec<String>,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version_before {
            None => write!(f, "installed schema auth version {}", self.version_after)?,
            Some(before) if before == self.version_after => {
                write!(f, "schema auth is up to date (version {before})")?
            }
            Some(before) => write!(
                f,
                "upgraded schema auth from version {before} to {}",
                self.version_after
            )?,
        }
        if self.keys_added.is_empty() {
            write!(f, "; no new signing keys")
        } else {
            write!(f, "; added signing key(s) {}", self.keys_added.join(", "))
        }
    }
}

/// Installs or upgrades schema `auth` and registers each key (existing keys
/// stay: adding a second key is how rotation works). Everything happens in one
/// transaction, so a failure leaves the database as it was.
pub async fn install(client: &Client, keys: &[Vec<u8>]) -> anyhow::Result<InstallReport> {
    for key in keys {
        if key.len() < SigningKey::MIN_LEN {
            bail!(
                "a signing key of {} bytes is too short: use at least {} random bytes \
                 (e.g. `openssl rand -base64 32`)",
                key.len(),
                SigningKey::MIN_LEN
            );
        }
    }
    client
        .batch_execute("begin")
        .await
        .map_err(|e| explain(e, "starting a transaction"))?;
    match install_in_transaction(client, keys).await {
        Ok(report) => {
            client
                .batch_execute("commit")
                .await
                .map_err(|e| explain(e, "committing"))?;
            Ok(report)
        }
        Err(e) => {
            // The error matters more than a failed rollback, and the server
            // rolls back anyway when the connection closes.
            let _ = client.batch_execute("rollback").await;
            Err(e)
        }
    }
}

async fn install_in_transaction(
    client: &Client,
    keys: &[Vec<u8>],
) -> anyhow::Result<InstallReport> {
    client
        .execute(
            "select pg_catalog.pg_advisory_xact_lock($1)",
            &[&ADVISORY_LOCK_KEY],
        )
        .await
        .map_err(|e| explain(e, "waiting for the install lock"))?;

    let version_before = installed_version(client).await?;
    if version_before.is_none() {
        refuse_foreign_auth_schema(client).await?;
    }

    let mut version = version_before.unwrap_or(0);
    for &(migration, sql) in MIGRATIONS {
        if migration <= version {
            continue;
        }
        client
            .batch_execute(sql)
            .await
            .map_err(|e| explain(e, &format!("installing schema auth version {migration}")))?;
        client
            .execute(
                "insert into auth.schema_version (version) values ($1)",
                &[&migration],
            )
            .await
            .map_err(|e| explain(e, "recording the schema version"))?;
        version = migration;
    }

    let insert = client
        .prepare(
            "insert into auth.signing_keys (key_id, inner_pad, outer_pad) values ($1, $2, $3) \
             on conflict (key_id) do nothing returning key_id",
        )
        .await
        .map_err(|e| explain(e, "registering signing keys"))?;
    let mut keys_added = Vec::new();
    for key in keys {
        let pads = key_pads(key);
        let inner: &[u8] = &pads.inner;
        let outer: &[u8] = &pads.outer;
        let rows = client
            .query(&insert, &[&pads.key_id, &inner, &outer])
            .await
            .map_err(|e| explain(e, &format!("registering signing key {}", pads.key_id)))?;
        if !rows.is_empty() && !keys_added.contains(&pads.key_id) {
            keys_added.push(pads.key_id);
        }
    }

    Ok(InstallReport {
        version_before,
        version_after: version,
        keys_added,
    })
}

/// The highest recorded version, or `None` when schema `auth` has no
/// version table yet.
async fn installed_version(client: &Client) -> anyhow::Result<Option<i32>> {
    let row = client
        .query_one(
            "select pg_catalog.to_regclass('auth.schema_version') is not null",
            &[],
        )
        .await
        .map_err(|e| explain(e, "reading the installed schema version"))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one("select max(version) from auth.schema_version", &[])
        .await
        .map_err(|e| explain(e, "reading the installed schema version"))?;
    Ok(row.get(0))
}

/// Supabase and Neon's pg_session_jwt have their own schema `auth` with
/// functions of the same names; replacing them would silently change what
/// existing policies see.
async fn refuse_foreign_auth_schema(client: &Client) -> anyhow::Result<()> {
    let rows = client
        .query(
            "select p.proname::text from pg_catalog.pg_proc p \
               join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
              where n.nspname = 'auth' \
                and p.proname in ('session', 'jwt', 'user_id', 'uid') \
              order by 1",
            &[],
        )
        .await
        .map_err(|e| explain(e, "inspecting schema auth"))?;
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = rows
        .iter()
        .map(|row| format!("auth.{}()", row.get::<_, String>(0)))
        .collect();
    bail!(
        "schema auth already defines {} but was not installed by rlsgate (Supabase's auth \
         schema, or the pg_session_jwt extension?); rlsgate will not replace them. Use a \
         database without them, or drop them if nothing depends on them",
        names.join(", ")
    )
}

/// Connects to `database_url` and runs [`install`].
///
/// TLS is as libpq does it: `sslmode` (up to `verify-full`),
/// `sslrootcert`, and the client certificate `sslcert` and `sslkey` in the
/// URL. A URL that says nothing about TLS takes `upstream`'s `tls`,
/// `tls_ca_file`, `tls_server_name` and client certificate (the
/// configuration's `[upstream]`), and without one `prefer`. A host that is a
/// directory is a Unix socket, where there is no TLS.
pub async fn run(
    database_url: &str,
    upstream: Option<&Upstream>,
    keys: &[Vec<u8>],
) -> anyhow::Result<InstallReport> {
    let invalid = "--database-url is not a valid connection string \
         (expected e.g. postgresql://user:password@host:5432/dbname?sslmode=verify-full)";
    let split = UrlTls::split(database_url);
    let from_url = |mode, ca: Option<std::path::PathBuf>| {
        let tls = UpstreamTls::new(mode, ca.as_deref(), None)?.named_as_in_urls();
        match split.client_certificate() {
            Some((cert, key)) => tls.with_client_certificate(&cert, &key),
            None => Ok(tls),
        }
    };
    let tls = match (split.resolve().context(invalid)?, upstream) {
        (Some((mode, ca)), _) => from_url(mode, ca),
        (None, Some(upstream)) => UpstreamTls::from_config(upstream),
        (None, None) => from_url(Default::default(), None),
    }
    .context("--database-url: TLS settings")?;
    let mut config: tokio_postgres::Config = split.rest.parse().context(invalid)?;
    let connector = tls.for_postgres();
    if only_sockets(&config) {
        // As libpq: no SSLRequest over a socket.
        if tls.mode().requires_tls() {
            bail!(
                "--database-url: the host is a Unix socket directory, which has no TLS, but \
                 the TLS mode {} (sslmode, or [upstream] tls) requires it; use sslmode=disable \
                 or prefer with a socket",
                tls.mode().as_str()
            );
        }
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    } else {
        config.ssl_mode(connector.ssl_mode());
    }
    let target = describe(&config);
    let (client, connection) = config
        .connect(connector)
        .await
        .with_context(|| format!("cannot connect to {target} (TLS: {})", tls.mode().as_str()))?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: LOG_TARGET, error = %e, "init-db connection ended");
        }
    });
    let result = install(&client, keys)
        .await
        .with_context(|| format!("init-db on {target} failed"));
    drop(client);
    let _ = connection.await;
    result
}

/// `rlsgate init-db`: installs into `database_url` with the key the flags
/// choose (see [`chosen_key`]) and prints what changed.
pub(crate) async fn command(
    database_url: &str,
    config: Option<&Path>,
    signing_key: Option<&str>,
) -> anyhow::Result<()> {
    let (key, upstream) = chosen_key(config, signing_key)?;
    let report = run(database_url, upstream.as_ref(), &[key.bytes().to_vec()]).await?;
    println!("{report}");
    Ok(())
}

/// The key to register, and the `[upstream]` whose TLS settings apply when
/// the URL gives none. A configuration named on the command line wins over
/// the key's environment variable (`--signing-key`), which that file may
/// expand; with neither, the default configuration file.
fn chosen_key(
    config: Option<&Path>,
    signing_key: Option<&str>,
) -> anyhow::Result<(SigningKey, Option<Upstream>)> {
    let path = match (config, signing_key) {
        (Some(path), _) => path,
        (None, Some(text)) => return Ok((SigningKey::from_base64(text)?, None)),
        (None, None) => Path::new(config::DEFAULT_PATH),
    };
    let config = Config::load(path)?;
    Ok((config.claims.signing_key, Some(config.upstream)))
}

/// Whether every host of `config` is a Unix socket directory.
fn only_sockets(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            Host::Tcp(_) => false,
            #[cfg(unix)]
            Host::Unix(_) => true,
        })
}

/// "database D on HOST:PORT as USER", without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "database {} on {host}:{port} as {}",
        config.get_dbname().unwrap_or("(default)"),
        config.get_user().unwrap_or("(default user)")
    )
}

/// Turns a server error into a message that says what to do about it.
fn explain(error: tokio_postgres::Error, doing: &str) -> anyhow::Error {
    let Some(db) = error.as_db_error() else {
        return anyhow::Error::new(error).context(format!("{doing}: connection failed"));
    };
    let mut message = format!("{doing}: {} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        message.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = db.hint() {
        message.push_str(&format!("; hint: {hint}"));
    }
    let advice = match *db.code() {
        SqlState::INSUFFICIENT_PRIVILEGE => Some(
            "the role running init-db must be allowed to create schema auth \
             (CREATE on the database) or, when it exists, own schema auth and everything in it; \
             run init-db as the database owner or the role that installed it first",
        ),
        SqlState::READ_ONLY_SQL_TRANSACTION => {
            Some("the database is read-only (a standby?); run init-db against the primary")
        }
        _ => None,
    };
    if let Some(advice) = advice {
        message.push_str(". ");
        message.push_str(advice);
    }
    anyhow::Error::msg(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::claims::key_id;
    use crate::dev::postgres::TempPostgres;
    use aws_lc_rs::digest;
    use aws_lc_rs::hmac;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::{Value, json};

    const SET: &str = "select pg_catalog.set_config('rlsgate.session', $1, false)";

    fn now() -> i64 {
        crate::clock::unix_now() as i64
    }

    /// The setting value per the contract, made independently of claims.rs,
    /// for the backend of `client`.
    async fn sealed(client: &Client, key: &[u8], user: &str, exp: i64, claims: Value) -> String {
        let row = client
            .query_one(
                "select pg_backend_pid(), (extract(epoch from backend_start) * 1000000)::bigint \
                 from pg_stat_activity where pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let (pid, started): (i32, i64) = (row.get(0), row.get(1));
        seal(
            key,
            json!({"v": 2, "user": user, "pid": pid, "started": started, "exp": exp, "claims": claims}),
        )
    }

    fn seal(key: &[u8], envelope: Value) -> String {
        let signed = format!(
            "{}.{}",
            key_id(key),
            STANDARD.encode(serde_json::to_vec(&envelope).unwrap())
        );
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), signed.as_bytes());
        format!("{signed}.{}", hex::encode(mac.as_ref()))
    }

    fn key(fill: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
    }

    async fn set(client: &Client, value: &str) {
        client.execute(SET, &[&value]).await.unwrap();
    }

    async fn user_id(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
        Ok(client.query_one("select auth.user_id()", &[]).await?.get(0))
    }

    /// The error of `auth.user_id()`, which must be SQLSTATE 28000.
    async fn refusal(client: &Client) -> String {
        let err = user_id(client).await.expect_err("bad claims were accepted");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(
            db.code(),
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "{db:?}"
        );
        assert!(db.message().starts_with("rlsgate: "), "{}", db.message());
        db.message().to_owned()
    }

    #[test]
    fn pads_reproduce_hmac_for_every_key_length() {
        for len in [32, 63, 64, 65, 100, 200] {
            let key = key(9, len);
            let pads = key_pads(&key);
            let message = b"0123456789abcdef.eyJ2IjoxfQ==";
            let inner = digest::digest(&digest::SHA256, &[&pads.inner[..], message].concat());
            let outer =
                digest::digest(&digest::SHA256, &[&pads.outer[..], inner.as_ref()].concat());
            let expected = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), message);
            assert_eq!(outer.as_ref(), expected.as_ref(), "key of {len} bytes");
            assert_eq!(pads.key_id.len(), 16);
            assert!(
                pads.key_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
            assert!(!format!("{pads:?}").contains(&hex::encode(pads.inner)));
        }
    }

    #[tokio::test]
    async fn installs_once_and_adds_rotated_keys() {
        let pg = TempPostgres::start().await.unwrap();
        let client = pg.connect("postgres").await.unwrap();
        let (k1, k2) = (key(1, 32), key(2, 48));

        let first = install(&client, std::slice::from_ref(&k1)).await.unwrap();
        assert_eq!(
            first,
            InstallReport {
                version_before: None,
                version_after: SCHEMA_VERSION,
                keys_added: vec![key_id(&k1)],
            }
        );
        let again = install(&client, std::slice::from_ref(&k1)).await.unwrap();
        assert_eq!(
            again,
            InstallReport {
                version_before: Some(SCHEMA_VERSION),
                version_after: SCHEMA_VERSION,
                keys_added: vec![],
            }
        );
        assert_eq!(
            again.to_string(),
            format!("schema auth is up to date (version {SCHEMA_VERSION}); no new signing keys")
        );

        let rotated = install(&client, &[k1.clone(), k2.clone()]).await.unwrap();
        assert_eq!(rotated.keys_added, vec![key_id(&k2)]);
        let versions: i64 = client
            .query_one("select count(*) from auth.schema_version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(versions, i64::from(SCHEMA_VERSION), "one row per migration");

        let claims = json!({"sub": "alice"});
        for k in [&k1, &k2] {
            set(
                &client,
                &sealed(&client, k, "postgres", now() + 60, claims.clone()).await,
            )
            .await;
            assert_eq!(user_id(&client).await.unwrap().as_deref(), Some("alice"));
        }

        let short = install(&client, &[vec![0; 16]]).await.unwrap_err();
        assert!(short.to_string().contains("too short"), "{short:#}");

        // Someone else's auth schema (Supabase, pg_session_jwt) is left alone.
        client
            .batch_execute("create database foreign_auth")
            .await
            .unwrap();
        let other = pg.connect("foreign_auth").await.unwrap();
        other
            .batch_execute(
                "create schema auth; \
                 create function auth.uid() returns uuid language sql as 'select null::uuid'",
            )
            .await
            .unwrap();
        let err = install(&other, &[k1]).await.unwrap_err().to_string();
        assert!(
            err.contains("auth.uid()") && err.contains("not installed by rlsgate"),
            "{err}"
        );
        let tables: i64 = other
            .query_one(
                "select count(*) from pg_catalog.pg_tables where schemaname = 'auth'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(tables, 0, "a refused install must leave nothing behind");
    }

    #[tokio::test]
    async fn valid_envelopes_yield_claims() {
        let pg = TempPostgres::start().await.unwrap();
        let client = pg.connect("postgres").await.unwrap();
        let k = key(3, 32);
        install(&client, std::slice::from_ref(&k)).await.unwrap();

        let null: Option<String> = client
            .query_one("select auth.session()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(null, None, "no setting means no claims");
        set(&client, "").await;
        let message = refusal(&client).await;
        assert!(message.contains("cleared"), "{message}");

        let uuid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301";
        let claims = json!({"sub": uuid, "role": "authenticated", "n": [1, 2]});
        set(
            &client,
            &sealed(&client, &k, "postgres", now() + 60, claims.clone()).await,
        )
        .await;
        let row = client
            .query_one(
                "select auth.session()::text, auth.jwt()::text, auth.user_id(), auth.uid()::text",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(row.get(0)).unwrap(), claims);
        assert_eq!(serde_json::from_str::<Value>(row.get(1)).unwrap(), claims);
        assert_eq!(row.get::<_, String>(2), uuid);
        assert_eq!(row.get::<_, String>(3), uuid.to_lowercase());

        for sub in [
            "user_2abc",
            "3f2504e0-4f89-11d3-9a0c-0305e82c33011",
            "{3f2504e0-4f89-11d3-9a0c-0305e82c3301}",
        ] {
            set(
                &client,
                &sealed(&client, &k, "postgres", now() + 60, json!({"sub": sub})).await,
            )
            .await;
            let row = client
                .query_one("select auth.user_id(), auth.uid()::text", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), sub);
            assert_eq!(row.get::<_, Option<String>>(1), None, "{sub} is not a uuid");
        }
    }

    #[tokio::test]
    async fn bad_envelopes_raise_28000() {
        let pg = TempPostgres::start().await.unwrap();
        let client = pg.connect("postgres").await.unwrap();
        let k = key(4, 32);
        install(&client, std::slice::from_ref(&k)).await.unwrap();
        let good = sealed(&client, &k, "postgres", now() + 60, json!({"sub": "alice"})).await;
        let (signed, mac) = good.rsplit_once('.').unwrap();

        let flipped = if mac.starts_with('0') { "1" } else { "0" };
        set(&client, &format!("{signed}.{flipped}{}", &mac[1..])).await;
        let message = refusal(&client).await;
        assert!(message.contains("invalid signature"), "{message}");
        assert!(!message.contains(&mac[1..]), "{message}");

        let (_, payload) = signed.split_once('.').unwrap();
        let forged_payload = STANDARD.encode(
            serde_json::to_vec(
                &json!({"v":2,"user":"postgres","exp":now()+60,"claims":{"sub":"bob"}}),
            )
            .unwrap(),
        );
        set(&client, &format!("{}.{forged_payload}.{mac}", key_id(&k))).await;
        assert!(refusal(&client).await.contains("invalid signature"));

        let unknown = key(5, 32);
        set(
            &client,
            &sealed(
                &client,
                &unknown,
                "postgres",
                now() + 60,
                json!({"sub": "alice"}),
            )
            .await,
        )
        .await;
        let message = refusal(&client).await;
        assert!(
            message.contains(&format!("unknown key {}", key_id(&unknown))),
            "{message}"
        );

        let exp = now() - 5;
        set(
            &client,
            &sealed(&client, &k, "postgres", exp, json!({"sub": "alice"})).await,
        )
        .await;
        let message = refusal(&client).await;
        assert!(message.contains("claims expired at "), "{message}");

        set(
            &client,
            &sealed(
                &client,
                &k,
                "someone_else",
                now() + 60,
                json!({"sub": "alice"}),
            )
            .await,
        )
        .await;
        assert!(refusal(&client).await.contains("another login role"));

        for malformed in [
            "garbage",
            &format!("{good}.x"),
            &format!("{signed}."),
            payload,
        ] {
            set(&client, malformed).await;
            let message = refusal(&client).await;
            assert!(!message.contains(payload), "{message}");
        }

        // A refusal must not leave the later queries of the session broken.
        set(&client, &good).await;
        assert_eq!(user_id(&client).await.unwrap().as_deref(), Some("alice"));
    }

    #[tokio::test]
    async fn served_roles_cannot_read_keys_but_can_read_claims() {
        let pg = TempPostgres::start().await.unwrap();
        let admin = pg.connect("postgres").await.unwrap();
        let k = key(6, 32);
        // Default privileges must not leak the keys to the role they name.
        admin
            .batch_execute(
                "create role app_user login password 'app-user-password'; \
                 alter default privileges grant select on tables to app_user",
            )
            .await
            .unwrap();
        install(&admin, std::slice::from_ref(&k)).await.unwrap();

        let (app, connection) = pg
            .config("postgres")
            .user("app_user")
            .password("app-user-password")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);

        for table in ["auth.signing_keys", "auth.schema_version"] {
            let err = app
                .query(&format!("select * from {table}"), &[])
                .await
                .expect_err("a served role read a private table");
            assert_eq!(
                err.code(),
                Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                "{table}"
            );
        }
        let err = app
            .execute(
                "insert into auth.signing_keys (key_id, inner_pad, outer_pad) \
                 values ('0000000000000000', '\\x00', '\\x00')",
                &[],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

        set(
            &app,
            &sealed(&app, &k, "app_user", now() + 60, json!({"sub": "carol"})).await,
        )
        .await;
        assert_eq!(user_id(&app).await.unwrap().as_deref(), Some("carol"));

        let err = install(&app, std::slice::from_ref(&k)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("the role running init-db must"),
            "{err:#}"
        );

        // The superuser's envelope is worthless in app_user's session.
        set(
            &app,
            &sealed(&app, &k, "postgres", now() + 60, json!({"sub": "carol"})).await,
        )
        .await;
        assert!(refusal(&app).await.contains("another login role"));
    }

    #[tokio::test]
    async fn sql_hmac_matches_aws_lc_for_long_keys() {
        let pg = TempPostgres::start().await.unwrap();
        let client = pg.connect("postgres").await.unwrap();
        let long = key(7, 100);
        install(&client, std::slice::from_ref(&long)).await.unwrap();

        let message = format!("{}.eyJ2IjoxfQ==", key_id(&long));
        let row = client
            .query_one(
                "select pg_catalog.encode(pg_catalog.sha256(outer_pad || pg_catalog.sha256( \
                     inner_pad || pg_catalog.convert_to($2, 'UTF8'))), 'hex') \
                   from auth.signing_keys where key_id = $1",
                &[&key_id(&long), &message],
            )
            .await
            .unwrap();
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &long),
            message.as_bytes(),
        );
        assert_eq!(row.get::<_, String>(0), hex::encode(expected.as_ref()));

        set(
            &client,
            &sealed(
                &client,
                &long,
                "postgres",
                now() + 60,
                json!({"sub": "dave"}),
            )
            .await,
        )
        .await;
        assert_eq!(user_id(&client).await.unwrap().as_deref(), Some("dave"));
    }
}
