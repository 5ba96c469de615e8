//! Message framing: the five-byte header (kind, then a length that counts
//! itself) every message after startup begins with, and [`Frame`], one
//! whole message read from a stream.
//!
//! Every reader of the proxy's shares the header parsing here. [`Frame`]
//! reads exactly one message and not a byte more, so that what follows it
//! stays in the stream for whoever reads next (the relay, after startup);
//! and it checks the declared length against a maximum before reading the
//! body. [`Answer`] reads the answer to one of the proxy's own requests
//! through a buffer instead, and hands back what it read past it. The relay
//! frames its streams in place, without copying (`session::relay::Frames`),
//! with the same [`Header::parse`].

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
        let body_len = checked_body_len(header, max_body)?;
        let mut raw = BytesMut::from(&header[..]);
        read_body_into(stream, body_len, &mut raw).await?;
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

    /// The whole message, header included.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.raw
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

/// The answer to one of the proxy's own requests (binding claims, `DISCARD
/// ALL`), read through a buffer: each read takes what the stream has, so a
/// whole answer usually costs one system call instead of two per message.
///
/// A buffered read may take bytes past the answer's ReadyForQuery: a
/// NoticeResponse or ParameterStatus the server sends unasked. They are not
/// the answer's, so [`Answer::finish`] hands them back, completing a
/// message cut short (the server is sending the rest) and reading nothing
/// further, for the caller to pass on whole to whoever reads the stream
/// next. That is simpler and safer than never reading past the
/// ReadyForQuery: an error may end any answer early, so a reader that
/// stopped at it could never ask for more than a dozen bytes at a time; and
/// the leftover stays with the one caller that knows whose it is, instead
/// of in a prefix buffer every reader of the stream would have to drain.
pub(crate) struct Answer {
    buf: BytesMut,
    max_body: usize,
}

/// How much an [`Answer`] asks the stream for at least: more than any of
/// the proxy's own answers usually takes.
const ANSWER_READ: usize = 4 * 1024;

impl Answer {
    /// Refusing messages whose body is longer than `max_body` before their
    /// body is read.
    pub(crate) fn new(max_body: usize) -> Answer {
        Answer {
            buf: BytesMut::new(),
            max_body,
        }
    }

