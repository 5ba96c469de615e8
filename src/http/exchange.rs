//! One request's round trip on a lent upstream connection.
//!
//! Everything is written at once, as three parts:
//!
//! 1. `set_config` of the request's signed envelope (and, for a batch, the
//!    `default_transaction_*` settings its transaction starts with), as
//!    bound parameters, then Sync;
//! 2. each statement (Parse, Bind, Describe, Execute), then one Sync: the
//!    statements share one transaction, which the first error rolls back;
//! 3. `DISCARD ALL`, which returns every setting (the envelope included)
//!    to its startup value and drops temporary tables, prepared statements,
//!    cursors, advisory locks and `LISTEN`s.
//!
//! So a request costs one round trip. Only a request that leaves a
//! transaction open (a lone `BEGIN`) costs a second: its `DISCARD ALL`
//! fails inside the transaction, and `ROLLBACK` then `DISCARD ALL` follow.
//! The statements run after a Sync of their own rather than in the
//! envelope's transaction so that they behave as they would alone (a
//! `VACUUM` must not be inside a pipelined transaction); should binding the
//! envelope fail, they run with the startup value, which the `auth`
//! functions refuse, and the request is answered with the failure.

use std::io;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncWriteExt, BufReader};

use crate::auth::claims;
use crate::http::json::{DbError, Encoder, TooLarge};
use crate::http::request::{BatchOptions, Payload};
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::session::stream::UpstreamStream;

/// Why a request's connection cannot go back to the pool.
#[derive(Debug, thiserror::Error)]
pub(super) enum Spoiled {
    /// The connection failed, or the backend said something out of place.
    /// `answered`: whether anything came back; if nothing did, nothing ran.
    #[error("{reason}")]
    Lost { reason: String, answered: bool },
    #[error("the response is larger than [http] max_response_bytes")]
    TooLarge,
    /// COPY has no place in a request: there is nothing to copy from or to.
    #[error("COPY is not supported over HTTP")]
    Copy,
}

/// The database's answer: `Ok` when every statement ran (the encoder holds
/// the results), else the error that stopped them.
pub(super) type Answer = Result<(), DbError>;

/// Runs `payload` with `envelope` bound, leaving the connection clean and
/// idle unless it returns an error.
pub(super) async fn run(
    stream: &mut UpstreamStream,
    envelope: &str,
    payload: &Payload,
    batch: &BatchOptions,
    encoder: &mut Encoder,
) -> Result<Answer, Spoiled> {
    let out = compose(envelope, payload, batch).map_err(|e| Spoiled::Lost {
        reason: e.to_string(),
        answered: false,
    })?;
    let lost = |e: io::Error| Spoiled::Lost {
        reason: e.to_string(),
        answered: false,
    };
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    let mut reader = Reader {
        inner: BufReader::with_capacity(16 * 1024, stream),
        answered: false,
    };
    let bound = reader.settings().await?;
    let answer = reader.statements(payload, encoder).await?;
    let open = reader.discarded().await?;
    if open {
        reader.rollback_and_discard().await?;
    }
    if !reader.inner.buffer().is_empty() {
        return Err(reader.lost("the backend sent more than was asked"));
    }
    match bound {
        Ok(()) => Ok(answer),
        Err(why) => Err(Spoiled::Lost {
            reason: format!("binding the request's claims failed: {why}"),
            answered: true,
        }),
    }
}

/// The three parts, in one buffer.
fn compose(envelope: &str, payload: &Payload, batch: &BatchOptions) -> io::Result<BytesMut> {
    let mut out = BytesMut::with_capacity(1024);
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut settings = vec![(claims::SETTING, envelope)];
    if let Payload::Batch(_) = payload {
        if let Some((level, _)) = batch.isolation {
            settings.push(("default_transaction_isolation", level));
        }
        if let Some(read_only) = batch.read_only {
            settings.push(("default_transaction_read_only", on_off(read_only)));
        }
        if let Some(deferrable) = batch.deferrable {
            settings.push(("default_transaction_deferrable", on_off(deferrable)));
        }
    }
    messages::set_config(&mut out, "", settings)?;
    let statements = match payload {
        Payload::One(statement) => std::slice::from_ref(statement),
        Payload::Batch(statements) => statements,
    };
    for statement in statements {
        messages::statement(&mut out, &statement.text, &statement.params)?;
    }
    messages::sync(&mut out);
    messages::query(&mut out, "DISCARD ALL")?;
    Ok(out)
}

struct Reader<'a> {
    inner: BufReader<&'a mut UpstreamStream>,
    answered: bool,
}

