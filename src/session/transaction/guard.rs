//! The SQL guard of transaction pooling: finds statements whose state would outlive their transaction.
//!
//! A client in transaction mode gets a backend per transaction, so state that Postgres keeps for the
//! rest of the session (a `LISTEN`, a temporary table, a session advisory lock, a holdable cursor)
//! would stay behind on a backend the client may never see again. Those statements are refused
//! (the caller answers 0A000) with a message saying what works instead.
//!
//! The guard reads the text the way Postgres's lexer does: comments (`--`, nested `/* */`), string
//! literals (`'…'`, `E'…'`, `U&'…'`, continued across newlines), dollar quotes and quoted
//! identifiers are never mistaken for statements, and `;` splits statements only outside them.
//! It is one pass over the bytes and allocates nothing unless it refuses.
//!
//! It is not a security boundary, and need not be one: whatever slips past it (a `DO` block or a
//! function body calling `pg_advisory_lock`, `EXECUTE 'LISTEN x'` in PL/pgSQL, plain strings with
//! backslash escapes under `standard_conforming_strings = off`) is still undone by the
//! `DISCARD ALL` that resets a backend before another client uses it. The guard exists so that a
//! client fails loudly where it would otherwise silently lose state between transactions.

/// What transaction pooling refuses in a statement, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Listen,
    /// `CREATE TEMP …`, or a create in `pg_temp`, other than a table with `ON COMMIT DROP`.
    CreateTemp(Object),
    /// `SELECT … INTO TEMP …` (or into `pg_temp`).
    SelectIntoTemp,
    /// `DECLARE … WITH HOLD`.
    HoldCursor,
    /// A call of a session-level advisory lock function.
    AdvisoryLock(Lock),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    Table,
    View,
    Sequence,
    /// Not a kind Postgres makes temporary; it will refuse the statement itself.
    Other,
}

/// The session-level advisory lock functions, each with its transaction-level twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    Exclusive,
    Shared,
    TryExclusive,
    TryShared,
}

const LOCKS: [(&str, &str, Lock); 4] = [
    ("pg_advisory_lock", "pg_advisory_xact_lock", Lock::Exclusive),
    (
        "pg_advisory_lock_shared",
        "pg_advisory_xact_lock_shared",
        Lock::Shared,
    ),
    (
        "pg_try_advisory_lock",
        "pg_try_advisory_xact_lock",
        Lock::TryExclusive,
    ),
    (
        "pg_try_advisory_lock_shared",
        "pg_try_advisory_xact_lock_shared",
        Lock::TryShared,
    ),
];

impl Lock {
    fn names(self) -> (&'static str, &'static str) {
        let (session, xact, _) = LOCKS[self as usize];
        (session, xact)
    }
}

const POOLING: &str = "with transaction pooling ([pool] mode = \"transaction\")";
const SESSION: &str = "or connect through a proxy in session mode ([pool] mode = \"session\")";

impl Refused {
    /// The ErrorResponse message: what is refused, why, and what works instead. ASCII only, so it
    /// reads the same in any client encoding.
    pub(crate) fn message(&self) -> String {
        let later = "this connection's next transaction may run on another backend";
        match self.what {
            What::Listen => format!(
                "LISTEN is not available {POOLING}: notifications go to the backend that listens, and \
                 {later}. NOTIFY still works; to receive notifications, {}.",
                SESSION.trim_start_matches("or ")
            ),
            What::CreateTemp(Object::Table) => format!(
                "CREATE TEMPORARY TABLE without ON COMMIT DROP is not available {POOLING}: a temporary \
                 table lasts as long as the backend session, and {later}. Add ON COMMIT DROP and use the \
                 table within one transaction (BEGIN ... COMMIT), {SESSION}."
            ),
            What::CreateTemp(Object::View) => format!(
                "CREATE TEMPORARY VIEW is not available {POOLING}: a temporary view lasts as long as the \
                 backend session, and {later}. Use a WITH query or a subquery instead, create a regular \
                 view, {SESSION}."
            ),
            What::CreateTemp(Object::Sequence) => format!(
                "CREATE TEMPORARY SEQUENCE is not available {POOLING}: a temporary sequence lasts as long \
                 as the backend session, and {later}. Use a regular sequence, {SESSION}."
            ),
            What::CreateTemp(Object::Other) => format!(
                "CREATE TEMPORARY is not available {POOLING}: temporary objects last as long as the \
                 backend session, and {later}. Create temporary tables with ON COMMIT DROP and use them \
                 within one transaction (BEGIN ... COMMIT), {SESSION}."
            ),
            What::SelectIntoTemp => format!(
                "SELECT ... INTO TEMPORARY is not available {POOLING}: the table would last as long as \
                 the backend session, and {later}. Use CREATE TEMPORARY TABLE ... ON COMMIT DROP AS \
                 SELECT ... within one transaction (BEGIN ... COMMIT), {SESSION}."
            ),
            What::HoldCursor => format!(
                "DECLARE ... WITH HOLD is not available {POOLING}: a holdable cursor outlives its \
                 transaction, and {later}. Declare the cursor without WITH HOLD and fetch from it within \
                 one transaction (BEGIN ... COMMIT), {SESSION}."
            ),
            What::AdvisoryLock(lock) => {
                let (session, xact) = lock.names();
                format!(
                    "{session} is not available {POOLING}: a session-level advisory lock stays with the \
                     backend, not with this connection, and {later}. Use {xact} (released when the \
                     transaction ends) within one transaction (BEGIN ... COMMIT), {SESSION}."
                )
            }
        }
    }
}

