//! The client's side of a lease: each of its messages on its way upstream,
//! with what its answer will be ([`Expect`]).
//!
//! Named statements are the client's, not the backend's: the client may run
//! each transaction on another backend. So the proxy keeps each client's
//! statements (name, text and parameter types) and prepares them on the
//! backend under a name of its own ([`backend_name`]) — before the client's
//! Parse when the backend lacks it, or on the client's behalf before a Bind
//! or Describe that needs it on a backend that never saw its Parse. A Parse
//! of a statement the backend already holds, and every Close of a statement,
//! are answered by the proxy. The client's unnamed statement passes
//! unchanged, and is kept too: a Bind or Describe of it in a later
//! transaction (some drivers Parse and Describe, Sync, then Bind and
//! Execute) finds it prepared again on that transaction's backend first.
//! Portals live as long as a transaction (or a Sync) does.
//!
//! Statements transaction pooling refuses ([`guard`]) are replaced by one
//! that raises the refusal on the server, so that it fails in its place in
//! the protocol (an open transaction is aborted, later messages up to the
//! Sync are skipped) exactly as a statement Postgres refused would.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::answers::{Answers, Expect};
use super::guard;
use crate::protocol::frame::{Frame, kind};
use crate::upstream::prepared::{Prepared, backend_name};

/// A client's named statement.
struct Statement {
    /// Its name on a backend.
    backend: Arc<str>,
    /// The Parse body after the name: query text, NUL, parameter types.
    definition: Box<[u8]>,
}

/// What a client sent, for the lease's end.
#[derive(Default)]
pub(crate) struct Sent {
    /// Extended-query messages were sent after the last Sync.
    pub(crate) unsynced: bool,
    /// Syncs since the last Execute (see [`Answers::forget_syncs`]).
    syncs_after_execute: u64,
}

/// A client's named statements, and what it sent in the current lease.
#[derive(Default)]
pub(crate) struct Statements {
    by_name: HashMap<Box<[u8]>, Statement>,
    /// The definition of the client's unnamed statement, if it has one.
    unnamed: Option<Box<[u8]>>,
    /// Whether the backend of the lease holds the client's unnamed
    /// statement (the proxy's own statements, and a refusal's stand-in,
    /// use the unnamed statement too).
    unnamed_here: bool,
    pub(crate) sent: Sent,
}

/// The upstream side of the lease a message goes to.
pub(crate) struct Upstream<'a> {
    pub(crate) out: &'a mut BytesMut,
    pub(crate) prepared: &'a mut Prepared,
    pub(crate) max_prepared: usize,
}

/// Whether the client said goodbye.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Forwarded {
    Sent,
    Terminate,
}

impl Statements {
    /// A lease begins: its backend holds none of the client's unnamed
    /// statement.
    pub(crate) fn new_lease(&mut self) {
        self.unnamed_here = false;
    }

    /// Sends one client message upstream, with what answers it, or answers
    /// it (into `to_client`).
    pub(crate) fn forward(
        &mut self,
        frame: &Frame,
        up: Upstream<'_>,
        answers: &mut Answers,
        to_client: &mut BytesMut,
    ) -> Forwarded {
        let kind = frame.kind();
        match kind {
            kind::TERMINATE => return Forwarded::Terminate,
            b'P' => return self.parse(frame, up, answers, to_client),
            b'B' | b'D' => match statement_of(frame) {
                Some(b"") => {
                    self.prepare_unnamed(up.out, answers, to_client);
                    up.out.put_slice(frame.bytes());
                    answers.expect(client(kind), to_client);
                }
                Some(_) => self.use_statement(frame, up, answers, to_client),
                None => {
                    up.out.put_slice(frame.bytes());
                    answers.expect(client(kind), to_client);
                }
            },
            b'C' if frame.body().first() == Some(&b'S') => {
                // A statement the client closes may serve others on the
                // backend: only the client's name for it goes.
                let name = name_at(frame.body(), 1).unwrap_or_default();
                if name.is_empty() {
                    // The backend's unnamed statement is left for the next
                    // Parse to replace; a Bind of it finds none.
                    self.unnamed = None;
                    self.unnamed_here = false;
                }
                self.by_name.remove(name);
                answers.expect(Expect::Made(close_complete()), to_client);
            }
            b'Q' => {
                let text = name_at(frame.body(), 0).unwrap_or_default();
                // A simple Query drops the unnamed statement.
                self.unnamed = None;
                match guard::refused(text) {
                    Some(refused) => {
                        raise_query(up.out, &refused.message());
                        answers.expect(Expect::Raised { kind }, to_client);
                    }
                    None => {
                        up.out.put_slice(frame.bytes());
                        answers.expect(client(kind), to_client);
                    }
                }
            }
            _ => {
                up.out.put_slice(frame.bytes());
                if answered(kind) {
                    answers.expect(client(kind), to_client);
                }
            }
        }
        self.track(kind, answers);
        Forwarded::Sent
    }

