//! The upstream session: a connection to Postgres as the role's configured
//! user, authenticated by the proxy, with the client's harmless startup
//! parameters and the sealed claims.

use std::collections::BTreeMap;
use std::io;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::claims;
use crate::config::{Role, Secret, Upstream};
use crate::error::{Refusal, sqlstate};
use crate::front_door::CancelKey;
use crate::stream::UpstreamStream;
use crate::upstream_tls::UpstreamTls;

/// PostgreSQL refuses startup packets above this size.
const MAX_STARTUP_PACKET: usize = 10_000;

/// A ready upstream backend, idle after its first ReadyForQuery.
pub struct UpstreamSession {
    pub stream: UpstreamStream,
    /// The backend's process id and secret, for cancelling its queries.
    pub key: CancelKey,
    /// Raw ParameterStatus and NoticeResponse frames to pass on to the client.
    pub greeting: BytesMut,
    /// The raw ReadyForQuery frame that ended startup.
    pub ready: BytesMut,
}

/// What the upstream session is opened with.
pub struct Login<'a> {
    pub role: &'a Role,
    pub database: Option<&'a str>,
    pub parameters: Vec<(String, String)>,
    /// The sealed envelope for [`claims::SETTING`].
    pub claims: String,
}

pub async fn connect(
    upstream: &Upstream,
    tls: &UpstreamTls,
    login: Login<'_>,
) -> Result<UpstreamSession, Refusal> {
    match tokio::time::timeout(upstream.connect_timeout, open(upstream, tls, login)).await {
        Ok(result) => result,
        Err(_) => Err(Refusal::database_unavailable(format!(
            "no answer from {}:{} within {:?}",
            upstream.host, upstream.port, upstream.connect_timeout
        ))),
    }
}

async fn open(
    upstream: &Upstream,
    tls: &UpstreamTls,
    login: Login<'_>,
) -> Result<UpstreamSession, Refusal> {
    let address = format!("{}:{}", upstream.host, upstream.port);
    let mut stream = tls.connect(&upstream.host, upstream.port).await?;

    let user = login.role.upstream_user();
    let mut parameters: Vec<(&str, &str)> = vec![("user", user)];
    if let Some(database) = upstream.database.as_deref().or(login.database) {
        parameters.push(("database", database));
    }
    parameters.extend(
        login
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    parameters.push((claims::SETTING, &login.claims));
    let mut out = BytesMut::new();
    frontend::startup_message(parameters.iter().copied(), &mut out)
        .map_err(|e| Refusal::auth(format!("invalid startup parameter: {e}")))?;
    if out.len() > MAX_STARTUP_PACKET {
        return Err(Refusal::auth(format!(
            "the token's claims are too large to bind to a session ({} bytes of startup data, PostgreSQL accepts at most {MAX_STARTUP_PACKET})",
            out.len()
        )));
    }

    let lost = |e: io::Error| {
        Refusal::database_unavailable(format!("connection to {address} lost during startup: {e}"))
    };
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;

    let password = login.role.upstream_password.as_ref().map(Secret::as_str);
    let mut reader = FrameReader::default();
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut greeting = BytesMut::new();
    let mut key = None;
    loop {
        let (kind, raw) = reader.next(&mut stream).await.map_err(lost)?;
        if matches!(kind, b'S' | b'N') {
            greeting.extend_from_slice(&raw);
            continue;
        }
        if kind == b'Z' {
            let key = key
                .ok_or_else(|| Refusal::database_unavailable("upstream sent no BackendKeyData"))?;
            return Ok(UpstreamSession {
                stream,
                key,
                greeting,
                ready: raw,
            });
        }
        let message = Message::parse(&mut raw.clone())
            .map_err(lost)?
            .ok_or_else(|| Refusal::database_unavailable("truncated upstream message"))?;
        out.clear();
        let need_password = || {
            password.ok_or_else(|| {
                Refusal::database_unavailable(format!(
                    "Postgres asks for a password for {user:?}, but its [[role]] has no upstream_password"
                ))
            })
        };
        match message {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(need_password()?.as_bytes(), &mut out).map_err(lost)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), need_password()?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(lost)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(m) = mechanisms.next().map_err(lost)? {
                    offered |= m == sasl::SCRAM_SHA_256;
                }
                if !offered {
                    return Err(Refusal::database_unavailable(
                        "upstream offers no SCRAM-SHA-256",
                    ));
                }
                let state = sasl::ScramSha256::new(
                    need_password()?.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, state.message(), &mut out)
                    .map_err(lost)?;
                scram = Some(state);
            }
            Message::AuthenticationSaslContinue(body) => {
                let state = scram
                    .as_mut()
                    .ok_or_else(|| Refusal::database_unavailable("unexpected SASL continue"))?;
                state
                    .update(body.data())
                    .map_err(|e| Refusal::database_unavailable(format!("SCRAM: {e}")))?;
                frontend::sasl_response(state.message(), &mut out).map_err(lost)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let state = scram
                    .as_mut()
                    .ok_or_else(|| Refusal::database_unavailable("unexpected SASL final"))?;
                state.finish(body.data()).map_err(|e| {
                    Refusal::database_unavailable(format!("SCRAM server signature: {e}"))
                })?;
            }
            Message::BackendKeyData(body) => {
                key = Some(CancelKey {
                    pid: body.process_id(),
                    secret: body.secret_key(),
                });
            }
            Message::ErrorResponse(body) => return Err(upstream_refusal(body.fields(), user)),
            _ => {
                return Err(Refusal::database_unavailable(format!(
                    "unexpected message {:?} from upstream during startup",
                    kind as char
                )));
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(lost)?;
            stream.flush().await.map_err(lost)?;
        }
    }
}

