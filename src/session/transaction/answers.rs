//! The server's side of a lease: what each answer belongs to, in the order
//! the answers come, so that the client gets the answers to its own
//! messages (and, in their turn, the ones the proxy makes up for it) and
//! never those of the proxy's own messages.
//!
//! Postgres answers messages in order, and after an error in an extended
//! query it skips everything up to the next Sync: so a queue of
//! expectations, one per message that is answered, is all it takes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::protocol::frame::Frame;
use crate::protocol::server_error::ServerError;
use crate::upstream::prepared::Prepared;

/// What the next answers from the server belong to.
pub(crate) enum Expect {
    /// A client's message of this type, passed on as it came: its answers
    /// reach the client. A Parse names the statement it prepares.
    Client {
        kind: u8,
        prepares: Option<Arc<str>>,
    },
    /// A Parse or Close the proxy sent on the client's behalf (to prepare
    /// one of its statements on this backend, or make room for one): a
    /// success is the proxy's, an error the client's.
    OnBehalf { prepares: Option<Arc<str>> },
    /// The proxy's own statements sent ahead of the client's first message
    /// without a Sync (reset and bind, see
    /// [`bind_ahead`](crate::protocol::messages::bind_ahead)), done after
    /// this many CommandCompletes: nothing of their answer reaches the
    /// client, an error ends the session, and the settings they report
    /// reach the client only as they stand when all are done.
    Ahead { commands: usize },
    /// An answer the proxy makes itself, given in its turn.
    Made(BytesMut),
    /// A refused message's stand-in, of this type, raising the refusal:
    /// answered as the client's message would be, its error without the
    /// stand-in's own context line.
    Raised { kind: u8 },
}

/// What a lease's statements did that its end must see to.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effects {
    /// `SET`, `RESET` or `DISCARD ALL` ran: the client's settings changed.
    pub(crate) settings: bool,
    /// SQL `PREPARE` or `DEALLOCATE` ran: they must not outlive the
    /// transaction, nor leave the proxy's statements unknown.
    pub(crate) sql_statements: bool,
    /// `DISCARD ALL` ran: the claims and the proxy's statements are gone.
    pub(crate) discarded: bool,
}

/// The answers of one lease.
pub(crate) struct Answers {
    queue: VecDeque<Expect>,
    /// The server skips the client's messages up to its next Sync, which
    /// the client has not sent yet: they get no expectation.
    skipping: bool,
    /// The transaction status of the last ReadyForQuery the client got.
    pub(crate) status: u8,
    pub(crate) effects: Effects,
    /// What the statements sent ahead reported, by setting name.
    held_reports: BTreeMap<Vec<u8>, Frame>,
}

/// The proxy's own statements failed: the session cannot go on.
pub(crate) struct OwnFailed(pub(crate) String);

impl Answers {
    pub(crate) fn new() -> Answers {
        Answers {
            queue: VecDeque::new(),
            skipping: false,
            status: b'I',
            effects: Effects::default(),
            held_reports: BTreeMap::new(),
        }
    }