/// What transaction pooling refuses in `sql`, if anything: the first such statement.
///
/// `sql` is the text of a simple Query or of a Parse message's query string, in any encoding
/// Postgres accepts (only ASCII matters here). Text that Postgres would reject as a syntax error
/// may pass either way: Postgres then runs none of it.
///
/// Seen: `LISTEN`; `CREATE [GLOBAL|LOCAL] TEMP[ORARY]` tables (unless `ON COMMIT DROP`), views and
/// sequences, and the same created in `pg_temp`; `SELECT … INTO TEMP[ORARY]` (or into `pg_temp`);
/// `DECLARE … WITH HOLD`; calls of `pg_advisory_lock`, `pg_advisory_lock_shared`,
/// `pg_try_advisory_lock`, `pg_try_advisory_lock_shared` (unqualified or in `pg_catalog`), also
/// under `EXPLAIN`.
///
/// Not seen, by design: anything inside literals, dollar quotes and comments, which includes
/// function bodies and `DO` blocks; the unquoted body of `CREATE FUNCTION|PROCEDURE` (a definition
/// calls nothing). What slips past is reset by `DISCARD ALL` before another client gets the backend.
pub(crate) fn refused(sql: &[u8]) -> Option<Refused> {
    let mut lexer = Lexer { sql, pos: 0 };
    let mut guard = Guard::default();
    while let Some(token) = lexer.next() {
        if let Some(what) = guard.step(token) {
            return Some(Refused { what });
        }
    }
    guard.end_statement().map(|what| Refused { what })
}

/// A token, as far as the guard cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a [u8]),
    /// The inside of a quoted identifier, `""` escapes left as they are.
    Quoted(&'a [u8]),
    Dot,
    Open,
    Close,
    Semicolon,
    /// A literal, number, parameter, operator or other punctuation.
    Other,
}

impl Token<'_> {
    /// This keyword, unquoted in any case (a quoted word is never a keyword).
    fn is(self, keyword: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(keyword.as_bytes()))
    }

    fn is_any(self, keywords: &[&str]) -> bool {
        keywords.iter().any(|k| self.is(k))
    }

    /// An identifier meaning `name` (lowercase): unquoted in any case, or quoted exactly.
    fn names(self, name: &str) -> bool {
        match self {
            Token::Word(w) => w.eq_ignore_ascii_case(name.as_bytes()),
            Token::Quoted(q) => q == name.as_bytes(),
            _ => false,
        }
    }

    /// `pg_temp`, the session's temporary schema (or its real name `pg_temp_N`).
    fn is_pg_temp(self) -> bool {
        let (Token::Word(name) | Token::Quoted(name)) = self else {
            return false;
        };
        let prefix = b"pg_temp";
        name.len() >= prefix.len()
            && name[..prefix.len()].eq_ignore_ascii_case(prefix)
            && match &name[prefix.len()..] {
                [] => true,
                [b'_', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
                _ => false,
            }
    }
}

/// Words after which a `SELECT … INTO temp` names a table called "temp" rather than a temporary one.
const AFTER_INTO_TARGET: &[&str] = &[
    "from",
    "where",
    "group",
    "having",
    "window",
    "order",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "intersect",
    "except",
];

/// Where the current statement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    /// Nothing seen yet.
    Start,
    /// After `EXPLAIN` and its options: the explained statement comes next.
    Explain,
    /// After `CREATE` and its modifiers (`OR REPLACE`, `TEMP`, …).
    CreateHead { temp: bool },
    /// After the kind of object: `IF NOT EXISTS` or the name comes next.
    CreateName { object: Object, temp: bool },
    /// After the name's first part, which may be the schema `pg_temp`.
    CreateQualified { object: Object, temp: bool },
    /// A temporary table, refused at its end unless `ON COMMIT DROP` came.
    TempTable { on_commit_drop: bool },
    /// `DECLARE` before its `FOR`.
    Declare,
    /// `CREATE FUNCTION|PROCEDURE`: a definition, checked for nothing.
    Routine,
    /// Nothing more to learn from the statement's shape.
    Rest,
}

/// The statement-level state over the token stream.
struct Guard<'a> {
    /// The last tokens, most recent first.
    recent: [Token<'a>; 4],
    statement: Statement,
    /// Parenthesis depth: `;` inside parentheses does not end a statement (rule actions).
    depth: u32,
    /// `BEGIN ATOMIC … END` nesting in a routine body, whose `;` do not end the statement.
    atomic: u32,
    /// `INTO TEMP` just seen: the next token tells a temporary table from one named "temp".
    into_temp: bool,
}

