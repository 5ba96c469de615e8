//! The relay: bytes both ways, untouched. Both directions track message
//! boundaries (five header bytes per message, no parsing beyond that) so
//! that an ending — the token expiring, the proxy shutting down — reaches
//! the client as a whole FATAL message, never inside another; so that the
//! proxy knows whether a statement is still running when a session ends;
//! and so that it can replace the session's envelope while it is idle.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::claims::{self, Envelope};
use crate::auth::token_check::format_time;
use crate::clock::unix_now;
use crate::protocol::frame::{HEADER_LEN, Header, kind};
use crate::protocol::messages;
use crate::protocol::refusal::{Refusal, sqlstate};
use crate::session::shutdown::Shutdown;
use crate::session::stream::{ClientStream, UpstreamStream};

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::relay=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::relay";

const BUFFER: usize = 16 * 1024;
/// How long an ending waits for the upstream to finish the message in flight.
const FINISH_MESSAGE_GRACE: Duration = Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum Ending {
    ClientClosed,
    UpstreamClosed,
    /// The token expired (unix seconds of its `exp`).
    TokenExpired(u64),
    ShuttingDown,
    /// Reading from or writing to that side failed, or it broke the protocol.
    #[allow(
        dead_code,
        reason = "read through Debug in the session's closing log line"
    )]
    Failed(Side, io::Error),
}

/// One side of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

/// When the session must end because its token does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry {
    pub(crate) at: Instant,
    pub(crate) exp: u64,
}

/// Bytes relayed each way: counted per read, for the session's log line,
/// and added to the proxy's counters (`rlsgate_relayed_bytes_total`) as they go.
pub(crate) struct Traffic {
    client_to_server: AtomicU64,
    server_to_client: AtomicU64,
    client_to_server_total: metrics::Counter,
    server_to_client_total: metrics::Counter,
}

impl Traffic {
    /// Counts into these totals as well as its own.
    pub(crate) fn new(
        client_to_server: metrics::Counter,
        server_to_client: metrics::Counter,
    ) -> Self {
        Traffic {
            client_to_server: AtomicU64::new(0),
            server_to_client: AtomicU64::new(0),
            client_to_server_total: client_to_server,
            server_to_client_total: server_to_client,
        }
    }

    /// Bytes relayed so far: (client to server, server to client).
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.client_to_server.load(Ordering::Relaxed),
            self.server_to_client.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn to_server(&self, n: usize) {
        self.client_to_server.fetch_add(n as u64, Ordering::Relaxed);
        self.client_to_server_total.increment(n as u64);
    }

    pub(crate) fn to_client(&self, n: usize) {
        self.server_to_client.fetch_add(n as u64, Ordering::Relaxed);
        self.server_to_client_total.increment(n as u64);
    }
}

/// What a session's relay needs besides its two streams.
pub(crate) struct Plan {
    /// When the session ends with its token, if it does.
    pub(crate) expiry: Option<Expiry>,
    /// The backend outlives the session: the client's Terminate is kept
    /// from it.
    pub(crate) pooled: bool,
    /// The session's envelope, replaced when due.
    pub(crate) envelope: Envelope,
    /// Requests to have answered before the relay stops, at the next
    /// request that finds the session idle, for its streams to move onto
    /// io_uring ([`Relayed::Moving`]); `None`: it never stops for that.
    pub(crate) move_after: Option<u64>,
    /// What the client sent that the relay takes before it reads: the
    /// request that stopped the relay before a move.
    pub(crate) first: Vec<u8>,
}

/// What a relay came to: the session ended, or the relay stopped for the
/// session's streams to move onto io_uring, at message boundaries both
/// ways with nothing in flight, and a fresh relay takes over from there
/// with the rest of the plan.
pub(crate) enum Relayed {
    Finished(Finish),
    Moving(Box<Move>),
}

/// A session stopped for its streams to move ([`Relayed::Moving`]).
pub(crate) struct Move {
    pub(crate) client: ClientStream,
    /// The plan of the relay to come, the stopping request in `first`.
    pub(crate) rest: Plan,
}

/// What the client's direction stopped for.
enum ClientStep {
    Ended(Ending),
    /// The request read (see [`Plan::first`]).
    Moving(Vec<u8>),
}

