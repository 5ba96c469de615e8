//! The frontend side of the PostgreSQL protocol, spoken by hand, for what
//! tokio-postgres hides or refuses to send: the cancel key, arbitrary startup
//! parameters, sessions over a TLS stream of our own, malformed input.
//!
//! Messages are built with postgres-protocol's encoders; what the proxy
//! answers is read frame by frame from any `AsyncRead` (a TCP or TLS stream,
//! or bytes already read) and parsed here.
#![allow(dead_code)]

use std::io;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// The startup parameters of a client of role `authenticated` on database `app`.
pub const APP_STARTUP: &[(&str, &str)] = &[("user", "authenticated"), ("database", "app")];

fn encode(write: impl FnOnce(&mut BytesMut) -> io::Result<()>) -> Vec<u8> {
    let mut buf = BytesMut::new();
    write(&mut buf).expect("the message encodes");
    buf.to_vec()
}

/// A StartupMessage (protocol 3.0) with these parameters, in this order.
pub fn startup_message(parameters: &[(&str, &str)]) -> Vec<u8> {
    encode(|buf| frontend::startup_message(parameters.iter().copied(), buf))
}

pub fn password_message(password: &str) -> Vec<u8> {
    encode(|buf| frontend::password_message(password.as_bytes(), buf))
}

/// A simple-protocol Query.
pub fn query_message(sql: &str) -> Vec<u8> {
    encode(|buf| frontend::query(sql, buf))
}

pub fn terminate_message() -> Vec<u8> {
    encode(|buf| {
        frontend::terminate(buf);
        Ok(())
    })
}

/// A CancelRequest for the session with this cancel key.
pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    encode(|buf| {
        frontend::cancel_request(pid, secret, buf);
        Ok(())
    })
}

/// Reads one backend message: its type byte and its body.
pub async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

/// The values of a DataRow body, as text.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let count = u16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    let mut values = Vec::new();
    for _ in 0..count {
        let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
        rest = &rest[4..];
        if len < 0 {
            values.push(None);
            continue;
        }
        let (value, tail) = rest.split_at(len as usize);
        values.push(Some(
            String::from_utf8(value.to_vec()).expect("a text value"),
        ));
        rest = tail;
    }
    values
}

/// The fields of an ErrorResponse the tests look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: String,
    /// The SQLSTATE.
    pub code: String,
    pub message: String,
}

pub fn error_response(body: &[u8]) -> ErrorResponse {
    let mut error = ErrorResponse::default();
    // Fields are a type byte and a NUL-terminated value; an empty one ends them.
    for field in body.split(|&b| b == 0).take_while(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            _ => {}
        }
    }
    error
}

/// The process id and secret of a BackendKeyData body.
pub fn backend_key_data(body: &[u8]) -> (i32, i32) {
    assert_eq!(body.len(), 8, "BackendKeyData: {body:?}");
    (
        i32::from_be_bytes(body[..4].try_into().unwrap()),
        i32::from_be_bytes(body[4..].try_into().unwrap()),
    )
}

/// The rows of a simple query, or the error it ended with.
pub type QueryResult = Result<Vec<Vec<Option<String>>>, ErrorResponse>;

/// A logged-in session spoken by hand.
pub struct RawSession<S = TcpStream> {
    pub stream: S,
    /// The cancel key the client was given.
    pub pid: i32,
    pub secret: i32,
}

impl RawSession {
    /// Connects to the proxy on `port` over TCP and logs in (see `login`).
    pub async fn connect(
        port: u16,
        parameters: &[(&str, &str)],
        password: &str,
    ) -> Result<RawSession, ErrorResponse> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the proxy");
        RawSession::login(stream, parameters, password).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawSession<S> {
    /// Sends a StartupMessage, answers the cleartext password request and
    /// reads up to ReadyForQuery. An ErrorResponse on the way is the refusal;
    /// anything but the messages of a normal login is a failure.
    pub async fn login(
        mut stream: S,
        parameters: &[(&str, &str)],
        password: &str,
    ) -> Result<RawSession<S>, ErrorResponse> {
        send(&mut stream, &startup_message(parameters)).await;
        let (kind, body) = next_message(&mut stream).await;
        if kind == b'E' {
            return Err(error_response(&body));
        }
        assert_eq!(
            (kind, body.as_slice()),
            (b'R', &3u32.to_be_bytes()[..]),
            "AuthenticationCleartextPassword"
        );

        send(&mut stream, &password_message(password)).await;
        let (kind, body) = next_message(&mut stream).await;
        if kind == b'E' {
            return Err(error_response(&body));
        }
        assert_eq!(
            (kind, body.as_slice()),
            (b'R', &0u32.to_be_bytes()[..]),
            "AuthenticationOk, got {:?} {}",
            kind as char,
            String::from_utf8_lossy(&body)
        );

        let mut key = None;
        loop {
            let (kind, body) = next_message(&mut stream).await;
            match kind {
                b'K' => key = Some(backend_key_data(&body)),
                b'S' | b'N' => {}
                b'Z' => break,
                b'E' => return Err(error_response(&body)),
                _ => panic!("unexpected message {:?} during login", kind as char),
            }
        }
        let (pid, secret) = key.expect("BackendKeyData before ReadyForQuery");
        Ok(RawSession {
            stream,
            pid,
            secret,
        })
    }

    pub async fn send_query(&mut self, sql: &str) {
        send(&mut self.stream, &query_message(sql)).await;
    }

    /// Reads the answer to a query up to ReadyForQuery.
    pub async fn read_result(&mut self) -> QueryResult {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = next_message(&mut self.stream).await;
            match kind {
                b'D' => rows.push(data_row(&body)),
                b'E' => error = Some(error_response(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                _ => panic!("unexpected message {:?} in a query's answer", kind as char),
            }
        }
    }

    pub async fn query(&mut self, sql: &str) -> QueryResult {
        self.send_query(sql).await;
        self.read_result().await
    }

    /// The first value of the first row `sql` returns; its failing is a failure.
    pub async fn query_value(&mut self, sql: &str) -> Option<String> {
        let rows = self
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("`{sql}` failed: {e:?}"));
        rows.into_iter().next()?.into_iter().next()?
    }

    pub async fn terminate(mut self) {
        send(&mut self.stream, &terminate_message()).await;
    }
}

pub async fn send(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) {
    stream.write_all(bytes).await.expect("send to the proxy");
}

/// The next message of a session, which must come within `WAIT`.
async fn next_message(stream: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    tokio::time::timeout(WAIT, read_message(stream))
        .await
        .expect("an answer within the timeout")
        .expect("a whole message before the connection closes")
}
