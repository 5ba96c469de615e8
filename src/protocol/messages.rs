//! Every message the proxy writes itself, to the client and to Postgres.
//!
//! One library per direction. To the client the proxy is the server, and
//! its messages are pgwire's backend types, complete for what a server
//! sends before the relay (authentication, BackendKeyData, ParameterStatus,
//! ReadyForQuery, ErrorResponse, NegotiateProtocolVersion, the answers to
//! SSLRequest and GSSENCRequest); postgres-protocol has no encoders for
//! those. To Postgres the proxy is a client, and its messages are
//! postgres-protocol's frontend encoders, which tokio-postgres itself uses:
//! they write straight from borrowed data (no owned strings per message),
//! and they go with the same crate's SCRAM and MD5 code.
//!
//! Everything else in the crate passes messages through as they came, or
//! reads them (see [`frame`](crate::protocol::frame)).

use std::io;

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{
    ErrorResponse, GssEncResponse, ReadyForQuery, SslResponse, TransactionStatus,
};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;

use crate::protocol::startup::{CancelKey, PEER_CANCEL_REQUEST};

// To the client.

/// Appends a pgwire message; a message pgwire will not encode (one above
/// its size cap, which nothing the proxy writes reaches) leaves `out` as it
/// was, rather than with half a message in it.
fn put(out: &mut BytesMut, message: &impl Message) {
    let start = out.len();
    if message.encode(out).is_err() {
        out.truncate(start);
    }
}

/// The answer to an SSLRequest: `S`, TLS follows, or `N`.
pub(crate) fn ssl_response(out: &mut BytesMut, accept: bool) {
    let answer = if accept {
        SslResponse::Accept
    } else {
        SslResponse::Refuse
    };
    put(out, &answer);
}

/// The answer to a GSSENCRequest: `N`, the proxy has no GSSAPI.
pub(crate) fn gssenc_refused(out: &mut BytesMut) {
    put(out, &GssEncResponse::Refuse);
}

/// NegotiateProtocolVersion: the newest version the proxy speaks, and the
/// protocol options the client asked for that it does not support.
pub(crate) fn negotiate_protocol_version(
    out: &mut BytesMut,
    newest: u32,
    unsupported: Vec<String>,
) {
    put(
        out,
        &NegotiateProtocolVersion::new(newest as i32, unsupported),
    );
}

/// AuthenticationCleartextPassword: the proxy asks for the token.
pub(crate) fn authentication_cleartext_password(out: &mut BytesMut) {
    put(out, &Authentication::CleartextPassword);
}

pub(crate) fn authentication_ok(out: &mut BytesMut) {
    put(out, &Authentication::Ok);
}

/// BackendKeyData with the key the client is to cancel with.
pub(crate) fn backend_key_data(out: &mut BytesMut, key: CancelKey) {
    put(
        out,
        &BackendKeyData::new(key.pid, SecretKey::I32(key.secret)),
    );
}

pub(crate) fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put(
        out,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

/// ReadyForQuery, idle: outside a transaction.
pub(crate) fn ready_for_query_idle(out: &mut BytesMut) {
    put(out, &ReadyForQuery::new(TransactionStatus::Idle));
}

/// An ErrorResponse with the fields libpq shows: severity (localized and
/// not), code, message.
pub(crate) fn error_response(out: &mut BytesMut, severity: &str, sqlstate: &str, message: &str) {
    let response = ErrorResponse::new(vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', sqlstate.to_owned()),
        (b'M', message.to_owned()),
    ]);
    put(out, &response);
}

// To Postgres.

/// SSLRequest: the proxy asks the server for TLS.
pub(crate) fn ssl_request(out: &mut BytesMut) {
    frontend::ssl_request(out);
}

/// StartupMessage of protocol 3.0 with these parameters.
pub(crate) fn startup_message<'a>(
    out: &mut BytesMut,
    parameters: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> io::Result<()> {
    frontend::startup_message(parameters, out)
}

/// CancelRequest for the backend with this key.
pub(crate) fn cancel_request(out: &mut BytesMut, key: CancelKey) {
    frontend::cancel_request(key.pid, key.secret, out);
}

