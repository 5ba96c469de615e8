//! The front door: everything a client sends before it is authenticated.
//!
//! TLS negotiation (SSLRequest, or direct TLS with ALPN `postgresql`), a
//! GSSENCRequest declined, the StartupMessage, a CancelRequest, and the
//! cleartext password that carries the token.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use pgwire::messages::startup::{NegotiateProtocolVersion, Startup};
use pgwire::messages::{DecodeContext, Message};
use rustls::server::Acceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::session::stream::ClientStream;
use crate::session::tls::ALPN_POSTGRESQL;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::front_door=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::front_door";

/// Largest packet before authentication, as in PostgreSQL's `pqcomm.h`.
const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3_0: u32 = 196_608;
/// The first byte of a TLS handshake record: a client using direct TLS.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a new connection turned out to be.
pub enum Arrival {
    Startup(StartupRequest),
    Cancel(CancelKey),
}

/// A client that sent a StartupMessage and waits for authentication.
pub struct StartupRequest {
    pub stream: ClientStream,
    pub parameters: BTreeMap<String, String>,
}

/// The key of a CancelRequest: a backend's process id and secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

pub enum FrontDoorError {
    /// The peer went away or spoke something that is not the protocol.
    Closed(io::Error),
    /// The client gets a FATAL ErrorResponse on `stream`.
    Refused {
        stream: ClientStream,
        refusal: Refusal,
    },
}

impl From<io::Error> for FrontDoorError {
    fn from(e: io::Error) -> Self {
        FrontDoorError::Closed(e)
    }
}

/// Reads the client's first request, negotiating TLS on the way.
pub async fn receive(tcp: TcpStream, tls: Option<&TlsAcceptor>) -> Result<Arrival, FrontDoorError> {
    let mut first = [0u8; 1];
    let direct = tls.is_some() && tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE;
    let mut stream = match tls {
        Some(acceptor) if direct => direct_tls(tcp, acceptor).await?,
        _ => ClientStream::Plain(tcp),
    };
    let mut gss_declined = false;
    loop {
        let packet = match read_startup_packet(&mut stream).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Err(refusal) => return Err(FrontDoorError::Refused { stream, refusal }),
        };
        let request = match parse_request(&packet) {
            Ok(request) => request,
            Err(refusal) => return Err(FrontDoorError::Refused { stream, refusal }),
        };
        match request {
            Request::Ssl if !stream.is_tls() => match tls {
                Some(acceptor) => {
                    stream.write_all(b"S").await?;
                    stream = upgrade(stream, acceptor).await?;
                }
                None => stream.write_all(b"N").await?,
            },
            Request::GssEnc if !stream.is_tls() && !gss_declined => {
                gss_declined = true;
                stream.write_all(b"N").await?;
            }
            Request::Cancel(key) => return Ok(Arrival::Cancel(key)),
            Request::Startup(startup) => {
                if let Some(negotiation) = startup.negotiation() {
                    stream.write_all(&negotiation).await?;
                }
                let parameters = startup.parameters;
                return Ok(Arrival::Startup(StartupRequest { stream, parameters }));
            }
            // Encryption asked for again, or over TLS: PostgreSQL treats
            // these as an unknown protocol version, and so do we.
            Request::Ssl => return refused(stream, unsupported_protocol(SSL_REQUEST)),
            Request::GssEnc => return refused(stream, unsupported_protocol(GSSENC_REQUEST)),
        }
    }
}

fn refused<T>(stream: ClientStream, refusal: Refusal) -> Result<T, FrontDoorError> {
    Err(FrontDoorError::Refused { stream, refusal })
}

fn unsupported_protocol(code: u32) -> Refusal {
    Refusal::new(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "unsupported frontend protocol {}.{}: rlsgate speaks protocol 3.0",
            code >> 16,
            code & 0xffff
        ),
    )
    .because(Reason::Malformed)
}

