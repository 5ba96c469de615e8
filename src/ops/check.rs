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
//!    warning. The same holds for every role the user can SET ROLE to or
//!    inherits from, through any chain of grants; being able to become a
//!    predefined role that reads or writes past every grant
//!    (`pg_read_all_data`, …) fails too.
//! 5. What every user of a shared login role can do to the others: settings
//!    from `ALTER ROLE … SET` that the role does not declare in
//!    `upstream_settings` fail (`ALTER DATABASE … SET` ones are a warning);
//!    creating large objects, which belong to the shared role, and
//!    logging in upstream with a password, which every role may change, are
//!    warnings.
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
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncWriteExt;

use crate::auth::claims::Identity;
use crate::auth::jwks::{JwksCache, http_client};
use crate::clock::unix_now;
use crate::commands::init_db::SCHEMA_VERSION;
use crate::config::{Config, Role};
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::server_error::ServerError;
use crate::session::stream::UpstreamStream;
use crate::upstream::claims::bind_claims;
use crate::upstream::login::{self, Login};
use crate::upstream::tls::UpstreamTls;

/// How long the envelope of a check session is valid.
const ENVELOPE_VALIDITY: Duration = Duration::from_secs(60);

/// Bound on each query of a check session.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Startup parameters of a check session. They outrank `ALTER ROLE … SET`
/// and `ALTER DATABASE … SET`, which the check reports rather than suffers:
/// a timeout of 1 ms must not hide them, nor a search_path put functions of
/// the served user's own before the catalog's.
const CHECK_PARAMETERS: [(&str, &str); 5] = [
    ("application_name", "rlsgate check"),
    ("search_path", "pg_catalog"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

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

/// `rlsgate check`: prints the report, and exits with status 1 when
/// something failed.
pub async fn command(path: &Path, database: Option<&str>) {
    let report = run(path, database).await;
    print!("{report}");
    if !report.passed() {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
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
    let mut database_checked = false;
    for role in &config.roles {
        let user = role.upstream_user();
        let subject = if user == role.name {
            format!("role {}", role.name)
        } else {
            format!("role {} (upstream user {user})", role.name)
        };
        if role.upstream_password.is_some() {
            report.warn(&subject, password_exposure(user));
        }
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
            check_role_settings(&mut session, &subject, role, database, report).await?;
            if !database_checked {
                database_checked = true;
                check_database_settings(&mut session, &subject, database, report).await?;
            }
            if users_checked.insert(user.to_owned()) {
                check_privileges(&mut session, &subject, user, report).await?;
            }
            Ok::<_, SessionError>(())
        }
        .await;
        if let Err(reason) = outcome {
            report.fail(&subject, format!("the check session failed: {reason}"));
        }
        session.close().await;
    }
}

/// Every role may change its own password: with password authentication
/// upstream, one token holder can lock every user of the role out.
fn password_exposure(user: &str) -> String {
    format!(
        "logs in to Postgres as {user} with upstream_password, and any token holder can change \
         that password (alter role {user} password …), locking every user out: log in with a \
         TLS client certificate instead ([upstream] tls_client_cert and tls_client_key, \
         pg_hba.conf method cert), or over a Unix socket with pg_hba.conf method peer"
    )
}

/// `ALTER ROLE … SET` rows of the session's user, for every database and
/// for this one: every role may set its own, and they apply to every later
/// session of every user of the role. Those the role does not declare in
/// `upstream_settings` fail.
async fn check_role_settings(
    session: &mut Session,
    subject: &str,
    role: &Role,
    database: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let user = role.upstream_user();
    let rows = session
        .query(
            "select s.setdatabase <> 0, x.setting \
               from pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) x(setting) \
              where s.setrole = (select oid from pg_catalog.pg_roles \
                                  where rolname = session_user) \
                and s.setdatabase in (0, (select oid from pg_catalog.pg_database \
                                           where datname = pg_catalog.current_database())) \
              order by 1, 2",
        )
        .await?;
    let mut undeclared = 0;
    for row in rows {
        let setting = text(&row[1]);
        if role.upstream_settings.contains(&setting) {
            continue;
        }
        undeclared += 1;
        let name = setting_name(&setting);
        let scope = if is_true(&row[0]) {
            format!("alter role {user} in database {database}")
        } else {
            format!("alter role {user}")
        };
        let declare = if is_secret_setting(name) {
            "declare it".to_owned()
        } else {
            format!("declare {setting:?}")
        };
        report.fail(
            subject,
            format!(
                "{user} has the setting {} ({scope} set), which every session of every user \
                 of it gets, and [[role]] {:?} does not declare it: {scope} reset {name}, or \
                 {declare} in its upstream_settings",
                shown_setting(&setting),
                role.name
            ),
        );
    }
    if undeclared == 0 {
        report.ok(
            subject,
            format!("{user} has no role settings but those declared in upstream_settings"),
        );
    }
    Ok(())
}

/// `ALTER DATABASE … SET` rows apply to every session of every role; they
/// are the database owner's to make, so worth a mention but no failure.
async fn check_database_settings(
    session: &mut Session,
    subject: &str,
    database: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let rows = session
        .query(
            "select x.setting \
               from pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) x(setting) \
              where s.setrole = 0 \
                and s.setdatabase = (select oid from pg_catalog.pg_database \
                                      where datname = pg_catalog.current_database()) \
              order by 1",
        )
        .await?;
    for row in rows {
        let setting = text(&row[0]);
        report.warn(
            subject,
            format!(
                "database {database} has the setting {} (alter database {database} set), which \
                 every session of every role gets: alter database {database} reset {} unless \
                 it is meant",
                shown_setting(&setting),
                setting_name(&setting)
            ),
        );
    }
    Ok(())
}

/// The name of a `setconfig` entry, "name=value".
fn setting_name(setting: &str) -> &str {
    setting.split_once('=').map_or(setting, |(name, _)| name)
}

/// rlsgate's own settings carry envelopes, and settings named like a secret
/// may hold one: the report names them without their value.
fn is_secret_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("rlsgate.")
        || ["password", "secret", "key", "token"]
            .iter()
            .any(|word| name.contains(word))
}

fn shown_setting(setting: &str) -> String {
    let name = setting_name(setting);
    if is_secret_setting(name) {
        format!("{name} (its value not shown)")
    } else {
        setting.to_owned()
    }
}

/// Logs in as `role`'s upstream user through [`login::connect`], with
/// null claims sealed by the configured key and bound as `serve` binds them.
async fn open(config: &Config, role: &Role, database: &str) -> Result<Session, LoginError> {
    let identity = Identity {
        upstream_user: role.upstream_user().to_owned(),
        claims: None,
        valid_until: unix_now() + ENVELOPE_VALIDITY.as_secs(),
        lifetime: ENVELOPE_VALIDITY,
    };
    let login = Login {
        role,
        database: Some(database),
        parameters: CHECK_PARAMETERS
            .iter()
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
        // Reported by the check itself, with the fix.
        refuse_undeclared_settings: false,
    };
    let tls = UpstreamTls::from_config(&config.upstream).map_err(LoginError::Tls)?;
    let key = &config.claims.signing_key;
    let bound = async {
        let mut session = login::connect(&config.upstream, &tls, login).await?;
        bind_claims(&mut session, key, &identity, unix_now()).await?;
        Ok::<_, crate::protocol::refusal::Refusal>(session)
    };
    match bound.await {
        Ok(session) => Ok(Session {
            stream: session.stream,
        }),
        // The detail holds the upstream's own words, never the password.
        Err(refusal) => Err(LoginError::Refused(
            refusal.detail.unwrap_or(refusal.message),
        )),
    }
}

/// Whether schema `auth` is installed in the version this build expects.
async fn check_schema(
    session: &mut Session,
    subject: &str,
    init_db: &str,
    report: &mut Report,
) -> Result<bool, SessionError> {
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
) -> Result<(), SessionError> {
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
        Err(lost) => return Err(lost.into()),
    }
    Ok(())
}