/// A CancelRequest forwarded to a peer replica: the same packet with the
/// peers' own code ([`PEER_CANCEL_REQUEST`]).
pub(crate) fn peer_cancel_request(out: &mut BytesMut, key: CancelKey) {
    out.put_u32(16);
    out.put_u32(PEER_CANCEL_REQUEST);
    out.put_i32(key.pid);
    out.put_i32(key.secret);
}

/// PasswordMessage: a cleartext password or an MD5 hash.
pub(crate) fn password(out: &mut BytesMut, password: &[u8]) -> io::Result<()> {
    frontend::password_message(password, out)
}

pub(crate) fn sasl_initial_response(
    out: &mut BytesMut,
    mechanism: &str,
    data: &[u8],
) -> io::Result<()> {
    frontend::sasl_initial_response(mechanism, data, out)
}

pub(crate) fn sasl_response(out: &mut BytesMut, data: &[u8]) -> io::Result<()> {
    frontend::sasl_response(data, out)
}

/// A simple Query.
pub(crate) fn query(out: &mut BytesMut, sql: &str) -> io::Result<()> {
    frontend::query(sql, out)
}

pub(crate) fn terminate(out: &mut BytesMut) {
    frontend::terminate(out);
}

/// The statement that applies one setting; `false`: for the session.
const SET_CONFIG: &str = "select pg_catalog.set_config($1, $2, false)";

/// The `text` type, for both parameters of [`SET_CONFIG`].
const TEXT_OID: u32 = 25;

/// `set_config` for each pair, as bound parameters (never query text), then
/// Sync: Parse, Bind and Execute for each pair, Close, Sync. With a
/// `statement` name the statement is closed afterwards, so the client's
/// unnamed statement, if it has one, survives.
pub(crate) fn set_config<'a>(
    out: &mut BytesMut,
    statement: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> io::Result<()> {
    set_configs(out, statement, pairs)?;
    if !statement.is_empty() {
        frontend::close(b'S', statement, out)?;
    }
    frontend::sync(out);
    Ok(())
}

/// Parse of [`SET_CONFIG`] as `statement`, then Bind and Execute for each
/// pair; returns how many pairs.
fn set_configs<'a>(
    out: &mut BytesMut,
    statement: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> io::Result<usize> {
    frontend::parse(statement, SET_CONFIG, [TEXT_OID, TEXT_OID], out)?;
    let mut count = 0;
    for (name, value) in pairs {
        frontend::bind(
            "",
            statement,
            [0i16],
            [name, value],
            |v, buf| {
                buf.put_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            [0i16],
            out,
        )
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a setting has a NUL byte"))?;
        frontend::execute("", 0, out)?;
        count += 1;
    }
    Ok(count)
}

/// The proxy's statements ahead of a transaction-pooled client's first
/// message on a backend: `DISCARD ALL` when `reset`, then the settings
/// `pairs` bound in a transaction of their own (so that no ROLLBACK of the
/// client's undoes them). No Sync: should one of them fail, the server
/// skips the client's messages behind them up to the client's Sync.
/// Returns how many CommandCompletes answer them; writes nothing on error.
pub(crate) fn bind_ahead<'a>(
    out: &mut BytesMut,
    reset: bool,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> io::Result<usize> {
    let mut ahead = BytesMut::new();
    let mut commands = 0;
    let mut run = |sql: &str, ahead: &mut BytesMut| {
        commands += 1;
        unnamed_without_parameters(ahead, sql)
    };
    if reset {
        run("DISCARD ALL", &mut ahead)?;
    }
    run("BEGIN", &mut ahead)?;
    let settings = set_configs(&mut ahead, "", pairs)?;
    run("COMMIT", &mut ahead)?;
    out.put_slice(&ahead);
    Ok(commands + settings)
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal.
fn unnamed_without_parameters(out: &mut BytesMut, sql: &str) -> io::Result<()> {
    frontend::parse("", sql, [], out)?;
    let no_values: [&str; 0] = [];
    frontend::bind("", "", [], no_values, |_, _| Ok(IsNull::No), [], out)
        .map_err(|_| io::Error::other("a Bind without parameters"))?;
    frontend::execute("", 0, out)
}

/// One statement of an HTTP request by the extended protocol: Parse
/// (unnamed, no parameter types, so the server infers them), Bind (text
/// parameters, `None` for NULL; text results), Describe the portal, Execute
/// every row. No Sync: the statements of one request share a transaction
/// until [`sync`].
pub(crate) fn statement<'a>(
    out: &mut BytesMut,
    sql: &str,
    params: &'a [Option<String>],
) -> io::Result<()> {
    frontend::parse("", sql, [], out)?;
    frontend::bind(
        "",
        "",
        [0i16],
        params.iter().map(Option::as_deref),
        |value: Option<&'a str>, buf| match value {
            Some(v) => {
                buf.put_slice(v.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        },
        [0i16],
        out,
    )
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many parameters, or one too long",
        )
    })?;
    frontend::describe(b'P', "", out)?;
    frontend::execute("", 0, out)
}

