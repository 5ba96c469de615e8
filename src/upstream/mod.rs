//! The upstream session: a connection to Postgres as the role's configured
//! user, authenticated by the proxy, with the client's harmless startup
//! parameters; then one round trip that names the backend (for the claims
//! envelope) and refuses a login role whose settings were changed behind the
//! operator's back; then the envelope bound, by [`bind_claims`].

pub mod pool;
pub mod tls;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::claims::{self, Backend, Identity, SigningKey};
use crate::config::{Role, Secret, Upstream};
use crate::ops::tamper::Tampering;
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::protocol::server_error::ServerError;
use crate::protocol::startup::{CancelKey, MAX_STARTUP_PACKET};
use crate::session::stream::UpstreamStream;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::upstream=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::upstream";

/// A ready upstream backend, idle after its first ReadyForQuery.
pub struct UpstreamSession {
    pub stream: UpstreamStream,
    /// The backend's process id and secret, for cancelling its queries.
    pub key: CancelKey,
    /// The backend as claims envelopes name it.
    pub backend: Backend,
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
    /// Whether a login role with `ALTER ROLE … SET` settings its `[[role]]`
    /// does not declare is refused (always, except for `rlsgate check`,
    /// which reports them).
    pub refuse_undeclared_settings: bool,
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
    // Empty until bound: a session whose envelope was never bound, or was
    // reset to this value, is refused by the `auth` functions.
    parameters.push((claims::SETTING, ""));
    let mut out = BytesMut::new();
    messages::startup_message(&mut out, parameters.iter().copied())
        .map_err(|e| Refusal::auth(format!("invalid startup parameter: {e}")))?;
    if out.len() > MAX_STARTUP_PACKET {
        return Err(Refusal::auth(format!(
            "the startup parameters are too large ({} bytes of startup data, PostgreSQL accepts at most {MAX_STARTUP_PACKET})",
            out.len()
        )));
    }

    let lost = |e: io::Error| lost_during_startup(tls, &address, e);
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;

    let password = login.role.upstream_password.as_ref().map(Secret::as_str);
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut greeting = BytesMut::new();
    let mut key = None;
    // A password was sent and not yet accepted, so that a refusal is the
    // password's (atomic only so that the future stays Send).
    let password_pending = AtomicBool::new(false);
    loop {
        let frame = Frame::read(&mut stream, MAX_BACKEND_MESSAGE)
            .await
            .map_err(lost)?;
        let kind = frame.kind();
        if matches!(kind, b'S' | b'N') {
            greeting.extend_from_slice(&frame.into_raw());
            continue;
        }
        if kind == b'Z' {
            let key = key
                .ok_or_else(|| Refusal::database_unavailable("upstream sent no BackendKeyData"))?;
            let backend = inspect(&mut stream, key, &login, tls).await?;
            return Ok(UpstreamSession {
                stream,
                key,
                backend,
                greeting,
                ready: frame.into_raw(),
            });
        }
        let message = frame.into_message().map_err(lost)?;
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
                messages::password(&mut out, need_password()?.as_bytes()).map_err(lost)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), need_password()?.as_bytes(), body.salt());
                messages::password(&mut out, hash.as_bytes()).map_err(lost)?;
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
                messages::sasl_initial_response(&mut out, sasl::SCRAM_SHA_256, state.message())
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
                messages::sasl_response(&mut out, state.message()).map_err(lost)?;
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
                let error = ServerError::from_body(&body);
                return Err(upstream_refusal(error, user, &password_pending, tls));
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
    error: ServerError,
    user: &str,
    password_pending: &AtomicBool,
    tls: &UpstreamTls,
) -> Refusal {
    let ServerError { code, message, .. } = error;
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
    Refusal::new(code, message).because(crate::protocol::refusal::Reason::Upstream)
}

/// What the proxy asks every new backend before anyone uses it: its start
/// time, for the claims envelope, and the settings its login role carries
/// from `ALTER ROLE … [IN DATABASE …] SET`. Every name is qualified, so that
/// a `search_path` set on the role cannot change what this query means; the
/// timeouts are lifted for its own transaction only, so that a role's
/// `statement_timeout = '1ms'` cannot hide itself; the start time is
/// computed exactly as `auth.session()` computes it.
const INSPECT: &str = "begin; \
    set local statement_timeout = 0; set local lock_timeout = 0; \
    select (extract(epoch from a.backend_start) \
       operator(pg_catalog.*) 1000000)::pg_catalog.int8, \
     (select pg_catalog.json_agg(s.setting order by d.setdatabase, s.n) \
        from pg_catalog.pg_db_role_setting d \
             cross join lateral pg_catalog.unnest(d.setconfig) with ordinality as s(setting, n) \
       where d.setrole operator(pg_catalog.=) (select r.oid from pg_catalog.pg_roles r \
                 where r.rolname operator(pg_catalog.=) session_user) \
         and d.setdatabase operator(pg_catalog.=) any (array[0::pg_catalog.oid, \
             (select b.oid from pg_catalog.pg_database b \
               where b.datname operator(pg_catalog.=) pg_catalog.current_database())])) \
     from pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a; \
    commit";

