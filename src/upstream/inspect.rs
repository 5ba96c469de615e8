//! The round trip after login that names the backend (its start time, for
//! the claims envelope) and refuses a login role whose settings were
//! changed behind the operator's back.

use std::io;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncWriteExt;

use crate::auth::claims::Backend;
use crate::ops::tamper::Tampering;
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal};
use crate::protocol::server_error::ServerError;
use crate::protocol::startup::CancelKey;
use crate::session::stream::UpstreamStream;
use crate::upstream::login::Login;
use crate::upstream::tls::UpstreamTls;

/// What the proxy asks every new backend before anyone uses it: its start
/// time, for the claims envelope, and the settings its login role carries
/// from `ALTER ROLE … [IN DATABASE …] SET`. Every name is qualified, so that
/// a `search_path` set on the role cannot change what this query means; the
/// timeouts are lifted for its own transaction only, so that a role's
/// `statement_timeout = '1ms'` cannot hide itself; the start time is
/// computed exactly as `auth.session()` computes it.
const INSPECT: &str = "begin; \
    set local statement_timeout = 0; set local lock_timeout = 0; \
    select (extract(epoch from a.backend_start) \
       operator(pg_catalog.*) 1000000)::pg_catalog.int8, \
     (select pg_catalog.json_agg(s.setting order by d.setdatabase, s.n) \
        from pg_catalog.pg_db_role_setting d \
             cross join lateral pg_catalog.unnest(d.setconfig) with ordinality as s(setting, n) \
       where d.setrole operator(pg_catalog.=) (select r.oid from pg_catalog.pg_roles r \
                 where r.rolname operator(pg_catalog.=) session_user) \
         and d.setdatabase operator(pg_catalog.=) any (array[0::pg_catalog.oid, \
             (select b.oid from pg_catalog.pg_database b \
               where b.datname operator(pg_catalog.=) pg_catalog.current_database())])) \
     from pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a; \
    commit";

/// Runs [`INSPECT`] on a fresh backend: its identity for envelopes, and a
/// refusal when its login role has settings the configuration does not
/// declare. Every role may `ALTER ROLE` itself, so a user of the shared login
/// role could otherwise change every later session of every other user
/// (`statement_timeout`, `search_path`, `default_transaction_read_only`, …).
pub(crate) async fn inspect(
    stream: &mut UpstreamStream,
    key: CancelKey,
    login: &Login<'_>,
    tls: &UpstreamTls,
) -> Result<Backend, Refusal> {
    let role = login.role;
    let user = role.upstream_user();
    let lost = |e: io::Error| {
        Refusal::database_unavailable(format!("connection lost while inspecting the backend: {e}"))
    };
    let mut out = BytesMut::new();
    messages::query(&mut out, INSPECT).map_err(lost)?;
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    let mut row = None;
    let mut failed = None;
    loop {
        let frame = Frame::read(stream, MAX_BACKEND_MESSAGE)
            .await
            .map_err(lost)?;
        match frame.kind() {
            b'T' | b'C' | b'N' | b'S' | b'A' => {}
            b'D' => row = Some(frame),
            b'E' => failed = Some(frame),
            // After an error the transaction is aborted and the
            // ErrorResponse says why: the connection is not served.
            b'Z' => break,
            other => {
                return Err(Refusal::database_unavailable(format!(
                    "unexpected message {:?} while inspecting the backend",
                    other as char
                )));
            }
        }
    }
    if let Some(frame) = failed {
        let ServerError { code, message, .. } = ServerError::from_frame(frame);
        return Err(Refusal::database_unavailable(format!(
            "the proxy's first query as {user:?} failed ({code} {message}); \
             if a setting of the login role causes this, it was probably changed \
             from inside a session: see `rlsgate check`"
        ))
        .because(Reason::Upstream));
    }
    let (started, settings) = row
        .and_then(inspected)
        .ok_or_else(|| Refusal::database_unavailable("the backend did not say when it started"))?;
    if login.refuse_undeclared_settings {
        let watch = tls.tampering();
        if let Some(names) = undeclared_names(&settings, &role.upstream_settings) {
            if let Some(watch) = watch {
                watch.raise(Tampering::UndeclaredSettings, user, &names);
            }
            return Err(undeclared_settings(user, &names));
        }
        if let Some(watch) = watch {
            watch.clear(Tampering::UndeclaredSettings, user);
        }
    }
    Ok(Backend {
        pid: key.pid,
        started,
    })
}

/// The start time and role settings of [`INSPECT`]'s one row.
fn inspected(row: Frame) -> Option<(i64, Vec<String>)> {
    let Ok(Message::DataRow(body)) = row.into_message() else {
        return None;
    };
    let buffer = body.buffer();
    let mut columns = body.ranges();
    let started = columns.next().ok()??.map(|r| &buffer[r])?;
    let started = std::str::from_utf8(started).ok()?.parse().ok()?;
    let settings = match columns.next().ok()?? {
        Some(range) => serde_json::from_slice(&buffer[range]).ok()?,
        None => Vec::new(),
    };
    Some((started, settings))
}

/// The names of the `settings` (as `name=value`) that are not `declared`,
/// or `None` when all are.
fn undeclared_names(settings: &[String], declared: &[String]) -> Option<String> {
    let names: Vec<&str> = settings
        .iter()
        .filter(|s| !declared.contains(s))
        .map(|s| setting_name(s))
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// The refusal for a login role with undeclared settings. It names them
/// but never shows their values, which may be anything (a custom setting
/// holding a secret, say); `rlsgate check` shows them where that is safe.
fn undeclared_settings(user: &str, names: &str) -> Refusal {
    Refusal::database_unavailable(format!(
        "login role {user:?} has settings the configuration does not declare: {names}; \
         they apply to every session and were probably set from inside one \
         (ALTER ROLE … SET). Remove them (ALTER ROLE {user} RESET …, also IN \
         DATABASE …) or declare them in its [[role]] upstream_settings"
    ))
    .because(Reason::Upstream)
}

/// The name in a `name=value` role setting.
fn setting_name(setting: &str) -> &str {
    setting.split('=').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undeclared_settings_are_named_without_their_values() {
        let settings = [
            "app.api_key=s3cr3t".to_owned(),
            "statement_timeout=1ms".to_owned(),
        ];
        let declared = ["statement_timeout=5min".to_owned()];
        let names = undeclared_names(&settings, &declared).unwrap();
        assert_eq!(names, "app.api_key, statement_timeout");
        let refusal = undeclared_settings("authenticated", &names);
        let logged = format!("{refusal} {:?}", refusal.detail);
        assert!(logged.contains(&names), "{logged}");
        assert!(
            !logged.contains("s3cr3t") && !logged.contains("1ms"),
            "{logged}"
        );
        assert_eq!(undeclared_names(&settings[1..], &settings[1..]), None);
    }
}