    /// The next message of the answer.
    pub(crate) async fn next(
        &mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> io::Result<Frame> {
        loop {
            let wanted = match self.pending(0)? {
                Pending::Whole(len) => {
                    return Ok(Frame {
                        raw: self.buf.split_to(len),
                    });
                }
                Pending::Short(missing) => missing,
            };
            // Grow by what the message still lacks, up to a chunk at a time,
            // not by its declared length at once.
            self.buf.reserve(wanted.clamp(ANSWER_READ, 8 * ANSWER_READ));
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The next message if it is already read whole: no I/O.
    pub(crate) fn buffered(&mut self) -> io::Result<Option<Frame>> {
        Ok(match self.pending(0)? {
            Pending::Whole(len) => Some(Frame {
                raw: self.buf.split_to(len),
            }),
            Pending::Short(_) => None,
        })
    }

    /// Whether part of a message is read and the rest still to come.
    pub(crate) fn is_midway(&self) -> bool {
        !self.buf.is_empty()
    }

    /// What was read past the last message taken: whole messages only, read
    /// to their end, and not a byte beyond.
    pub(crate) async fn finish(
        mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> io::Result<BytesMut> {
        let mut whole = 0;
        loop {
            match self.pending(whole)? {
                Pending::Whole(len) => whole += len,
                Pending::Short(_) if whole == self.buf.len() => return Ok(self.buf),
                Pending::Short(missing) => {
                    let mut rest = (&mut *stream).take(missing as u64);
                    self.buf.reserve(missing.min(8 * ANSWER_READ));
                    if rest.read_buf(&mut self.buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }

    /// Whether the buffer holds a whole message from `at` (its length), or
    /// how many bytes it still lacks at least.
    fn pending(&self, at: usize) -> io::Result<Pending> {
        let buffered = &self.buf[at..];
        let Some(header) = buffered.first_chunk::<HEADER_LEN>() else {
            return Ok(Pending::Short(HEADER_LEN - buffered.len()));
        };
        let body_len = checked_body_len(*header, self.max_body)?;
        let len = HEADER_LEN + body_len;
        Ok(match buffered.len().checked_sub(len) {
            Some(_) => Pending::Whole(len),
            None => Pending::Short(len - buffered.len()),
        })
    }
}

/// What [`Answer::pending`] found.
enum Pending {
    Whole(usize),
    Short(usize),
}

/// The body length a header declares, refused when it is below the length
/// field's own four bytes or above `max_body`.
fn checked_body_len(header: [u8; HEADER_LEN], max_body: usize) -> io::Result<usize> {
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
    Ok(parsed.body_len)
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

    /// Feeds `first`, lets the answer be read as far as it goes, then the
    /// rest of `bytes`; returns the kinds read up to ReadyForQuery, what
    /// `finish` handed back, and the reading side of the stream.
    async fn read_answer_split(
        bytes: Vec<u8>,
        at: usize,
    ) -> (
        Vec<u8>,
        BytesMut,
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
    ) {
        use tokio::io::AsyncWriteExt;
        let (mut server, mut proxy) = tokio::io::duplex(1 << 16);
        server.write_all(&bytes[..at]).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut answer = Answer::new(100);
            let mut kinds = Vec::new();
            loop {
                let frame = answer.next(&mut proxy).await.unwrap();
                kinds.push(frame.kind());
                if frame.kind() == b'Z' {
                    break;
                }
            }
            let unasked = answer.finish(&mut proxy).await.unwrap();
            (kinds, unasked, proxy)
        });
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        server.write_all(&bytes[at..]).await.unwrap();
        let (kinds, unasked, proxy) = reader.await.unwrap();
        (kinds, unasked, proxy, server)
    }

    #[tokio::test]
    async fn an_answer_split_anywhere_is_read_whole_and_nothing_past_it_is_lost() {
        use tokio::io::AsyncWriteExt;
        let answer = [
            message(b'1', b""),
            message(b'2', b""),
            message(b'D', b"\0\x01\0\0\0\x03abc"),
            message(b'C', b"SELECT 1\0"),
            message(b'Z', b"I"),
        ]
        .concat();
        let notice = message(b'N', b"SWARNING\0Mreloaded\0\0");
        let status = message(b'S', b"TimeZone\0UTC\0");
        let status_len = status.len();
        let unasked = [notice, status].concat();
        let next = message(b'A', b"\0\0\0\x01chan\0payload\0");
        let bytes = [answer.clone(), unasked.clone()].concat();
        for at in 0..=bytes.len() {
            let (kinds, got, mut proxy, mut server) = read_answer_split(bytes.clone(), at).await;
            assert_eq!(kinds, b"12DCZ", "split at {at}");
            // Whole messages past the ReadyForQuery, in order: none, or a
            // prefix of them; what was not read stays in the stream.
            assert!(unasked.starts_with(&got), "split at {at}: {got:?}");
            let boundaries = [0, unasked.len() - status_len, unasked.len()];
            assert!(boundaries.contains(&got.len()), "split at {at}: {got:?}");
            server.write_all(&next).await.unwrap();
            let mut rest = vec![0u8; unasked.len() - got.len() + next.len()];
            proxy.read_exact(&mut rest).await.unwrap();
            assert_eq!(
                [&got[..], &rest[..]].concat(),
                [&unasked[..], &next[..]].concat(),
                "split at {at}"
            );
        }
    }

    #[tokio::test]
    async fn an_answer_refuses_a_length_above_the_maximum_before_its_body() {
        let mut reader = &[b'D', 0x7f, 0xff, 0xff, 0xff][..];
        let error = Answer::new(1024).next(&mut reader).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let mut reader = &[message(b'Z', b"I"), vec![b'E', 0, 0, 0, 2]].concat()[..];
        let mut answer = Answer::new(1024);
        assert_eq!(answer.next(&mut reader).await.unwrap().kind(), b'Z');
        let error = answer.finish(&mut reader).await.unwrap_err();
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
