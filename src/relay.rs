//! The relay: bytes both ways, untouched. The server-to-client direction
//! tracks message boundaries (five header bytes per message, no parsing
//! beyond that) so that an ending — the token expiring, the proxy shutting
//! down — reaches the client as a whole FATAL message, never inside another.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::{Refusal, sqlstate};
use crate::shutdown::Shutdown;
use crate::stream::{ClientStream, UpstreamStream};
use crate::token_check::format_time;

const BUFFER: usize = 16 * 1024;
/// How long an ending waits for the upstream to finish the message in flight.
const FINISH_MESSAGE_GRACE: Duration = Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug)]
pub enum Ending {
    ClientClosed,
    UpstreamClosed,
    /// The token expired (unix seconds of its `exp`).
    TokenExpired(u64),
    ShuttingDown,
    Failed(io::Error),
}

/// When the session must end because its token does.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub at: Instant,
    pub exp: u64,
}

/// Bytes relayed each way: counted per read, for the session's log line,
/// and added to the proxy's counters (`rlsgate_relayed_bytes_total`) as they go.
pub struct Traffic {
    client_to_server: AtomicU64,
    server_to_client: AtomicU64,
    client_to_server_total: metrics::Counter,
    server_to_client_total: metrics::Counter,
}

impl Traffic {
    /// Counts into these totals as well as its own.
    pub fn new(client_to_server: metrics::Counter, server_to_client: metrics::Counter) -> Self {
        Traffic {
            client_to_server: AtomicU64::new(0),
            server_to_client: AtomicU64::new(0),
            client_to_server_total: client_to_server,
            server_to_client_total: server_to_client,
        }
    }

    /// Bytes relayed so far: (client to server, server to client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.client_to_server.load(Ordering::Relaxed),
            self.server_to_client.load(Ordering::Relaxed),
        )
    }

    fn to_server(&self, n: usize) {
        self.client_to_server.fetch_add(n as u64, Ordering::Relaxed);
        self.client_to_server_total.increment(n as u64);
    }

    fn to_client(&self, n: usize) {
        self.server_to_client.fetch_add(n as u64, Ordering::Relaxed);
        self.server_to_client_total.increment(n as u64);
    }
}

pub async fn run(
    client: ClientStream,
    upstream: UpstreamStream,
    expiry: Option<Expiry>,
    shutdown: &mut Shutdown,
    traffic: &Traffic,
) -> Ending {
    let (mut client_read, client_write) = tokio::io::split(client);
    let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let to_upstream = async {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) => return Ending::ClientClosed,
                Ok(n) => n,
                Err(e) => return Ending::Failed(e),
            };
            if let Err(e) = upstream_write.write_all(&buf[..n]).await {
                return Ending::Failed(e);
            }
            traffic.to_server(n);
        }
    };
    let to_client = to_client(upstream_read, client_write, expiry, shutdown, traffic);
    let ending = tokio::select! {
        ending = to_upstream => ending,
        ending = to_client => ending,
    };
    if matches!(ending, Ending::TokenExpired(_) | Ending::ShuttingDown) {
        // Terminate, so the backend ends cleanly and rolls back any open transaction.
        let _ = upstream_write.write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = upstream_write.flush().await;
    }
    ending
}

