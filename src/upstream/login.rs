//! Logging in to Postgres: the connection (TLS as configured), the startup
//! packet with the client's harmless parameters, the authentication
//! exchange with the role's upstream password, and what a refusal says.
//! Then the backend is inspected ([`inspect`]) before anyone uses it.

use std::io;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncWriteExt;

use crate::auth::claims::{self, Backend};
use crate::config::{Role, Secret, Upstream};
use crate::ops::tamper::Tampering;
use crate::protocol::frame::{Frame, MAX_BACKEND_MESSAGE};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal};
use crate::protocol::server_error::ServerError;
use crate::protocol::startup::{CancelKey, MAX_STARTUP_PACKET};
use crate::session::stream::UpstreamStream;
use crate::upstream::inspect::inspect;
use crate::upstream::tls::UpstreamTls;

/// A ready upstream backend, idle after its first ReadyForQuery.
pub(crate) struct UpstreamSession {
    pub(crate) stream: UpstreamStream,
    /// The backend's process id and secret, for cancelling its queries.
    pub(crate) key: CancelKey,
    /// The backend as claims envelopes name it.
    pub(crate) backend: Backend,
    /// Raw ParameterStatus and NoticeResponse frames to pass on to the client.
    pub(crate) greeting: BytesMut,
    /// The raw ReadyForQuery frame that ended startup.
    pub(crate) ready: BytesMut,
}

/// What the upstream session is opened with.
pub(crate) struct Login<'a> {
    pub(crate) role: &'a Role,
    pub(crate) database: Option<&'a str>,
    pub(crate) parameters: Vec<(String, String)>,
    /// Whether a login role with `ALTER ROLE … SET` settings its `[[role]]`
    /// does not declare is refused (always, except for `rlsgate check`,
    /// which reports them).
    pub(crate) refuse_undeclared_settings: bool,
}

pub(crate) async fn connect(
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
    let mut out = startup_packet(upstream, &login)?;
    let lost = |e: io::Error| lost_during_startup(tls, &address, e);
    stream.write_all(&out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;

    let mut auth = Authentication {
        user: login.role.upstream_user(),
        password: login.role.upstream_password.as_ref().map(Secret::as_str),
        scram: None,
        password_pending: false,
    };
    let mut greeting = BytesMut::new();
    let mut key = None;
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
        out.clear();
        match frame.into_message().map_err(lost)? {
            Message::BackendKeyData(body) => {
                key = Some(CancelKey {
                    pid: body.process_id(),
                    secret: body.secret_key(),
                });
            }
            Message::ErrorResponse(body) => {
                return Err(auth.refusal(ServerError::from_body(&body), tls));
            }
            message => auth.answer(message, kind, tls, &mut out, lost)?,
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(lost)?;
            stream.flush().await.map_err(lost)?;
        }
    }
}

/// The StartupMessage: the role's upstream user, the database, the client's
/// forwarded parameters, and the envelope setting, empty.
fn startup_packet(upstream: &Upstream, login: &Login<'_>) -> Result<BytesMut, Refusal> {
    let mut parameters: Vec<(&str, &str)> = vec![("user", login.role.upstream_user())];
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
    Ok(out)
}

/// The proxy's side of Postgres's authentication exchange for one login.
struct Authentication<'a> {
    user: &'a str,
    password: Option<&'a str>,
    scram: Option<sasl::ScramSha256>,
    /// A password was sent and not yet accepted, so that a refusal is the
    /// password's.
    password_pending: bool,
}

impl<'a> Authentication<'a> {
    /// Answers an authentication request into `out` (nothing for
    /// AuthenticationOk and SASL final); any other message, of type `kind`,
    /// does not belong in startup.
    fn answer(
        &mut self,
        message: Message,
        kind: u8,
        tls: &UpstreamTls,
        out: &mut BytesMut,
        lost: impl Fn(io::Error) -> Refusal,
    ) -> Result<(), Refusal> {
        match message {
            Message::AuthenticationOk => self.logged_in(tls),
            Message::AuthenticationCleartextPassword => {
                messages::password(out, self.need_password()?.as_bytes()).map_err(lost)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let password = self.need_password()?.as_bytes();
                let hash = md5_hash(self.user.as_bytes(), password, body.salt());
                messages::password(out, hash.as_bytes()).map_err(lost)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(m) = mechanisms.next().map_err(&lost)? {
                    offered |= m == sasl::SCRAM_SHA_256;
                }
                if !offered {
                    return Err(Refusal::database_unavailable(
                        "upstream offers no SCRAM-SHA-256",
                    ));
                }
                let state = sasl::ScramSha256::new(
                    self.need_password()?.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                messages::sasl_initial_response(out, sasl::SCRAM_SHA_256, state.message())
                    .map_err(lost)?;
                self.scram = Some(state);
            }
            Message::AuthenticationSaslContinue(body) => {
                let state = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| Refusal::database_unavailable("unexpected SASL continue"))?;
                state
                    .update(body.data())
                    .map_err(|e| Refusal::database_unavailable(format!("SCRAM: {e}")))?;
                messages::sasl_response(out, state.message()).map_err(lost)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let state = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| Refusal::database_unavailable("unexpected SASL final"))?;
                state.finish(body.data()).map_err(|e| {
                    Refusal::database_unavailable(format!("SCRAM server signature: {e}"))
                })?;
            }
            _ => {
                return Err(Refusal::database_unavailable(format!(
                    "unexpected message {:?} from upstream during startup",
                    kind as char
                )));
            }
        }
        Ok(())
    }

    /// The role's upstream password, about to be sent.
    fn need_password(&mut self) -> Result<&'a str, Refusal> {
        self.password_pending = self.password.is_some();
        self.password.ok_or_else(|| {
            Refusal::database_unavailable(format!(
                "Postgres asks for a password for {:?}, but its [[role]] has no upstream_password",
                self.user
            ))
        })
    }

    /// Postgres accepted the login: an alarm about its password is over
    /// (also when it no longer asks for one), and errors from here on, such
    /// as a role that may not log in, are not the password's.
    fn logged_in(&mut self, tls: &UpstreamTls) {
        self.password_pending = false;
        if let Some(watch) = tls.tampering() {
            watch.clear(Tampering::PasswordRejected, self.user);
        }
    }

    /// The upstream's own refusal. Authentication failures are the proxy's
    /// configuration, not the client's doing, so they read as unavailability;
    /// the log says what to check. A refused password is most likely one
    /// changed from inside a session, which raises an alarm.
    fn refusal(&self, error: ServerError, tls: &UpstreamTls) -> Refusal {
        let ServerError { code, message, .. } = error;
        let user = self.user;
        let refused_password = matches!(code.as_str(), "28P01" | "28000");
        if refused_password && self.password_pending {
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
        Refusal::new(code, message).because(Reason::Upstream)
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
