//! The front door: everything a client sends before it is authenticated.
//!
//! TLS negotiation (SSLRequest, or direct TLS with ALPN `postgresql`), a
//! GSSENCRequest declined, the StartupMessage, a CancelRequest, and the
//! cleartext password that carries the token.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::server::Acceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::protocol::refusal::Refusal;
use crate::protocol::startup::{
    CancelKey, GSSENC_REQUEST, Request, SSL_REQUEST, parse_password, parse_request,
    password_body_length, startup_packet_body_length, unsupported_protocol,
};
use crate::protocol::{frame, messages};
use crate::session::stream::ClientStream;
use crate::session::tls::ALPN_POSTGRESQL;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::front_door=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::front_door";

/// The first byte of a TLS handshake record: a client using direct TLS.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a new connection turned out to be.
pub(crate) enum Arrival {
    Startup(StartupRequest),
    Cancel(CancelKey),
    /// A cancel request a peer replica forwarded.
    PeerCancel(CancelKey),
}

/// A client that sent a StartupMessage and waits for authentication.
pub(crate) struct StartupRequest {
    pub(crate) stream: ClientStream,
    pub(crate) parameters: BTreeMap<String, String>,
}

pub(crate) enum FrontDoorError {
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

/// Reads the client's first request, negotiating TLS on the way (over
/// TCP; a tunnel is answered `N`: its encryption is the carrier's).
pub(crate) async fn receive(
    stream: ClientStream,
    tls: Option<&TlsAcceptor>,
) -> Result<Arrival, FrontDoorError> {
    let tls = tls.filter(|_| matches!(stream, ClientStream::Plain(_)));
    let mut stream = match (stream, tls) {
        (ClientStream::Plain(tcp), Some(acceptor)) => {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE {
                direct_tls(tcp, acceptor).await?
            } else {
                ClientStream::Plain(tcp)
            }
        }
        (stream, _) => stream,
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
        let mut answer = BytesMut::new();
        match request {
            Request::Ssl if !stream.is_tls() => {
                messages::ssl_response(&mut answer, tls.is_some());
                stream.write_all(&answer).await?;
                if let Some(acceptor) = tls {
                    stream = upgrade(stream, acceptor).await?;
                }
            }
            Request::GssEnc if !stream.is_tls() && !gss_declined => {
                gss_declined = true;
                messages::gssenc_refused(&mut answer);
                stream.write_all(&answer).await?;
            }
            Request::Cancel(key) => return Ok(Arrival::Cancel(key)),
            Request::PeerCancel(key) => return Ok(Arrival::PeerCancel(key)),
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

/// Asks for the cleartext password (the token) and reads it, up to
/// `max_bytes`, until `deadline` (`[listen] auth_timeout` after the client
/// connected).
pub(crate) async fn ask_password(
    stream: &mut ClientStream,
    max_bytes: usize,
    deadline: Instant,
) -> Result<String, PasswordError> {
    match tokio::time::timeout_at(deadline, read_password(stream, max_bytes)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(target: LOG_TARGET, "closed: no password within auth_timeout");
            Err(PasswordError::Closed)
        }
    }
}

async fn read_password(
    stream: &mut ClientStream,
    max_bytes: usize,
) -> Result<String, PasswordError> {
    let mut ask = BytesMut::new();
    messages::authentication_cleartext_password(&mut ask);
    stream.write_all(&ask).await?;
    stream.flush().await?;
    let header = frame::read_header(stream).await?;
    let len = password_body_length(header, max_bytes).map_err(PasswordError::Refused)?;
    let body = frame::read_body(stream, len).await?;
    parse_password(body).map_err(PasswordError::Refused)
}

pub(crate) enum PasswordError {
    /// The client hung up, as psql does to prompt for a password.
    Closed,
    Refused(Refusal),
}

impl From<io::Error> for PasswordError {
    fn from(_: io::Error) -> Self {
        PasswordError::Closed
    }
}

/// The next startup packet; `None` when the client left before sending a
/// byte of it. As PostgreSQL does, that is no refusal to tell or log: port
/// probes do it, and so does a client that did not like the answer to its
/// SSLRequest; and a flood of such connections must not flood the log.
async fn read_startup_packet(stream: &mut ClientStream) -> Result<Option<Vec<u8>>, Refusal> {
    let closed = |_| Refusal::protocol("incomplete startup packet");
    // Every startup packet has at least 8 bytes, its length and its code,
    // so the first read asks for 8: an SSLRequest arrives in one system
    // call, and no byte after the packet is taken from the stream.
    let mut start = [0u8; 8];
    let mut got = match stream.read(&mut start).await {
        Ok(0) | Err(_) => return Ok(None),
        Ok(got) => got,
    };
    if got < 4 {
        stream
            .read_exact(&mut start[got..4])
            .await
            .map_err(closed)?;
        got = 4;
    }
    let (length, code) = start.split_at(4);
    let length = length.try_into().expect("four bytes");
    let mut packet = vec![0u8; startup_packet_body_length(length)?];
    let (known, rest) = packet.split_at_mut(got - 4);
    known.copy_from_slice(&code[..got - 4]);
    stream.read_exact(rest).await.map_err(closed)?;
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
pub(crate) fn acceptor(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::stream::Tunnel;

    fn tunnel(io: tokio::io::DuplexStream) -> ClientStream {
        ClientStream::Tunnel(Tunnel {
            io: Box::new(io),
            secure: false,
            local_is_loopback: true,
        })
    }

    fn startup_packet() -> Vec<u8> {
        let body = b"\0\x03\0\0user\0authenticated\0database\0app\0\0";
        let mut packet = u32::try_from(body.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        packet.extend_from_slice(body);
        packet
    }

    #[tokio::test]
    async fn a_startup_packet_is_read_whole_however_it_is_cut_and_nothing_after_it() {
        let packet = startup_packet();
        let mut sent = packet.clone();
        sent.extend_from_slice(b"p\0\0\0\x08abc\0");
        for cut in [1, 3, 4, 5, 8, 9, sent.len()] {
            let (mut peer, ours) = tokio::io::duplex(64);
            let mut ours = tunnel(ours);
            let sending = sent.clone();
            let writer = tokio::spawn(async move {
                for piece in sending.chunks(cut) {
                    peer.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
                peer
            });
            let read = read_startup_packet(&mut ours).await;
            let got = read.unwrap_or_else(|r| panic!("cut {cut}: {}", r.message));
            assert_eq!(got.as_deref(), Some(&packet[4..]), "cut {cut}");
            let _peer = writer.await.unwrap();
            let mut after = [0u8; 9];
            ours.read_exact(&mut after).await.unwrap();
            assert_eq!(
                &after, b"p\0\0\0\x08abc\0",
                "cut {cut}: the password stays unread"
            );
        }
    }

    #[tokio::test]
    async fn a_startup_packet_too_short_is_refused_on_its_length_alone() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut ours = tunnel(ours);
        peer.write_all(&7u32.to_be_bytes()).await.unwrap();
        let refusal = read_startup_packet(&mut ours).await.unwrap_err();
        assert!(
            refusal.message.contains("invalid length"),
            "{}",
            refusal.message
        );
        drop(peer);
        let (_, ours) = tokio::io::duplex(64);
        assert!(matches!(
            read_startup_packet(&mut tunnel(ours)).await,
            Ok(None)
        ));
    }
}
