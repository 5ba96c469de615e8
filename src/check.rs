//! `rlsgate check`: whether a configuration would work, asked of the world it
//! names rather than of the file alone.
//!
//! 1. The configuration parses and validates (as `serve` would load it).
//! 2. Each provider's discovery document and JWKS can be fetched and hold
//!    keys for its accepted algorithms; a provider with only a shared secret
//!    has nothing to fetch.
//! 3. The proxy can log in upstream as each role, with the same code and a
//!    sealed envelope as `serve` (null claims, valid for a minute), and in
//!    that session schema `auth` is installed and `auth.session()` accepts
//!    the envelope: the database knows the configured signing key.
//! 4. Row-Level Security protects what each served upstream user can reach:
//!    a table it has privileges on with RLS disabled, a table it owns (owners
//!    bypass RLS unless it is forced), or the user being a superuser or
//!    having BYPASSRLS are failures. So is reading `auth.signing_keys`, which
//!    lets a session forge claims. TRUNCATE, which RLS does not cover, is a
//!    warning.
//!
//! The report has one line per finding, `ok`, `warn` or `FAIL`; it passes
//! when nothing failed. A table meant to be readable by everyone should say
//! so with RLS and a `using (true)` policy, rather than by having none.
//! Views are not inspected. Messages name keys by their ids and never hold
//! passwords, signing keys or secrets.
//!
//! The installed version is recorded in `auth.schema_version`, which only the
//! schema's owner can read; when the served user cannot, the schema counts
//! as installed when the objects of this build's version are all present.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, Role};
use crate::init_db::SCHEMA_VERSION;
use crate::jwks::{JwksCache, http_client};
use crate::stream::UpstreamStream;
use crate::upstream::{self, Login};
use crate::upstream_tls::UpstreamTls;

/// How long the envelope of a check session is valid.
const ENVELOPE_VALIDITY: Duration = Duration::from_secs(60);

/// Bound on each query of a check session.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The functions of schema `auth` that policies call.
const AUTH_FUNCTIONS: [&str; 4] = ["session", "jwt", "user_id", "uid"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report: what was checked (`config FILE`, `provider URL`,
/// `role NAME`) and what was found.
#[derive(Debug, Clone)]
pub struct Finding {
    pub status: Status,
    pub subject: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Nothing failed (warnings may remain).
    pub fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    pub fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    fn add(&mut self, status: Status, subject: &str, message: impl Into<String>) {
        self.findings.push(Finding {
            status,
            subject: subject.to_owned(),
            message: message.into(),
        });
    }

    fn ok(&mut self, subject: &str, message: impl Into<String>) {
        self.add(Status::Ok, subject, message);
    }

    fn warn(&mut self, subject: &str, message: impl Into<String>) {
        self.add(Status::Warn, subject, message);
    }

    fn fail(&mut self, subject: &str, message: impl Into<String>) {
        self.add(Status::Fail, subject, message);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(
                f,
                "{:<5} {}: {}",
                finding.status.label(),
                finding.subject,
                finding.message
            )?;
        }
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let (failures, warnings) = (self.count(Status::Fail), self.count(Status::Warn));
        writeln!(f)?;
        if failures == 0 {
            writeln!(
                f,
                "passed, with {}",
                plural(warnings, "warning").replacen("0 warnings", "no warnings", 1)
            )
        } else {
            writeln!(
                f,
                "FAILED: {}, {}",
                plural(failures, "problem"),
                plural(warnings, "warning")
            )
        }
    }
}

/// Loads the configuration at `path` and checks it (see the module
/// documentation). `database` is the database to look into when
/// `[upstream]` names none.
pub async fn run(path: &Path, database: Option<&str>) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            let subject = format!("config {}", path.display());
            report.fail(&subject, without_quoted_lines(&format!("{e:#}")));
            return report;
        }
    };
    report.ok(
        &format!("config {}", path.display()),
        format!(
            "valid: {} role(s), {} provider(s)",
            config.roles.len(),
            config.providers.len()
        ),
    );
    check(&config, path, database, &mut report).await;
    report
}