/// Runs [`INSPECT`] on a fresh backend: its identity for envelopes, and a
/// refusal when its login role has settings the configuration does not
/// declare. Every role may `ALTER ROLE` itself, so a user of the shared login
/// role could otherwise change every later session of every other user
/// (`statement_timeout`, `search_path`, `default_transaction_read_only`, …).
async fn inspect(
    stream: &mut UpstreamStream,
    key: CancelKey,
    login: &Login<'_>,
    tls: &UpstreamTls,
) -> Result<Backend, Refusal> {
    let role = login.role;
    let user = role.upstream_user();
    let lost = |e: io::Error| {
        Refusal::database_unavailable(format!("connection lost while inspecting the backend: {e}"))
    };
    let mut out = BytesMut::new();
    messages::query(&mut out, INSPECT).map_err(lost)?;
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    let mut row = None;
    let mut failed = None;
    loop {
        let frame = Frame::read(stream, MAX_BACKEND_MESSAGE)
            .await
            .map_err(lost)?;
        match frame.kind() {
            b'T' | b'C' | b'N' | b'S' | b'A' => {}
            b'D' => row = Some(frame),
            b'E' => failed = Some(frame),
            // After an error the transaction is aborted and the
            // ErrorResponse says why: the connection is not served.
            b'Z' => break,
            other => {
                return Err(Refusal::database_unavailable(format!(
                    "unexpected message {:?} while inspecting the backend",
                    other as char
                )));
            }
        }
    }
    if let Some(frame) = failed {
        let ServerError { code, message, .. } = ServerError::from_frame(frame);
        return Err(Refusal::database_unavailable(format!(
            "the proxy's first query as {user:?} failed ({code} {message}); \
             if a setting of the login role causes this, it was probably changed \
             from inside a session: see `rlsgate check`"
        ))
        .because(Reason::Upstream));
    }
    let (started, settings) = row
        .and_then(inspected)
        .ok_or_else(|| Refusal::database_unavailable("the backend did not say when it started"))?;
    if login.refuse_undeclared_settings {
        let watch = tls.tampering();
        if let Some(names) = undeclared_names(&settings, &role.upstream_settings) {
            if let Some(watch) = watch {
                watch.raise(Tampering::UndeclaredSettings, user, &names);
            }
            return Err(undeclared_settings(user, &names));
        }
        if let Some(watch) = watch {
            watch.clear(Tampering::UndeclaredSettings, user);
        }
    }
    Ok(Backend {
        pid: key.pid,
        started,
    })
}

/// The start time and role settings of [`INSPECT`]'s one row.
fn inspected(row: Frame) -> Option<(i64, Vec<String>)> {
    let Ok(Message::DataRow(body)) = row.into_message() else {
        return None;
    };
    let buffer = body.buffer();
    let mut columns = body.ranges();
    let started = columns.next().ok()??.map(|r| &buffer[r])?;
    let started = std::str::from_utf8(started).ok()?.parse().ok()?;
    let settings = match columns.next().ok()?? {
        Some(range) => serde_json::from_slice(&buffer[range]).ok()?,
        None => Vec::new(),
    };
    Some((started, settings))
}