/// Predefined roles whose privileges reach past every grant, and what they
/// give a session that has them.
const PREDEFINED: [(&str, &str); 5] = [
    (
        "pg_read_all_data",
        "which reads every table whatever its grants: auth.signing_keys, and so any user's \
         claims, and every table without row-level security",
    ),
    (
        "pg_write_all_data",
        "which writes every table whatever its grants: auth.signing_keys, and so any user's \
         claims, and every table without row-level security",
    ),
    (
        "pg_read_server_files",
        "which reads the server's files as its operating-system user",
    ),
    (
        "pg_write_server_files",
        "which writes the server's files as its operating-system user",
    ),
    (
        "pg_execute_server_program",
        "which runs programs on the server as its operating-system user",
    ),
];

/// The functions that create a large object.
const LARGE_OBJECT_CREATORS: [&str; 5] = [
    "lo_create(oid)",
    "lo_creat(integer)",
    "lo_from_bytea(oid, bytea)",
    "lo_import(text)",
    "lo_import(text, oid)",
];

/// A role whose privileges sessions of the served user can use: the user
/// itself, or a role it can SET ROLE to or inherits the privileges of.
#[derive(Clone)]
struct Reach {
    /// The role as the first argument of the privilege functions.
    sql: String,
    /// Quoted as an identifier, as it is written in SQL.
    name: String,
    /// The roles between the user and this one, for messages.
    through: String,
    /// The role granted to the user that leads here.
    first: String,
    can_set: bool,
    superuser: bool,
    bypassrls: bool,
}

