//! What a `POST /sql` asks for, read from its headers and JSON body as the
//! serverless driver sends them; anything else is a refusal that says what
//! is wrong.

use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::protocol::refusal::{Reason, Refusal, sqlstate};

pub(super) const CONNECTION_STRING: &str = "neon-connection-string";
pub(super) const RAW_TEXT_OUTPUT: &str = "neon-raw-text-output";
pub(super) const ARRAY_MODE: &str = "neon-array-mode";
pub(super) const BATCH_ISOLATION_LEVEL: &str = "neon-batch-isolation-level";
pub(super) const BATCH_READ_ONLY: &str = "neon-batch-read-only";
pub(super) const BATCH_DEFERRABLE: &str = "neon-batch-deferrable";

/// The request's headers, read. Its `Debug` leaves the token out.
pub(super) struct Headers {
    /// The connection string's user name: a `[[role]]`.
    pub(super) role: String,
    /// The connection string's path, when it names one.
    pub(super) database: Option<String>,
    /// The `Authorization: Bearer` token, or else the connection string's
    /// password (drivers that put the token there).
    pub(super) token: Option<String>,
    /// The connection string's `application_name`, set for the request.
    pub(super) application_name: Option<String>,
    pub(super) raw_text: bool,
    pub(super) array_mode: bool,
    pub(super) batch: BatchOptions,
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Headers")
            .field("role", &self.role)
            .field("database", &self.database)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("application_name", &self.application_name)
            .field("raw_text", &self.raw_text)
            .field("array_mode", &self.array_mode)
            .field("batch", &self.batch)
            .finish()
    }
}

/// How a batch's transaction runs (`Neon-Batch-*`); ignored for one query.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct BatchOptions {
    /// The setting `default_transaction_isolation` takes, and the header's value.
    pub(super) isolation: Option<(&'static str, &'static str)>,
    pub(super) read_only: Option<bool>,
    pub(super) deferrable: Option<bool>,
}

/// One statement and its parameters in Postgres text form (`None`: NULL).
#[derive(Debug, PartialEq)]
pub(super) struct Statement {
    pub(super) text: String,
    pub(super) params: Vec<Option<String>>,
}

/// The body: one statement, or a batch run as one transaction.
#[derive(Debug, PartialEq)]
pub(super) enum Payload {
    One(Statement),
    Batch(Vec<Statement>),
}

fn malformed(message: impl Into<String>) -> Refusal {
    Refusal::new(sqlstate::PROTOCOL_VIOLATION, message).because(Reason::Malformed)
}

impl Headers {
    pub(super) fn read(headers: &HeaderMap) -> Result<Headers, Refusal> {
        let text = |name: &str| -> Result<Option<&str>, Refusal> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map_err(|_| malformed(format!("header {name} is not text")))
                })
                .transpose()
        };
        let flag = |name: &str| -> Result<Option<bool>, Refusal> {
            text(name)?
                .map(|v| match v.to_ascii_lowercase().as_str() {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => Err(malformed(format!("header {name} must be true or false"))),
                })
                .transpose()
        };
        let Some(connection_string) = text(CONNECTION_STRING)? else {
            return Err(malformed(
                "header Neon-Connection-String is missing: send postgresql://ROLE@HOST/DATABASE",
            ));
        };
        let url = url::Url::parse(connection_string)
            .ok()
            .filter(|u| matches!(u.scheme(), "postgres" | "postgresql"))
            .ok_or_else(|| {
                malformed(
                    "header Neon-Connection-String is not a postgresql:// URL \
                     (postgresql://ROLE@HOST/DATABASE)",
                )
            })?;
        let decoded = |part: &str| {
            url::form_urlencoded::parse(format!("x={part}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let role = decoded(url.username());
        if role.is_empty() {
            return Err(Refusal::auth(
                "the connection string names no user: connect as one of the roles rlsgate serves",
            )
            .because(Reason::Role));
        }
        let database = url
            .path()
            .strip_prefix('/')
            .filter(|p| !p.is_empty())
            .map(decoded);
        let bearer = match text("authorization")? {
            None => None,
            Some(value) => Some(bearer_token(value)?),
        };
        let token = bearer.or_else(|| url.password().map(decoded));
        let application_name = url
            .query_pairs()
            .find(|(name, _)| name == "application_name")
            .map(|(_, value)| value.into_owned());
        Ok(Headers {
            role,
            database,
            token,
            application_name,
            raw_text: flag(RAW_TEXT_OUTPUT)?.unwrap_or(false),
            array_mode: flag(ARRAY_MODE)?.unwrap_or(false),
            batch: BatchOptions {
                isolation: text(BATCH_ISOLATION_LEVEL)?.map(isolation).transpose()?,
                read_only: flag(BATCH_READ_ONLY)?,
                deferrable: flag(BATCH_DEFERRABLE)?,
            },
        })
    }
}

fn bearer_token(value: &str) -> Result<String, Refusal> {
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(token.trim().to_owned())
        }
        _ => Err(
            Refusal::auth("the Authorization header must be \"Bearer <token>\"")
                .because(Reason::Malformed),
        ),
    }
}

