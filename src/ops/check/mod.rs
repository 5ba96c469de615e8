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

mod exposures;
mod privileges;
mod providers;
mod schema;
mod session;

use exposures::{check_database_settings, check_role_settings, password_exposure};
use privileges::check_privileges;
use providers::check_providers;
use schema::{check_key, check_schema};
use session::{QueryError, Session, SessionError, is_true, open, text};

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
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
pub(crate) struct Finding {
    pub(crate) status: Status,
    pub(crate) subject: String,
    pub(crate) message: String,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) findings: Vec<Finding>,
}

impl Report {
    /// Nothing failed (warnings may remain).
    pub(crate) fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    pub(crate) fn count(&self, status: Status) -> usize {
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
pub(crate) async fn run(path: &Path, database: Option<&str>) -> Report {
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
pub(crate) async fn command(path: &Path, database: Option<&str>) {
    let report = run(path, database).await;
    print!("{report}");
    if !report.passed() {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
}

/// Checks a loaded configuration; `path` is only named in the advice.
pub(crate) async fn check(
    config: &Config,
    path: &Path,
    database: Option<&str>,
    report: &mut Report,
) {
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
