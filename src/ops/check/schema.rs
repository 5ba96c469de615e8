//! Schema `auth` installed at this build's version, and the configured
//! signing key known to it.

use super::*;
use crate::commands::init_db::SCHEMA_VERSION;

/// The functions of schema `auth` that policies call.
pub(super) const AUTH_FUNCTIONS: [&str; 4] = ["session", "jwt", "user_id", "uid"];

/// Whether schema `auth` is installed in the version this build expects.
pub(super) async fn check_schema(
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
pub(super) async fn check_key(
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