/// Checks a loaded configuration; `path` is only named in the advice.
pub async fn check(config: &Config, path: &Path, database: Option<&str>, report: &mut Report) {
    check_providers(config, report).await;
    check_upstream(config, path, database, report).await;
}

/// toml's errors quote the offending line of the file, after `${VAR}`
/// expansion: it may hold a password or the signing key. Its position and
/// message are kept, the quoted lines dropped.
fn without_quoted_lines(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let rest = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !rest.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

async fn check_providers(config: &Config, report: &mut Report) {
    let http = http_client();
    for provider in &config.providers {
        let subject = format!("provider {}", provider.issuer);
        if !provider.has_jwks() {
            report.ok(
                &subject,
                "shared secret (HS256) only: no keys to fetch".to_owned(),
            );
            continue;
        }
        let cache = JwksCache::new(provider, http.clone());
        let (jwks_uri, keys) = match cache.fetch_once().await {
            Ok(fetched) => fetched,
            Err(reason) => {
                report.fail(&subject, format!("cannot fetch its signing keys: {reason}"));
                continue;
            }
        };
        let algorithms = provider.algorithms();
        let (usable, unusable): (Vec<_>, Vec<_>) = keys.iter().partition(|key| {
            algorithms
                .iter()
                .any(|&alg| key.kind.fits(alg) && key.alg.is_none_or(|declared| declared == alg))
        });
        if usable.is_empty() {
            let why = if keys.is_empty() {
                "it holds no signature keys".to_owned()
            } else {
                format!(
                    "none of its {} key(s) fits the accepted algorithms",
                    keys.len()
                )
            };
            report.fail(
                &subject,
                format!("{jwks_uri} has no usable signing keys: {why}"),
            );
            continue;
        }
        let kids: Vec<&str> = usable
            .iter()
            .map(|key| key.kid.as_deref().unwrap_or("(none)"))
            .collect();
        let mut message = format!(
            "{} signing key(s) (kid {}) from {jwks_uri}",
            usable.len(),
            kids.join(", ")
        );
        if !unusable.is_empty() {
            message.push_str(&format!(
                "; {} more fit(s) no accepted algorithm",
                unusable.len()
            ));
        }
        if provider.hs256_secret.is_some() {
            message.push_str("; and a shared secret (HS256)");
        }
        report.ok(&subject, message);
        if usable.len() > 1 && usable.iter().any(|key| key.kid.is_none()) {
            report.warn(
                &subject,
                "some keys have no kid, and tokens without a kid are refused while the set holds several keys",
            );
        }
    }
}

async fn check_upstream(config: &Config, path: &Path, database: Option<&str>, report: &mut Report) {
    let upstream = &config.upstream;
    let Some(database) = upstream.database.as_deref().or(database) else {
        report.fail(
            "upstream",
            "[upstream] names no database (clients choose it): pass --database NAME to check one",
        );
        return;
    };
    let place = format!("database {database} on {}", upstream.address());
    let key = &config.claims.signing_key;
    let url = if upstream.is_socket() {
        format!(
            "postgresql://OWNER@/{database}?host={}&port={}",
            upstream.host, upstream.port
        )
    } else {
        format!(
            "postgresql://OWNER@{}:{}/{database}",
            upstream.host, upstream.port
        )
    };
    let init_db = format!(
        "rlsgate init-db --config {} --database-url {url} (as a superuser or the database owner)",
        path.display(),
    );
    let mut users_checked = HashSet::new();
    for role in &config.roles {
        let user = role.upstream_user();
        let subject = if user == role.name {
            format!("role {}", role.name)
        } else {
            format!("role {} (upstream user {user})", role.name)
        };
        let session = match open(config, role, database).await {
            Ok(session) => session,
            Err(reason) => {
                report.fail(
                    &subject,
                    format!("cannot log in to {place} as {user}: {reason}"),
                );
                continue;
            }
        };
        report.ok(&subject, format!("logged in to {place} as {user}"));
        let mut session = session;
        let outcome = async {
            let installed = check_schema(&mut session, &subject, &init_db, report).await?;
            if installed {
                check_key(&mut session, &subject, key.id(), &init_db, report).await?;
            }
            if users_checked.insert(user.to_owned()) {
                check_privileges(&mut session, &subject, user, report).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(reason) = outcome {
            report.fail(&subject, format!("the check session failed: {reason}"));
        }
        session.close().await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Logs in as `role`'s upstream user through [`upstream::connect`], with
/// null claims sealed by the configured key.
async fn open(config: &Config, role: &Role, database: &str) -> Result<Session, String> {
    let claims = config.claims.signing_key.seal(
        role.upstream_user(),
        unix_now() + ENVELOPE_VALIDITY.as_secs(),
        None,
    );
    let login = Login {
        role,
        database: Some(database),
        parameters: vec![("application_name".to_owned(), "rlsgate check".to_owned())],
        claims,
    };
    let tls = UpstreamTls::from_config(&config.upstream).map_err(|e| format!("{e:#}"))?;
    match upstream::connect(&config.upstream, &tls, login).await {
        Ok(session) => Ok(Session {
            stream: session.stream,
            buf: BytesMut::new(),
        }),
        // The detail holds the upstream's own words, never the password.
        Err(refusal) => Err(refusal.detail.unwrap_or(refusal.message)),
    }
}

/// Whether schema `auth` is installed in the version this build expects.
async fn check_schema(
    session: &mut Session,
    subject: &str,
    init_db: &str,
    report: &mut Report,
) -> Result<bool, String> {
    let functions: Vec<String> = AUTH_FUNCTIONS
        .iter()
        .map(|name| {
            format!("case when pg_catalog.to_regprocedure('auth.{name}()') is null then 'auth.{name}()' end")
        })
        .collect();
    let sql = format!(
        "select pg_catalog.to_regnamespace('auth') is not null, \
                pg_catalog.to_regclass('auth.schema_version') is not null, \
                pg_catalog.concat_ws(', ', {})",
        functions.join(", ")
    );
    let row = session.one(&sql).await?;
    let (schema, version_table, missing) = (is_true(&row[0]), is_true(&row[1]), text(&row[2]));
    if !schema {
        report.fail(
            subject,
            format!("schema auth is not installed in this database: run {init_db}"),
        );
        return Ok(false);
    }
    if !version_table || !missing.is_empty() {
        let lacking = if version_table {
            missing
        } else if missing.is_empty() {
            "auth.schema_version".to_owned()
        } else {
            format!("auth.schema_version, {missing}")
        };
        report.fail(
            subject,
            format!(
                "schema auth lacks {lacking}: it was not installed by rlsgate (Supabase's or \
                 pg_session_jwt's schema auth?), or only in part; run {init_db}"
            ),
        );
        return Ok(false);
    }
    let readable = session
        .one("select pg_catalog.has_table_privilege('auth.schema_version', 'SELECT')")
        .await?;
    if !is_true(&readable[0]) {
        report.ok(
            subject,
            format!(
                "schema auth is installed (the objects of version {SCHEMA_VERSION} are present)"
            ),
        );
        return Ok(true);
    }
    let row = session
        .one("select max(version) from auth.schema_version")
        .await?;
    let installed: Option<i32> = row[0].as_deref().and_then(|v| v.parse().ok());
    match installed {
        Some(version) if version == SCHEMA_VERSION => {
            report.ok(
                subject,
                format!("schema auth is installed in version {version}"),
            );
            Ok(true)
        }
        Some(version) if version > SCHEMA_VERSION => {
            report.fail(
                subject,
                format!(
                    "schema auth is in version {version}, newer than this rlsgate knows \
                     ({SCHEMA_VERSION}): upgrade rlsgate"
                ),
            );
            Ok(true)
        }
        other => {
            let version =
                other.map_or("no recorded version".to_owned(), |v| format!("version {v}"));
            report.fail(
                subject,
                format!(
                    "schema auth has {version}, this rlsgate expects {SCHEMA_VERSION}: run {init_db}"
                ),
            );
            Ok(true)
        }
    }
}

/// Whether `auth.session()` accepts the envelope the session was opened
/// with, which it does only when the database knows the key that sealed it.
async fn check_key(
    session: &mut Session,
    subject: &str,
    key_id: &str,
    init_db: &str,
    report: &mut Report,
) -> Result<(), String> {
    match session.query("select auth.session() is null").await {
        Ok(_) => report.ok(
            subject,
            format!("the database knows the configured signing key (key id {key_id})"),
        ),
        Err(QueryError::Db(e)) if e.code == "28000" && e.message.contains("unknown key") => report
            .fail(
                subject,
                format!(
                    "the database does not know the configured signing key (key id {key_id}): \
                     run {init_db}"
                ),
            ),
        Err(QueryError::Db(e)) => report.fail(
            subject,
            format!(
                "auth.session() refuses the envelope the proxy binds: {} (SQLSTATE {})",
                e.message, e.code
            ),
        ),
        Err(QueryError::Lost(reason)) => return Err(reason),
    }
    Ok(())
}

/// What RLS leaves open to the session's user.
async fn check_privileges(
    session: &mut Session,
    subject: &str,
    user: &str,
    report: &mut Report,
) -> Result<(), String> {
    let row = session
        .one(
            "select r.rolsuper, r.rolbypassrls, \
                    coalesce(pg_catalog.has_table_privilege( \
                      pg_catalog.to_regclass('auth.signing_keys'), 'SELECT'), false) \
               from pg_catalog.pg_roles r where r.rolname = session_user",
        )
        .await?;
    let mut clean = true;
    if is_true(&row[0]) {
        clean = false;
        report.fail(
            subject,
            format!("{user} is a superuser: RLS does not apply to it, and it can forge claims"),
        );
    } else if is_true(&row[1]) {
        clean = false;
        report.fail(
            subject,
            format!(
                "{user} has BYPASSRLS: no policy applies to it (alter role {user} nobypassrls)"
            ),
        );
    }
    if is_true(&row[2]) {
        clean = false;
        report.fail(
            subject,
            format!(
                "{user} can read auth.signing_keys, and so forge any user's claims: serve a role \
                 that is not the owner of schema auth nor a member of it"
            ),
        );
    }

    // Tables in schemas the user can use, that it holds a privilege on,
    // and whose rows RLS leaves open to it.
    let rows = session
        .query(
            "with reachable as ( \
               select pg_catalog.quote_ident(n.nspname) operator(pg_catalog.||) '.' \
                        operator(pg_catalog.||) pg_catalog.quote_ident(c.relname) as name, \
                      c.relrowsecurity as rls, c.relforcerowsecurity as forced, \
                      pg_catalog.pg_has_role(c.relowner, 'MEMBER') as owner, \
                      pg_catalog.array_to_string(array( \
                        select p from pg_catalog.unnest( \
                          array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p \
                         where pg_catalog.has_table_privilege(c.oid, p)), ', ') as privileges, \
                      pg_catalog.has_any_column_privilege(c.oid, \
                        'SELECT, INSERT, UPDATE, REFERENCES') as columns \
                 from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                where c.relkind in ('r', 'p') \
                  and n.nspname not in ('pg_catalog', 'information_schema', 'auth') \
                  and n.nspname !~ '^pg_(toast|temp_)' \
                  and pg_catalog.has_schema_privilege(n.oid, 'USAGE')) \
             select name, rls, forced, owner, privileges from reachable \
              where privileges <> '' or columns \
              order by name",
        )
        .await
        .map_err(|e| e.to_string())?;
    for row in rows {
        let (name, rls, forced, owner) = (
            text(&row[0]),
            is_true(&row[1]),
            is_true(&row[2]),
            is_true(&row[3]),
        );
        let privileges = match text(&row[4]) {
            p if p.is_empty() => "column privileges".to_owned(),
            p => p,
        };
        if !rls {
            clean = false;
            report.fail(
                subject,
                format!(
                    "table {name} has row-level security disabled, and {user} has {privileges} \
                     on it: every user sees all its rows. Enable it (alter table {name} enable \
                     row level security) and add policies, or revoke the grant"
                ),
            );
        } else if owner && !forced {
            clean = false;
            report.fail(
                subject,
                format!(
                    "table {name} is owned by {user} (or a role it is a member of), and owners \
                     bypass its policies: change its owner, or alter table {name} force row \
                     level security"
                ),
            );
        } else if privileges.contains("TRUNCATE") {
            clean = false;
            report.warn(
                subject,
                format!(
                    "{user} may TRUNCATE table {name}, which row-level security does not cover: \
                     one user can empty it for all (revoke truncate on {name} from {user})"
                ),
            );
        }
    }
    if clean {
        report.ok(
            subject,
            format!("row-level security covers every table {user} can reach"),
        );
    }
    Ok(())
}

fn is_true(value: &Option<String>) -> bool {
    value.as_deref() == Some("t")
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

/// A server error, or the session lost.
enum QueryError {
    Db(DbError),
    Lost(String),
}

struct DbError {
    code: String,
    message: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Db(e) => write!(f, "{} (SQLSTATE {})", e.message, e.code),
            QueryError::Lost(reason) => f.write_str(reason),
        }
    }
}

type Rows = Vec<Vec<Option<String>>>;

/// An upstream session after login, spoken to with the simple query
/// protocol: text results, one statement at a time.
struct Session {
    stream: UpstreamStream,
    buf: BytesMut,
}

impl Session {
    async fn query(&mut self, sql: &str) -> Result<Rows, QueryError> {
        match tokio::time::timeout(QUERY_TIMEOUT, self.exchange(sql)).await {
            Ok(result) => result,
            Err(_) => Err(QueryError::Lost(format!(
                "no answer within {}",
                humantime::format_duration(QUERY_TIMEOUT)
            ))),
        }
    }

    /// The first row of a query that must return one.
    async fn one(&mut self, sql: &str) -> Result<Vec<Option<String>>, String> {
        self.query(sql)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or_else(|| "a catalog query returned no row".to_owned())
    }

    async fn exchange(&mut self, sql: &str) -> Result<Rows, QueryError> {
        let lost = |e: io::Error| QueryError::Lost(format!("connection lost: {e}"));
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(lost)?;
        self.stream.write_all(&out).await.map_err(lost)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next().await.map_err(lost)? {
                Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let row = body
                        .ranges()
                        .map(|range| {
                            Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()))
                        })
                        .collect()
                        .map_err(lost)?;
                    rows.push(row);
                }
                Message::ErrorResponse(body) => {
                    let mut fields = body.fields();
                    let mut e = DbError {
                        code: String::new(),
                        message: String::new(),
                    };
                    while let Some(field) = fields.next().map_err(lost)? {
                        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                        match field.type_() {
                            b'C' => e.code = value,
                            b'M' => e.message = value,
                            _ => {}
                        }
                    }
                    error = Some(e);
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(QueryError::Db(e)),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    async fn next(&mut self) -> io::Result<Message> {
        loop {
            if let Some(message) = Message::parse(&mut self.buf)? {
                return Ok(message);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_configuration_lines_are_left_out() {
        let message = "in configuration file x.toml: TOML parse error at line 3, column 15\n  |\n3 | signing_key = \"c2VjcmV0\"\n  |               ^^^^^^^^^^\nthe signing key must be at least 32 bytes\n";
        let shown = without_quoted_lines(message);
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert_eq!(
            shown,
            "in configuration file x.toml: TOML parse error at line 3, column 15: the signing key must be at least 32 bytes"
        );
    }
}
