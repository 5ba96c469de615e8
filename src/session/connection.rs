//! One client connection, top to bottom: front door, token check, upstream
//! session with the claims bound to it, relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::auth::claims::{Envelope, Identity, NO_EXPIRY, SigningKey};
use crate::auth::token_cache::TokenDigest;
use crate::auth::token_check::{TokenChecker, VerifiedToken};
use crate::clock::unix_now;
use crate::config::{Config, PoolMode, Role, TokenPolicy};
use crate::ops::metrics::{self, Metrics};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::session::cancel::{CancelRegistry, Registration};
use crate::session::front_door::{self, Arrival, FrontDoorError, PasswordError};
use crate::session::limit::{Limit, StartupSlot};
use crate::session::relay::{self, Expiry, Relayed, Traffic};
use crate::session::shutdown::Shutdown;
use crate::session::stream::{ClientStream, UpstreamStream};
use crate::session::transaction::{self, Tenant};
use crate::upstream::login::{Login, UpstreamSession};
use crate::upstream::options::forwarded_parameters;
use crate::upstream::pool::{Attached, Lease, Pool};
use crate::upstream::retire::retire;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::connection=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::connection";

/// How long, and how much, a refused client may still send before we close.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// What every connection shares.
pub(crate) struct Services {
    pub(crate) config: Config,
    /// `[listen] max_connections`, and per role for roles that set one.
    /// Shared with the services a reload replaces these with.
    pub(crate) limit: Arc<Limit>,
    pub(crate) role_limits: HashMap<String, Arc<Limit>>,
    pub(crate) tokens: TokenChecker,
    pub(crate) cancels: Arc<CancelRegistry>,
    /// How the upstream connections of sessions and cancel requests are made.
    pub(crate) upstream_tls: UpstreamTls,
    pub(crate) tls: Option<TlsAcceptor>,
    /// The same certificate for the HTTP front door (ALPN `http/1.1`).
    pub(crate) http_tls: Option<TlsAcceptor>,
    /// Kept across reloads, so counts go on.
    pub(crate) metrics: Arc<Metrics>,
    /// Warm upstream connections, with `[pool] mode = "session"`.
    pub(crate) pool: Option<Arc<Pool>>,
    /// The upstream connections HTTP requests share, with `[http] address`.
    pub(crate) http_pool: Option<Arc<Pool>>,
    /// Alarms for a login role changed from inside a session; kept across
    /// reloads, and told of logins through `upstream_tls`.
    pub(crate) tampering: Arc<crate::ops::tamper::TamperWatch>,
}

/// A session admitted and connected upstream, ready for the relay.
struct Session {
    role: String,
    upstream: Hold,
    /// Held while the session lives: its cancel key and its slots.
    cancel: Registration,
    session_slot: OwnedSemaphorePermit,
    role_slot: Option<OwnedSemaphorePermit>,
}

/// How a session holds its backends.
#[allow(
    clippy::large_enum_variant,
    reason = "both variants are large; one per session, moved once"
)]
enum Hold {
    /// One for the whole session.
    Session {
        upstream: UpstreamSession,
        plan: relay::Plan,
        /// The upstream connection is pooled and goes back when the session
        /// ends.
        lease: Option<Lease>,
    },
    /// One per transaction (`[pool] mode = "transaction"`).
    Transactions(Tenant),
}

enum Failure {
    Refused(Refusal),
    /// The client went away; nothing to tell it.
    Closed,
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}

/// What is known of the client so far, for the one line that logs a refusal.
#[derive(Default)]
struct Seen {
    role: Option<String>,
    /// The token's fingerprint, never the token.
    token: Option<String>,
}