/// One packet a client may send before it is authenticated, parsed.
#[derive(Debug)]
pub enum Request {
    /// SSLRequest: the client asks for TLS.
    Ssl,
    /// GSSENCRequest: the client asks for GSSAPI encryption.
    GssEnc,
    /// CancelRequest for the backend with this key.
    Cancel(CancelKey),
    /// StartupMessage of protocol 3.x.
    Startup(StartupMessage),
}

/// A StartupMessage: the protocol version asked for and the parameters.
#[derive(Debug)]
pub struct StartupMessage {
    /// The version the client asked for (major in the high 16 bits).
    pub version: u32,
    /// The parameters, without the `_pq_.` protocol options.
    pub parameters: BTreeMap<String, String>,
    /// The `_pq_.` protocol options the client asked for; none is supported.
    pub unsupported_options: Vec<String>,
}

impl StartupMessage {
    /// The NegotiateProtocolVersion message the client must get before the
    /// authentication request, if it asked for a newer minor version or for
    /// protocol options, as PostgreSQL answers: we speak 3.0 and no options.
    pub fn negotiation(&self) -> Option<BytesMut> {
        if self.version == PROTOCOL_3_0 && self.unsupported_options.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        let message =
            NegotiateProtocolVersion::new(PROTOCOL_3_0 as i32, self.unsupported_options.clone());
        // Encoding into memory cannot fail.
        let _ = message.encode(&mut out);
        Some(out)
    }
}

/// The length of the packet that follows a startup packet's 4-byte length
/// field, or a refusal when the declared length is out of bounds: checked
/// before anything is read, so that a client cannot make us allocate more
/// than PostgreSQL's 10 000-byte limit.
pub fn startup_packet_body_length(header: [u8; 4]) -> Result<usize, Refusal> {
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(Refusal::protocol(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    Ok(len - 4)
}

/// Parses a startup packet's body (everything after the length field): the
/// request code, then what that request carries.
pub fn parse_request(packet: &[u8]) -> Result<Request, Refusal> {
    let Some((code, body)) = packet.split_first_chunk::<4>() else {
        return Err(Refusal::protocol("invalid length of startup packet"));
    };
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST => Ok(Request::Ssl),
        GSSENC_REQUEST => Ok(Request::GssEnc),
        CANCEL_REQUEST if body.len() == 8 => Ok(Request::Cancel(CancelKey {
            pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            secret: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        })),
        code if code >> 16 == 3 => parse_startup(code, body).map(Request::Startup),
        code => Err(unsupported_protocol(code)),
    }
}

/// Parses a StartupMessage's parameters, `body` being what follows the
/// version.
fn parse_startup(version: u32, body: &[u8]) -> Result<StartupMessage, Refusal> {
    if body.last() != Some(&0) {
        return Err(Refusal::protocol(
            "invalid startup packet layout: expected terminator as last byte",
        ));
    }
    // pgwire decodes from the full packet: put back the length and version.
    let mut full = BytesMut::with_capacity(body.len() + 8);
    full.put_u32((body.len() + 8) as u32);
    full.put_u32(version);
    full.put_slice(body);
    let parameters = match Startup::decode(&mut full, &DecodeContext::default()) {
        Ok(Some(startup)) => startup.parameters,
        _ => return Err(Refusal::protocol("invalid startup packet")),
    };
    let (unsupported_options, parameters): (BTreeMap<_, _>, BTreeMap<_, _>) = parameters
        .into_iter()
        .partition(|(k, _)| k.starts_with("_pq_."));
    Ok(StartupMessage {
        version,
        parameters,
        unsupported_options: unsupported_options.into_keys().collect(),
    })
}

/// Asks for the cleartext password (the token) and reads it, up to
/// `max_bytes`, until `deadline` (`[listen] auth_timeout` after the client
/// connected).
pub async fn ask_password(
    stream: &mut ClientStream,
    max_bytes: usize,
    deadline: Instant,
) -> Result<String, PasswordError> {
    match tokio::time::timeout_at(deadline, read_password(stream, max_bytes)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(target: LOG_TARGET, "closed: no password within auth_timeout");
            Err(PasswordError::Closed(io::ErrorKind::TimedOut.into()))
        }
    }
}