    fn track(&mut self, kind: u8, answers: &mut Answers) {
        let sent = &mut self.sent;
        match kind {
            b'S' => {
                sent.unsynced = false;
                sent.syncs_after_execute += 1;
            }
            b'E' => {
                sent.unsynced = true;
                sent.syncs_after_execute = 0;
            }
            b'Q' => sent.syncs_after_execute = 0,
            b'c' | b'f' => answers.forget_syncs(std::mem::take(&mut sent.syncs_after_execute)),
            b'P' | b'B' | b'D' | b'C' => sent.unsynced = true,
            _ => {}
        }
    }

    /// A Parse: an unnamed statement passes; a named one is the client's,
    /// prepared under the backend's name unless the backend has it.
    fn parse(
        &mut self,
        frame: &Frame,
        up: Upstream<'_>,
        answers: &mut Answers,
        to_client: &mut BytesMut,
    ) -> Forwarded {
        let body = frame.body();
        let Some(name) = name_at(body, 0) else {
            // Malformed: Postgres says so.
            up.out.put_slice(frame.bytes());
            answers.expect(client(b'P'), to_client);
            return Forwarded::Sent;
        };
        let definition = &body[name.len() + 1..];
        let text = name_at(definition, 0).unwrap_or(definition);
        self.track(b'P', answers);
        if let Some(refused) = guard::refused(text) {
            raise_in_extended_query(up.out, &refused.message(), answers, to_client);
            if name.is_empty() {
                // As after a Parse Postgres refused.
                self.unnamed = None;
            }
            self.unnamed_here = false;
            return Forwarded::Sent;
        }
        if name.is_empty() {
            self.unnamed = Some(definition.into());
            self.unnamed_here = true;
            up.out.put_slice(frame.bytes());
            answers.expect(client(b'P'), to_client);
            return Forwarded::Sent;
        }
        let backend = backend_name(definition);
        self.by_name.insert(
            name.into(),
            Statement {
                backend: Arc::clone(&backend),
                definition: definition.into(),
            },
        );
        if up.prepared.contains(&backend) {
            answers.expect(Expect::Made(parse_complete()), to_client);
            return Forwarded::Sent;
        }
        let expect = Expect::Client {
            kind: b'P',
            prepares: Some(Arc::clone(&backend)),
        };
        prepare(up, (&backend, definition), expect, answers, to_client);
        Forwarded::Sent
    }

