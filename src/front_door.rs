//! The front door: everything a client sends before it is authenticated.
//!
//! TLS negotiation (SSLRequest, or direct TLS with ALPN `postgresql`), a
//! GSSENCRequest declined, the StartupMessage, a CancelRequest, and the
//! cleartext password that carries the token.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use pgwire::messages::startup::{NegotiateProtocolVersion, Startup};
use pgwire::messages::{DecodeContext, Message};
use rustls::server::Acceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::error::{Refusal, sqlstate};
use crate::stream::ClientStream;
use crate::tls::ALPN_POSTGRESQL;

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
        let mut packet = match read_startup_packet(&mut stream).await {
            Ok(packet) => packet,
            Err(refusal) => return Err(FrontDoorError::Refused { stream, refusal }),
        };
        let code = packet.get_u32();
        match code {
            SSL_REQUEST if !stream.is_tls() => match tls {
                Some(acceptor) => {
                    stream.write_all(b"S").await?;
                    stream = upgrade(stream, acceptor).await?;
                }
                None => stream.write_all(b"N").await?,
            },
            GSSENC_REQUEST if !stream.is_tls() && !gss_declined => {
                gss_declined = true;
                stream.write_all(b"N").await?;
            }
            CANCEL_REQUEST if packet.remaining() == 8 => {
                return Ok(Arrival::Cancel(CancelKey {
                    pid: packet.get_i32(),
                    secret: packet.get_i32(),
                }));
            }
            code if code >> 16 == 3 => {
                return match startup(&mut stream, code, packet).await? {
                    Ok(parameters) => Ok(Arrival::Startup(StartupRequest { stream, parameters })),
                    Err(refusal) => Err(FrontDoorError::Refused { stream, refusal }),
                };
            }
            code => {
                let refusal = Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {}.{}: rlsgate speaks protocol 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                )
                .because(crate::error::Reason::Malformed);
                return Err(FrontDoorError::Refused { stream, refusal });
            }
        }
    }
}

/// Parses a StartupMessage; a newer minor version or `_pq_.` options are
/// answered with NegotiateProtocolVersion, as PostgreSQL does.
async fn startup(
    stream: &mut ClientStream,
    code: u32,
    mut body: BytesMut,
) -> io::Result<Result<BTreeMap<String, String>, Refusal>> {
    if body.last() != Some(&0) {
        return Ok(Err(Refusal::protocol(
            "invalid startup packet layout: expected terminator as last byte",
        )));
    }
    // pgwire decodes from the full packet: put back the length and version.
    let mut full = BytesMut::with_capacity(body.len() + 8);
    full.put_u32((body.len() + 8) as u32);
    full.put_u32(code);
    full.unsplit(body.split());
    let parameters = match Startup::decode(&mut full, &DecodeContext::default()) {
        Ok(Some(startup)) => startup.parameters,
        _ => return Ok(Err(Refusal::protocol("invalid startup packet"))),
    };
    let unsupported: Vec<String> = parameters
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    if code != PROTOCOL_3_0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        let _ = NegotiateProtocolVersion::new(PROTOCOL_3_0 as i32, unsupported).encode(&mut out);
        stream.write_all(&out).await?;
    }
    let parameters = parameters
        .into_iter()
        .filter(|(k, _)| !k.starts_with("_pq_."))
        .collect();
    Ok(Ok(parameters))
}

/// Asks for the cleartext password (the token) and reads it, up to `max_bytes`.
pub async fn ask_password(
    stream: &mut ClientStream,
    max_bytes: usize,
) -> Result<String, PasswordError> {
    stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
    stream.flush().await?;
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let [kind, len @ ..] = header;
    if kind != b'p' {
        return Err(PasswordError::Refused(Refusal::protocol(format!(
            "expected a password message, got message type {:?}",
            kind as char
        ))));
    }
    let len = u32::from_be_bytes(len) as usize;
    if len < 5 {
        return Err(PasswordError::Refused(Refusal::protocol(
            "invalid password message length",
        )));
    }
    if len - 5 > max_bytes {
        return Err(PasswordError::Refused(
            Refusal::auth(format!(
                "the password is {} bytes, more than the {max_bytes}-byte token limit",
                len - 5
            ))
            .because(crate::error::Reason::Malformed),
        ));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    if body.pop() != Some(0) || body.contains(&0) {
        return Err(PasswordError::Refused(Refusal::protocol(
            "invalid password message",
        )));
    }
    String::from_utf8(body).map_err(|_| {
        PasswordError::Refused(
            Refusal::auth("the password is not valid UTF-8, so it cannot be a token")
                .because(crate::error::Reason::Malformed),
        )
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

async fn read_startup_packet(stream: &mut ClientStream) -> Result<BytesMut, Refusal> {
    let closed = |_| Refusal::protocol("incomplete startup packet");
    let len = stream.read_u32().await.map_err(closed)? as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(Refusal::protocol(format!(
            "invalid length of startup packet: {len}"
        )));
    }
    let mut packet = BytesMut::zeroed(len - 4);
    stream.read_exact(&mut packet).await.map_err(closed)?;
    Ok(packet)
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