impl Reach {
    fn user(user: &str) -> Reach {
        Reach {
            sql: "session_user".to_owned(),
            name: user.to_owned(),
            through: String::new(),
            first: user.to_owned(),
            can_set: true,
            superuser: false,
            bypassrls: false,
        }
    }

    fn is_user(&self) -> bool {
        self.sql == "session_user"
    }

    /// How the served user comes by this role: "authenticated can SET ROLE
    /// service_role (through ops)".
    fn how(&self, user: &str) -> String {
        let verb = if self.can_set {
            "can SET ROLE"
        } else {
            "has the privileges of"
        };
        format!("{user} {verb} {}{}", self.name, self.through())
    }

    fn through(&self) -> String {
        if self.through.is_empty() {
            String::new()
        } else {
            format!(" (through {})", self.through)
        }
    }

    /// Who holds a privilege, as the subject of "has SELECT on it".
    fn holder(&self, user: &str) -> String {
        if self.is_user() {
            user.to_owned()
        } else {
            format!("{}, which", self.how(user))
        }
    }

    /// The grant to revoke to cut the way to this role.
    fn revoke(&self, user: &str) -> String {
        format!("revoke {} from {user}", self.first)
    }
}

/// The findings about one served user, each reported once however many of
/// the roles it can use lead to it.
struct Escapes<'a> {
    report: &'a mut Report,
    subject: &'a str,
    user: &'a str,
    seen: HashSet<String>,
    clean: bool,
}

impl Escapes<'_> {
    fn fail(&mut self, key: String, message: String) {
        self.clean = false;
        if self.seen.insert(key) {
            self.report.fail(self.subject, message);
        }
    }

    fn warn(&mut self, key: String, message: String) {
        self.clean = false;
        if self.seen.insert(key) {
            self.report.warn(self.subject, message);
        }
    }
}

/// What RLS leaves open to the session's user, and to every role it can
/// become or inherits from.
async fn check_privileges(
    session: &mut Session,
    subject: &str,
    user: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let row = session
        .one(
            "select r.rolsuper, r.rolbypassrls \
               from pg_catalog.pg_roles r where r.rolname = session_user",
        )
        .await?;
    let mut escapes = Escapes {
        report,
        subject,
        user,
        seen: HashSet::new(),
        clean: true,
    };
    if is_true(&row[0]) {
        escapes.fail(
            "superuser".to_owned(),
            format!("{user} is a superuser: RLS does not apply to it, and it can forge claims"),
        );
    } else if is_true(&row[1]) {
        escapes.fail(
            "bypassrls".to_owned(),
            format!(
                "{user} has BYPASSRLS: no policy applies to it (alter role {user} nobypassrls)"
            ),
        );
    }
    let roles = reachable_roles(session).await?;
    for reach in std::iter::once(Reach::user(user)).chain(roles.iter().cloned()) {
        if !reach.is_user() {
            judge_role(&mut escapes, &reach);
        }
        // Privileges of a role the user only inherits from are already
        // the user's own.
        if reach.is_user() || reach.can_set {
            check_key_table(session, &mut escapes, &reach).await?;
            let tables = reachable_tables(session, &reach.sql).await?;
            judge_tables(&mut escapes, &reach, tables);
        }
    }
    if escapes.clean {
        let mut message = format!("row-level security covers every table {user} can reach");
        if !roles.is_empty() {
            let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
            message.push_str(&format!(
                ", also through the roles it can become or inherits from ({})",
                names.join(", ")
            ));
        }
        escapes.report.ok(subject, message);
    }
    check_large_objects(session, subject, user, report).await
}

