//! The check's own upstream session: logged in and sealed as `serve` does,
//! then spoken to with simple queries.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncWriteExt;

use crate::auth::claims::Identity;
use crate::clock::unix_now;
use crate::config::{Config, Role};
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::server_error::ServerError;
use crate::session::stream::UpstreamStream;
use crate::upstream::claims::bind_claims;
use crate::upstream::login::{self, Login};
use crate::upstream::tls::UpstreamTls;

/// How long the envelope of a check session is valid.
pub(super) const ENVELOPE_VALIDITY: Duration = Duration::from_secs(60);

/// Bound on each query of a check session.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Startup parameters of a check session. They outrank `ALTER ROLE … SET`
/// and `ALTER DATABASE … SET`, which the check reports rather than suffers:
/// a timeout of 1 ms must not hide them, nor a search_path put functions of
/// the served user's own before the catalog's.
pub(super) const CHECK_PARAMETERS: [(&str, &str); 5] = [
    ("application_name", "rlsgate check"),
    ("search_path", "pg_catalog"),
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

/// Logs in as `role`'s upstream user through [`login::connect`], with
/// null claims sealed by the configured key and bound as `serve` binds them.
pub(super) async fn open(
    config: &Config,
    role: &Role,
    database: &str,
) -> Result<Session, LoginError> {
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

/// Why the proxy's own login for a check failed; the report shows it after
/// "cannot log in to … as …:".
#[derive(Debug, thiserror::Error)]
pub(super) enum LoginError {
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
pub(super) enum SessionError {
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
pub(super) enum QueryError {
    #[error("{} (SQLSTATE {})", .0.message, .0.code)]
    Db(DbError),
    #[error("no answer within {}", humantime::format_duration(QUERY_TIMEOUT))]
    TimedOut,
    #[error("connection lost: {0}")]
    Lost(io::Error),
}

#[derive(Debug)]
pub(super) struct DbError {
    pub(super) code: String,
    pub(super) message: String,
}

pub(super) type Rows = Vec<Vec<Option<String>>>;

/// An upstream session after login, spoken to with the simple query
/// protocol: text results, one statement at a time.
pub(super) struct Session {
    stream: UpstreamStream,
}

impl Session {
    pub(super) async fn query(&mut self, sql: &str) -> Result<Rows, QueryError> {
        match tokio::time::timeout(QUERY_TIMEOUT, self.exchange(sql)).await {
            Ok(result) => result,
            Err(_) => Err(QueryError::TimedOut),
        }
    }

    /// The first row of a query that must return one.
    pub(super) async fn one(&mut self, sql: &str) -> Result<Vec<Option<String>>, SessionError> {
        self.query(sql)
            .await?
            .into_iter()
            .next()
            .ok_or(SessionError::NoRow)
    }

    pub(super) async fn exchange(&mut self, sql: &str) -> Result<Rows, QueryError> {
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

    pub(super) async fn next(&mut self) -> io::Result<Message> {
        Frame::read(&mut self.stream, MAX_BACKEND_MESSAGE)
            .await?
            .into_message()
    }

    pub(super) async fn close(mut self) {
        let mut out = BytesMut::new();
        messages::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

pub(super) fn is_true(value: &Option<String>) -> bool {
    value.as_deref() == Some("t")
}

pub(super) fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