impl Default for Guard<'_> {
    fn default() -> Self {
        Guard {
            recent: [Token::Other; 4],
            statement: Statement::Start,
            depth: 0,
            atomic: 0,
            into_temp: false,
        }
    }
}

impl<'a> Guard<'a> {
    fn step(&mut self, token: Token<'a>) -> Option<What> {
        let mut what = self.advance(token);
        if what.is_none() && self.statement != Statement::Routine {
            what = self.anywhere(token);
        }
        match token {
            Token::Open => self.depth += 1,
            Token::Close => self.depth = self.depth.saturating_sub(1),
            Token::Semicolon if self.depth == 0 && self.atomic == 0 => {
                what = what.or(self.end_statement());
                *self = Guard::default();
            }
            _ => {}
        }
        self.recent = [token, self.recent[0], self.recent[1], self.recent[2]];
        what
    }

    /// The refusal a statement earns only once it is over: a temporary object whose statement ended
    /// without `ON COMMIT DROP`.
    fn end_statement(&self) -> Option<What> {
        match self.statement {
            Statement::CreateHead { temp: true } => Some(What::CreateTemp(Object::Other)),
            Statement::CreateName { object, temp: true }
            | Statement::CreateQualified { object, temp: true } => Some(What::CreateTemp(object)),
            Statement::TempTable {
                on_commit_drop: false,
            } => Some(What::CreateTemp(Object::Table)),
            _ => None,
        }
    }

    /// The statement's shape: what its leading words make it.
    fn advance(&mut self, token: Token<'a>) -> Option<What> {
        match self.statement {
            Statement::Start => self.start(token),
            Statement::Explain => {
                let option = self.depth > 0
                    || matches!(token, Token::Open | Token::Close)
                    || token.is_any(&["analyze", "analyse", "verbose"]);
                if option { None } else { self.start(token) }
            }
            Statement::CreateHead { temp } => self.create_head(token, temp),
            Statement::CreateName { object, temp } => {
                if token.is_any(&["if", "not", "exists"]) {
                    None
                } else if matches!(token, Token::Word(_) | Token::Quoted(_)) {
                    self.statement = Statement::CreateQualified { object, temp };
                    None
                } else {
                    self.create_body(object, temp)
                }
            }
            Statement::CreateQualified { object, temp } => {
                let in_pg_temp = token == Token::Dot && self.recent[0].is_pg_temp();
                self.create_body(object, temp || in_pg_temp)
            }
            Statement::TempTable { .. } => {
                let r = self.recent;
                if self.depth == 0 && token.is("drop") && r[0].is("commit") && r[1].is("on") {
                    self.statement = Statement::TempTable {
                        on_commit_drop: true,
                    };
                }
                None
            }
            Statement::Declare => {
                if token.is("hold") && self.recent[0].is("with") {
                    return Some(What::HoldCursor);
                }
                if token.is("for") {
                    self.statement = Statement::Rest;
                }
                None
            }
            Statement::Routine => {
                self.routine(token);
                None
            }
            Statement::Rest => None,
        }
    }

    fn start(&mut self, token: Token<'a>) -> Option<What> {
        if token.is("listen") {
            return Some(What::Listen);
        }
        self.statement = if token.is("create") {
            Statement::CreateHead { temp: false }
        } else if token.is("declare") {
            Statement::Declare
        } else if token.is("explain") {
            Statement::Explain
        } else {
            Statement::Rest
        };
        None
    }

    fn create_head(&mut self, token: Token<'a>, temp: bool) -> Option<What> {
        let object = if token.is_any(&["or", "replace", "global", "local", "unlogged", "recursive"])
        {
            return None;
        } else if token.is_any(&["temp", "temporary"]) {
            self.statement = Statement::CreateHead { temp: true };
            return None;
        } else if token.is_any(&["function", "procedure"]) {
            self.statement = Statement::Routine;
            return None;
        } else if token.is("table") {
            Object::Table
        } else if token.is("view") {
            Object::View
        } else if token.is("sequence") {
            Object::Sequence
        } else {
            self.statement = Statement::Rest;
            return temp.then_some(What::CreateTemp(Object::Other));
        };
        self.statement = Statement::CreateName { object, temp };
        None
    }

    /// Past the name of a created object: a temporary one is refused now, or at the end of the
    /// statement for a table (which may yet say `ON COMMIT DROP`).
    fn create_body(&mut self, object: Object, temp: bool) -> Option<What> {
        self.statement = Statement::Rest;
        match (temp, object) {
            (false, _) => None,
            (true, Object::Table) => {
                self.statement = Statement::TempTable {
                    on_commit_drop: false,
                };
                None
            }
            (true, object) => Some(What::CreateTemp(object)),
        }
    }

    /// Tracks `BEGIN ATOMIC … END` (with `CASE … END` inside) in an unquoted routine body.
    fn routine(&mut self, token: Token<'a>) {
        let opens = token.is("atomic") && self.recent[0].is("begin");
        if opens || self.atomic > 0 && token.is("case") {
            self.atomic += 1;
        } else if self.atomic > 0 && token.is("end") {
            self.atomic -= 1;
        }
    }