    /// A Bind or Describe of a named statement: under the backend's name,
    /// prepared there first if it is not yet.
    fn use_statement(
        &mut self,
        frame: &Frame,
        up: Upstream<'_>,
        answers: &mut Answers,
        to_client: &mut BytesMut,
    ) {
        let kind = frame.kind();
        let body = frame.body();
        // Bind: portal, statement, the rest. Describe: 'S', statement.
        let (head, name) = match kind {
            b'B' => {
                let portal = name_at(body, 0).unwrap_or_default();
                (&body[..portal.len() + 1], name_at(body, portal.len() + 1))
            }
            _ => (&body[..1], name_at(body, 1)),
        };
        let statement = name.and_then(|name| self.by_name.get(name).map(|s| (name, s)));
        let Some((name, statement)) = statement else {
            // Not one of the client's: Postgres says it does not exist.
            up.out.put_slice(frame.bytes());
            answers.expect(client(kind), to_client);
            return;
        };
        if !up.prepared.contains(&statement.backend) {
            let expect = Expect::OnBehalf {
                prepares: Some(Arc::clone(&statement.backend)),
            };
            let up = Upstream {
                out: &mut *up.out,
                prepared: &mut *up.prepared,
                max_prepared: up.max_prepared,
            };
            prepare(
                up,
                (&statement.backend, &statement.definition),
                expect,
                answers,
                to_client,
            );
        }
        let rest = &body[head.len() + name.len() + 1..];
        let len = 4 + head.len() + statement.backend.len() + 1 + rest.len();
        up.out.put_u8(kind);
        up.out.put_u32(len as u32);
        up.out.put_slice(head);
        put_name(up.out, &statement.backend);
        up.out.put_slice(rest);
        answers.expect(client(kind), to_client);
    }

    /// Prepares the client's unnamed statement on the lease's backend, on
    /// its behalf, unless the backend has it (or closes the backend's, if
    /// the client has none).
    fn prepare_unnamed(
        &mut self,
        out: &mut BytesMut,
        answers: &mut Answers,
        to_client: &mut BytesMut,
    ) {
        if self.unnamed_here {
            return;
        }
        match &self.unnamed {
            Some(definition) => put_parse(out, "", definition),
            // Whatever the backend holds as unnamed is not the client's:
            // the Bind is to find none, as it would on its own connection.
            None => out.put_slice(b"C\0\0\0\x06S\0"),
        }
        answers.expect(Expect::OnBehalf { prepares: None }, to_client);
        self.unnamed_here = true;
    }
}

/// The statement a Bind or a Describe of a statement uses ("" for the
/// unnamed one); `None` for a Describe of a portal, or a malformed message.
fn statement_of(frame: &Frame) -> Option<&[u8]> {
    let body = frame.body();
    match frame.kind() {
        b'B' => {
            let portal = name_at(body, 0)?;
            name_at(body, portal.len() + 1)
        }
        b'D' if body.first() == Some(&b'S') => name_at(body, 1),
        _ => None,
    }
}

/// Prepares a statement on the backend under its `name` there: Parse, the
/// backend's oldest statement closed first when it holds its maximum.
fn prepare(
    up: Upstream<'_>,
    (name, definition): (&Arc<str>, &[u8]),
    expect: Expect,
    answers: &mut Answers,
    to_client: &mut BytesMut,
) {
    if let Some(oldest) = up.prepared.evict(up.max_prepared) {
        let len = 4 + 1 + oldest.len() + 1;
        up.out.put_u8(b'C');
        up.out.put_u32(len as u32);
        up.out.put_u8(b'S');
        put_name(up.out, &oldest);
        answers.expect(Expect::OnBehalf { prepares: None }, to_client);
    }
    put_parse(up.out, name, definition);
    up.prepared.insert(Arc::clone(name));
    answers.expect(expect, to_client);
}

/// Whether Postgres answers a client message of this type (Flush and COPY
/// data are answered by nothing of their own).
fn answered(kind: u8) -> bool {
    matches!(kind, b'B' | b'D' | b'E' | b'C' | b'S' | b'F')
}

fn client(kind: u8) -> Expect {
    Expect::Client {
        kind,
        prepares: None,
    }
}