/// Sync: the end of a pipeline, answered by ReadyForQuery.
pub(crate) fn sync(out: &mut BytesMut) {
    frontend::sync(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        write(&mut out);
        out.to_vec()
    }

    /// The bytes PostgreSQL's own server and libpq write for these messages
    /// (protocol 3.0), spelled out once, here.
    #[test]
    fn messages_are_the_bytes_postgres_writes() {
        assert_eq!(written(|o| ssl_response(o, true)), b"S");
        assert_eq!(written(|o| ssl_response(o, false)), b"N");
        assert_eq!(written(gssenc_refused), b"N");
        assert_eq!(written(authentication_ok), [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
        assert_eq!(
            written(authentication_cleartext_password),
            [b'R', 0, 0, 0, 8, 0, 0, 0, 3]
        );
        let key = CancelKey { pid: 7, secret: -2 };
        assert_eq!(
            written(|o| backend_key_data(o, key)),
            [b'K', 0, 0, 0, 12, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe]
        );
        assert_eq!(
            written(|o| parameter_status(o, "TimeZone", "UTC")),
            b"S\0\0\0\x11TimeZone\0UTC\0"
        );
        assert_eq!(written(ready_for_query_idle), [b'Z', 0, 0, 0, 5, b'I']);
        assert_eq!(
            written(|o| error_response(o, "FATAL", "28000", "no")),
            b"E\0\0\0\x1eSFATAL\0VFATAL\0C28000\0Mno\0\0"
        );
        assert_eq!(written(terminate), [b'X', 0, 0, 0, 4]);
        assert_eq!(written(ssl_request), [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(
            written(|o| cancel_request(o, key)),
            [
                0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe
            ]
        );
        assert_eq!(
            written(|o| peer_cancel_request(o, key)),
            [
                0, 0, 0, 16, 0x04, 0xd2, 0x1e, 0x61, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe
            ]
        );
        assert_eq!(
            written(|o| negotiate_protocol_version(o, 196_608, vec!["_pq_.x".into()])),
            b"v\0\0\0\x13\0\x03\0\0\0\0\0\x01_pq_.x\0"
        );
    }

    #[test]
    fn settings_are_parsed_bound_executed_then_closed_and_synced() {
        // A name that cannot be a C string is refused, not cut short.
        let mut out = BytesMut::new();
        assert!(set_config(&mut out, "a\0b", [("a", "b")]).is_err());
        let mut out = BytesMut::new();
        set_config(&mut out, "named", [("a", "b")]).unwrap();
        // Parse, Bind, Execute, Close, Sync.
        let kinds: Vec<u8> = walk(&out).collect();
        assert_eq!(kinds, b"PBECS");
    }

    #[test]
    fn a_statement_is_parsed_bound_described_and_executed_without_a_sync() {
        let mut out = BytesMut::new();
        statement(&mut out, "select $1, $2", &[Some("a".into()), None]).unwrap();
        let kinds: Vec<u8> = walk(&out).collect();
        assert_eq!(kinds, b"PBDE");
        // The NULL is a length of -1 with no bytes, not an empty string.
        assert!(out.windows(4).any(|w| w == [0xff, 0xff, 0xff, 0xff]));
        // SQL with a NUL byte cannot be a C string: refused, not cut short.
        assert!(statement(&mut BytesMut::new(), "select 1\0", &[]).is_err());
    }

    fn walk(mut bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
        std::iter::from_fn(move || {
            let (&kind, rest) = bytes.split_first()?;
            let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
            bytes = &rest[len..];
            Some(kind)
        })
    }
}
