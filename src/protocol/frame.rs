//! Message framing: the five-byte header (kind, then a length that counts
//! itself) every message after startup begins with, and [`Frame`], one
//! whole message read from a stream.
//!
//! Every reader of the proxy's shares the header parsing here. [`Frame`]
//! reads exactly one message and not a byte more, so that what follows it
//! stays in the stream for whoever reads next (the relay, after startup);
//! and it checks the declared length against a maximum before reading the
//! body. The relay frames its streams in place instead, without copying
//! (`session::relay::Frames`), with the same [`Header::parse`].

use std::io;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The kind byte and the length field.
pub(crate) const HEADER_LEN: usize = 5;

/// The largest backend message the proxy reads for itself (answers during
/// login, to its own queries and settings, to `rlsgate check`'s catalog
/// queries): far above any of them, so a length beyond it is a broken or
/// hostile server, turned away before its body is read.
pub(crate) const MAX_BACKEND_MESSAGE: usize = 16 << 20;

/// Message kinds the proxy looks for when it reads.
pub(crate) mod kind {
    /// Frontend: the client says goodbye.
    pub(crate) const TERMINATE: u8 = b'X';
    /// Frontend: the cleartext password (and SASL responses).
    pub(crate) const PASSWORD: u8 = b'p';
    pub(crate) const PARAMETER_STATUS: u8 = b'S';
}

/// A message header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: u8,
    /// The length field less its own four bytes.
    pub(crate) body_len: usize,
}

impl Header {
    /// `None` when the length field is below 4: it counts itself, so no
    /// message can declare less.
    pub(crate) fn parse(header: [u8; HEADER_LEN]) -> Option<Header> {
        let [kind, len @ ..] = header;
        let body_len = (u32::from_be_bytes(len) as usize).checked_sub(4)?;
        Some(Header { kind, body_len })
    }
}

/// One whole message as it came: header and body.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    raw: BytesMut,
}

impl Frame {
    /// Reads the next message, refusing one whose body is longer than
    /// `max_body` before reading it.
    pub(crate) async fn read(
        stream: &mut (impl AsyncRead + Unpin),
        max_body: usize,
    ) -> io::Result<Frame> {
        let header = read_header(stream).await?;
        let parsed = Header::parse(header)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad frame length"))?;
        if parsed.body_len > max_body {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a message of {} bytes, more than the {max_body} the proxy reads",
                    parsed.body_len
                ),
            ));
        }
        let mut raw = BytesMut::from(&header[..]);
        read_body_into(stream, parsed.body_len, &mut raw).await?;
        Ok(Frame { raw })
    }

    /// A frame of bytes already known to hold one whole message.
    #[cfg(test)]
    pub(crate) fn from_raw(raw: BytesMut) -> Frame {
        Frame { raw }
    }

    pub(crate) fn kind(&self) -> u8 {
        self.raw[0]
    }

    /// Everything after the header.
    pub(crate) fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The whole message, header included, to pass on as it came.
    pub(crate) fn into_raw(self) -> BytesMut {
        self.raw
    }

    /// The message parsed as a backend message.
    pub(crate) fn into_message(mut self) -> io::Result<Message> {
        Message::parse(&mut self.raw)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated message"))
    }
}

/// The next message's header, for a reader that checks it itself before
/// reading the body (the front door's password).
pub(crate) async fn read_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> io::Result<[u8; HEADER_LEN]> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    Ok(header)
}

/// A body of `len` bytes whose length was already checked.
pub(crate) async fn read_body(
    stream: &mut (impl AsyncRead + Unpin),
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut body = BytesMut::new();
    read_body_into(stream, len, &mut body).await?;
    Ok(body.into())
}

/// Appends `len` bytes to `out`, growing it as they arrive rather than by
/// the declared length at once.
async fn read_body_into(
    stream: &mut (impl AsyncRead + Unpin),
    len: usize,
    out: &mut BytesMut,
) -> io::Result<()> {
    const CHUNK: usize = 8 * 1024;
    let wanted = out.len() + len;
    let mut body = stream.take(len as u64);
    while out.len() < wanted {
        out.reserve((wanted - out.len()).min(CHUNK));
        if body.read_buf(out).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
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
    fn a_length_below_four_is_no_header() {
        assert_eq!(Header::parse([b'D', 0, 0, 0, 3]), None);
        assert_eq!(
            Header::parse([b'Z', 0, 0, 0, 5]),
            Some(Header {
                kind: b'Z',
                body_len: 1
            })
        );
    }

    #[tokio::test]
    async fn a_frame_is_read_whole_and_what_follows_stays_in_the_stream() {
        let stream = [message(b'Z', b"I"), message(b'S', b"a\0b\0")].concat();
        let mut reader = &stream[..];
        let first = Frame::read(&mut reader, 100).await.unwrap();
        assert_eq!(first.kind(), b'Z');
        assert_eq!(first.body(), b"I");
        assert_eq!(reader, &message(b'S', b"a\0b\0")[..]);
        let second = Frame::read(&mut reader, 100).await.unwrap();
        assert_eq!(&second.into_raw()[..], &message(b'S', b"a\0b\0")[..]);
    }

    #[tokio::test]
    async fn a_declared_length_above_the_maximum_is_refused_before_its_body() {
        let mut reader = &[b'D', 0x7f, 0xff, 0xff, 0xff][..];
        let error = Frame::read(&mut reader, 1024).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let mut reader = &[b'D', 0, 0, 0, 3][..];
        let error = Frame::read(&mut reader, 1024).await.unwrap_err();
        assert_eq!(error.to_string(), "bad frame length");
    }

    #[tokio::test]
    async fn a_message_cut_short_is_an_unexpected_end() {
        let whole = message(b'D', b"hello");
        let mut reader = &whole[..whole.len() - 1];
        let error = Frame::read(&mut reader, 100).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