/// The roles the session's user is a member of, directly or through a
/// chain, that it can SET ROLE to or inherits the privileges of. Before
/// PostgreSQL 16 membership is the right to SET ROLE; since, a grant says
/// so with its SET option.
async fn reachable_roles(session: &mut Session) -> Result<Vec<Reach>, SessionError> {
    let version = session
        .one("select pg_catalog.current_setting('server_version_num')")
        .await?;
    let version: u32 = text(&version[0])
        .parse()
        .map_err(|_| SessionError::NoServerVersion)?;
    let set = if version >= 160_000 { "SET" } else { "MEMBER" };
    // Circular grants are refused by Postgres; the depth bound is a fuse.
    let sql = format!(
        "with recursive chain(oid, path, depth) as ( \
             select m.roleid, array[]::pg_catalog.text[], 1 \
               from pg_catalog.pg_auth_members m \
              where m.member = (select oid from pg_catalog.pg_roles \
                                  where rolname = session_user) \
           union all \
             select m.roleid, \
                    pg_catalog.array_append(c.path, \
                      pg_catalog.quote_ident(r.rolname) collate pg_catalog.\"default\"), \
                    c.depth + 1 \
               from chain c \
               join pg_catalog.pg_auth_members m on m.member = c.oid \
               join pg_catalog.pg_roles r on r.oid = c.oid \
              where c.depth < 16), \
         shortest as ( \
             select distinct on (oid) oid, path from chain order by oid, depth) \
         select r.oid, pg_catalog.quote_ident(r.rolname), \
                pg_catalog.array_to_string(s.path, ', '), \
                coalesce(s.path[1], pg_catalog.quote_ident(r.rolname)), \
                pg_catalog.pg_has_role(session_user, r.oid, '{set}'), \
                r.rolsuper, r.rolbypassrls \
           from shortest s join pg_catalog.pg_roles r on r.oid = s.oid \
          where pg_catalog.pg_has_role(session_user, r.oid, '{set}') \
             or pg_catalog.pg_has_role(session_user, r.oid, 'USAGE') \
          order by 2"
    );
    let rows = session.query(&sql).await?;
    Ok(rows
        .into_iter()
        .map(|row| Reach {
            sql: format!("{}::pg_catalog.oid", text(&row[0])),
            name: text(&row[1]),
            through: text(&row[2]),
            first: text(&row[3]),
            can_set: is_true(&row[4]),
            superuser: is_true(&row[5]),
            bypassrls: is_true(&row[6]),
        })
        .collect())
}

/// The attributes of a role the user can become, and the predefined roles
/// whose privileges reach past every grant.
fn judge_role(escapes: &mut Escapes<'_>, reach: &Reach) {
    let user = escapes.user;
    let (how, revoke) = (reach.how(user), reach.revoke(user));
    // Attributes are not inherited: only SET ROLE gives them.
    if reach.can_set && reach.superuser {
        escapes.fail(
            format!("superuser {}", reach.name),
            format!(
                "{how}, which is a superuser: RLS does not apply to it, and it can forge \
                 claims ({revoke})"
            ),
        );
    } else if reach.can_set && reach.bypassrls {
        escapes.fail(
            format!("bypassrls {}", reach.name),
            format!(
                "{how}, which has BYPASSRLS: after set role {} no policy applies ({revoke}, or \
                 alter role {} nobypassrls)",
                reach.name, reach.name
            ),
        );
    }
    if let Some((_, what)) = PREDEFINED.iter().find(|(name, _)| *name == reach.name) {
        escapes.fail(
            format!("predefined {}", reach.name),
            format!("{how}, {what} ({revoke})"),
        );
    }
}

/// Whether the role can read `auth.signing_keys` or is a member of its
/// owner, either of which lets a session forge claims.
async fn check_key_table(
    session: &mut Session,
    escapes: &mut Escapes<'_>,
    reach: &Reach,
) -> Result<(), SessionError> {
    let role = &reach.sql;
    let row = session
        .one(&format!(
            "select coalesce(pg_catalog.has_table_privilege({role}, \
                      pg_catalog.to_regclass('auth.signing_keys'), 'SELECT'), false) \
                 or coalesce(pg_catalog.pg_has_role({role}, \
                      (select relowner from pg_catalog.pg_class \
                        where oid = \
                              pg_catalog.to_regclass('auth.signing_keys')), 'MEMBER'), false)"
        ))
        .await?;
    if is_true(&row[0]) {
        let fix = if reach.is_user() {
            "serve a role that is not the owner of schema auth nor a member of it".to_owned()
        } else {
            reach.revoke(escapes.user)
        };
        escapes.fail(
            "signing keys".to_owned(),
            format!(
                "{} can read auth.signing_keys, and so forge any user's claims: {fix}",
                reach.holder(escapes.user)
            ),
        );
    }
    Ok(())
}