    /// Statements sent ahead of the client's are not answered yet.
    pub(crate) fn ahead(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Ahead { .. }))
    }

    /// Everything sent is answered.
    pub(crate) fn settled(&self) -> bool {
        self.queue.is_empty() && !self.skipping
    }

    /// Expects the answer to a message just sent upstream (or, for
    /// [`Expect::Made`], gives it as soon as its turn comes: into `out`).
    pub(crate) fn expect(&mut self, expect: Expect, out: &mut BytesMut) {
        let sync = matches!(expect, Expect::Client { kind: b'S', .. });
        if self.skipping && !sync {
            // The server will skip the message: no answer comes, and none
            // may be made up for it.
            return;
        }
        self.skipping = false;
        self.queue.push_back(expect);
        self.give_made(out);
    }

    /// Drops up to `n` Syncs the client sent after its last Execute, when
    /// that Execute turned out to be COPY FROM STDIN: the server ignores
    /// them, and the client sends another after its CopyDone or CopyFail.
    pub(crate) fn forget_syncs(&mut self, n: u64) {
        for _ in 0..n {
            match self.queue.back() {
                Some(Expect::Client { kind: b'S', .. }) => {
                    self.queue.pop_back();
                }
                _ => break,
            }
        }
    }

    /// Takes one message from the server: what reaches the client goes to
    /// `out`; statements the backend confirms go to `prepared`.
    pub(crate) fn take(
        &mut self,
        frame: Frame,
        prepared: &mut Prepared,
        reports: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        out: &mut BytesMut,
    ) -> Result<(), OwnFailed> {
        let kind = frame.kind();
        match kind {
            // Whenever they come, for the client, and not for ours alone.
            b'N' | b'A' => {
                out.put_slice(frame.bytes());
                return Ok(());
            }
            b'S' if self.ahead() => {
                let name = frame.body().split(|&b| b == 0).next().unwrap_or_default();
                self.held_reports.insert(name.to_vec(), frame);
                return Ok(());
            }
            b'S' => {
                pass_report(&frame, reports, out);
                return Ok(());
            }
            _ => {}
        }
        self.give_made(out);
        let Some(head) = self.queue.front_mut() else {
            // Unasked (a FATAL error before the server hangs up).
            out.put_slice(frame.bytes());
            return Ok(());
        };
        match head {
            Expect::Ahead { commands } => {
                if kind == b'E' {
                    let error = ServerError::from_frame(frame);
                    return Err(OwnFailed(format!("{} {}", error.code, error.message)));
                }
                if kind == b'C' {
                    *commands = commands.saturating_sub(1);
                    if *commands == 0 {
                        self.queue.pop_front();
                        for (_, report) in std::mem::take(&mut self.held_reports) {
                            pass_report(&report, reports, out);
                        }
                    }
                }
            }
            Expect::OnBehalf { prepares } => match kind {
                b'1' | b'2' | b'3' => {
                    self.queue.pop_front();
                }
                _ => {
                    if let Some(name) = prepares.take() {
                        prepared.remove(&name);
                    }
                    out.put_slice(frame.bytes());
                    if kind == b'E' {
                        self.fail(prepared);
                    }
                }
            },
            Expect::Client { kind: sent, .. } | Expect::Raised { kind: sent } => {
                let sent = *sent;
                if kind == b'E' && matches!(head, Expect::Raised { .. }) {
                    put_without_context(&frame, out);
                } else {
                    out.put_slice(frame.bytes());
                }
                self.note(&frame, prepared);
                if kind == b'E' && !matches!(sent, b'Q' | b'F' | b'S') {
                    self.fail(prepared);
                } else if completes(sent, kind) {
                    if kind == b'Z' {
                        self.status = frame.body().first().copied().unwrap_or(b'I');
                    }
                    self.queue.pop_front();
                }
            }
            // Given above, before anything after it.
            Expect::Made(_) => {}
        }
        self.give_made(out);
        Ok(())
    }

    /// Records what a client's statement did (CommandComplete tags).
    fn note(&mut self, frame: &Frame, prepared: &mut Prepared) {
        if frame.kind() != b'C' {
            return;
        }
        let tag = frame.body().strip_suffix(b"\0").unwrap_or(frame.body());
        match tag {
            b"SET" | b"RESET" => self.effects.settings = true,
            b"DISCARD ALL" => {
                self.effects.settings = true;
                self.effects.discarded = true;
                prepared.clear();
            }
            b"PREPARE" | b"DEALLOCATE" => self.effects.sql_statements = true,
            b"DEALLOCATE ALL" => {
                self.effects.sql_statements = true;
                prepared.clear();
            }
            _ => {}
        }
    }

    /// An extended-query message failed: the server skips everything up
    /// to the next Sync, so nothing more comes for what lies before it.
    fn fail(&mut self, prepared: &mut Prepared) {
        let mut failed = true;
        while let Some(head) = self.queue.front() {
            match head {
                Expect::Client { kind: b'S', .. } if !failed => return,
                Expect::Client {
                    prepares: Some(name),
                    ..
                }
                | Expect::OnBehalf {
                    prepares: Some(name),
                } => prepared.remove(name),
                _ => {}
            }
            failed = false;
            self.queue.pop_front();
        }
        self.skipping = true;
    }

    fn give_made(&mut self, out: &mut BytesMut) {
        while let Some(Expect::Made(_)) = self.queue.front() {
            if let Some(Expect::Made(answer)) = self.queue.pop_front() {
                out.put_slice(&answer);
            }
        }
    }
}

/// Whether a message of type `answer` is the last of the answer to a
/// client's message of type `sent`.
fn completes(sent: u8, answer: u8) -> bool {
    match sent {
        b'P' => answer == b'1',
        b'B' => answer == b'2',
        b'D' => matches!(answer, b'T' | b'n'),
        b'E' => matches!(answer, b'C' | b'I' | b's'),
        b'C' => answer == b'3',
        _ => answer == b'Z',
    }
}