/// Serves one connection, which holds `startup` until its session is ready
/// or it fails.
pub(crate) async fn serve(
    client: ClientStream,
    peer: SocketAddr,
    services: Arc<Services>,
    startup: StartupSlot,
    mut shutdown: Shutdown,
) {
    let span = tracing::info_span!(target: LOG_TARGET, "connection", %peer);
    let _open = services.metrics.connection_opened();
    async move {
        let timeout = services.config.listen.startup_timeout;
        let (client, session) = match tokio::time::timeout(
            timeout,
            establish(client, peer, &services, startup),
        )
        .await
        {
            Ok(Some(established)) => established,
            Ok(None) => return,
            Err(_) => {
                tracing::info!(
                    target: LOG_TARGET,
                    "closed: startup not finished within {timeout:?}",
                );
                return;
            }
        };
        let started = StdInstant::now();
        let (to_server, to_client) = services.metrics.relayed_bytes();
        let traffic = Traffic::new(to_server, to_client);
        services.metrics.session_started(&session.role);
        let Session {
            role,
            upstream,
            cancel,
            session_slot,
            role_slot,
        } = session;
        let ending = match upstream {
            Hold::Session {
                upstream,
                plan,
                lease,
            } => {
                let held = (upstream, plan, lease);
                relay_session(client, held, cancel, &services, &mut shutdown, &traffic).await
            }
            Hold::Transactions(tenant) => {
                let relay = (&*services, &mut shutdown, &traffic);
                relay_transactions(client, tenant, cancel, relay).await
            }
        };
        let duration = started.elapsed();
        // The session's slots are free only now that its backend has ended.
        drop((session_slot, role_slot));
        let (client_to_server, server_to_client) = traffic.bytes();
        services.metrics.session_ended(&role, &ending, duration);
        tracing::info!(
            target: LOG_TARGET,
            role = %role,
            outcome = metrics::outcome(&ending),
            ?ending,
            ?duration,
            client_to_server,
            server_to_client,
            "session ended"
        );
    }
    .instrument(span)
    .await
}

/// Relays a session on the one backend it holds, then hands the backend
/// back to the pool or retires it. A plain TCP client and its backend's
/// plain socket move onto the worker's io_uring, when it has one
/// ([`uring`](crate::session::uring)), once the session has had
/// `[listen] io_uring_after` requests answered through epoll; the backend
/// goes back to the reactor before it is pooled.
async fn relay_session(
    client: ClientStream,
    (upstream, mut plan, lease): (UpstreamSession, relay::Plan, Option<Lease>),
    cancel: Registration,
    services: &Services,
    shutdown: &mut Shutdown,
    traffic: &Traffic,
) -> relay::Ending {
    let (mut client, mut stream) = (client, upstream.stream);
    match client
        .can_ride_ring()
        .then_some(services.config.listen.io_uring_after)
    {
        Some(0) => {
            (client, stream) = match onto_ring(client, stream) {
                Ok(moved) => moved,
                Err(ending) => return ending,
            }
        }
        after => plan.move_after = after,
    }
    services.metrics.relay_started(client.on_ring());
    let finish = loop {
        match relay::run(client, &mut stream, plan, shutdown, traffic).await {
            Relayed::Finished(finish) => break finish,
            Relayed::Moving(stopped) => {
                let relay::Move { client: idle, rest } = *stopped;
                (client, stream) = match onto_ring(idle, stream) {
                    Ok(moved) => moved,
                    Err(ending) => return ending,
                };
                services.metrics.relay_started(true);
                plan = rest;
            }
        }
    };
    // The client's cancel key must not reach the next client's queries,
    // nor a backend being retired: unregistered, and any cancel already
    // on its way taken by the server, before the backend is handed on.
    let settled = cancel.close().await;
    let config = &services.config.upstream;
    let target = (config.host.as_str(), config.port, upstream.key);
    let tls = &services.upstream_tls;
    match (lease, &services.pool) {
        (Some(lease), Some(pool)) if finish.clean && settled => match stream.off_ring().await {
            Ok((stream, true)) => pool.give_back(stream, lease).await,
            Ok((stream, false)) => retire(stream, target, false, tls).await,
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %e, "cannot take a backend off io_uring; it is closed");
            }
        },
        _ => retire(stream, target, finish.in_flight, tls).await,
    }
    finish.ending
}

/// A session's client and backend, moved onto the worker's io_uring.
fn onto_ring(
    client: ClientStream,
    upstream: UpstreamStream,
) -> Result<(ClientStream, UpstreamStream), relay::Ending> {
    let client = client
        .onto_ring()
        .map_err(|e| relay::Ending::Failed(relay::Side::Client, e))?;
    let upstream = upstream
        .onto_ring()
        .map_err(|e| relay::Ending::Failed(relay::Side::Upstream, e))?;
    Ok((client, upstream))
}