/// A table the role holds a privilege on, in a schema it can use.
struct TableAccess {
    name: String,
    rls: bool,
    forced: bool,
    owner: bool,
    privileges: String,
}

/// Tables in schemas the role can use, that it holds a privilege on, with
/// what RLS does about them.
async fn reachable_tables(
    session: &mut Session,
    role: &str,
) -> Result<Vec<TableAccess>, SessionError> {
    let rows = session
        .query(&format!(
            "with reachable as ( \
               select pg_catalog.quote_ident(n.nspname) operator(pg_catalog.||) '.' \
                        operator(pg_catalog.||) pg_catalog.quote_ident(c.relname) as name, \
                      c.relrowsecurity as rls, c.relforcerowsecurity as forced, \
                      pg_catalog.pg_has_role({role}, c.relowner, 'MEMBER') as owner, \
                      pg_catalog.array_to_string(array( \
                        select p from pg_catalog.unnest( \
                          array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p \
                         where pg_catalog.has_table_privilege({role}, c.oid, p)), ', ') \
                        as privileges, \
                      pg_catalog.has_any_column_privilege({role}, c.oid, \
                        'SELECT, INSERT, UPDATE, REFERENCES') as columns \
                 from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                where c.relkind in ('r', 'p') \
                  and n.nspname not in ('pg_catalog', 'information_schema', 'auth') \
                  and n.nspname !~ '^pg_(toast|temp_)' \
                  and pg_catalog.has_schema_privilege({role}, n.oid, 'USAGE')) \
             select name, rls, forced, owner, privileges from reachable \
              where privileges <> '' or columns \
              order by name"
        ))
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| TableAccess {
            name: text(&row[0]),
            rls: is_true(&row[1]),
            forced: is_true(&row[2]),
            owner: is_true(&row[3]),
            privileges: match text(&row[4]) {
                p if p.is_empty() => "column privileges".to_owned(),
                p => p,
            },
        })
        .collect())
}

fn judge_tables(escapes: &mut Escapes<'_>, reach: &Reach, tables: Vec<TableAccess>) {
    let user = escapes.user;
    let holder = reach.holder(user);
    for table in tables {
        let (name, privileges) = (&table.name, &table.privileges);
        if !table.rls {
            escapes.fail(
                format!("no rls {name}"),
                format!(
                    "table {name} has row-level security disabled, and {holder} has \
                     {privileges} on it: every user sees all its rows. Enable it (alter table \
                     {name} enable row level security) and add policies, or revoke the grant"
                ),
            );
        } else if table.owner && !table.forced {
            let owner = if reach.is_user() {
                format!("{user} (or a role it is a member of)")
            } else {
                format!(
                    "{} (or a role it is a member of), which {user} can SET ROLE to{}",
                    reach.name,
                    reach.through()
                )
            };
            escapes.fail(
                format!("owner {name}"),
                format!(
                    "table {name} is owned by {owner}, and owners bypass its policies: change \
                     its owner, or alter table {name} force row level security"
                ),
            );
        } else if privileges.contains("TRUNCATE") {
            escapes.warn(
                format!("truncate {name}"),
                format!(
                    "{holder} may TRUNCATE table {name}, which row-level security does not \
                     cover: one user can empty it for all (revoke truncate on {name} from {})",
                    reach.name
                ),
            );
        }
    }
}

