//! `POST /sql`, top to bottom: the request's headers, its token checked as
//! on the wire, its body, a lent upstream connection, the round trip with
//! the request's claims bound (see [`exchange`]), and the answer.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::claims::{Identity, NO_EXPIRY};
use crate::auth::token_cache::TokenDigest;
use crate::clock::unix_now;
use crate::config::{Role, TokenPolicy};
use crate::http::exchange::{self, Spoiled};
use crate::http::json::{DbError, Encoder};
use crate::http::request::{self, Headers, Payload};
use crate::http::{LOG_TARGET, Peer};
use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::session::connection::Services;
use crate::upstream::pool::Lent;

/// SQLSTATE 54000, program_limit_exceeded: a request or response too large.
const LIMIT_EXCEEDED: &str = "54000";

/// Why a request got no results.
enum Failure {
    /// Refused before its statements ran, or the database could not be
    /// used: logged and counted as the wire counts refusals.
    Refused(Refusal),
    /// A statement failed: the database's own error, for the application.
    Database(Box<DbError>),
    RequestTooLarge(usize),
    ResponseTooLarge(usize),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

/// What is known of the request so far, for the line that logs a refusal.
#[derive(Default)]
struct Seen {
    role: Option<String>,
    /// The token's fingerprint, never the token.
    token: Option<String>,
}

/// Answers one request; the metrics count it, also when the client leaves
/// before its answer (the dropped future's guard does).
pub(super) async fn handle(
    services: Arc<Services>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut tally = Tally::new(&services);
    let mut seen = Seen::default();
    // A request in flight is a client served, as a wire session is: its
    // body and its answer are in memory until it ends.
    let result = match request_slot(&services) {
        Ok(_slot) => answer(&services, &peer, &headers, body, &mut seen).await,
        Err(refusal) => Err(refusal.into()),
    };
    let (outcome, response) = match result {
        Ok((results, batch)) => ("ok", ok_response(results, &headers, batch)),
        Err(failure) => failure_response(failure, &services, &seen),
    };
    tracing::debug!(
        target: LOG_TARGET,
        client = %peer.address,
        role = seen.role.as_deref(),
        token = seen.token.as_deref(),
        outcome,
        status = response.status().as_u16(),
        "answered a request"
    );
    tally.finish(outcome, response.status());
    response
}

/// A slot of `[listen] max_connections`, which wire sessions and HTTP
/// requests in flight share: 53300 when it is full.
fn request_slot(services: &Services) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
    services.limit.try_acquire().ok_or_else(|| {
        Refusal::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "too many connections: rlsgate serves at most {} sessions and requests at once",
                services.config.listen.max_connections
            ),
        )
        .because(Reason::Limit)
    })
}

async fn answer(
    services: &Arc<Services>,
    peer: &Peer,
    headers: &HeaderMap,
    body: Body,
    seen: &mut Seen,
) -> Result<(Vec<u8>, bool), Failure> {
    let request = Headers::read(headers)?;
    let role = services.config.role(&request.role).ok_or_else(|| {
        Refusal::auth(format!(
            "role {:?} is not served by this proxy",
            request.role.chars().take(64).collect::<String>()
        ))
        .because(Reason::Role)
    })?;
    // The configured name: what a client sent is never logged as such.
    seen.role = Some(role.name.clone());
    let identity = identify(services, peer, role, request.token.as_deref(), seen).await?;
    let limit = services.config.http.max_request_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Failure::RequestTooLarge(limit))?;
    let payload = Payload::parse(&bytes)?;
    let batch = matches!(payload, Payload::Batch(_));
    let results = run(services, role, &request, &payload, &identity).await?;
    Ok((results, batch))
}