/// How a session ended, and the state it left its backend in.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) ending: Ending,
    /// The client said goodbye (Terminate or end of stream) right after a
    /// ReadyForQuery "idle" that answered everything it had sent: a pooled
    /// backend can serve another client.
    pub(crate) clean: bool,
    /// Something the client sent was still unanswered: a statement may be
    /// running on the backend, and must be cancelled rather than left to
    /// finish (and commit) after its session ended.
    pub(crate) in_flight: bool,
}

/// What the two directions of a session tell each other.
struct Shared {
    /// ReadyForQuery messages passed to the client.
    answered: AtomicU64,
    /// The transaction status of the last ReadyForQuery.
    status: AtomicU8,
    /// Answers to the proxy's own messages (ReadyForQuery each) still to be
    /// taken out of the server's stream.
    swallow: AtomicU32,
    /// The proxy is ending the session and telling the client why (token
    /// expiry, shutdown): the client leaving after that is its answer.
    telling: AtomicBool,
    /// The server's direction is waiting for the server, at a message
    /// boundary with nothing held back, and is not ending the session.
    server_quiet: AtomicBool,
}

/// What a session's client has sent.
#[derive(Default)]
struct Sent {
    /// Messages that are each answered by one ReadyForQuery: Query, Sync,
    /// FunctionCall.
    syncs: u64,
    /// Something was sent after the last of those (or after Terminate).
    unsynced: bool,
    /// Syncs sent since the last Execute. If that Execute turns out to be a
    /// COPY FROM STDIN, the server ignores them (libpq sends one right after
    /// the Execute, before it knows), and the client's CopyDone or CopyFail
    /// says so.
    syncs_after_execute: u64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            answered: AtomicU64::new(0),
            status: AtomicU8::new(b'I'),
            swallow: AtomicU32::new(0),
            telling: AtomicBool::new(false),
            server_quiet: AtomicBool::new(true),
        }
    }

    /// Everything the client sent is answered, outside a transaction.
    fn idle(&self, sent: &Sent) -> bool {
        !sent.unsynced
            && self.swallow.load(Ordering::Relaxed) == 0
            && self.answered.load(Ordering::Relaxed) == sent.syncs
            && self.status.load(Ordering::Relaxed) == b'I'
    }
}

/// Relays a session both ways until one side ends it. Both directions are
/// framed (five header bytes per message, no parsing beyond that), so that
/// an ending reaches the client as a whole message, the client's Terminate
/// is known, the proxy can slip a fresh envelope in while the session is
/// idle, and what is still running when it ends is known.
pub(crate) async fn run(
    client: ClientStream,
    upstream: &mut UpstreamStream,
    plan: Plan,
    shutdown: &mut Shutdown,
    traffic: &Traffic,
) -> Relayed {
    let Plan {
        expiry,
        pooled,
        mut envelope,
        move_after,
        first,
    } = plan;
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let shared = Shared::new();
    let mut from_server = Frames::default();
    let mut from_client = Frames::default();
    let mut sent = Sent::default();
    let step = {
        let to_upstream = ClientSide {
            frames: &mut from_client,
            sent: &mut sent,
            shared: &shared,
            envelope: &mut envelope,
            pooled,
            move_after,
            traffic,
        }
        .run(&mut client_read, &mut upstream_write, first);
        let to_client = ServerSide {
            frames: &mut from_server,
            shared: &shared,
            traffic,
        }
        .run(&mut upstream_read, &mut client_write, expiry, shutdown);
        tokio::pin!(to_client);
        // Whichever side caused the end names it, even when the other's
        // reaction is seen as soon (one turn of an io_uring can complete
        // both): the client's goodbye first, before the server's close that
        // it caused; but once the proxy is telling the client why it ends
        // the session, the client leaving is its answer to that.
        tokio::select! {
            biased;
            step = to_upstream => match step {
                ClientStep::Ended(_) if shared.telling.load(Ordering::Relaxed) => {
                    ClientStep::Ended(to_client.await)
                }
                step => step,
            },
            ending = &mut to_client => ClientStep::Ended(ending),
        }
    };
    let ending = match step {
        ClientStep::Ended(ending) => ending,
        ClientStep::Moving(first) => {
            let client = client_read.unsplit(client_write);
            let rest = Plan {
                expiry,
                pooled,
                envelope,
                move_after: None,
                first,
            };
            return Relayed::Moving(Box::new(Move { client, rest }));
        }
    };
    let answered = shared.answered.load(Ordering::Relaxed);
    let in_flight = sent.unsynced || answered < sent.syncs;
    let clean = matches!(ending, Ending::ClientClosed)
        && from_client.at_boundary()
        && from_server.at_boundary()
        && shared.idle(&sent);
    Relayed::Finished(Finish {
        ending,
        clean,
        in_flight,
    })
}