/// Large objects belong to the role that creates them, here the login role
/// every user of the proxy shares, and no policy covers them: one user can
/// read, change or unlink another's.
async fn check_large_objects(
    session: &mut Session,
    subject: &str,
    user: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let creators: Vec<String> = LARGE_OBJECT_CREATORS
        .iter()
        .map(|f| {
            format!(
                "case when coalesce(pg_catalog.has_function_privilege(session_user, \
                   pg_catalog.to_regprocedure('pg_catalog.{f}'), 'EXECUTE'), false) \
                 then 'pg_catalog.{f}' end"
            )
        })
        .collect();
    let row = session
        .one(&format!(
            "select pg_catalog.concat_ws(', ', {}), \
                    pg_catalog.current_setting('lo_compat_privileges'), \
                    (select pg_catalog.count(*) from pg_catalog.pg_largeobject_metadata \
                      where pg_catalog.pg_has_role(session_user, lomowner, 'USAGE'))",
            creators.join(", ")
        ))
        .await?;
    let (creators, compat, owned) = (text(&row[0]), text(&row[1]), text(&row[2]));
    if !creators.is_empty() {
        report.warn(
            subject,
            format!(
                "{user} can create large objects, which belong to {user} and so to every user \
                 of it: one reads, changes or deletes another's (lo_get, lo_put, lo_unlink). \
                 Unless the application uses them: revoke execute on function {creators} \
                 from public, {user}"
            ),
        );
    }
    if owned != "0" && !owned.is_empty() {
        report.warn(
            subject,
            format!(
                "{user} owns {owned} large object(s): every user of it can read, change and \
                 delete them (lo_unlink the ones no longer needed)"
            ),
        );
    }
    if compat == "on" {
        report.warn(
            subject,
            "lo_compat_privileges is on: every role reads and writes every large object, \
             whoever owns it (alter system set lo_compat_privileges = off)",
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

/// Why the proxy's own login for a check failed; the report shows it after
/// "cannot log in to … as …:".
#[derive(Debug, thiserror::Error)]
enum LoginError {
    /// `[upstream]`'s certificates or keys cannot be loaded.
    #[error("{0:#}")]
    Tls(anyhow::Error),
    /// The upstream's own words (a refusal's detail), never the password.
    #[error("{0}")]
    Refused(String),
}

/// Why a check session could not go on; the report shows it after "the
/// check session failed:".
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("a catalog query returned no row")]
    NoRow,
    #[error("the server reports no server_version_num")]
    NoServerVersion,
}

/// A server error, or the session lost. Only a server error leaves the
/// session usable for the next query.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("{} (SQLSTATE {})", .0.message, .0.code)]
    Db(DbError),
    #[error("no answer within {}", humantime::format_duration(QUERY_TIMEOUT))]
    TimedOut,
    #[error("connection lost: {0}")]
    Lost(io::Error),
}

#[derive(Debug)]
struct DbError {
    code: String,
    message: String,
}

type Rows = Vec<Vec<Option<String>>>;

/// An upstream session after login, spoken to with the simple query
/// protocol: text results, one statement at a time.
struct Session {
    stream: UpstreamStream,
}

impl Session {
    async fn query(&mut self, sql: &str) -> Result<Rows, QueryError> {
        match tokio::time::timeout(QUERY_TIMEOUT, self.exchange(sql)).await {
            Ok(result) => result,
            Err(_) => Err(QueryError::TimedOut),
        }
    }

    /// The first row of a query that must return one.
    async fn one(&mut self, sql: &str) -> Result<Vec<Option<String>>, SessionError> {
        self.query(sql)
            .await?
            .into_iter()
            .next()
            .ok_or(SessionError::NoRow)
    }

    async fn exchange(&mut self, sql: &str) -> Result<Rows, QueryError> {
        let lost = QueryError::Lost;
        let mut out = BytesMut::new();
        messages::query(&mut out, sql).map_err(lost)?;
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
                    let ServerError { code, message, .. } = ServerError::from_body(&body);
                    error = Some(DbError { code, message });
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
        Frame::read(&mut self.stream, MAX_BACKEND_MESSAGE)
            .await?
            .into_message()
    }

    async fn close(mut self) {
        let mut out = BytesMut::new();
        messages::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_may_hold_a_secret_are_shown_without_their_value() {
        assert_eq!(
            shown_setting("statement_timeout=1ms"),
            "statement_timeout=1ms"
        );
        for setting in [
            "rlsgate.session=v1.c2VhbGVk",
            "app.api_key=c2VhbGVk",
            "myapp.Password=c2VhbGVk",
        ] {
            let shown = shown_setting(setting);
            assert!(!shown.contains("c2VhbGVk"), "{shown}");
            assert!(shown.starts_with(setting_name(setting)), "{shown}");
        }
    }

    #[test]
    fn a_failed_check_session_says_what_failed_in_the_reports_words() {
        let refused = SessionError::from(QueryError::Db(DbError {
            code: "42501".into(),
            message: "permission denied for table signing_keys".into(),
        }));
        assert_eq!(
            refused.to_string(),
            "permission denied for table signing_keys (SQLSTATE 42501)"
        );
        let timed_out = SessionError::from(QueryError::TimedOut);
        assert_eq!(timed_out.to_string(), "no answer within 30s");
        let lost = QueryError::Lost(io::ErrorKind::UnexpectedEof.into());
        assert!(lost.to_string().starts_with("connection lost: "), "{lost}");
        assert_eq!(
            SessionError::NoRow.to_string(),
            "a catalog query returned no row"
        );
    }

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