/// Relays a session a transaction at a time (`[pool] mode =
/// "transaction"`). Only the client's socket goes onto the worker's
/// io_uring, once the session has run `[listen] io_uring_after`
/// transactions through epoll: backends pass between sessions on any
/// worker, and stay with the reactor.
async fn relay_transactions(
    client: ClientStream,
    tenant: Tenant,
    cancel: Registration,
    (services, shutdown, traffic): (&Services, &mut Shutdown, &Traffic),
) -> relay::Ending {
    let (client, move_after) = match client
        .can_ride_ring()
        .then_some(services.config.listen.io_uring_after)
    {
        Some(0) => match client.onto_ring() {
            Ok(client) => (client, None),
            Err(e) => return relay::Ending::Failed(relay::Side::Client, e),
        },
        after => (client, after),
    };
    services.metrics.relay_started(client.on_ring());
    let relay = transaction::Relay {
        client,
        move_after,
        tenant,
        cancel: &cancel,
        services,
        shutdown,
        traffic,
    };
    let ending = relay.run().await;
    cancel.close().await;
    ending
}

/// The front door, the token check and the upstream login, under the
/// startup limits: `_startup` is held until this returns. Session slots
/// (`[listen] max_connections`, the role's own) are taken once the token is
/// checked (see [`session_slots`]), so that clients that say nothing, or
/// dawdle over their password, hold none.
async fn establish(
    client: ClientStream,
    peer: SocketAddr,
    services: &Services,
    _startup: StartupSlot,
) -> Option<(ClientStream, Session)> {
    // By then the startup packet and the password must have arrived; the
    // token check and the upstream login have the rest of startup_timeout.
    let auth_deadline = tokio::time::Instant::now() + services.config.listen.auth_timeout;
    let received = tokio::time::timeout_at(
        auth_deadline,
        front_door::receive(client, services.tls.as_ref()),
    )
    .await;
    let Ok(received) = received else {
        // Like PostgreSQL, no log line for a client that never said hello:
        // under a flood of such connections it would be one per connection.
        tracing::debug!(target: LOG_TARGET, "closed: no startup packet within auth_timeout");
        return None;
    };
    let request = match received {
        Ok(Arrival::Startup(request)) => request,
        Ok(Arrival::Cancel(key)) => {
            let upstream = (&services.upstream_tls, &services.config.cluster);
            let result = services.cancels.cancel(key, peer.ip(), upstream).await;
            services.metrics.cancel_request(result);
            return None;
        }
        Ok(Arrival::PeerCancel(key)) => {
            let upstream = (&services.upstream_tls, &services.config.cluster);
            let result = services
                .cancels
                .cancel_for_peer(key, peer.ip(), upstream)
                .await;
            services.metrics.cancel_request(result);
            return None;
        }
        Err(FrontDoorError::Closed(e)) => {
            tracing::debug!(target: LOG_TARGET, error = %e, "closed before startup");
            return None;
        }
        Err(FrontDoorError::Refused {
            mut stream,
            refusal,
        }) => {
            refuse(&mut stream, &refusal, &Seen::default(), &services.metrics).await;
            return None;
        }
    };
    let mut client = request.stream;
    let mut seen = Seen::default();
    let result = open_session(
        &mut client,
        &request.parameters,
        services,
        &mut seen,
        auth_deadline,
    )
    .await;
    match result {
        Ok(session) => Some((client, session)),
        Err(Failure::Refused(refusal)) => {
            refuse(&mut client, &refusal, &seen, &services.metrics).await;
            None
        }
        Err(Failure::Closed) => {
            tracing::debug!(target: LOG_TARGET, "client closed during authentication");
            None
        }
    }
}