/// The client-to-server direction.
struct ClientSide<'a> {
    frames: &'a mut Frames,
    sent: &'a mut Sent,
    shared: &'a Shared,
    envelope: &'a mut Envelope,
    pooled: bool,
    move_after: Option<u64>,
    traffic: &'a Traffic,
}

impl ClientSide<'_> {
    /// A partial header at the end of a read is held back until its type is
    /// known, so a pooled client's Terminate never reaches the backend, not
    /// even in part. `first` is taken as the first read.
    async fn run<R, W>(mut self, client: &mut R, upstream: &mut W, first: Vec<u8>) -> ClientStep
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // What is in `buf` is what was read and not yet forwarded: reads
        // append to it, into capacity never zeroed.
        let mut buf = Vec::with_capacity(BUFFER.max(first.len()));
        buf.extend_from_slice(&first);
        let mut pending = first.len();
        let mut held = 0;
        loop {
            let n = match std::mem::take(&mut pending) {
                0 => match client.read_buf(&mut buf).await {
                    Ok(0) => return ClientStep::Ended(Ending::ClientClosed),
                    Ok(n) => n,
                    Err(e) => return ClientStep::Ended(Ending::Failed(Side::Client, e)),
                },
                n => n,
            };
            if held == 0 && self.may_move() {
                return ClientStep::Moving(buf[..n].to_vec());
            }
            let failed = |side, e| ClientStep::Ended(Ending::Failed(side, e));
            if held == 0
                && self.frames.at_boundary()
                && let Err(e) = self.refresh_envelope(upstream).await
            {
                return failed(Side::Upstream, e);
            }
            let end = held + n;
            let (forward, terminated) = match self.frame(&buf[..end], held) {
                Ok(walked) => walked,
                Err(e) => return failed(Side::Client, e),
            };
            if let Err(e) = write(upstream, &buf[..forward]).await {
                return failed(Side::Upstream, e);
            }
            self.traffic.to_server(forward);
            if terminated {
                return ClientStep::Ended(Ending::ClientClosed);
            }
            held = end - forward;
            buf.copy_within(forward..end, 0);
            buf.truncate(held);
        }
    }

    /// Whether the relay stops before this request for the session's
    /// streams to move onto io_uring: it has had enough answered, and
    /// nothing is in flight either way, so that a fresh relay on the moved
    /// streams starts at message boundaries with nothing to carry over but
    /// the request.
    fn may_move(&self) -> bool {
        let answered = || self.shared.answered.load(Ordering::Relaxed);
        self.move_after.is_some_and(|after| answered() >= after)
            && self.frames.at_boundary()
            && self.shared.idle(self.sent)
            && self.shared.server_quiet.load(Ordering::Relaxed)
    }

    /// Walks the messages of `bytes` from `from` (what comes before was held
    /// back, already walked): how many bytes to forward now, and whether the
    /// client said goodbye.
    fn frame(&mut self, bytes: &[u8], from: usize) -> io::Result<(usize, bool)> {
        let malformed = |what| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut at = from;
        while at < bytes.len() {
            at += self
                .frames
                .consume(&bytes[at..], true)
                .ok_or_else(|| malformed("malformed message from client"))?;
            if !self.frames.at_boundary() {
                continue;
            }
            match self.frames.kind {
                kind::TERMINATE => {
                    if self.frames.body_len != 0 {
                        return Err(malformed("malformed Terminate from client"));
                    }
                    self.sent.unsynced |= at < bytes.len();
                    // A pooled backend outlives its client; any other ends
                    // cleanly when it reads the Terminate.
                    let forward = if self.pooled { at - HEADER_LEN } else { at };
                    return Ok((forward, true));
                }
                b'Q' | b'S' | b'F' => {
                    self.sent.syncs += 1;
                    self.sent.unsynced = false;
                    self.sent.syncs_after_execute += u64::from(self.frames.kind == b'S');
                }
                b'E' => {
                    self.sent.syncs_after_execute = 0;
                    self.sent.unsynced = true;
                }
                // COPY FROM STDIN's data and its end belong to the Query or
                // Execute that started it: answered by its ReadyForQuery.
                b'd' => {}
                b'c' | b'f' => {
                    self.sent.syncs -= std::mem::take(&mut self.sent.syncs_after_execute);
                }
                _ => self.sent.unsynced = true,
            }
        }
        Ok((bytes.len() - self.frames.header_len, false))
    }

    /// Sends a fresh envelope ahead of the client's next message when the
    /// current one is due and the session is idle: outside a transaction,
    /// so that no rollback can undo it, and with nothing in flight, so that
    /// its answer is the next thing the server says.
    async fn refresh_envelope<W: AsyncWrite + Unpin>(
        &mut self,
        upstream: &mut W,
    ) -> io::Result<()> {
        if !self.shared.idle(self.sent) {
            return Ok(());
        }
        let Some(sealed) = self.envelope.renew(unix_now()) else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        messages::set_config(
            &mut out,
            REFRESH_STATEMENT,
            [(claims::SETTING, sealed.as_str())],
        )?;
        self.shared.swallow.fetch_add(1, Ordering::Relaxed);
        write(upstream, &out).await
    }
}