/// The request's identity: its token checked as on the wire (same
/// providers, cache, claim rules and refusals), its envelopes valid until
/// the token expires (plus the provider's leeway).
async fn identify(
    services: &Services,
    peer: &Peer,
    role: &Role,
    token: Option<&str>,
    seen: &mut Seen,
) -> Result<Identity, Refusal> {
    let config = &services.config;
    let identity = |claims, valid_until| Identity {
        upstream_user: role.upstream_user().to_owned(),
        claims,
        valid_until,
        lifetime: config.claims.envelope_lifetime,
    };
    if role.token == TokenPolicy::None {
        return Ok(identity(None, NO_EXPIRY));
    }
    if !peer.tls && !peer.local_is_loopback && !config.listen.allow_plaintext_tokens {
        return Err(
            Refusal::auth("TLS is required to send a token: use https:// (or wss://)")
                .because(Reason::TlsRequired),
        );
    }
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
        Refusal::auth("no token: send the signed-in user's JWT as Authorization: Bearer <token>")
            .because(Reason::Malformed)
    })?;
    let digest = TokenDigest::of(token);
    seen.token = Some(digest.fingerprint());
    let checking = Instant::now();
    let checked = services
        .tokens
        .check_digested(token, digest, &role.name)
        .await;
    services.metrics.token_checked(checking.elapsed());
    let verified = checked?;
    let leeway = services.tokens.leeway(&verified);
    let valid_until = verified.expires_at.saturating_add(leeway.as_secs());
    Ok(identity(Some(verified.claims), valid_until))
}

/// Runs the payload on a lent connection. A reused connection that died
/// while idle without a sign (nothing came back: nothing ran) is replaced
/// by a fresh one, once.
async fn run(
    services: &Arc<Services>,
    role: &Role,
    request: &Headers,
    payload: &Payload,
    identity: &Identity,
) -> Result<Vec<u8>, Failure> {
    let config = &services.config;
    let pool = services
        .http_pool
        .as_ref()
        .ok_or_else(|| Refusal::database_unavailable("no HTTP pool: [http] is not configured"))?;
    let limit = config.http.max_response_bytes;
    let mut retried = false;
    loop {
        let waiting = Instant::now();
        let database = request.database.as_deref();
        let lent = pool
            .lend(
                &config.upstream,
                &services.upstream_tls,
                (role, database),
                None,
            )
            .await;
        // Counted whether a connection came or not: a wait that timed out
        // is the one that matters most.
        services.metrics.http_upstream_waited(waiting.elapsed());
        let mut lent = lent?;
        let backend = lent.lease.backend();
        let exp = identity.envelope_expiry(unix_now());
        let envelope = config.claims.signing_key.seal(identity, backend, exp);
        let mut encoder = Encoder::new(limit, request.raw_text, request.array_mode);
        let in_flight = InFlight::new(services, &lent);
        let exchanged = exchange::Request {
            envelope: &envelope,
            application_name: request.application_name.as_deref(),
            payload,
            batch: &request.batch,
        };
        let result = exchange::run(&mut lent.stream, &exchanged, &mut encoder).await;
        match result {
            Ok(answer) => {
                in_flight.done();
                pool.put_back(lent);
                return match answer {
                    Ok(()) => Ok(encoder.finish()),
                    Err(error) => Err(Failure::Database(Box::new(error))),
                };
            }
            Err(Spoiled::Lost {
                answered: false, ..
            }) if lent.reused && !retried => {
                in_flight.done();
                pool.discard(lent);
                retried = true;
            }
            Err(spoiled) => {
                // The connection is closed rather than pooled. A statement
                // may still run on it (the response grew too large, or it
                // is in COPY): dropping `in_flight` cancels it.
                let failure = match spoiled {
                    Spoiled::TooLarge => Failure::ResponseTooLarge(limit),
                    Spoiled::Copy => Refusal::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "COPY is not supported over HTTP: use the WebSocket or a wire connection",
                    )
                    .into(),
                    lost => {
                        in_flight.done();
                        Refusal::database_unavailable(lost.to_string()).into()
                    }
                };
                pool.discard(lent);
                return Err(failure);
            }
        }
    }
}

/// Cancels the statement on a lent connection unless [`done`](Self::done)
/// is called first: when its request is dropped because the client went
/// away, or when it is abandoned. The connection itself is closed, never
/// pooled, so a late cancel cannot reach another request.
struct InFlight {
    services: Option<Arc<Services>>,
    key: crate::protocol::startup::CancelKey,
}