/// The upstream's own refusal. Authentication failures are the proxy's
/// configuration, not the client's doing, so they read as unavailability.
fn upstream_refusal(mut fields: ErrorFields<'_>, user: &str) -> Refusal {
    let mut code = String::new();
    let mut message = String::new();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    if code.starts_with("28") || code.starts_with("08") || code.is_empty() {
        return Refusal::database_unavailable(format!(
            "upstream refused {user:?}: {code} {message}"
        ));
    }
    Refusal::new(code, message).because(crate::error::Reason::Upstream)
}

/// Reads whole backend frames into a reused buffer.
#[derive(Default)]
pub(crate) struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    pub(crate) async fn next(
        &mut self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> io::Result<(u8, BytesMut)> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_u32() as usize;
                if len < 4 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad frame length",
                    ));
                }
                if self.buf.len() > len {
                    let kind = self.buf[0];
                    return Ok((kind, self.buf.split_to(len + 1)));
                }
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Identity-bearing settings a client must not choose: its identity comes
/// only from the verified token.
fn is_identity_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "role" | "session_authorization")
        || ["rlsgate.", "request.jwt.", "request.", "pg_session_jwt."]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The client's startup parameters that may reach Postgres. `user`,
/// `database` and `replication` are the proxy's to set; settings that could
/// change identity are dropped, also from inside `options`.
pub fn forwarded_parameters(
    client: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, Refusal> {
    let mut forwarded = Vec::new();
    for (name, value) in client {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => {
                return Err(Refusal::new(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "replication connections are not served by rlsgate",
                ));
            }
            "options" => {
                let options = filtered_options(value);
                if !options.is_empty() {
                    forwarded.push((name.clone(), options));
                }
            }
            name if is_identity_setting(name) => {
                tracing::info!(
                    parameter = %loggable(name),
                    "dropped identity-setting startup parameter"
                );
            }
            _ => forwarded.push((name.clone(), value.clone())),
        }
    }
    Ok(forwarded)
}

