//! The relay: bytes both ways, untouched. The server-to-client direction
//! tracks message boundaries (five header bytes per message, no parsing
//! beyond that) so that an ending — the token expiring, the proxy shutting
//! down — reaches the client as a whole FATAL message, never inside another.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::{Refusal, sqlstate};
use crate::shutdown::Shutdown;
use crate::stream::{ClientStream, UpstreamStream};
use crate::token_check::format_time;

const BUFFER: usize = 16 * 1024;
/// A client's Terminate message.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
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
    // Whether the client's last bytes were a Terminate: the upstream then
    // closes, which may be seen before the client's own close.
    let said_goodbye = AtomicBool::new(false);
    let to_upstream = async {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) => return Ending::ClientClosed,
                Ok(n) => n,
                Err(e) => return Ending::Failed(e),
            };
            said_goodbye.store(buf[..n].ends_with(&TERMINATE), Ordering::Relaxed);
            // Flushed, as TLS may hold written bytes back until then.
            if let Err(e) = write(&mut upstream_write, &buf[..n]).await {
                return Ending::Failed(e);
            }
            traffic.to_server(n);
        }
    };
    let mut frames = Frames::default();
    let to_client = to_client(
        upstream_read,
        client_write,
        expiry,
        shutdown,
        &mut frames,
        traffic,
    );
    let ending = tokio::select! {
        ending = to_upstream => ending,
        ending = to_client => ending,
    };
    match ending {
        Ending::UpstreamClosed if said_goodbye.load(Ordering::Relaxed) => Ending::ClientClosed,
        Ending::TokenExpired(_) | Ending::ShuttingDown => {
            // Terminate, so the backend ends cleanly and rolls back any open transaction.
            let _ = write(&mut upstream_write, &TERMINATE).await;
            ending
        }
        ending => ending,
    }
}