/// An ErrorResponse without its context field (`W`): a refusal raised by
/// the proxy's stand-in statement would otherwise name the PL/pgSQL block
/// that raised it, which is not the client's.
fn put_without_context(frame: &Frame, out: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(frame.body().len());
    let mut fields = frame.body();
    while let Some((&code, rest)) = fields.split_first()
        && code != 0
    {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if code != b'W' {
            body.put_u8(code);
            body.put_slice(&rest[..end]);
            body.put_u8(0);
        }
        fields = rest.get(end + 1..).unwrap_or_default();
    }
    body.put_u8(0);
    out.put_u8(b'E');
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(&body);
}

/// Passes a ParameterStatus on only when it tells the client something new:
/// a backend lent to it says again what the client has been told.
fn pass_report(frame: &Frame, reports: &mut BTreeMap<Vec<u8>, Vec<u8>>, out: &mut BytesMut) {
    let mut parts = frame.body().splitn(3, |&b| b == 0);
    let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
        return out.put_slice(frame.bytes());
    };
    if reports.get(name).map(Vec::as_slice) != Some(value) {
        reports.insert(name.to_vec(), value.to_vec());
        out.put_slice(frame.bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::new();
        raw.put_u8(kind);
        raw.put_u32((body.len() + 4) as u32);
        raw.put_slice(body);
        Frame::from_raw(raw)
    }

    fn client(kind: u8) -> Expect {
        Expect::Client {
            kind,
            prepares: None,
        }
    }

    /// Feeds the server's messages; returns the kinds the client got.
    fn feed(answers: &mut Answers, prepared: &mut Prepared, server: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut reports = BTreeMap::new();
        for &(kind, body) in server {
            let taken = answers.take(message(kind, body), prepared, &mut reports, &mut out);
            assert!(taken.is_ok());
        }
        kinds(&out)
    }

    fn kinds(mut out: &[u8]) -> Vec<u8> {
        let mut kinds = Vec::new();
        while out.len() >= 5 {
            let len = u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
            kinds.push(out[0]);
            out = &out[1 + len..];
        }
        kinds
    }

    #[test]
    fn the_proxys_own_answers_are_taken_out_and_made_ones_given_in_their_turn() {
        let mut answers = Answers::new();
        let mut out = BytesMut::new();
        answers.expect(Expect::Ahead { commands: 3 }, &mut out);
        answers.expect(client(b'B'), &mut out);
        answers.expect(Expect::Made(BytesMut::from(&b"1\0\0\0\x04"[..])), &mut out);
        answers.expect(client(b'S'), &mut out);
        assert!(out.is_empty(), "not its turn yet");
        let mut prepared = Prepared::default();
        let got = feed(
            &mut answers,
            &mut prepared,
            &[
                (b'1', b""),
                (b'2', b""),
                (b'C', b"BEGIN\0"),
                (b'1', b""),
                (b'2', b""),
                (b'D', b"\0\x01\0\0\0\x01x"),
                (b'C', b"SELECT 1\0"),
                (b'1', b""),
                (b'2', b""),
                (b'C', b"COMMIT\0"),
                (b'2', b""),
                (b'N', b"notice"),
                (b'Z', b"T"),
            ],
        );
        assert_eq!(got, b"2\x31NZ".to_vec());
        assert!(answers.settled());
        assert_eq!(answers.status, b'T');
    }

    #[test]
    fn after_an_error_what_precedes_the_sync_gets_no_answer_and_a_statement_is_not_prepared() {
        let mut answers = Answers::new();
        let mut out = BytesMut::new();
        let mut prepared = Prepared::default();
        prepared.insert("rlsgate_a".into());
        answers.expect(client(b'B'), &mut out);
        answers.expect(
            Expect::Client {
                kind: b'P',
                prepares: Some("rlsgate_a".into()),
            },
            &mut out,
        );
        answers.expect(Expect::Made(BytesMut::from(&b"3\0\0\0\x04"[..])), &mut out);
        answers.expect(client(b'E'), &mut out);
        let got = feed(&mut answers, &mut prepared, &[(b'E', b"SERROR\0\0")]);
        assert_eq!(got, b"E".to_vec(), "the made CloseComplete is dropped too");
        assert!(!prepared.contains("rlsgate_a"), "its Parse was skipped");
        assert!(!answers.settled(), "skipping until the client's Sync");
        answers.expect(client(b'E'), &mut out);
        answers.expect(client(b'S'), &mut out);
        let got = feed(&mut answers, &mut prepared, &[(b'Z', b"I")]);
        assert_eq!(got, b"Z".to_vec());
        assert!(answers.settled());
    }

    #[test]
    fn a_failed_binding_of_the_proxys_ends_the_lease() {
        let mut answers = Answers::new();
        answers.expect(Expect::Ahead { commands: 2 }, &mut BytesMut::new());
        let mut reports = BTreeMap::new();
        let error = message(b'E', b"SERROR\0C42501\0Mpermission denied\0\0");
        let taken = answers.take(
            error,
            &mut Prepared::default(),
            &mut reports,
            &mut BytesMut::new(),
        );
        let Err(OwnFailed(why)) = taken else {
            panic!("an error of the proxy's own statements must fail");
        };
        assert!(why.contains("42501"), "{why}");
    }

    #[test]
    fn a_raised_refusal_reaches_the_client_without_the_stand_ins_context() {
        let mut answers = Answers::new();
        answers.expect(Expect::Raised { kind: b'Q' }, &mut BytesMut::new());
        let error = b"SERROR\0C0A000\0MLISTEN is not available\0WPL/pgSQL function\0\0";
        let mut out = BytesMut::new();
        let mut prepared = Prepared::default();
        let taken = answers.take(
            message(b'E', error),
            &mut prepared,
            &mut BTreeMap::new(),
            &mut out,
        );
        assert!(taken.is_ok());
        let expected = message(b'E', b"SERROR\0C0A000\0MLISTEN is not available\0\0");
        assert_eq!(&out[..], expected.bytes());
        assert!(!answers.settled(), "its ReadyForQuery is still to come");
    }

    #[test]
    fn a_parameter_status_the_client_knows_is_not_repeated() {
        let mut answers = Answers::new();
        let mut reports = BTreeMap::new();
        let mut out = BytesMut::new();
        let mut prepared = Prepared::default();
        for _ in 0..2 {
            let status = message(b'S', b"TimeZone\0UTC\0");
            assert!(
                answers
                    .take(status, &mut prepared, &mut reports, &mut out)
                    .is_ok()
            );
        }
        assert_eq!(kinds(&out), b"S".to_vec());
    }

    #[test]
    fn syncs_sent_into_a_copy_from_stdin_are_forgotten() {
        let mut answers = Answers::new();
        let mut out = BytesMut::new();
        answers.expect(client(b'E'), &mut out);
        answers.expect(client(b'S'), &mut out);
        answers.forget_syncs(1);
        answers.expect(client(b'S'), &mut out);
        let mut prepared = Prepared::default();
        let got = feed(
            &mut answers,
            &mut prepared,
            &[(b'G', b"\0\0\0"), (b'C', b"COPY 1\0"), (b'Z', b"I")],
        );
        assert_eq!(got, b"GCZ".to_vec());
        assert!(answers.settled());
    }

    #[test]
    fn settings_reported_by_the_statements_sent_ahead_reach_the_client_as_they_end() {
        let mut answers = Answers::new();
        let mut out = BytesMut::new();
        answers.expect(Expect::Ahead { commands: 2 }, &mut out);
        answers.expect(client(b'Q'), &mut out);
        let mut reports = BTreeMap::new();
        reports.insert(b"application_name".to_vec(), b"app".to_vec());
        reports.insert(b"TimeZone".to_vec(), b"UTC".to_vec());
        let mut prepared = Prepared::default();
        let server: &[(u8, &[u8])] = &[
            (b'S', b"application_name\0\0"),
            (b'S', b"TimeZone\0Etc/UTC\0"),
            (b'C', b"DISCARD ALL\0"),
            (b'S', b"application_name\0app\0"),
            (b'C', b"SELECT 1\0"),
            (b'Z', b"I"),
        ];
        for &(kind, body) in server {
            let taken = answers.take(message(kind, body), &mut prepared, &mut reports, &mut out);
            assert!(taken.is_ok());
        }
        let expected = [
            message(b'S', b"TimeZone\0Etc/UTC\0").bytes().to_vec(),
            message(b'Z', b"I").bytes().to_vec(),
        ]
        .concat();
        assert_eq!(
            &out[..],
            &expected[..],
            "application_name came back as it was"
        );
        assert!(answers.settled());
    }
}