async fn read_password(
    stream: &mut ClientStream,
    max_bytes: usize,
) -> Result<String, PasswordError> {
    stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
    stream.flush().await?;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = password_body_length(header, max_bytes).map_err(PasswordError::Refused)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    parse_password(body).map_err(PasswordError::Refused)
}

/// The length of a password message's body from its 5-byte header (type and
/// length), or a refusal when it is not a password message or is longer than
/// `max_bytes` allows: checked before the body is read.
pub fn password_body_length(header: [u8; 5], max_bytes: usize) -> Result<usize, Refusal> {
    let [kind, len @ ..] = header;
    if kind != b'p' {
        return Err(Refusal::protocol(format!(
            "expected a password message, got message type {:?}",
            kind as char
        )));
    }
    let len = u32::from_be_bytes(len) as usize;
    if len < 5 {
        return Err(Refusal::protocol("invalid password message length"));
    }
    if len - 5 > max_bytes {
        return Err(Refusal::auth(format!(
            "the password is {} bytes, more than the {max_bytes}-byte token limit",
            len - 5
        ))
        .because(Reason::Malformed));
    }
    Ok(len - 4)
}

/// The password from a password message's body: one NUL-terminated UTF-8
/// string, nothing after it.
pub fn parse_password(mut body: Vec<u8>) -> Result<String, Refusal> {
    if body.pop() != Some(0) || body.contains(&0) {
        return Err(Refusal::protocol("invalid password message"));
    }
    String::from_utf8(body).map_err(|_| {
        Refusal::auth("the password is not valid UTF-8, so it cannot be a token")
            .because(Reason::Malformed)
    })
}

pub enum PasswordError {
    /// The client hung up, as psql does to prompt for a password.
    Closed(io::Error),
    Refused(Refusal),
}

impl From<io::Error> for PasswordError {
    fn from(e: io::Error) -> Self {
        PasswordError::Closed(e)
    }
}

/// The next startup packet; `None` when the client left before sending a
/// byte of it. As PostgreSQL does, that is no refusal to tell or log: port
/// probes do it, and so does a client that did not like the answer to its
/// SSLRequest; and a flood of such connections must not flood the log.
async fn read_startup_packet(stream: &mut ClientStream) -> Result<Option<Vec<u8>>, Refusal> {
    let closed = |_| Refusal::protocol("incomplete startup packet");
    let mut header = [0u8; 4];
    match stream.read(&mut header[..1]).await {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    stream.read_exact(&mut header[1..]).await.map_err(closed)?;
    let mut packet = vec![0u8; startup_packet_body_length(header)?];
    stream.read_exact(&mut packet).await.map_err(closed)?;
    Ok(Some(packet))
}

async fn upgrade(stream: ClientStream, acceptor: &TlsAcceptor) -> io::Result<ClientStream> {
    match stream {
        ClientStream::Plain(tcp) => Ok(ClientStream::Tls(Box::new(acceptor.accept(tcp).await?))),
        tls => Ok(tls),
    }
}

/// Direct TLS (libpq `sslnegotiation=direct`) must offer ALPN `postgresql`,
/// as PostgreSQL requires, so that a TLS connection meant for another
/// protocol is turned away before any handshake.
async fn direct_tls(tcp: TcpStream, acceptor: &TlsAcceptor) -> io::Result<ClientStream> {
    let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
    let offers_postgresql = start
        .client_hello()
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ALPN_POSTGRESQL));
    if !offers_postgresql {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "direct TLS connection without ALPN \"postgresql\"",
        ));
    }
    let tls = start.into_stream(Arc::clone(acceptor.config())).await?;
    Ok(ClientStream::Tls(Box::new(tls)))
}

