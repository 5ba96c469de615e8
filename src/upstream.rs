//! The upstream session: a connection to Postgres as the role's configured
//! user, authenticated by the proxy, with the client's harmless startup
//! parameters and the sealed claims.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

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
use crate::tamper::Tampering;
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
            "no answer from {} within {:?}",
            upstream.address(),
            upstream.connect_timeout
        ))),
    }
}

async fn open(
    upstream: &Upstream,
    tls: &UpstreamTls,
    login: Login<'_>,
) -> Result<UpstreamSession, Refusal> {
    let address = upstream.address();
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

    let lost = |e: io::Error| lost_during_startup(tls, &address, e);
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;

    let password = login.role.upstream_password.as_ref().map(Secret::as_str);
    let mut reader = FrameReader::default();
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut greeting = BytesMut::new();
    let mut key = None;
    // A password was sent and not yet accepted, so that a refusal is the
    // password's (atomic only so that the future stays Send).
    let password_pending = AtomicBool::new(false);
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
            password_pending.store(password.is_some(), Ordering::Relaxed);
            password.ok_or_else(|| {
                Refusal::database_unavailable(format!(
                    "Postgres asks for a password for {user:?}, but its [[role]] has no upstream_password"
                ))
            })
        };
        match message {
            Message::AuthenticationOk => logged_in(tls, user, &password_pending),
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
            Message::ErrorResponse(body) => {
                return Err(upstream_refusal(
                    body.fields(),
                    user,
                    &password_pending,
                    tls,
                ));
            }
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

/// A connection that broke during startup; with TLS 1.3 that is also how
/// the server's refusal of a client certificate arrives.
fn lost_during_startup(tls: &UpstreamTls, address: &str, e: io::Error) -> Refusal {
    match tls.client_certificate_refusal(&e) {
        Some(refused) => Refusal::database_unavailable(refused),
        None => Refusal::database_unavailable(format!(
            "connection to {address} lost during startup: {e}"
        )),
    }
}

/// Postgres accepted the login: an alarm about its password is over (also
/// when it no longer asks for one), and errors from here on, such as a role
/// that may not log in, are not the password's.
fn logged_in(tls: &UpstreamTls, user: &str, password_pending: &AtomicBool) {
    password_pending.store(false, Ordering::Relaxed);
    if let Some(watch) = tls.tampering() {
        watch.clear(Tampering::PasswordRejected, user);
    }
}

/// The upstream's own refusal. Authentication failures are the proxy's
/// configuration, not the client's doing, so they read as unavailability;
/// the log says what to check. A refused password is most likely one
/// changed from inside a session, which raises an alarm.
fn upstream_refusal(
    mut fields: ErrorFields<'_>,
    user: &str,
    password_pending: &AtomicBool,
    tls: &UpstreamTls,
) -> Refusal {
    let mut code = String::new();
    let mut message = String::new();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    let refused_password = matches!(code.as_str(), "28P01" | "28000");
    if refused_password && password_pending.load(Ordering::Relaxed) {
        let detail = format!("{code} {message}");
        if let Some(watch) = tls.tampering() {
            watch.raise(Tampering::PasswordRejected, user, &detail);
        }
        return Refusal::database_unavailable(format!(
            "Postgres refused the upstream_password of login role {user:?} ({detail}); \
             it was probably changed from inside a session (ALTER ROLE … PASSWORD)"
        ));
    }
    if code.starts_with("28") {
        let check = if tls.has_client_certificate() {
            "check that pg_hba.conf admits the proxy, and that the CN of [upstream] \
             tls_client_cert is the login role or is mapped to it in pg_ident.conf"
        } else {
            "check pg_hba.conf's line for the proxy: `cert` needs [upstream] tls_client_cert \
             and tls_client_key; `peer` needs a Unix socket host, and pg_ident.conf to map the \
             proxy's OS user to the role"
        };
        return Refusal::database_unavailable(format!(
            "upstream refused {user:?}: {code} {message}; {check}"
        ));
    }
    if code.starts_with("08") || code.is_empty() {
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
                    parameter = name,
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
fn filtered_options(options: &str) -> String {
    let words = split_options(options);
    let mut kept = Vec::new();
    let mut words = words.into_iter();
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
        let name = setting
            .split('=')
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        if setting.contains('=') && !is_identity_setting(&name) {
            kept.push(format!("-c {}", escape_option(&setting)));
        } else {
            tracing::info!(setting = %name, "dropped identity-setting startup option");
        }
    }
    kept.join(" ")
}

/// Splits like PostgreSQL's `pg_split_opts`: whitespace separates words, a
/// backslash makes the next character literal.
pub(crate) fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn escape_option(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c == '\\' || c.is_ascii_whitespace() {
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

    #[test]
    fn replication_is_refused() {
        let err = forwarded_parameters(&params(&[("replication", "database")])).unwrap_err();
        assert_eq!(err.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
    }
}