/// `Neon-Batch-Isolation-Level`'s value: the setting and the header's spelling.
fn isolation(value: &str) -> Result<(&'static str, &'static str), Refusal> {
    const LEVELS: [(&str, &str); 4] = [
        ("ReadUncommitted", "read uncommitted"),
        ("ReadCommitted", "read committed"),
        ("RepeatableRead", "repeatable read"),
        ("Serializable", "serializable"),
    ];
    LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|&(name, setting)| (setting, name))
        .ok_or_else(|| {
            malformed(
                "header Neon-Batch-Isolation-Level must be ReadUncommitted, ReadCommitted, \
                 RepeatableRead or Serializable",
            )
        })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Body {
    Batch { queries: Vec<Query> },
    One(Query),
}

#[derive(Deserialize)]
struct Query {
    query: String,
    #[serde(default)]
    params: Vec<Value>,
}

impl Payload {
    /// The JSON body (sent as `text/plain` by the driver: the content type
    /// is not looked at).
    pub(super) fn parse(body: &[u8]) -> Result<Payload, Refusal> {
        let body: Body = serde_json::from_slice(body).map_err(|e| {
            malformed(format!(
                "the body is not {{\"query\": …, \"params\": […]}} or {{\"queries\": […]}}: {e}"
            ))
        })?;
        let statement = |q: Query| Statement {
            text: q.query,
            params: q.params.iter().map(parameter).collect(),
        };
        Ok(match body {
            Body::One(q) => Payload::One(statement(q)),
            Body::Batch { queries } => Payload::Batch(queries.into_iter().map(statement).collect()),
        })
    }
}

/// A parameter in Postgres text form. The driver sends strings (already
/// in that form) and nulls; other clients' JSON values are taken as
/// Postgres would read their text: arrays as array literals, objects as JSON.
fn parameter(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(array_literal(items)),
        other => Some(other.to_string()),
    }
}

