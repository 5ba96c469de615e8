//! The WebSocket tunnel: the Postgres protocol as one byte stream in binary
//! frames (a message may span frames, a frame may hold several), served by
//! the same front door, token check, upstream session and relay as a TCP
//! client, under the same limits. The driver's pipelined first frame
//! (startup, password and first query before any reply) is simply bytes
//! the front door finds already there.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::http::{LOG_TARGET, Peer};
use crate::session::connection::{self, Services};
use crate::session::listener::Sessions;
use crate::session::stream::{ClientStream, Tunnel};

/// Upgrades the request and serves the tunnel as a wire connection.
pub(super) fn accept(
    upgrade: WebSocketUpgrade,
    services: Arc<Services>,
    peer: Peer,
    sessions: Sessions,
) -> Response {
    upgrade
        .on_failed_upgrade(|e| {
            tracing::debug!(target: LOG_TARGET, error = %e, "WebSocket upgrade failed");
        })
        .on_upgrade(move |socket| async move {
            let _open = sessions.open();
            let mut client = ClientStream::Tunnel(Tunnel {
                io: Box::new(Frames::new(socket)),
                secure: peer.tls,
                local_is_loopback: peer.local_is_loopback,
            });
            let startup = match sessions.startup_slot(peer.address.ip(), &services) {
                Ok(slot) => slot,
                Err(refusal) => {
                    tracing::info!(target: LOG_TARGET, client = %peer.address.ip(), error = %refusal, "refused a tunnel");
                    let mut out = BytesMut::new();
                    refusal.encode(&mut out);
                    let _ = client.write_all(&out).await;
                    let _ = client.shutdown().await;
                    return;
                }
            };
            let shutdown = sessions.shutdown();
            connection::serve(client, peer.address, services, startup, shutdown).await;
        })
}

/// A WebSocket read and written as bytes: binary frames in, one binary
/// frame per write out. A text frame is an error (closed with 1003); a close frame is the
/// end of the stream.
struct Frames {
    socket: WebSocket,
    /// What is left of the last frame read.
    unread: Bytes,
}

impl Frames {
    fn new(socket: WebSocket) -> Frames {
        Frames {
            socket,
            unread: Bytes::new(),
        }
    }
}

impl Frames {
    /// Closes with 1003 (unsupported data), so that the client learns why,
    /// as far as the socket takes it at once: the stream ends regardless.
    fn refuse_text(&mut self, cx: &mut Context<'_>) {
        let socket = &mut self.socket;
        if let Poll::Ready(Ok(())) = Pin::new(&mut *socket).poll_ready(cx) {
            let close = Message::Close(Some(CloseFrame {
                code: close_code::UNSUPPORTED,
                reason: "rlsgate's tunnel carries binary frames only".into(),
            }));
            if Pin::new(&mut *socket).start_send(close).is_ok() {
                let _ = Pin::new(socket).poll_flush(cx);
            }
        }
    }
}

fn broken(e: axum::Error) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl AsyncRead for Frames {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(Pin::new(&mut this.socket).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(bytes))) => this.unread = bytes,
                Some(Ok(Message::Text(_))) => {
                    this.refuse_text(cx);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame: the tunnel carries binary frames only",
                    )));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Frames {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = &mut self.get_mut().socket;
        ready!(Pin::new(&mut *socket).poll_ready(cx)).map_err(broken)?;
        let frame = Message::Binary(Bytes::copy_from_slice(buf));
        Pin::new(socket).start_send(frame).map_err(broken)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket)
            .poll_flush(cx)
            .map_err(broken)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket)
            .poll_close(cx)
            .map_err(broken)
    }
}
