//! What every user of a shared login role can do to the others: settings
//! it does not declare, and a password any of them may change.

use super::*;
use crate::config::Role;

/// Every role may change its own password: with password authentication
/// upstream, one token holder can lock every user of the role out.
pub(super) fn password_exposure(user: &str) -> String {
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
pub(super) async fn check_role_settings(
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
pub(super) async fn check_database_settings(
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
pub(super) fn setting_name(setting: &str) -> &str {
    setting.split_once('=').map_or(setting, |(name, _)| name)
}

/// rlsgate's own settings carry envelopes, and settings named like a secret
/// may hold one: the report names them without their value.
pub(super) fn is_secret_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("rlsgate.")
        || ["password", "secret", "key", "token"]
            .iter()
            .any(|word| name.contains(word))
}

pub(super) fn shown_setting(setting: &str) -> String {
    let name = setting_name(setting);
    if is_secret_setting(name) {
        format!("{name} (its value not shown)")
    } else {
        setting.to_owned()
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
}