/// The name of the statement that refreshes an envelope: named and closed
/// again, so that a client's unnamed statement survives it.
const REFRESH_STATEMENT: &str = "rlsgate_envelope_refresh";

/// The server-to-client direction.
struct ServerSide<'a> {
    frames: &'a mut Frames,
    shared: &'a Shared,
    traffic: &'a Traffic,
}

impl ServerSide<'_> {
    async fn run<R, W>(
        mut self,
        mut upstream: R,
        mut client: W,
        expiry: Option<Expiry>,
        shutdown: &mut Shutdown,
    ) -> Ending
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // As the client side's: what was read and not yet passed on.
        let mut buf = Vec::with_capacity(BUFFER);
        let mut held = 0;
        let mut filter = Filter::default();
        let mut ending: Option<Ending> = None;
        let grace = tokio::time::sleep_until(far_future());
        tokio::pin!(grace);
        let expires = tokio::time::sleep_until(expiry.map_or_else(far_future, |e| e.at));
        tokio::pin!(expires);

        loop {
            if let Some(reason) = ending.take() {
                // What is held back was not walked yet: it is dropped.
                if self.frames.at_boundary() {
                    self.shared.telling.store(true, Ordering::Relaxed);
                    return end_with_fatal(&mut client, reason).await;
                }
                ending = Some(reason);
            }
            tokio::select! {
                read = upstream.read_buf(&mut buf) => {
                    let n = match read {
                        Ok(0) => return Ending::UpstreamClosed,
                        Ok(n) => n,
                        Err(e) => return Ending::Failed(Side::Upstream, e),
                    };
                    self.shared.server_quiet.store(false, Ordering::Relaxed);
                    let end = held + n;
                    let (passed, taken) = match self.pass(&mut buf, end, ending.is_some(), &mut filter) {
                        Ok(walked) => walked,
                        Err(e) => return Ending::Failed(Side::Upstream, e),
                    };
                    if let Err(e) = write(&mut client, &buf[..passed]).await {
                        return Ending::Failed(Side::Client, e);
                    }
                    self.traffic.to_client(passed);
                    held = end - taken;
                    buf.copy_within(taken..end, 0);
                    buf.truncate(held);
                    let quiet = held == 0 && self.frames.at_boundary() && ending.is_none();
                    self.shared.server_quiet.store(quiet, Ordering::Relaxed);
                }
                () = &mut expires, if ending.is_none() && expiry.is_some() => {
                    ending = expiry.map(|e| Ending::TokenExpired(e.exp));
                    self.shared.server_quiet.store(false, Ordering::Relaxed);
                    grace.as_mut().reset(Instant::now() + FINISH_MESSAGE_GRACE);
                }
                () = shutdown.recv(), if ending.is_none() && !shutdown.is_received() => {
                    ending = Some(Ending::ShuttingDown);
                    self.shared.server_quiet.store(false, Ordering::Relaxed);
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

    /// Walks `buf[..end]`: moves what goes to the client to the front of
    /// `buf` and returns (its length, bytes walked). Bytes not walked (the
    /// rest after a boundary when `stop`, or a partial header while the
    /// proxy's own answers are being taken out) wait for the next read.
    fn pass(
        &mut self,
        buf: &mut [u8],
        end: usize,
        stop: bool,
        filter: &mut Filter,
    ) -> io::Result<(usize, usize)> {
        let malformed = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed message from upstream",
            )
        };
        if !filter.active(self.shared) {
            // The common case: the bytes go as they came.
            let taken = self
                .frames
                .consume(&buf[..end], stop)
                .ok_or_else(malformed)?;
            self.answered(filter);
            return Ok((taken, taken));
        }
        let (mut passed, mut at) = (0, 0);
        while at < end {
            let begins = self.frames.at_boundary();
            if begins && (end - at < 5 || (stop && at > 0)) {
                break;
            }
            let take = self
                .frames
                .consume(&buf[at..end], true)
                .ok_or_else(malformed)?;
            if begins {
                filter.dropping = filter.active(self.shared) && Filter::answers(self.frames.kind);
            }
            if !filter.dropping {
                buf.copy_within(at..at + take, passed);
                passed += take;
            }
            at += take;
            if filter.dropping && self.frames.at_boundary() {
                filter.dropped(self.frames.kind, self.shared);
            }
        }
        self.answered(filter);
        Ok((passed, at))
    }

    /// Publishes what the client has been answered, the proxy's own
    /// answers left out.
    fn answered(&self, filter: &Filter) {
        let own = filter.readies + u64::from(filter.dropping && self.frames.kind == b'Z');
        if self.frames.readies > own {
            self.shared
                .status
                .store(self.frames.status, Ordering::Relaxed);
        }
        self.shared
            .answered
            .store(self.frames.readies - own, Ordering::Relaxed);
    }
}