async fn open_session(
    client: &mut ClientStream,
    parameters: &std::collections::BTreeMap<String, String>,
    services: &Services,
    seen: &mut Seen,
    auth_deadline: tokio::time::Instant,
) -> Result<Session, Failure> {
    let config = &services.config;
    let user = parameters.get("user").ok_or_else(|| {
        Refusal::auth("no user name given: connect as one of the roles rlsgate serves")
            .because(Reason::Role)
    })?;
    let role = config.role(user).ok_or_else(|| {
        Refusal::auth(format!(
            "role {:?} is not served by this proxy",
            user.chars().take(64).collect::<String>()
        ))
        .because(Reason::Role)
    })?;
    seen.role = Some(role.name.clone());
    let forwarded = forwarded_parameters(parameters)?;
    let mut verified_token = None;
    let (identity, expiry) = match role.token {
        TokenPolicy::None => {
            // No token, so the session does not expire; its envelopes still do.
            let identity = Identity {
                upstream_user: role.upstream_user().to_owned(),
                claims: None,
                valid_until: NO_EXPIRY,
                lifetime: config.claims.envelope_lifetime,
            };
            (identity, None)
        }
        TokenPolicy::Required => {
            let (identity, expiry, verified) =
                token_identity(client, role, services, seen, auth_deadline).await?;
            verified_token = Some(verified);
            (identity, expiry)
        }
    };

    // Only authenticated clients hold session slots: a client that dawdles
    // over its password holds a startup slot, which is bounded apart.
    let (session_slot, role_slot) = session_slots(services, role)?;

    let login = Login {
        role,
        database: parameters.get("database").map(String::as_str),
        parameters: forwarded,
        refuse_undeclared_settings: true,
    };
    let key = &config.claims.signing_key;
    if config.pool.mode == PoolMode::Transaction {
        let connecting = StdInstant::now();
        let logged_in = transaction::login(services, login, (key, &identity), expiry).await;
        services.metrics.upstream_connected(connecting.elapsed());
        let (tenant, cancel, greeting) = logged_in?;
        client
            .write_all(&greeting.0)
            .await
            .map_err(|_| Failure::Closed)?;
        client.flush().await.map_err(|_| Failure::Closed)?;
        log_started(role, verified_token.as_ref(), seen);
        return Ok(Session {
            role: role.name.clone(),
            upstream: Hold::Transactions(tenant),
            cancel,
            session_slot,
            role_slot,
        });
    }
    let (attached, cancel) = attach_and_greet(client, services, login, (key, &identity)).await?;
    let Attached {
        upstream,
        lease,
        claims_exp,
        ..
    } = attached;
    log_started(role, verified_token.as_ref(), seen);
    let envelope = Envelope::new(key.clone(), identity, upstream.backend, claims_exp);
    let plan = relay::Plan {
        expiry,
        pooled: lease.is_some(),
        envelope,
        move_after: None,
        first: Vec::new(),
    };
    Ok(Session {
        role: role.name.clone(),
        upstream: Hold::Session {
            upstream,
            plan,
            lease,
        },
        cancel,
        session_slot,
        role_slot,
    })
}

/// The one line that logs a session's start: who (never the token itself).
fn log_started(role: &Role, verified: Option<&VerifiedToken>, seen: &Seen) {
    let iss = verified
        .and_then(|v| v.claims.get("iss"))
        .and_then(serde_json::Value::as_str);
    tracing::info!(
        target: LOG_TARGET,
        role = %role.name,
        sub = verified.and_then(VerifiedToken::subject),
        iss,
        token = seen.token.as_deref(),
        "session started"
    );
}

/// The upstream session, and the client greeted (AuthenticationOk,
/// ParameterStatus, BackendKeyData, ReadyForQuery) with its cancel key
/// registered. A pooled bind may have been sent ahead of the greeting: its
/// answer is read here, after the greeting and before the relay forwards
/// anything of the client's (see [`Pool::attach`]).
/// `rlsgate_upstream_connect_seconds` still counts until the claims are
/// bound, answer included.
async fn attach_and_greet(
    client: &mut ClientStream,
    services: &Services,
    login: Login<'_>,
    claims: (&SigningKey, &Identity),
) -> Result<(Attached, Registration), Failure> {
    let config = &services.config;
    let connecting = StdInstant::now();
    let attached = match &services.pool {
        Some(pool) => {
            pool.attach(&config.upstream, &services.upstream_tls, login, claims)
                .await
        }
        None => Attached::unpooled(&config.upstream, &services.upstream_tls, login, claims).await,
    };
    let attached = attached.inspect_err(|_| {
        services.metrics.upstream_connected(connecting.elapsed());
    })?;
    let upstream = &attached.upstream;
    let cancel = services.cancels.register(
        config.upstream.host.clone(),
        config.upstream.port,
        upstream.key,
    );
    let mut greeting = BytesMut::with_capacity(upstream.greeting.len() + 32);
    messages::authentication_ok(&mut greeting);
    greeting.put_slice(&upstream.greeting);
    // The backend's real pid, with the proxy's own secret.
    messages::backend_key_data(&mut greeting, cancel.key);
    greeting.put_slice(&upstream.ready);
    client
        .write_all(&greeting)
        .await
        .map_err(|_| Failure::Closed)?;
    client.flush().await.map_err(|_| Failure::Closed)?;
    let confirmed = attached.confirm().await;
    services.metrics.upstream_connected(connecting.elapsed());
    let (attached, late) = confirmed?;
    if !late.is_empty() {
        client.write_all(&late).await.map_err(|_| Failure::Closed)?;
        client.flush().await.map_err(|_| Failure::Closed)?;
    }
    Ok((attached, cancel))
}