impl Reader<'_> {
    fn lost(&self, reason: impl Into<String>) -> Spoiled {
        Spoiled::Lost {
            reason: reason.into(),
            answered: self.answered,
        }
    }

    /// The next message; notices, notifications and parameter reports
    /// (which a request's own `SET` causes) are passed over.
    async fn next(&mut self) -> Result<Frame, Spoiled> {
        loop {
            let frame = Frame::read(&mut self.inner, MAX_BACKEND_MESSAGE)
                .await
                .map_err(|e| self.lost(e.to_string()))?;
            self.answered = true;
            match frame.kind() {
                b'N' | b'A' | b'S' => continue,
                _ => return Ok(frame),
            }
        }
    }

    /// Part 1's answer: `Err` with the database's reason when a setting
    /// was refused.
    async fn settings(&mut self) -> Result<Result<(), String>, Spoiled> {
        let mut refused = None;
        loop {
            let frame = self.next().await?;
            match frame.kind() {
                b'1' | b'2' | b'D' | b'C' => {}
                b'E' => {
                    let error = DbError::from_frame(frame);
                    if error.is_fatal() {
                        return Err(self.lost("the backend ended the connection"));
                    }
                    refused = Some(format!("{} {}", error.code, error.message));
                }
                b'Z' => return Ok(refused.map_or(Ok(()), Err)),
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Part 2's answer, each statement's results passed to `encoder`.
    async fn statements(
        &mut self,
        payload: &Payload,
        encoder: &mut Encoder,
    ) -> Result<Answer, Spoiled> {
        let mut failed = None;
        let too_large = |_: TooLarge| Spoiled::TooLarge;
        if let Payload::Batch(_) = payload {
            encoder.begin_batch();
        }
        loop {
            let frame = self.next().await?;
            match frame.kind() {
                b'1' | b'2' => {}
                b'T' | b'n' => match frame.into_message() {
                    Ok(Message::RowDescription(fields)) => {
                        encoder.fields(Some(&fields)).map_err(too_large)?
                    }
                    Ok(Message::NoData) => encoder.fields(None).map_err(too_large)?,
                    _ => return Err(self.lost("a malformed RowDescription")),
                },
                b'D' => match frame.into_message() {
                    Ok(Message::DataRow(row)) => encoder.row(&row).map_err(too_large)?,
                    _ => return Err(self.lost("a malformed DataRow")),
                },
                b'C' => encoder
                    .complete(command_tag(frame.body()))
                    .map_err(too_large)?,
                b'I' => encoder.complete("").map_err(too_large)?,
                b'E' => {
                    let error = DbError::from_frame(frame);
                    if error.is_fatal() {
                        return Err(self.lost(format!("the backend ended: {}", error.message)));
                    }
                    failed = Some(error);
                }
                b'G' | b'H' | b'W' => return Err(Spoiled::Copy),
                b'Z' => {
                    if let Payload::Batch(_) = payload {
                        encoder.end_batch().map_err(too_large)?;
                    }
                    return Ok(failed.map_or(Ok(()), Err));
                }
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Part 3's answer: `true` when `DISCARD ALL` failed because the
    /// request left a transaction open.
    async fn discarded(&mut self) -> Result<bool, Spoiled> {
        let mut refused = false;
        loop {
            let frame = self.next().await?;
            match (frame.kind(), frame.body()) {
                (b'C', b"DISCARD ALL\0") => {}
                (b'E', _) => {
                    let error = DbError::from_frame(frame);
                    // 25001, or 25P02 in a transaction already failed.
                    if error.is_fatal() || !error.code.starts_with("25") {
                        return Err(self.lost(format!("DISCARD ALL failed: {}", error.code)));
                    }
                    refused = true;
                }
                (b'Z', [b'I']) if !refused => return Ok(false),
                (b'Z', [b'T' | b'E']) if refused => return Ok(true),
                (other, _) => return Err(self.unexpected(other)),
            }
        }
    }

    /// Ends the transaction a request left open, then `DISCARD ALL`.
    async fn rollback_and_discard(&mut self) -> Result<(), Spoiled> {
        let mut out = BytesMut::new();
        messages::query(&mut out, "ROLLBACK").map_err(|e| self.lost(e.to_string()))?;
        messages::query(&mut out, "DISCARD ALL").map_err(|e| self.lost(e.to_string()))?;
        let stream = self.inner.get_mut();
        let written = async {
            stream.write_all(&out).await?;
            stream.flush().await
        };
        written.await.map_err(|e| self.lost(e.to_string()))?;
        for expected in [&b"ROLLBACK\0"[..], b"DISCARD ALL\0"] {
            let frame = self.next().await?;
            if frame.kind() != b'C' || frame.body() != expected {
                return Err(self.unexpected(frame.kind()));
            }
            let frame = self.next().await?;
            if frame.kind() != b'Z' || frame.body() != b"I" {
                return Err(self.unexpected(frame.kind()));
            }
        }
        Ok(())
    }

    fn unexpected(&self, kind: u8) -> Spoiled {
        self.lost(format!("unexpected message {:?}", char::from(kind)))
    }
}

/// CommandComplete's tag, without its NUL.
fn command_tag(body: &[u8]) -> &str {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    std::str::from_utf8(tag).unwrap_or("")
}