/// Keeps only `-c name=value` / `--name=value` settings that are not
/// identity settings; other backend switches have no business here.
///
/// The client's `options` are split as PostgreSQL's `pg_split_opts` splits
/// them (see [`split_option_bytes`]); what is kept is written out again so
/// that the server splits it into exactly the same settings.
///
/// A setting is kept only if every byte of it is printable ASCII (0x20 to
/// 0x7e). The server decides which bytes separate words with `isspace()`
/// under the database's `LC_CTYPE`: for bytes from 0x80 up that depends on
/// a locale the proxy cannot know, so a setting holding one could be split
/// by the server where the proxy saw none, and a backslash cannot make
/// every byte of a UTF-8 character literal without breaking the character.
/// Control bytes are dropped with them: no harmless setting needs one in
/// `options`. Such values can be sent as their own startup parameter (which
/// is never split) or `SET` after connecting. A dropped setting is logged
/// by its name only.
fn filtered_options(options: &str) -> String {
    let mut kept = Vec::new();
    let mut words = split_options(options).into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_owned())
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_owned())
        } else {
            tracing::info!("dropped startup option that is not a setting");
            None
        };
        let Some(setting) = setting else { continue };
        // As PostgreSQL's ParseLongOption: the name ends at the first `=`,
        // and its dashes are underscores.
        let name = setting
            .split('=')
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        if !setting.contains('=') {
            tracing::info!(setting = %loggable(&name), "dropped startup option without a value");
        } else if is_identity_setting(&name) {
            tracing::info!(setting = %loggable(&name), "dropped identity-setting startup option");
        } else if !setting.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            tracing::info!(
                setting = %loggable(&name),
                "dropped startup option holding a control or non-ASCII byte: \
                 send it as a startup parameter of its own, or SET it after connecting"
            );
        } else {
            kept.push(format!("-c {}", escape_option(&setting)));
        }
    }
    kept.join(" ")
}

/// A client-chosen name as it may appear in a log line: bounded, with
/// control characters escaped.
fn loggable(name: &str) -> String {
    name.chars().take(64).flat_map(char::escape_debug).collect()
}

/// C's `isspace()` in the "C" locale: the bytes every locale treats as
/// space.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Splits exactly as PostgreSQL's `pg_split_opts` (postinit.c) does in the
/// "C" locale, byte by byte: leading space bytes are skipped, a word runs
/// to the next space byte that no backslash escapes, and a backslash makes
/// the next byte literal (a trailing one is dropped, leaving a word that
/// may be empty).
pub fn split_option_bytes(options: &[u8]) -> Vec<Vec<u8>> {
    let mut words = Vec::new();
    let mut bytes = options.iter().copied().peekable();
    loop {
        while bytes.next_if(|&b| is_c_space(b)).is_some() {}
        if bytes.peek().is_none() {
            return words;
        }
        let mut word = Vec::new();
        let mut escaped = false;
        while let Some(byte) = bytes.next_if(|&b| escaped || !is_c_space(b)) {
            if !escaped && byte == b'\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(byte);
            }
        }
        words.push(word);
    }
}

/// [`split_option_bytes`] of a string. Words end only at ASCII bytes and
/// lose only ASCII backslashes, so each is valid UTF-8 again.
pub(crate) fn split_options(options: &str) -> Vec<String> {
    split_option_bytes(options.as_bytes())
        .into_iter()
        .map(|word| String::from_utf8_lossy(&word).into_owned())
        .collect()
}