    /// What is refused wherever it stands in a statement: `INTO TEMP` and advisory lock calls.
    fn anywhere(&mut self, token: Token<'a>) -> Option<What> {
        if std::mem::take(&mut self.into_temp) {
            let names_table = match token {
                Token::Quoted(_) => true,
                Token::Word(_) => !token.is_any(AFTER_INTO_TARGET),
                _ => false,
            };
            if names_table {
                return Some(What::SelectIntoTemp);
            }
        }
        let r = self.recent;
        match token {
            Token::Word(_) if token.is_any(&["temp", "temporary"]) => {
                if self.select_into(0) {
                    self.into_temp = true;
                } else if r[0].is_any(&["local", "global"]) && self.select_into(1) {
                    return Some(What::SelectIntoTemp);
                }
                None
            }
            Token::Dot
                if r[0].is_pg_temp()
                    && (self.select_into(1) || r[1].is("table") && self.select_into(2)) =>
            {
                Some(What::SelectIntoTemp)
            }
            Token::Open => self.advisory_call(),
            _ => None,
        }
    }

    /// `recent[i]` is the `INTO` of a `SELECT … INTO` (not of `INSERT INTO` or `MERGE INTO`).
    fn select_into(&self, i: usize) -> bool {
        self.recent[i].is("into")
            && !self
                .recent
                .get(i + 1)
                .is_some_and(|t| t.is_any(&["insert", "merge"]))
    }

    /// At `(`: the tokens before it call a session-level advisory lock function.
    fn advisory_call(&self) -> Option<What> {
        let r = self.recent;
        let (_, _, lock) = LOCKS.iter().find(|(name, _, _)| r[0].names(name))?;
        let before = if r[1] == Token::Dot {
            if !r[2].names("pg_catalog") {
                return None; // someone else's function of that name
            }
            r[3]
        } else {
            r[1]
        };
        // `DROP FUNCTION pg_advisory_lock(bigint)`, `GRANT … ON FUNCTION …`: a signature, no call.
        if before.is_any(&["function", "procedure", "routine"]) {
            return None;
        }
        Some(What::AdvisoryLock(*lock))
    }
}

/// Splits SQL text into tokens, skipping whitespace, comments and the insides of literals.
struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

impl<'a> Lexer<'a> {
    fn peek(&self, ahead: usize) -> Option<u8> {
        self.sql.get(self.pos + ahead).copied()
    }

    fn skip_while(&mut self, keep: impl Fn(u8) -> bool) {
        while self.peek(0).is_some_and(&keep) {
            self.pos += 1;
        }
    }