impl InFlight {
    fn new(services: &Arc<Services>, lent: &Lent) -> InFlight {
        InFlight {
            services: Some(Arc::clone(services)),
            key: lent.lease.cancel_key(),
        }
    }

    fn done(mut self) {
        self.services = None;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(services) = self.services.take() else {
            return;
        };
        let key = self.key;
        tokio::spawn(async move {
            let upstream = &services.config.upstream;
            let tls = &services.upstream_tls;
            let cancelled =
                crate::session::cancel::cancel_backend(&upstream.host, upstream.port, key, tls)
                    .await;
            if let Err(e) = cancelled {
                tracing::warn!(
                    target: LOG_TARGET,
                    error = %e,
                    "cannot cancel the statement of an abandoned request"
                );
            }
        });
    }
}

/// Counts a request in the metrics once: as answered, or, when dropped
/// unanswered, as `client_closed`.
struct Tally {
    services: Arc<Services>,
    started: Instant,
    _active: crate::ops::metrics::ActiveGuard,
    finished: bool,
}

impl Tally {
    fn new(services: &Arc<Services>) -> Tally {
        Tally {
            services: Arc::clone(services),
            started: Instant::now(),
            _active: services.metrics.http_request_started(),
            finished: false,
        }
    }

    fn finish(&mut self, outcome: &'static str, status: StatusCode) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let metrics = &self.services.metrics;
        metrics.http_request_ended(outcome, status.as_u16(), elapsed);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.finished {
            tracing::debug!(target: LOG_TARGET, "the client left before its answer");
            // 499, as nginx logs a client that closed first.
            self.finish(
                "client_closed",
                StatusCode::from_u16(499).expect("a valid code"),
            );
        }
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// 200 with the results; a batch's transaction headers are echoed.
fn ok_response(results: Vec<u8>, headers: &HeaderMap, batch: bool) -> Response {
    let mut response = json_response(StatusCode::OK, results);
    if batch {
        for name in [
            request::BATCH_ISOLATION_LEVEL,
            request::BATCH_READ_ONLY,
            request::BATCH_DEFERRABLE,
        ] {
            if let Some(value) = headers.get(name) {
                response.headers_mut().insert(name, value.clone());
            }
        }
    }
    response
}

/// The answer to a failed request, and its outcome label. Refusals are
/// logged (one line, the token's fingerprint at most) and counted.
fn failure_response(
    failure: Failure,
    services: &Services,
    seen: &Seen,
) -> (&'static str, Response) {
    let limit_error = |message: String| DbError::refusal(&Refusal::new(LIMIT_EXCEEDED, message));
    match failure {
        Failure::Refused(refusal) => {
            tracing::info!(
                target: LOG_TARGET,
                reason = %refusal.reason,
                role = seen.role.as_deref(),
                token = seen.token.as_deref(),
                error = %refusal,
                "refused a request"
            );
            services.metrics.refused(refusal.reason);
            let outcome = match refusal.reason {
                Reason::Upstream => "upstream_error",
                _ => "refused",
            };
            let body = DbError::refusal(&refusal).to_json();
            (outcome, json_response(StatusCode::BAD_REQUEST, body))
        }
        Failure::Database(error) => (
            "database_error",
            json_response(StatusCode::BAD_REQUEST, error.to_json()),
        ),
        Failure::RequestTooLarge(limit) => {
            let error = limit_error(format!(
                "the request body is larger than {limit} bytes ([http] max_request_bytes)"
            ));
            (
                "too_large",
                json_response(StatusCode::PAYLOAD_TOO_LARGE, error.to_json()),
            )
        }
        Failure::ResponseTooLarge(limit) => {
            let error = limit_error(format!(
                "the response is larger than {limit} bytes ([http] max_response_bytes): \
                 select fewer rows, or page with LIMIT"
            ));
            (
                "too_large",
                json_response(StatusCode::INSUFFICIENT_STORAGE, error.to_json()),
            )
        }
    }
}