/// Used by the listener to share one acceptor across connections.
pub fn acceptor(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn a_declared_length_out_of_bounds_is_refused_before_reading() {
        for len in [0u32, 7, 10_001, 1 << 30, u32::MAX] {
            let refusal = startup_packet_body_length(len.to_be_bytes()).unwrap_err();
            assert_eq!(refusal.sqlstate, sqlstate::PROTOCOL_VIOLATION, "{len}");
        }
        assert_eq!(startup_packet_body_length(8u32.to_be_bytes()).unwrap(), 4);
        assert_eq!(
            startup_packet_body_length(10_000u32.to_be_bytes()).unwrap(),
            9_996
        );
    }

    #[test]
    fn requests_are_told_apart_by_their_code() {
        assert!(matches!(
            parse_request(&packet(SSL_REQUEST, b"")),
            Ok(Request::Ssl)
        ));
        assert!(matches!(
            parse_request(&packet(GSSENC_REQUEST, b"")),
            Ok(Request::GssEnc)
        ));
        let key = [0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe];
        match parse_request(&packet(CANCEL_REQUEST, &key)) {
            Ok(Request::Cancel(key)) => assert_eq!(key, CancelKey { pid: 7, secret: -2 }),
            other => panic!("{other:?}"),
        }
        // A cancel request of the wrong size is no cancel request.
        let refusal = parse_request(&packet(CANCEL_REQUEST, &key[..7])).unwrap_err();
        assert!(refusal.message.contains("1234.5678"), "{refusal}");
        let refusal = parse_request(&packet(2 << 16, b"\0")).unwrap_err();
        assert_eq!(refusal.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
        assert!(parse_request(b"\0\0\0").is_err());
    }

    #[test]
    fn a_startup_message_splits_off_protocol_options_and_negotiates() {
        let body = b"user\0alice\0_pq_.x\0y\0\0";
        let Ok(Request::Startup(startup)) = parse_request(&packet(PROTOCOL_3_0, body)) else {
            panic!("a startup message");
        };
        assert_eq!(startup.parameters.len(), 1);
        assert_eq!(startup.parameters["user"], "alice");
        assert_eq!(startup.unsupported_options, ["_pq_.x"]);
        assert_eq!(startup.negotiation().unwrap()[0], b'v');

        let Ok(Request::Startup(plain)) = parse_request(&packet(PROTOCOL_3_0, b"user\0a\0\0"))
        else {
            panic!("a startup message");
        };
        assert!(plain.negotiation().is_none());
        let Ok(Request::Startup(newer)) = parse_request(&packet(PROTOCOL_3_0 + 2, b"\0")) else {
            panic!("a startup message");
        };
        assert!(newer.negotiation().is_some());
    }

    #[test]
    fn malformed_startup_messages_are_refused() {
        for body in [&b""[..], b"user\0alice", b"user"] {
            let refusal = parse_request(&packet(PROTOCOL_3_0, body)).unwrap_err();
            assert_eq!(refusal.sqlstate, sqlstate::PROTOCOL_VIOLATION, "{body:?}");
        }
    }

    #[test]
    fn password_lengths_are_checked_before_the_body_is_read() {
        let header = |kind: u8, len: u32| {
            let [a, b, c, d] = len.to_be_bytes();
            [kind, a, b, c, d]
        };
        assert_eq!(password_body_length(header(b'p', 10), 100).unwrap(), 6);
        assert!(password_body_length(header(b'Q', 10), 100).is_err());
        assert!(password_body_length(header(b'p', 4), 100).is_err());
        let refusal = password_body_length(header(b'p', 1 << 30), 100).unwrap_err();
        assert_eq!(refusal.sqlstate, sqlstate::INVALID_AUTHORIZATION);
        assert!(password_body_length(header(b'p', u32::MAX), usize::MAX - 1).is_ok());
    }

    #[test]
    fn a_password_is_one_terminated_utf8_string() {
        assert_eq!(parse_password(b"eyJ\0".to_vec()).unwrap(), "eyJ");
        for body in [&b""[..], b"eyJ", b"ey\0J\0", b"\xff\0"] {
            assert!(parse_password(body.to_vec()).is_err(), "{body:?}");
        }
    }
}