    fn next(&mut self) -> Option<Token<'a>> {
        loop {
            let b = self.peek(0)?;
            match (b, self.peek(1)) {
                (b'-', Some(b'-')) => self.skip_while(|b| b != b'\n' && b != b'\r'),
                (b'/', Some(b'*')) => self.block_comment(),
                _ if is_space(b) => self.pos += 1,
                _ => return Some(self.token(b)),
            }
        }
    }

    fn token(&mut self, b: u8) -> Token<'a> {
        let start = self.pos;
        self.pos += 1;
        match b {
            b'\'' => self.string(false),
            b'"' => self.quoted(),
            b'$' => self.dollar(),
            b'(' => Token::Open,
            b')' => Token::Close,
            b';' => Token::Semicolon,
            b'.' => Token::Dot,
            // Numbers take letters (`1e5`, `0x1F`) but not `$`: `1$$…$$` is a number and a literal.
            b'0'..=b'9' => {
                self.skip_while(|b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80);
                Token::Other
            }
            _ if is_ident_start(b) => {
                self.skip_while(is_ident_char);
                let word = &self.sql[start..self.pos];
                match (word, self.peek(0), self.peek(1)) {
                    (b"e" | b"E", Some(b'\''), _) => {
                        self.pos += 1;
                        self.string(true)
                    }
                    (b"u" | b"U", Some(b'&'), Some(b'\'')) => {
                        self.pos += 2;
                        self.string(false)
                    }
                    (b"u" | b"U", Some(b'&'), Some(b'"')) => {
                        self.pos += 2;
                        self.quoted()
                    }
                    _ => Token::Word(word),
                }
            }
            _ => Token::Other,
        }
    }

    /// `/* … */`, nested; unterminated runs to the end.
    fn block_comment(&mut self) {
        self.pos += 2;
        let mut depth = 1u32;
        while let Some(b) = self.peek(0) {
            match (b, self.peek(1)) {
                (b'*', Some(b'/')) => {
                    self.pos += 2;
                    depth -= 1;
                    if depth == 0 {
                        return;
                    }
                }
                (b'/', Some(b'*')) => {
                    self.pos += 2;
                    depth += 1;
                }
                _ => self.pos += 1,
            }
        }
    }

    /// A string literal after its opening quote; `escapes` for `E'…'`, where a backslash escapes
    /// the next byte. A literal continues in the same kind past a closing quote followed by
    /// whitespace with a newline and another quote, as in Postgres.
    fn string(&mut self, escapes: bool) -> Token<'a> {
        while let Some(b) = self.peek(0) {
            match b {
                b'\\' if escapes => self.pos += 2,
                b'\'' if self.peek(1) == Some(b'\'') => self.pos += 2,
                b'\'' => {
                    self.pos += 1;
                    match self.continuation() {
                        Some(next) => self.pos = next,
                        None => return Token::Other,
                    }
                }
                _ => self.pos += 1,
            }
        }
        self.pos = self.sql.len();
        Token::Other
    }

    /// Where a literal continues after `'…'`: just past the opening quote of the next segment.
    /// Between them, spaces and `--` comments with at least one newline.
    fn continuation(&self) -> Option<usize> {
        let mut i = self.pos;
        let mut newline = false;
        loop {
            match (*self.sql.get(i)?, self.sql.get(i + 1)) {
                (b'\n' | b'\r', _) => newline = true,
                (b' ' | b'\t' | 0x0c, _) => {}
                (0x0b, _) if newline => {}
                (b'-', Some(b'-')) => {
                    while self
                        .sql
                        .get(i + 1)
                        .is_some_and(|&b| b != b'\n' && b != b'\r')
                    {
                        i += 1;
                    }
                }
                (b'\'', _) if newline => return Some(i + 1),
                _ => return None,
            }
            i += 1;
        }
    }

    /// A quoted identifier after its opening quote, `""` escaping a quote.
    fn quoted(&mut self) -> Token<'a> {
        let start = self.pos;
        while let Some(b) = self.peek(0) {
            if b == b'"' {
                if self.peek(1) == Some(b'"') {
                    self.pos += 2;
                    continue;
                }
                self.pos += 1;
                return Token::Quoted(&self.sql[start..self.pos - 1]);
            }
            self.pos += 1;
        }
        Token::Quoted(&self.sql[start..])
    }

    /// After a `$`: a parameter (`$1`), a dollar-quoted literal (`$tag$…$tag$`), or a lone `$`.
    fn dollar(&mut self) -> Token<'a> {
        let start = self.pos - 1;
        if self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
            self.skip_while(|b| b.is_ascii_digit());
            return Token::Other;
        }
        let mut end = self.pos;
        if self.sql.get(end).is_some_and(|&b| is_ident_start(b)) {
            while self
                .sql
                .get(end)
                .is_some_and(|&b| is_ident_char(b) && b != b'$')
            {
                end += 1;
            }
        }
        if self.sql.get(end) != Some(&b'$') {
            return Token::Other; // not a delimiter: the `$` alone, the rest lexed as usual
        }
        let tag = &self.sql[start..=end];
        let body = end + 1;
        self.pos = self.sql[body..]
            .windows(tag.len())
            .position(|w| w == tag)
            .map_or(self.sql.len(), |at| body + at + tag.len());
        Token::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what(sql: &str) -> Option<What> {
        refused(sql.as_bytes()).map(|r| r.what)
    }

    fn assert_refused(sql: &str, expected: What) {
        assert_eq!(what(sql), Some(expected), "{sql:?}");
    }

    fn assert_allowed(sql: &str) {
        assert_eq!(what(sql), None, "{sql:?}");
    }

    const TEMP_TABLE: What = What::CreateTemp(Object::Table);

    #[test]
    fn listen_is_refused_in_any_case_and_spacing() {
        for sql in [
            "LISTEN jobs",
            "listen jobs;",
            "  \t\n LiStEn \"Jobs\"",
            "/* first */ -- a comment\n listen jobs",
            "LISTEN",
        ] {
            assert_refused(sql, What::Listen);
        }
    }

    #[test]
    fn notify_unlisten_and_a_column_named_listen_are_allowed() {
        for sql in [
            "NOTIFY jobs, 'hello'",
            "SELECT pg_notify('jobs', 'x')",
            "UNLISTEN jobs",
            "UNLISTEN *",
            "SELECT listen FROM settings",
            "UPDATE settings SET listen = true WHERE listen IS NULL",
            "SELECT 1 AS listen",
            "\"listen\"",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn text_inside_strings_comments_and_quoted_identifiers_never_counts() {
        for sql in [
            "SELECT 'LISTEN x'",
            "SELECT 'it''s; LISTEN x'",
            "SELECT E'it\\'s; LISTEN x'",
            "SELECT e'\\\\'';LISTEN x'",
            "SELECT U&'d\\0061t; LISTEN x'",
            "SELECT N'; LISTEN x', B'1010', X'1F'",
            "-- LISTEN x\nSELECT 1",
            "SELECT 1 -- ; LISTEN x",
            "/* LISTEN x */ SELECT 1",
            "/* outer /* inner */ still a comment; LISTEN x */ SELECT 1",
            "SELECT \"a;LISTEN b\" FROM t",
            "SELECT \"with \"\" quote; LISTEN x\" FROM t",
            "SELECT U&\"; LISTEN x\" FROM t",
            "SELECT 'pg_advisory_lock(1)'",
            "SELECT $$; CREATE TEMP TABLE t (a int); $$",
            "SELECT $body$ ; LISTEN x; $$ ; LISTEN y; $body$",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn the_lexer_ends_literals_where_postgres_does() {
        // Nested comments: the first `*/` closes only the inner one.
        assert_refused("/* /* */ */ LISTEN x", What::Listen);
        // Backslashes are literal in a standard string, so the string ends before `;`.
        assert_refused("SELECT 'a\\'; LISTEN x", What::Listen);
        // An E'' literal continued on the next line keeps its escapes: the $$ is inside it.
        assert_refused("SELECT E'a'\n'\\' $$ '; LISTEN x; -- $$", What::Listen);
        assert_refused(
            "SELECT E'a' -- note\n  -- more\n'\\' $$ '; LISTEN x; -- $$",
            What::Listen,
        );
        // Without a newline there is no continuation: the $$ opens a literal.
        assert_allowed("SELECT E'a' '\\' $$ '; LISTEN x; -- $$");
        // `$` inside a word or after a number is no delimiter.
        assert_refused("SELECT a$$b; LISTEN x", What::Listen);
        assert_refused("SELECT $1; LISTEN x", What::Listen);
        assert_allowed("SELECT 1$$; LISTEN x$$");
        // A lone `$` that opens no delimiter leaves the rest to be read.
        assert_refused("SELECT $a b; LISTEN x", What::Listen);
        // A dollar quote ends at its own tag only.
        assert_refused("SELECT $a$ $b$ $a$; LISTEN x", What::Listen);
        // A `--` inside an operator starts a comment, as in Postgres.
        assert_allowed("SELECT 1 ---; LISTEN x");
    }

    #[test]
    fn temporary_tables_without_on_commit_drop_are_refused() {
        for sql in [
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t (a int);",
            "CREATE GLOBAL TEMPORARY TABLE t (a int)",
            "CREATE LOCAL TEMP TABLE t (a int)",
            "CREATE\n\tTEMP\n\tTABLE IF NOT EXISTS t (a int)",
            "create/**/temp/**/table t(a int)",
            "CREATE TEMP TABLE t AS SELECT 1",
            "CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS",
            "CREATE TEMP TABLE t (a int) ON COMMIT PRESERVE ROWS",
            "CREATE TEMP TABLE t (LIKE src)",
            "CREATE TABLE pg_temp.t (a int)",
            "CREATE TABLE IF NOT EXISTS \"pg_temp\".t (a int)",
            "CREATE TABLE PG_TEMP.t (a int)",
            "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
            "EXPLAIN (ANALYZE, VERBOSE) CREATE TEMP TABLE t AS SELECT 1",
        ] {
            assert_refused(sql, TEMP_TABLE);
        }
    }

    #[test]
    fn temporary_tables_with_on_commit_drop_are_allowed() {
        for sql in [
            "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
            "create temporary table t (a int) on  commit\ndrop;",
            "CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1",
            "CREATE TABLE pg_temp.t (a int) ON COMMIT DROP",
            "BEGIN; CREATE TEMP TABLE t (a int) ON COMMIT DROP; INSERT INTO t VALUES (1); COMMIT",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn temporary_views_and_sequences_are_refused() {
        let view = What::CreateTemp(Object::View);
        let sequence = What::CreateTemp(Object::Sequence);
        assert_refused("CREATE TEMP VIEW v AS SELECT 1", view);
        assert_refused("CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1", view);
        assert_refused("CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", view);
        assert_refused("CREATE VIEW pg_temp.v AS SELECT 1", view);
        assert_refused("CREATE TEMP SEQUENCE s", sequence);
        assert_refused("CREATE TEMP SEQUENCE IF NOT EXISTS s;", sequence);
        assert_refused("CREATE SEQUENCE pg_temp.s START 5", sequence);
        // Not a temporary kind: Postgres refuses it too, the message stays general.
        assert_refused("CREATE TEMP WIDGET w", What::CreateTemp(Object::Other));
    }

    #[test]
    fn permanent_objects_with_temporary_looking_names_are_allowed() {
        for sql in [
            "CREATE TABLE temp_stuff (a int)",
            "CREATE TABLE temp (a int)",
            "CREATE TABLE \"temp\" (a int)",
            "CREATE UNLOGGED TABLE u (a int)",
            "CREATE TABLE t (temp int, temporary text)",
            "CREATE TABLE pg_temporary.t (a int)",
            "CREATE TABLE s.pg_temp (a int)",
            "CREATE VIEW temp AS SELECT 1",
            "CREATE SEQUENCE temp_ids",
            "CREATE MATERIALIZED VIEW m AS SELECT 1",
            "CREATE INDEX i ON pg_temp.t (a)",
            "EXPLAIN CREATE TABLE t AS SELECT 1",
            "ALTER TABLE t ADD COLUMN temp int",
            "DROP TABLE IF EXISTS temp",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn select_into_a_temporary_table_is_refused() {
        for sql in [
            "SELECT 1 AS a INTO TEMP t",
            "select 1 as a into temporary table t from src",
            "SELECT 1 AS a INTO LOCAL TEMP t",
            "SELECT 1 AS a INTO GLOBAL TEMPORARY t",
            "SELECT 1 AS a INTO TEMP \"t\"",
            "SELECT 1 AS a INTO pg_temp.t",
            "SELECT 1 AS a INTO TABLE pg_temp.t",
            "WITH x AS (SELECT 1 AS a) SELECT * INTO TEMP t FROM x",
        ] {
            assert_refused(sql, What::SelectIntoTemp);
        }
    }

    #[test]
    fn inserting_into_or_selecting_into_a_table_named_temp_is_allowed() {
        for sql in [
            "SELECT 1 AS a INTO temp",
            "SELECT 1 AS a INTO temp;",
            "SELECT 1 AS a INTO temp FROM src",
            "SELECT 1 AS a INTO temp WHERE true",
            "SELECT 1 AS a INTO temp UNION SELECT 2",
            "SELECT 1 AS a INTO temp.t",
            "INSERT INTO temp VALUES (1)",
            "INSERT INTO temp SELECT 1",
            "INSERT INTO pg_temp.t VALUES (1)",
            "MERGE INTO temp t USING src s ON t.a = s.a WHEN MATCHED THEN DELETE",
            "SELECT 1 AS a INTO UNLOGGED t",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn holdable_cursors_are_refused() {
        for sql in [
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "declare c no scroll cursor with hold for select 1",
            "DECLARE c BINARY INSENSITIVE SCROLL CURSOR\nWITH\nHOLD FOR SELECT 1",
            "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        ] {
            assert_refused(sql, What::HoldCursor);
        }
    }

    #[test]
    fn cursors_without_hold_are_allowed() {
        for sql in [
            "DECLARE c CURSOR FOR SELECT 1",
            "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
            "DECLARE hold CURSOR FOR SELECT 1",
            "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
            "SELECT 'WITH HOLD'",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn session_advisory_lock_calls_are_refused_wherever_they_stand() {
        let cases = [
            ("SELECT pg_advisory_lock(1)", Lock::Exclusive),
            ("select PG_ADVISORY_LOCK (1, 2)", Lock::Exclusive),
            ("SELECT pg_catalog.pg_advisory_lock(1)", Lock::Exclusive),
            (
                "SELECT pg_catalog . \"pg_advisory_lock\" (1)",
                Lock::Exclusive,
            ),
            ("SELECT \"pg_catalog\".pg_advisory_lock(1)", Lock::Exclusive),
            ("SELECT pg_advisory_lock_shared(1)", Lock::Shared),
            (
                "SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1",
                Lock::TryExclusive,
            ),
            ("SELECT pg_try_advisory_lock_shared(1, 2)", Lock::TryShared),
            ("SELECT 1; SELECT pg_advisory_lock(1)", Lock::Exclusive),
            (
                "SELECT * FROM t WHERE x IN (SELECT pg_advisory_lock(1))",
                Lock::Exclusive,
            ),
            ("PREPARE p AS SELECT pg_advisory_lock($1)", Lock::Exclusive),
            (
                "COPY (SELECT pg_advisory_lock(1)) TO STDOUT",
                Lock::Exclusive,
            ),
            (
                "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)",
                Lock::Exclusive,
            ),
        ];
        for (sql, lock) in cases {
            assert_refused(sql, What::AdvisoryLock(lock));
        }
    }

    #[test]
    fn transaction_advisory_locks_unlocks_and_non_calls_are_allowed() {
        for sql in [
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_advisory_xact_lock_shared(1)",
            "SELECT pg_try_advisory_xact_lock(1)",
            "SELECT pg_try_advisory_xact_lock_shared(1)",
            "SELECT pg_advisory_unlock(1), pg_advisory_unlock_shared(1)",
            "SELECT pg_advisory_unlock_all()",
            "SELECT pg_advisory_lock FROM t",
            "SELECT myschema.pg_advisory_lock(1)",
            "SELECT \"PG_ADVISORY_LOCK\"(1)",
            "SELECT pg_advisory_lockx(1)",
            "SELECT 'pg_advisory_lock(1)'::text",
            "DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $f$ SELECT pg_advisory_lock(1) $f$",
            "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql\n\
             BEGIN ATOMIC SELECT pg_advisory_lock(1); SELECT CASE WHEN true THEN 1 END; END",
            "CREATE OR REPLACE FUNCTION pg_advisory_lock(x int) RETURNS int RETURN x",
            "DROP FUNCTION pg_advisory_lock(bigint)",
            "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_advisory_lock(bigint) FROM PUBLIC",
            "COMMENT ON ROUTINE pg_try_advisory_lock(bigint) IS 'no'",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn statements_after_a_routine_body_are_still_checked() {
        let body = "CREATE FUNCTION f() RETURNS int LANGUAGE sql\n\
                    BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END";
        assert_refused(&format!("{body}; LISTEN x"), What::Listen);
        assert_refused(
            &format!("{body}; SELECT pg_advisory_lock(1)"),
            What::AdvisoryLock(Lock::Exclusive),
        );
    }

    #[test]
    fn a_refusal_in_a_later_statement_is_found_and_the_first_one_wins() {
        assert_refused("SELECT 1; LISTEN x", What::Listen);
        assert_refused("BEGIN;SELECT 1;LISTEN x;COMMIT", What::Listen);
        assert_refused(
            "CREATE TEMP TABLE a (x int) ON COMMIT DROP; CREATE TEMP TABLE b (x int)",
            TEMP_TABLE,
        );
        assert_refused("CREATE TEMP TABLE a (x int); LISTEN x", TEMP_TABLE);
        assert_refused("LISTEN a; SELECT pg_advisory_lock(1)", What::Listen);
        assert_refused(
            "SELECT pg_advisory_lock_shared(1); LISTEN a",
            What::AdvisoryLock(Lock::Shared),
        );
        // Only the first word of a statement makes it a LISTEN, DECLARE or CREATE.
        assert_allowed("SELECT 1 LISTEN");
        assert_allowed("NOTIFY x; UNLISTEN x; SELECT 'LISTEN'");
    }

    #[test]
    fn every_message_names_transaction_pooling_and_what_works_instead() {
        let cases = [
            (What::Listen, "NOTIFY still works"),
            (TEMP_TABLE, "ON COMMIT DROP"),
            (What::CreateTemp(Object::View), "WITH query"),
            (What::CreateTemp(Object::Sequence), "regular sequence"),
            (What::CreateTemp(Object::Other), "ON COMMIT DROP"),
            (What::SelectIntoTemp, "ON COMMIT DROP AS"),
            (What::HoldCursor, "without WITH HOLD"),
            (
                What::AdvisoryLock(Lock::Exclusive),
                "Use pg_advisory_xact_lock ",
            ),
            (
                What::AdvisoryLock(Lock::Shared),
                "Use pg_advisory_xact_lock_shared ",
            ),
            (
                What::AdvisoryLock(Lock::TryExclusive),
                "Use pg_try_advisory_xact_lock ",
            ),
            (
                What::AdvisoryLock(Lock::TryShared),
                "Use pg_try_advisory_xact_lock_shared ",
            ),
        ];
        for (what, instead) in cases {
            let message = Refused { what }.message();
            assert!(
                message.contains("transaction pooling ([pool] mode = \"transaction\")"),
                "{message}"
            );
            assert!(message.contains(instead), "{message}");
            assert!(
                message.contains("session mode ([pool] mode = \"session\")"),
                "{message}"
            );
            assert!(message.is_ascii(), "{message}");
        }
        let listen = Refused { what: What::Listen }.message();
        assert!(listen.starts_with("LISTEN is not available"), "{listen}");
        assert!(
            listen.contains("; to receive notifications, connect through"),
            "{listen}"
        );
        let lock = Refused {
            what: What::AdvisoryLock(Lock::TryShared),
        }
        .message();
        assert!(
            lock.starts_with("pg_try_advisory_lock_shared is not available"),
            "{lock}"
        );
    }

    #[test]
    fn unterminated_literals_and_comments_run_to_the_end() {
        for sql in [
            "SELECT 'LISTEN x",
            "SELECT E'\\",
            "SELECT E'abc\\'; LISTEN x",
            "SELECT $$ LISTEN x",
            "SELECT $tag$ LISTEN x $ta",
            "SELECT \"LISTEN x",
            "/* LISTEN x",
            "/* /* */ LISTEN x",
            "-- LISTEN x",
            "SELECT 'a'\n",
            "SELECT 'a'\n  -- trailing",
            "$",
            "$a",
            "U&",
            "e",
        ] {
            assert_allowed(sql);
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_read_as_identifier_characters() {
        assert_eq!(
            refused(b"SELECT '\xff\xfe'; LISTEN \xc3\x28").map(|r| r.what),
            Some(What::Listen)
        );
        assert_eq!(
            refused(b"SELECT \xff; listen x").map(|r| r.what),
            Some(What::Listen)
        );
        // A high byte continues a word, as in Postgres: this is one identifier, not LISTEN.
        assert_eq!(refused(b"listen\xe9 x").map(|r| r.what), None);
    }

    #[test]
    fn every_prefix_of_a_tricky_input_is_read_without_panicking() {
        let tricky = "/* a /* b */ c */ SELECT E'x\\'y' -- z\n'w', U&'q', $t$ $ $$ $t$, $1, \"q\"\"q\", \
                      1$$ $$; CREATE TEMP TABLE t (a int) ON COMMIT DROP; DECLARE c CURSOR WITH HOLD \
                      FOR SELECT pg_catalog.pg_advisory_lock(1) INTO TEMP x; LISTEN y; é\u{0}";
        let bytes = tricky.as_bytes();
        for end in 0..=bytes.len() {
            let _ = refused(&bytes[..end]);
            let _ = refused(&bytes[end..]);
        }
        assert_refused(tricky, What::HoldCursor);
    }

    #[test]
    fn random_bytes_are_read_without_panicking() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        // Mostly the bytes the lexer treats specially, so that every path is taken often.
        const ALPHABET: &[u8] =
            b"'\"$;/*-\n\r\\()._eEuU&tT0 LISTEN listen pg_temp into hold \xff\x80\0";
        let mut rng = StdRng::seed_from_u64(14);
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.random_bool(0.9) {
                        ALPHABET[rng.random_range(0..ALPHABET.len())]
                    } else {
                        rng.random()
                    }
                })
                .collect();
            if let Some(refusal) = refused(&input) {
                assert!(!refusal.message().is_empty());
            }
        }
    }
}