/// Asks for the token and checks it: the session's identity, when the
/// session ends with its token (if it does), and the verified token.
async fn token_identity(
    client: &mut ClientStream,
    role: &Role,
    services: &Services,
    seen: &mut Seen,
    auth_deadline: tokio::time::Instant,
) -> Result<(Identity, Option<Expiry>, VerifiedToken), Failure> {
    let config = &services.config;
    let plaintext = !client.is_tls();
    let local = client.local_is_loopback(config.listen.address.ip());
    if plaintext && !local && !config.listen.allow_plaintext_tokens {
        return Err(Refusal::auth(
            "TLS is required to send a token: connect with sslmode=require (or verify-full)",
        )
        .because(Reason::TlsRequired)
        .into());
    }
    let max_bytes = config.listen.max_token_bytes;
    let token = match front_door::ask_password(client, max_bytes, auth_deadline).await {
        Ok(token) => token,
        Err(PasswordError::Closed) => return Err(Failure::Closed),
        Err(PasswordError::Refused(refusal)) => return Err(refusal.into()),
    };
    let digest = TokenDigest::of(&token);
    seen.token = Some(digest.fingerprint());
    let checking = StdInstant::now();
    let checked = services
        .tokens
        .check_digested(&token, digest, &role.name)
        .await;
    services.metrics.token_checked(checking.elapsed());
    let verified = checked?;
    let ends_with_token = config.listen.end_sessions_at_token_expiry;
    let valid_until = if ends_with_token {
        let leeway = services.tokens.leeway(&verified);
        verified.expires_at.saturating_add(leeway.as_secs())
    } else {
        NO_EXPIRY
    };
    let expiry = ends_with_token.then(|| {
        let left = Duration::from_secs(valid_until.saturating_sub(unix_now()));
        Expiry {
            at: tokio::time::Instant::now() + left,
            exp: verified.expires_at,
        }
    });
    let identity = Identity {
        upstream_user: role.upstream_user().to_owned(),
        claims: Some(verified.claims.clone()),
        valid_until,
        lifetime: config.claims.envelope_lifetime,
    };
    Ok((identity, expiry, verified))
}

/// A slot of `[listen] max_connections`, and one of the role's own
/// `max_connections` when it sets one: 53300 when either is full.
fn session_slots(
    services: &Services,
    role: &Role,
) -> Result<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>), Refusal> {
    let session = services.limit.try_acquire().ok_or_else(|| {
        Refusal::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "too many connections: rlsgate serves at most {} at once",
                services.config.listen.max_connections
            ),
        )
        .because(Reason::Limit)
    })?;
    let role_slot = match services.role_limits.get(&role.name) {
        Some(limit) => Some(limit.try_acquire().ok_or_else(|| {
            Refusal::new(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections for role {:?}: rlsgate serves it at most {} at once",
                    role.name,
                    role.max_connections.unwrap_or_default()
                ),
            )
            .because(Reason::Limit)
        })?),
        None => None,
    };
    Ok((session, role_slot))
}

/// Tells the client why, logs it (the one line for a refusal) and counts it.
async fn refuse(client: &mut ClientStream, refusal: &Refusal, seen: &Seen, metrics: &Metrics) {
    tracing::info!(
        target: LOG_TARGET,
        reason = %refusal.reason,
        role = seen.role.as_deref(),
        token = seen.token.as_deref(),
        error = %refusal,
        "refused"
    );
    metrics.refused(refusal.reason);
    let mut out = BytesMut::new();
    refusal.encode(&mut out);
    let _ = client.write_all(&out).await;
    let _ = client.flush().await;
    // Let the client read the error and hang up first (bounded in time and
    // size): closing with its input unread makes the kernel answer with a
    // reset that can destroy the error in flight, and an immediate TLS
    // close_notify makes libpq add "SSL connection has been closed
    // unexpectedly" to the message.
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    let _ = client.shutdown().await;
}