fn array_literal(items: &[Value]) -> String {
    let elements: Vec<String> = items
        .iter()
        .map(|item| match item {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner),
            other => {
                let text = parameter(other).unwrap_or_default();
                format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
            }
        })
        .collect();
    format!("{{{}}}", elements.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_role_database_and_token_come_from_the_connection_string_and_bearer() {
        let read = Headers::read(&headers(&[
            (
                CONNECTION_STRING,
                "postgresql://app%5Fuser:pw@db.example/my%20db?sslmode=require&application_name=my%20app",
            ),
            ("authorization", "Bearer abc.def.ghi"),
            (RAW_TEXT_OUTPUT, "true"),
            (ARRAY_MODE, "true"),
        ]))
        .unwrap();
        assert_eq!(read.role, "app_user");
        assert_eq!(read.database.as_deref(), Some("my db"));
        assert_eq!(read.token.as_deref(), Some("abc.def.ghi"));
        assert_eq!(read.application_name.as_deref(), Some("my app"));
        assert!(read.raw_text && read.array_mode);
        assert_eq!(read.batch, BatchOptions::default());
    }

    #[test]
    fn the_token_is_left_out_of_debug_output() {
        let read = Headers::read(&headers(&[
            (CONNECTION_STRING, "postgresql://app@h/db"),
            ("authorization", "Bearer secret.token.here"),
        ]))
        .unwrap();
        let shown = format!("{read:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("token: Some(\"..\")"), "{shown}");
    }

    #[test]
    fn without_a_bearer_token_the_password_is_the_token() {
        let read =
            Headers::read(&headers(&[(CONNECTION_STRING, "postgres://app:tok@h/db")])).unwrap();
        assert_eq!(read.token.as_deref(), Some("tok"));
        assert!(!read.raw_text && !read.array_mode);
    }

    #[test]
    fn batch_headers_become_transaction_settings() {
        let read = Headers::read(&headers(&[
            (CONNECTION_STRING, "postgresql://app@h/db"),
            (BATCH_ISOLATION_LEVEL, "Serializable"),
            (BATCH_READ_ONLY, "true"),
            (BATCH_DEFERRABLE, "false"),
        ]))
        .unwrap();
        assert_eq!(read.batch.isolation, Some(("serializable", "Serializable")));
        assert_eq!(read.batch.read_only, Some(true));
        assert_eq!(read.batch.deferrable, Some(false));
    }

    #[test]
    fn bad_headers_are_refused_with_what_to_send() {
        let refused = |pairs: &[(&'static str, &str)]| Headers::read(&headers(pairs)).unwrap_err();
        let missing = refused(&[]);
        assert_eq!(missing.sqlstate, "08P01");
        assert!(missing.message.contains("Neon-Connection-String"));
        assert!(
            refused(&[(CONNECTION_STRING, "mysql://a@b/c")])
                .message
                .contains("postgresql://")
        );
        assert_eq!(
            refused(&[(CONNECTION_STRING, "postgresql://h/db")]).sqlstate,
            "28000"
        );
        let basic = refused(&[
            (CONNECTION_STRING, "postgresql://a@h/d"),
            ("authorization", "Basic x"),
        ]);
        assert_eq!(basic.sqlstate, "28000");
        let level = refused(&[
            (CONNECTION_STRING, "postgresql://a@h/d"),
            (BATCH_ISOLATION_LEVEL, "Chaos"),
        ]);
        assert!(level.message.contains("RepeatableRead"));
        let flag = refused(&[
            (CONNECTION_STRING, "postgresql://a@h/d"),
            (ARRAY_MODE, "yes"),
        ]);
        assert!(flag.message.contains("true or false"));
    }

    #[test]
    fn a_body_is_one_query_or_a_batch_with_parameters_in_text_form() {
        let one = Payload::parse(br#"{"query":"select $1, $2","params":["1",null]}"#).unwrap();
        assert_eq!(
            one,
            Payload::One(Statement {
                text: "select $1, $2".into(),
                params: vec![Some("1".into()), None]
            })
        );
        let batch = Payload::parse(br#"{"queries":[{"query":"select 1"}]}"#).unwrap();
        assert!(matches!(batch, Payload::Batch(ref q) if q.len() == 1 && q[0].params.is_empty()));
        assert_eq!(
            Payload::parse(br#"{"queries":[]}"#).unwrap(),
            Payload::Batch(vec![])
        );
        let refused = Payload::parse(b"select 1").unwrap_err();
        assert_eq!(refused.sqlstate, "08P01");
    }

    #[test]
    fn json_values_that_are_not_strings_take_their_postgres_text_form() {
        let values: Vec<Value> =
            serde_json::from_str(r#"[true, 7, 1.5, {"a":[1]}, ["x\"y", null, 2, ["z"]]]"#).unwrap();
        let texts: Vec<Option<String>> = values.iter().map(parameter).collect();
        assert_eq!(
            texts,
            vec![
                Some("true".into()),
                Some("7".into()),
                Some("1.5".into()),
                Some(r#"{"a":[1]}"#.into()),
                Some(r#"{"x\"y",NULL,"2",{"z"}}"#.into()),
            ]
        );
    }
}