/// Takes the answers to the proxy's own messages out of the server's
/// stream; notices and notifications still reach the client.
#[derive(Default)]
struct Filter {
    /// The message in flight is an answer of the proxy's.
    dropping: bool,
    /// ReadyForQuery messages taken out so far.
    readies: u64,
}

impl Filter {
    fn active(&self, shared: &Shared) -> bool {
        self.dropping || shared.swallow.load(Ordering::Relaxed) > 0
    }

    /// What the proxy's own extended-protocol messages are answered with.
    fn answers(kind: u8) -> bool {
        matches!(kind, b'1' | b'2' | b'3' | b'D' | b'C' | b'E' | b'Z')
    }

    fn dropped(&mut self, kind: u8, shared: &Shared) {
        match kind {
            b'E' => {
                tracing::warn!(target: LOG_TARGET, "the session's envelope could not be refreshed")
            }
            b'Z' => {
                self.readies += 1;
                shared.swallow.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.dropping = false;
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

pub(crate) async fn write<W: AsyncWrite + Unpin>(client: &mut W, bytes: &[u8]) -> io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

pub(crate) async fn end_with_fatal<W: AsyncWrite + Unpin>(
    client: &mut W,
    reason: Ending,
) -> Ending {
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
/// It walks the relay's buffers in place, a read at a time, without copying
/// a message out, so it is not [`Frame`](crate::protocol::frame::Frame),
/// which reads one whole message for the proxy itself; the two share the
/// header parsing ([`Header::parse`]).
///
/// Public so that the framing can be exercised on its own (the fuzz target
/// in `fuzz/`), without sockets.
#[derive(Debug, Default)]
pub struct Frames {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// The body length of the message in flight, or of the last one.
    body_len: usize,
    body_left: usize,
    /// Type of the message in flight, or of the last one.
    kind: u8,
    /// The body of the message in flight has not begun.
    fresh_body: bool,
    /// ReadyForQuery messages seen.
    readies: u64,
    /// The transaction status of the last ReadyForQuery.
    status: u8,
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
                    if self.kind == b'Z' {
                        self.status = bytes[at];
                    }
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
            if self.header_len == HEADER_LEN {
                let header = Header::parse(self.header)?;
                self.body_len = header.body_len;
                self.body_left = header.body_len;
                self.header_len = 0;
                self.kind = header.kind;
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

    fn envelope() -> Envelope {
        let key = crate::auth::claims::SigningKey::from_bytes(vec![7; 32]).unwrap();
        let identity = crate::auth::claims::Identity {
            upstream_user: "authenticated".into(),
            claims: None,
            valid_until: crate::auth::claims::NO_EXPIRY,
            lifetime: crate::auth::claims::LIFETIME,
        };
        let backend = crate::auth::claims::Backend { pid: 1, started: 1 };
        // Fresh for the length of any test: never renewed.
        Envelope::new(key, identity, backend, unix_now() + 3600)
    }

    async fn client_side(reads: Vec<Vec<u8>>, pooled: bool) -> (Ending, Vec<u8>, Sent) {
        // An empty read is the end of the stream.
        let mut client = Reads(reads.into_iter().filter(|r| !r.is_empty()).collect());
        let mut upstream = Vec::new();
        let mut sent = Sent::default();
        let ending = ClientSide {
            frames: &mut Frames::default(),
            sent: &mut sent,
            shared: &Shared::new(),
            envelope: &mut envelope(),
            pooled,
            move_after: None,
            traffic: &Traffic::new(metrics::Counter::noop(), metrics::Counter::noop()),
        }
        .run(&mut client, &mut upstream, Vec::new())
        .await;
        let ClientStep::Ended(ending) = ending else {
            panic!("the relay stopped for a move it was not asked for");
        };
        (ending, upstream, sent)
    }

    async fn pooled_client(reads: Vec<Vec<u8>>) -> (Ending, Vec<u8>, Sent) {
        client_side(reads, true).await
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

    #[tokio::test]
    async fn an_unpooled_clients_terminate_reaches_the_backend_and_ends_the_session() {
        let mut stream = message(b'Q', b"select 1\0");
        stream.extend(message(b'X', b""));
        for split in 0..=stream.len() {
            let (ending, upstream, sent) = client_side(
                vec![stream[..split].to_vec(), stream[split..].to_vec()],
                false,
            )
            .await;
            assert!(matches!(ending, Ending::ClientClosed), "{ending:?}");
            assert_eq!(upstream, stream, "split at {split}");
            assert_eq!(sent.syncs, 1);
        }
    }

    #[tokio::test]
    async fn a_due_envelope_goes_ahead_of_the_next_message_only_when_the_session_is_idle() {
        let shared = Shared::new();
        let mut sent = Sent::default();
        let mut frames = Frames::default();
        // A minute left of an envelope that may be renewed: due.
        let now = unix_now();
        let mut due = Envelope::new(
            crate::auth::claims::SigningKey::from_bytes(vec![7; 32]).unwrap(),
            crate::auth::claims::Identity {
                upstream_user: "authenticated".into(),
                claims: None,
                valid_until: crate::auth::claims::NO_EXPIRY,
                lifetime: crate::auth::claims::LIFETIME,
            },
            crate::auth::claims::Backend { pid: 1, started: 1 },
            now + 60,
        );
        let traffic = Traffic::new(metrics::Counter::noop(), metrics::Counter::noop());
        let mut upstream = Vec::new();
        let mut side = ClientSide {
            frames: &mut frames,
            sent: &mut sent,
            shared: &shared,
            envelope: &mut due,
            pooled: false,
            move_after: None,
            traffic: &traffic,
        };
        // In a transaction: nothing goes ahead.
        shared.status.store(b'T', Ordering::Relaxed);
        side.refresh_envelope(&mut upstream).await.unwrap();
        assert!(upstream.is_empty());
        // Idle: the refresh goes, and its answer is to be taken out.
        shared.status.store(b'I', Ordering::Relaxed);
        side.refresh_envelope(&mut upstream).await.unwrap();
        assert_eq!(upstream[0], b'P', "a Parse first");
        assert_eq!(shared.swallow.load(Ordering::Relaxed), 1);
        let text = String::from_utf8_lossy(&upstream);
        assert!(text.contains(REFRESH_STATEMENT) && text.contains("rlsgate.session"));
        assert!(!text.contains("select 1"), "{text}");
        // Not again while its answer is outstanding.
        let before = upstream.len();
        side.refresh_envelope(&mut upstream).await.unwrap();
        assert_eq!(upstream.len(), before);
    }

    /// A client over an in-memory pipe of `capacity` bytes, and the
    /// pipe's far end; a backend over a Unix socket pair, and the server's
    /// end.
    #[cfg(unix)]
    fn streams(
        capacity: usize,
    ) -> (
        (ClientStream, tokio::io::DuplexStream),
        (UpstreamStream, tokio::net::UnixStream),
    ) {
        let (proxy_end, client) = tokio::io::duplex(capacity);
        let client_stream = ClientStream::Tunnel(crate::session::stream::Tunnel {
            io: Box::new(proxy_end),
            secure: false,
            local_is_loopback: true,
        });
        let (backend, server) = tokio::net::UnixStream::pair().unwrap();
        let upstream = UpstreamStream::Plain(crate::session::stream::Transport::Unix(backend));
        ((client_stream, client), (upstream, server))
    }

    /// [`run`] with a pooled backend, no shutdown coming and traffic
    /// counted nowhere.
    async fn relay(
        client: ClientStream,
        upstream: &mut UpstreamStream,
        (expiry, move_after): (Option<Expiry>, Option<u64>),
    ) -> Relayed {
        let plan = Plan {
            expiry,
            pooled: true,
            envelope: envelope(),
            move_after,
            first: Vec::new(),
        };
        let (_stop, stopping) = tokio::sync::broadcast::channel(1);
        let traffic = Traffic::new(metrics::Counter::noop(), metrics::Counter::noop());
        run(
            client,
            upstream,
            plan,
            &mut Shutdown::new(stopping),
            &traffic,
        )
        .await
    }

    /// The proxy's goodbye to a client whose token expired is written in
    /// pieces (the client reads slowly); the client reads the first and
    /// leaves at once. Its leaving and the failed rest of the write are
    /// then seen in the same poll: the session still ended because the
    /// token expired, and its backend is not clean.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_client_leaving_on_the_proxys_goodbye_leaves_the_ending_the_proxys() {
        let ((client_stream, mut client), (mut upstream, _server)) = streams(8);
        let leaving = tokio::spawn(async move {
            let mut first = [0u8; 8];
            client.read_exact(&mut first).await.unwrap();
            first[0]
        });
        let expiry = Expiry {
            at: Instant::now(),
            exp: 1,
        };
        let relayed = relay(client_stream, &mut upstream, (Some(expiry), None)).await;
        assert_eq!(leaving.await.unwrap(), b'E', "the client was told why");
        let Relayed::Finished(finish) = relayed else {
            panic!("the relay stopped for a move it was not asked for");
        };
        assert!(
            matches!(finish.ending, Ending::TokenExpired(1)),
            "{:?}",
            finish.ending
        );
        assert!(!finish.clean);
    }

    /// Asked to stop once one request is answered, the relay passes the
    /// second, sent inside the transaction the first began, and stops at
    /// the third, which finds the session idle: it hands that request back
    /// unsent, with the client's stream whole, for a fresh relay.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_relay_stops_for_a_move_only_at_a_request_that_finds_the_session_idle() {
        let ((client_stream, mut client), (mut upstream, mut server)) = streams(1024);
        let query = |sql: &str| message(b'Q', format!("{sql}\0").as_bytes());
        let answer =
            |tag: &[u8], status: &[u8]| [message(b'C', tag), message(b'Z', status)].concat();
        let third = query("select 1");
        let script = {
            let third = third.clone();
            tokio::spawn(async move {
                for (sql, answer) in [
                    (query("begin"), answer(b"BEGIN\0", b"T")),
                    (query("commit"), answer(b"COMMIT\0", b"I")),
                ] {
                    client.write_all(&sql).await.unwrap();
                    let mut got = vec![0u8; sql.len()];
                    let read = server.read_exact(&mut got);
                    tokio::time::timeout(Duration::from_secs(5), read)
                        .await
                        .expect("the request reaches the server")
                        .unwrap();
                    assert_eq!(got, sql);
                    server.write_all(&answer).await.unwrap();
                    let mut got = vec![0u8; answer.len()];
                    client.read_exact(&mut got).await.unwrap();
                }
                client.write_all(&third).await.unwrap();
                (client, server)
            })
        };
        let relayed = relay(client_stream, &mut upstream, (None, Some(1))).await;
        let (mut client, mut server) = script.await.unwrap();
        let Relayed::Moving(stopped) = relayed else {
            panic!("the relay did not stop for the move");
        };
        let Move {
            client: mut moved,
            rest,
        } = *stopped;
        assert_eq!(
            rest.first, third,
            "the request that found it idle comes back"
        );
        assert!(rest.move_after.is_none() && rest.pooled);
        // Nothing of it reached the server, and both streams still carry.
        moved.write_all(b"to the client").await.unwrap();
        let mut seen = [0u8; 13];
        client.read_exact(&mut seen).await.unwrap();
        assert_eq!(&seen, b"to the client");
        upstream.write_all(b"to the server").await.unwrap();
        server.read_exact(&mut seen).await.unwrap();
        assert_eq!(&seen, b"to the server", "the third request was never sent");
    }

    /// A notification the server has only half sent when the client's
    /// request arrives: the relay does not stop for a move mid-message, it
    /// passes the request, and the rest of the notification follows whole.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_relay_never_stops_for_a_move_inside_a_message_from_the_server() {
        let ((client_stream, mut client), (mut upstream, mut server)) = streams(1024);
        let notification = message(b'A', b"\0\0\0\x01chan\0hello\0");
        let request = message(b'Q', b"select 1\0");
        let script = {
            let (notification, request) = (notification.clone(), request.clone());
            tokio::spawn(async move {
                server.write_all(&notification[..8]).await.unwrap();
                let mut got = vec![0u8; notification.len()];
                client.read_exact(&mut got[..8]).await.unwrap();
                client.write_all(&request).await.unwrap();
                let mut sent = vec![0u8; request.len()];
                let read = server.read_exact(&mut sent);
                tokio::time::timeout(Duration::from_secs(5), read)
                    .await
                    .expect("the request reaches the server")
                    .unwrap();
                assert_eq!(sent, request);
                server.write_all(&notification[8..]).await.unwrap();
                client.read_exact(&mut got[8..]).await.unwrap();
                assert_eq!(got, notification, "the notification arrives whole");
                drop(client);
            })
        };
        let relayed = relay(client_stream, &mut upstream, (None, Some(0))).await;
        script.await.unwrap();
        assert!(matches!(relayed, Relayed::Finished(_)), "it never stopped");
    }

    #[test]
    fn the_proxys_own_answers_are_taken_out_and_everything_else_passes() {
        let shared = Shared::new();
        shared.swallow.store(1, Ordering::Relaxed);
        let mut frames = Frames::default();
        let traffic = Traffic::new(metrics::Counter::noop(), metrics::Counter::noop());
        let mut side = ServerSide {
            frames: &mut frames,
            shared: &shared,
            traffic: &traffic,
        };
        let notify = message(b'A', b"\0\0\0\x01chan\0hi\0");
        let mut stream = message(b'1', b"");
        stream.extend(message(b'2', b""));
        stream.extend(notify.clone());
        stream.extend(message(b'D', b"\0\x01\0\0\0\x01x"));
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'3', b""));
        stream.extend(message(b'Z', b"I"));
        let answer = [message(b'T', b"\0\0"), message(b'Z', b"I")].concat();
        stream.extend(answer.clone());
        for split in 0..stream.len() {
            let mut filter = Filter::default();
            shared.swallow.store(1, Ordering::Relaxed);
            *side.frames = Frames::default();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 256];
            let mut held = 0;
            for chunk in [&stream[..split], &stream[split..]] {
                buf[held..held + chunk.len()].copy_from_slice(chunk);
                let end = held + chunk.len();
                let (passed, taken) = side.pass(&mut buf, end, false, &mut filter).unwrap();
                out.extend_from_slice(&buf[..passed]);
                held = end - taken;
                buf.copy_within(taken..end, 0);
            }
            assert_eq!(held, 0, "split at {split}");
            assert_eq!(
                out,
                [notify.clone(), answer.clone()].concat(),
                "split at {split}"
            );
            assert_eq!(shared.swallow.load(Ordering::Relaxed), 0);
            assert_eq!(
                shared.answered.load(Ordering::Relaxed),
                1,
                "split at {split}"
            );
        }
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let mut frames = Frames::default();
        assert_eq!(frames.consume(&[b'D', 0, 0, 0, 3], false), None);
    }
}