/// The NUL-terminated string at `at`, without its NUL.
fn name_at(body: &[u8], at: usize) -> Option<&[u8]> {
    let rest = body.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

fn put_name(out: &mut BytesMut, name: &str) {
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

fn put_parse(out: &mut BytesMut, name: &str, definition: &[u8]) {
    let len = 4 + name.len() + 1 + definition.len();
    out.put_u8(b'P');
    out.put_u32(len as u32);
    put_name(out, name);
    out.put_slice(definition);
}

fn parse_complete() -> BytesMut {
    BytesMut::from(&b"1\0\0\0\x04"[..])
}

fn close_complete() -> BytesMut {
    BytesMut::from(&b"3\0\0\0\x04"[..])
}

/// A statement that fails on the server with SQLSTATE 0A000 and `message`.
fn raise_statement(message: &str) -> String {
    format!(
        "DO $rlsgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = '{}'; END \
         $rlsgate$",
        message.replace('\'', "''")
    )
}

/// A simple Query refused: the server raises the refusal in its place.
fn raise_query(out: &mut BytesMut, message: &str) {
    let sql = raise_statement(message);
    out.put_u8(b'Q');
    out.put_u32((4 + sql.len() + 1) as u32);
    put_name(out, &sql);
}

/// A Parse refused: the unnamed statement raises the refusal when it runs,
/// at once (its ParseComplete and BindComplete are the proxy's), and the
/// server then skips the client's messages up to its Sync, as after the
/// failed Parse it replaces.
fn raise_in_extended_query(
    out: &mut BytesMut,
    message: &str,
    answers: &mut Answers,
    to_client: &mut BytesMut,
) {
    put_parse(
        out,
        "",
        format!("{}\0\0\0", raise_statement(message)).as_bytes(),
    );
    answers.expect(Expect::OnBehalf { prepares: None }, to_client);
    // Bind: unnamed portal and statement, no formats, parameters or results.
    out.put_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
    answers.expect(Expect::OnBehalf { prepares: None }, to_client);
    // Execute: the unnamed portal, every row.
    out.put_slice(b"E\0\0\0\x09\0\0\0\0\0");
    answers.expect(Expect::Raised { kind: b'E' }, to_client);
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

    /// Messages as (type, body).
    type Messages = Vec<(u8, Vec<u8>)>;

    /// The messages of `bytes`.
    fn messages(mut bytes: &[u8]) -> Messages {
        let mut found = Vec::new();
        while bytes.len() >= 5 {
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            found.push((bytes[0], bytes[5..1 + len].to_vec()));
            bytes = &bytes[1 + len..];
        }
        found
    }

    /// Sends the client's messages through a lease on `prepared`: what
    /// went upstream, and what the proxy answered itself.
    fn send(
        statements: &mut Statements,
        prepared: &mut Prepared,
        client: &[Frame],
    ) -> (Messages, Messages) {
        let (mut up, mut down) = (BytesMut::new(), BytesMut::new());
        let mut answers = Answers::new();
        for frame in client {
            let upstream = Upstream {
                out: &mut up,
                prepared: &mut *prepared,
                max_prepared: 2,
            };
            statements.forward(frame, upstream, &mut answers, &mut down);
        }
        (messages(&up), messages(&down))
    }

    const DEFINITION: &[u8] = b"select $1\0\0\x01\0\0\0\x17";

    fn parse(name: &str) -> Frame {
        message(b'P', &[name.as_bytes(), b"\0", DEFINITION].concat())
    }

    fn bind(name: &str) -> Frame {
        message(
            b'B',
            &[b"\0", name.as_bytes(), b"\0\0\0\0\x01\0\0\0\x011\0\0"].concat(),
        )
    }

    #[test]
    fn a_clients_statement_is_prepared_under_the_backends_name_and_once_per_backend() {
        let backend = backend_name(DEFINITION);
        let mut statements = Statements::default();
        let mut first = Prepared::default();
        let (up, made) = send(&mut statements, &mut first, &[parse("s1"), bind("s1")]);
        assert_eq!(up[0].0, b'P');
        assert!(up[0].1.starts_with(backend.as_bytes()), "{:?}", up[0]);
        assert_eq!(up[1].0, b'B');
        assert_eq!(&up[1].1[1..1 + backend.len()], backend.as_bytes());
        assert!(made.is_empty());
        assert!(first.contains(&backend));

        // Another client's Parse of the same text, on the same backend: the
        // proxy answers it.
        let mut other = Statements::default();
        let (up, made) = send(&mut other, &mut first, &[parse("other_name")]);
        assert!(up.is_empty(), "{up:?}");
        assert_eq!(made, vec![(b'1', Vec::new())]);

        // The first client's next transaction on a fresh backend: its Bind
        // is preceded by the Parse it needs there.
        let mut second = Prepared::default();
        let (up, _) = send(&mut statements, &mut second, &[bind("s1")]);
        let kinds: Vec<u8> = up.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, b"PB".to_vec());
    }

    #[test]
    fn a_close_is_answered_by_the_proxy_and_the_name_is_gone_for_the_client_only() {
        let mut statements = Statements::default();
        let mut prepared = Prepared::default();
        send(&mut statements, &mut prepared, &[parse("s1")]);
        let close = message(b'C', b"Ss1\0");
        let (up, made) = send(&mut statements, &mut prepared, &[close, bind("s1")]);
        assert_eq!(made, vec![(b'3', Vec::new())]);
        assert_eq!(up.len(), 1);
        assert_eq!(
            up[0].1,
            bind("s1").body(),
            "an unknown name goes as it came"
        );
        assert!(prepared.contains(&backend_name(DEFINITION)));
    }

    #[test]
    fn the_oldest_statement_is_closed_to_make_room() {
        let mut statements = Statements::default();
        let mut prepared = Prepared::default();
        let texts = ["select 1\0\0\0", "select 2\0\0\0", "select 3\0\0\0"];
        for (i, text) in texts.iter().enumerate() {
            let name = format!("s{i}");
            let frame = message(b'P', &[name.as_bytes(), b"\0", text.as_bytes()].concat());
            let (up, _) = send(&mut statements, &mut prepared, &[frame]);
            let kinds: Vec<u8> = up.iter().map(|(kind, _)| *kind).collect();
            let expected = if i < 2 { b"P".to_vec() } else { b"CP".to_vec() };
            assert_eq!(kinds, expected, "statement {i}");
        }
        assert!(!prepared.contains(&backend_name(texts[0].as_bytes())));
    }

    #[test]
    fn the_clients_unnamed_statement_is_prepared_again_on_the_next_leases_backend() {
        let mut statements = Statements::default();
        let mut prepared = Prepared::default();
        statements.new_lease();
        let (up, _) = send(&mut statements, &mut prepared, &[parse(""), bind("")]);
        let kinds: Vec<u8> = up.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, b"PB".to_vec(), "within a lease it is there");

        statements.new_lease();
        let (up, _) = send(&mut statements, &mut prepared, &[bind(""), bind("")]);
        assert_eq!(up[0], (b'P', parse("").body().to_vec()));
        let kinds: Vec<u8> = up.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, b"PBB".to_vec(), "prepared once per lease");
    }

    #[test]
    fn a_bind_of_an_unnamed_statement_the_client_never_had_finds_none() {
        let mut statements = Statements::default();
        let mut prepared = Prepared::default();
        statements.new_lease();
        let query = message(b'Q', b"select 1\0");
        let (up, _) = send(&mut statements, &mut prepared, &[parse(""), query]);
        assert_eq!(up.len(), 2);
        statements.new_lease();
        let (up, _) = send(&mut statements, &mut prepared, &[bind("")]);
        assert_eq!(up[0], (b'C', b"S\0".to_vec()), "a Query dropped it");
        assert_eq!(up[1].0, b'B');

        let close = message(b'C', b"S\0");
        let (up, _) = send(
            &mut statements,
            &mut prepared,
            &[parse(""), close, bind("")],
        );
        let kinds: Vec<u8> = up.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, b"PCB".to_vec(), "a Close dropped it");
    }
}