async fn to_client<R, W>(
    mut upstream: R,
    mut client: W,
    expiry: Option<Expiry>,
    shutdown: &mut Shutdown,
    traffic: &Traffic,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut frames = Frames::default();
    let mut ending: Option<Ending> = None;
    let grace = tokio::time::sleep_until(far_future());
    tokio::pin!(grace);
    let expires = tokio::time::sleep_until(expiry.map_or_else(far_future, |e| e.at));
    tokio::pin!(expires);

    loop {
        if let Some(reason) = ending.take() {
            if frames.at_boundary() {
                return end_with_fatal(&mut client, reason).await;
            }
            ending = Some(reason);
        }
        tokio::select! {
            read = upstream.read(&mut buf) => {
                let n = match read {
                    Ok(0) => return Ending::UpstreamClosed,
                    Ok(n) => n,
                    Err(e) => return Ending::Failed(e),
                };
                let stop = ending.is_some();
                let Some(take) = frames.consume(&buf[..n], stop) else {
                    return Ending::Failed(io::Error::new(io::ErrorKind::InvalidData, "malformed message from upstream"));
                };
                if let Err(e) = write(&mut client, &buf[..take]).await {
                    return Ending::Failed(e);
                }
                traffic.to_client(take);
            }
            () = &mut expires, if ending.is_none() && expiry.is_some() => {
                ending = expiry.map(|e| Ending::TokenExpired(e.exp));
                grace.as_mut().reset(Instant::now() + FINISH_MESSAGE_GRACE);
            }
            () = shutdown.recv(), if ending.is_none() && !shutdown.is_received() => {
                ending = Some(Ending::ShuttingDown);
                grace.as_mut().reset(Instant::now() + FINISH_MESSAGE_GRACE);
            }
            () = &mut grace => {
                // The upstream stalled mid-message: close without a message
                // rather than break the protocol.
                return ending.unwrap_or(Ending::UpstreamClosed);
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

async fn write<W: AsyncWrite + Unpin>(client: &mut W, bytes: &[u8]) -> io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

async fn end_with_fatal<W: AsyncWrite + Unpin>(client: &mut W, reason: Ending) -> Ending {
    let refusal = match &reason {
        Ending::TokenExpired(exp) => {
            Refusal::auth(format!("token expired at {}", format_time(*exp)))
        }
        _ => Refusal::new(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection: rlsgate is shutting down",
        ),
    };
    let mut out = BytesMut::new();
    refusal.encode(&mut out);
    let _ = write(client, &out).await;
    let _ = client.shutdown().await;
    reason
}

/// Message boundaries in the server-to-client byte stream.
///
/// Public so that the framing can be exercised on its own (the fuzz target
/// in `fuzz/`), without sockets.
#[derive(Debug, Default)]
pub struct Frames {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Frames {
    /// Whether the bytes consumed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Walks `bytes`, returning how many belong to the stream: all of them,
    /// or with `stop_at_boundary` only up to the end of the current message.
    /// `None` when a length field is impossible.
    pub fn consume(&mut self, bytes: &[u8], stop_at_boundary: bool) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() {
            if self.body_left > 0 {
                let take = self.body_left.min(bytes.len() - at);
                self.body_left -= take;
                at += take;
                continue;
            }
            if stop_at_boundary && self.header_len == 0 {
                return Some(at);
            }
            self.header[self.header_len] = bytes[at];
            self.header_len += 1;
            at += 1;
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.body_left = (len as usize).checked_sub(4)?;
                self.header_len = 0;
            }
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn boundaries_are_found_across_chunk_splits() {
        let mut stream = message(b'D', b"hello");
        stream.extend(message(b'1', b""));
        stream.extend(message(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut frames = Frames::default();
            assert_eq!(frames.consume(&stream[..split], false), Some(split));
            assert_eq!(
                frames.consume(&stream[split..], false),
                Some(stream.len() - split)
            );
            assert!(frames.at_boundary());
        }
    }

    #[test]
    fn stopping_cuts_after_the_message_in_flight() {
        let first = message(b'D', b"hello");
        let mut stream = first.clone();
        stream.extend(message(b'Z', b"I"));
        let mut frames = Frames::default();
        assert_eq!(frames.consume(&stream[..3], false), Some(3));
        assert!(!frames.at_boundary());
        assert_eq!(frames.consume(&stream[3..], true), Some(first.len() - 3));
        assert!(frames.at_boundary());
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut frames = Frames::default();
        assert_eq!(frames.consume(&[b'D', 0, 0, 0, 3], false), None);
    }
}