/// Escapes `word` so that `pg_split_opts` reads it back as one word:
/// a backslash before every backslash and every space byte.
fn escape_option(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '\\' || u8::try_from(c).is_ok_and(is_c_space) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn identity_settings_are_dropped_and_harmless_ones_kept() {
        let forwarded = forwarded_parameters(&params(&[
            ("user", "authenticated"),
            ("database", "app"),
            ("application_name", "psql"),
            ("Role", "postgres"),
            ("rlsgate.session", "forged"),
            ("request.jwt.claims", "{}"),
            ("options", "-c role=postgres -c statement_timeout=5s --rlsgate.session=x -cTimeZone=UTC -c search_path=a\\ b -d 5"),
        ]))
        .unwrap();
        assert_eq!(
            forwarded,
            vec![
                ("application_name".to_owned(), "psql".to_owned()),
                (
                    "options".to_owned(),
                    "-c statement_timeout=5s -c TimeZone=UTC -c search_path=a\\ b".to_owned()
                ),
            ]
        );
    }

    /// The bytes C's `isspace()` accepts in every locale.
    const SPACE_BYTES: [u8; 6] = [b'\t', b'\n', 0x0b, 0x0c, b'\r', b' '];

    fn words(options: &[u8]) -> Vec<Vec<u8>> {
        split_option_bytes(options)
    }

    #[test]
    fn options_are_split_as_pg_split_opts_splits_them() {
        assert!(words(b"").is_empty());
        assert!(words(b" \t\x0b ").is_empty());
        assert_eq!(words(b"  -c  a=b \t\n"), [&b"-c"[..], b"a=b"]);
        assert_eq!(words(b"a\\ b\\\\c"), [&b"a b\\c"[..]]);
        assert_eq!(words(b"a\\\x0bb"), [&b"a\x0bb"[..]]);
        // A trailing backslash is dropped; alone it leaves an empty word.
        assert_eq!(words(b"x\\"), [&b"x"[..]]);
        assert_eq!(words(b"x \\"), [&b"x"[..], b""]);
        for space in SPACE_BYTES {
            assert_eq!(words(&[b'a', space, b'b']), [b"a", b"b"], "{space:#04x}");
        }
        // Above ASCII the server's splitting depends on its locale; the
        // filter drops settings holding such bytes instead.
        for byte in 0x80..=0xff {
            assert_eq!(
                words(&[b'a', byte, b'b']),
                [[b'a', byte, b'b']],
                "{byte:#04x}"
            );
        }
    }

    fn forwarded_options(options: &str) -> Option<String> {
        let forwarded = forwarded_parameters(&params(&[("options", options)])).unwrap();
        forwarded
            .into_iter()
            .find(|(name, _)| name == "options")
            .map(|(_, value)| value)
    }

    #[test]
    fn a_setting_smuggled_after_any_space_byte_is_dropped() {
        for space in SPACE_BYTES {
            let s = char::from(space);
            let options = format!(
                "-c application_name=x{s}-c{s}role=other{s}-c{s}request.jwt.claims=y{s}--rlsgate.session=z{s}-cpg_session_jwt.jwk=k"
            );
            assert_eq!(
                forwarded_options(&options).as_deref(),
                Some("-c application_name=x"),
                "{space:#04x}"
            );
        }
    }

    #[test]
    fn settings_holding_control_or_non_ascii_bytes_are_dropped() {
        for options in [
            "-c application_name=caf\u{e9}",
            "-c application_name=a\\\u{7}b",
            "-c application_name=a\\\tb",
            "-c search_path=\u{7f}",
            "-c \u{e9}=x",
            "-c application_name=a\u{a0}-c\u{a0}role=other",
        ] {
            assert_eq!(forwarded_options(options), None, "{options:?}");
            let with_harmless = format!("{options} -c statement_timeout=5s");
            assert_eq!(
                forwarded_options(&with_harmless).as_deref(),
                Some("-c statement_timeout=5s"),
                "{options:?}"
            );
        }
    }

    #[test]
    fn what_is_kept_splits_back_into_the_same_settings() {
        // Options built from the bytes that matter, in a fixed pseudo-random
        // sequence so that a failure repeats.
        let alphabet = [
            "-c",
            "--",
            " ",
            "\t",
            "\u{b}",
            "\\",
            "=",
            "-",
            "role",
            "rlsgate.session",
            "a",
            "x.y",
            "\u{e9}",
            "\u{a0}",
            "\u{7}",
        ];
        let mut state: u32 = 0x9e37_79b9;
        for _ in 0..5_000 {
            let mut options = String::new();
            for _ in 0..12 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                options.push_str(alphabet[state as usize % alphabet.len()]);
            }
            let Some(kept) = forwarded_options(&options) else {
                continue;
            };
            let words = split_options(&kept);
            assert_eq!(words.len() % 2, 0, "{options:?} -> {kept:?}");
            for pair in words.chunks(2) {
                assert_eq!(pair[0], "-c", "{options:?} -> {kept:?}");
                let setting = &pair[1];
                let (name, _) = setting.split_once('=').expect("a value");
                assert!(
                    !is_identity_setting(&name.replace('-', "_")),
                    "{options:?} -> {kept:?}"
                );
                assert!(
                    setting.bytes().all(|b| (0x20..=0x7e).contains(&b)),
                    "{kept:?}"
                );
            }
            // Filtering again changes nothing: the server reads what the
            // proxy meant.
            assert_eq!(forwarded_options(&kept).as_deref(), Some(kept.as_str()));
        }
    }

    #[test]
    fn replication_is_refused() {
        let err = forwarded_parameters(&params(&[("replication", "database")])).unwrap_err();
        assert_eq!(err.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
    }
}