/// The names of the `settings` (as `name=value`) that are not `declared`,
/// or `None` when all are.
fn undeclared_names(settings: &[String], declared: &[String]) -> Option<String> {
    let names: Vec<&str> = settings
        .iter()
        .filter(|s| !declared.contains(s))
        .map(|s| setting_name(s))
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// The refusal for a login role with undeclared settings. It names them
/// but never shows their values, which may be anything (a custom setting
/// holding a secret, say); `rlsgate check` shows them where that is safe.
fn undeclared_settings(user: &str, names: &str) -> Refusal {
    Refusal::database_unavailable(format!(
        "login role {user:?} has settings the configuration does not declare: {names}; \
         they apply to every session and were probably set from inside one \
         (ALTER ROLE … SET). Remove them (ALTER ROLE {user} RESET …, also IN \
         DATABASE …) or declare them in its [[role]] upstream_settings"
    ))
    .because(Reason::Upstream)
}

/// The name in a `name=value` role setting.
fn setting_name(setting: &str) -> &str {
    setting.split('=').next().unwrap_or_default()
}

/// Why applying settings with [`messages::set_config`] failed.
pub(crate) enum SetFailure {
    /// The connection is gone (or going).
    Dead(String),
    /// The backend refused a setting; the connection is still usable.
    Refused(String),
}

/// Reads the answer to [`messages::set_config`] up to its ReadyForQuery,
/// passing each ParameterStatus on to `reported`.
pub(crate) async fn read_set_config_answer(
    stream: &mut UpstreamStream,
    mut reported: impl FnMut(&[u8]),
) -> Result<(), SetFailure> {
    let dead = |e: io::Error| SetFailure::Dead(e.to_string());
    let mut refused = None;
    loop {
        let frame = Frame::read(stream, MAX_BACKEND_MESSAGE)
            .await
            .map_err(dead)?;
        match frame.kind() {
            b'1' | b'2' | b'3' | b'D' | b'C' | b'N' | b'A' => {}
            b'S' => reported(frame.body()),
            b'E' => {
                let error = ServerError::from_frame(frame);
                if error.is_fatal() {
                    return Err(SetFailure::Dead(
                        "the backend ended the connection".to_owned(),
                    ));
                }
                refused = Some(format!("{} {}", error.code, error.message));
            }
            b'Z' => {
                return match (refused, frame.body().first()) {
                    (Some(why), _) => Err(SetFailure::Refused(why)),
                    (None, Some(&b'I')) => Ok(()),
                    (None, _) => Err(SetFailure::Dead(
                        "not idle after applying settings".to_owned(),
                    )),
                };
            }
            other => {
                return Err(SetFailure::Dead(format!(
                    "unexpected message {:?} while applying settings",
                    other as char
                )));
            }
        }
    }
}

/// Binds `identity`'s envelope to an unpooled session's backend, in one
/// round trip. Returns the envelope's expiry.
pub async fn bind_claims(
    session: &mut UpstreamSession,
    key: &SigningKey,
    identity: &Identity,
    now: u64,
) -> Result<u64, Refusal> {
    let exp = identity.envelope_expiry(now);
    let sealed = key.seal(identity, session.backend, exp);
    let failed = |why: String| {
        Refusal::database_unavailable(format!("binding the session's claims failed: {why}"))
    };
    let mut out = BytesMut::new();
    messages::set_config(&mut out, "", [(claims::SETTING, sealed.as_str())])
        .map_err(|e| failed(e.to_string()))?;
    let stream = &mut session.stream;
    let written = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    written.await.map_err(|e| failed(e.to_string()))?;
    read_set_config_answer(&mut session.stream, |_| {})
        .await
        .map_err(|(SetFailure::Dead(why) | SetFailure::Refused(why))| failed(why))?;
    Ok(exp)
}

/// How long a retired backend may take to end after its Terminate.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ends a session's backend for good. A statement still running is
/// cancelled first: left alone it would run on, and commit, after its
/// session ended (its token expired, its client left), holding a Postgres
/// backend that no slot of the proxy counts. Then Terminate, and a wait
/// until the backend has closed the connection, so that the session's
/// slots are released only once its backend is gone.
pub async fn retire(
    mut stream: UpstreamStream,
    (host, port, key): (&str, u16, CancelKey),
    in_flight: bool,
    tls: &UpstreamTls,
) {
    if in_flight && let Err(e) = crate::session::cancel::cancel_backend(host, port, key, tls).await
    {
        tracing::warn!(
            target: LOG_TARGET,
            error = %e, "cannot cancel the statement of a session that ended",
        );
    }
    let ended = tokio::time::timeout(RETIRE_TIMEOUT, async {
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        if stream.write_all(&terminate).await.is_ok() {
            let _ = stream.flush().await;
        }
        let mut sink = [0u8; 1024];
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
    if ended.is_err() {
        tracing::warn!(
            target: LOG_TARGET,
            "the backend of an ended session is still running {RETIRE_TIMEOUT:?} after it was \
             told to end; its connection is closed and its slot freed"
        );
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
                    target: LOG_TARGET,
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
            tracing::info!(target: LOG_TARGET, "dropped startup option that is not a setting");
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
            tracing::info!(
                target: LOG_TARGET,
                setting = %loggable(&name), "dropped startup option without a value",
            );
        } else if is_identity_setting(&name) {
            tracing::info!(
                target: LOG_TARGET,
                setting = %loggable(&name), "dropped identity-setting startup option",
            );
        } else if !setting.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            tracing::info!(
                target: LOG_TARGET,
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
    fn undeclared_settings_are_named_without_their_values() {
        let settings = [
            "app.api_key=s3cr3t".to_owned(),
            "statement_timeout=1ms".to_owned(),
        ];
        let declared = ["statement_timeout=5min".to_owned()];
        let names = undeclared_names(&settings, &declared).unwrap();
        assert_eq!(names, "app.api_key, statement_timeout");
        let refusal = undeclared_settings("authenticated", &names);
        let logged = format!("{refusal} {:?}", refusal.detail);
        assert!(logged.contains(&names), "{logged}");
        assert!(
            !logged.contains("s3cr3t") && !logged.contains("1ms"),
            "{logged}"
        );
        assert_eq!(undeclared_names(&settings[1..], &settings[1..]), None);
    }

    #[test]
    fn replication_is_refused() {
        let err = forwarded_parameters(&params(&[("replication", "database")])).unwrap_err();
        assert_eq!(err.sqlstate, sqlstate::FEATURE_NOT_SUPPORTED);
    }
}