async fn to_client<R, W>(
    mut upstream: R,
    mut client: W,
    expiry: Option<Expiry>,
    shutdown: &mut Shutdown,
    frames: &mut Frames,
    traffic: &Traffic,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
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

/// A pooled session: like [`run`], but the upstream connection outlives it.
/// The client-to-server direction is framed too, so that the client's
/// Terminate is kept from the backend and the session's last state is
/// known. Returns why the session ended and whether the backend was left
/// clean: the client said goodbye (Terminate or end of stream) right after
/// a ReadyForQuery "idle" that answered everything it had sent.
pub async fn run_pooled(
    client: ClientStream,
    upstream: &mut UpstreamStream,
    expiry: Option<Expiry>,
    shutdown: &mut Shutdown,
    traffic: &Traffic,
) -> (Ending, bool) {
    let (mut client_read, client_write) = tokio::io::split(client);
    let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut from_server = Frames::default();
    let mut from_client = Frames::default();
    let mut sent = Sent::default();
    let ending = {
        let to_upstream = to_upstream_pooled(
            &mut client_read,
            &mut upstream_write,
            &mut from_client,
            &mut sent,
            traffic,
        );
        let to_client = to_client(
            upstream_read,
            client_write,
            expiry,
            shutdown,
            &mut from_server,
            traffic,
        );
        tokio::select! {
            ending = to_upstream => ending,
            ending = to_client => ending,
        }
    };
    if matches!(ending, Ending::TokenExpired(_) | Ending::ShuttingDown) {
        let _ = write(&mut upstream_write, &TERMINATE).await;
        return (ending, false);
    }
    let clean = matches!(ending, Ending::ClientClosed)
        && from_client.at_boundary()
        && !sent.unsynced
        && from_server.at_boundary()
        && from_server.kind == b'Z'
        && from_server.first == b'I'
        && from_server.readies == sent.syncs;
    (ending, clean)
}

/// What a pooled session's client has sent.
#[derive(Default)]
struct Sent {
    /// Messages that are each answered by one ReadyForQuery: Query, Sync,
    /// FunctionCall.
    syncs: u64,
    /// Something was sent after the last of those (or after Terminate).
    unsynced: bool,
}

/// The client-to-server direction of a pooled session. A partial header at
/// the end of a read is held back until its type is known, so Terminate is
/// never forwarded, not even in part.
async fn to_upstream_pooled<R, W>(
    client: &mut R,
    upstream: &mut W,
    frames: &mut Frames,
    sent: &mut Sent,
    traffic: &Traffic,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut held = 0;
    loop {
        let n = match client.read(&mut buf[held..]).await {
            Ok(0) => return Ending::ClientClosed,
            Ok(n) => n,
            Err(e) => return Ending::Failed(e),
        };
        let end = held + n;
        let mut at = held;
        while at < end {
            let Some(take) = frames.consume(&buf[at..end], true) else {
                return Ending::Failed(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed message from client",
                ));
            };
            at += take;
            if !frames.at_boundary() {
                continue;
            }
            match frames.kind {
                b'X' => {
                    // Terminate has no body and its header was held back, so
                    // all of it is still here, unsent.
                    if frames.header != TERMINATE {
                        return Ending::Failed(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed Terminate from client",
                        ));
                    }
                    sent.unsynced |= at < end;
                    traffic.to_server(at - TERMINATE.len());
                    return match write(upstream, &buf[..at - TERMINATE.len()]).await {
                        Ok(()) => Ending::ClientClosed,
                        Err(e) => Ending::Failed(e),
                    };
                }
                b'Q' | b'S' | b'F' => {
                    sent.syncs += 1;
                    sent.unsynced = false;
                }
                _ => sent.unsynced = true,
            }
        }
        let keep = frames.header_len;
        if let Err(e) = write(upstream, &buf[..end - keep]).await {
            return Ending::Failed(e);
        }
        traffic.to_server(end - keep);
        buf.copy_within(end - keep..end, 0);
        held = keep;
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

/// Message boundaries in the server-to-client byte stream (and, for pooled
/// sessions, the client-to-server one).
///
/// Public so that the framing can be exercised on its own (the fuzz target
/// in `fuzz/`), without sockets.
#[derive(Debug, Default)]
pub struct Frames {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    /// Type of the message in flight, or of the last one.
    kind: u8,
    /// First body byte of the last message that had a body: the
    /// transaction status of a ReadyForQuery.
    first: u8,
    /// The body of the message in flight has not begun.
    fresh_body: bool,
    /// ReadyForQuery messages seen.
    readies: u64,
}

impl Frames {
    /// Whether the bytes consumed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Walks `bytes`, returning how many belong to the stream: all of them,
    /// or with `stop_at_boundary` only up to the end of the current message
    /// (the next one, when at a boundary). `None` when a length field is
    /// impossible.
    pub fn consume(&mut self, bytes: &[u8], stop_at_boundary: bool) -> Option<usize> {
        let mut at = 0;
        while at < bytes.len() {
            if self.body_left > 0 {
                if self.fresh_body {
                    self.first = bytes[at];
                    self.fresh_body = false;
                }
                let take = self.body_left.min(bytes.len() - at);
                self.body_left -= take;
                at += take;
                continue;
            }
            if stop_at_boundary && self.header_len == 0 && at > 0 {
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
                self.kind = self.header[0];
                self.fresh_body = self.body_left > 0;
                self.readies += u64::from(self.kind == b'Z');
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

    /// A client stream that arrives in these reads.
    struct Reads(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Reads {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some(read) = self.0.pop_front() {
                buf.put_slice(&read);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn pooled_client(reads: Vec<Vec<u8>>) -> (Ending, Vec<u8>, Sent) {
        // An empty read is the end of the stream.
        let mut client = Reads(reads.into_iter().filter(|r| !r.is_empty()).collect());
        let mut upstream = Vec::new();
        let mut sent = Sent::default();
        let ending = to_upstream_pooled(
            &mut client,
            &mut upstream,
            &mut Frames::default(),
            &mut sent,
            &Traffic::new(metrics::Counter::noop(), metrics::Counter::noop()),
        )
        .await;
        (ending, upstream, sent)
    }

    #[tokio::test]
    async fn a_pooled_clients_terminate_never_reaches_the_backend_however_it_is_split() {
        let query = message(b'Q', b"select 1\0");
        let mut stream = query.clone();
        stream.extend(message(b'X', b""));
        for split in 0..=stream.len() {
            let (ending, upstream, sent) =
                pooled_client(vec![stream[..split].to_vec(), stream[split..].to_vec()]).await;
            assert!(matches!(ending, Ending::ClientClosed), "{ending:?}");
            assert_eq!(upstream, query, "split at {split}");
            assert_eq!(sent.syncs, 1);
            assert!(!sent.unsynced);
        }
    }

    #[tokio::test]
    async fn a_pooled_client_that_sent_more_than_it_synced_is_unsynced() {
        let mut stream = message(b'P', b"\0select 1\0\0\0");
        stream.extend(message(b'X', b""));
        let (_, upstream, sent) = pooled_client(vec![stream]).await;
        assert_eq!(upstream, message(b'P', b"\0select 1\0\0\0"));
        assert_eq!(sent.syncs, 0);
        assert!(sent.unsynced);

        let mut stream = message(b'Q', b"select 1\0");
        stream.extend(message(b'X', b""));
        stream.extend(message(b'Q', b"select 2\0"));
        let (_, upstream, sent) = pooled_client(vec![stream]).await;
        assert_eq!(upstream, message(b'Q', b"select 1\0"));
        assert!(sent.unsynced, "something followed Terminate");
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut frames = Frames::default();
        assert_eq!(frames.consume(&[b'D', 0, 0, 0, 3], false), None);
    }
}
