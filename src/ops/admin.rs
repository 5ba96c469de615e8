//! The admin listener (`[listen] admin_address`): plain HTTP for operators
//! and orchestrators, off unless configured.
//!
//! - `GET /metrics`: the proxy's metrics in the Prometheus text format (see
//!   [`crate::ops::metrics`]).
//! - `GET /healthz`: 200 `ok` while the process runs (liveness).
//! - `GET /readyz`: 200 when new clients can be served, else 503, with a
//!   JSON body either way (readiness; see [`readiness`]); 503
//!   `{"ready":false,"draining":true}` from the moment shutdown begins.
//!
//! It shows no secrets, but it does show issuer URLs and traffic: bind it
//! to loopback or a private network.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::session::connection::Services;
use crate::session::stream::Transport;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::admin=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::admin";

/// What the endpoints report on: the services new connections get, which a
/// reload replaces.
type Current = watch::Receiver<Arc<Services>>;

/// Serves the admin endpoints until `shutdown` completes. `draining` turns
/// true once the proxy stops accepting: from then on `/readyz` is 503, so
/// that a load balancer sends new clients elsewhere while sessions drain.
pub(crate) async fn serve(
    listener: TcpListener,
    (services, draining): (Current, watch::Receiver<bool>),
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let ready = move |State(current): State<Current>| {
        let draining = *draining.borrow();
        async move { ready(current, draining).await }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(services);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(target: LOG_TARGET, error = %e, "the admin listener failed");
    }
}

async fn metrics(State(current): State<Current>) -> Response {
    let services = Arc::clone(&current.borrow());
    let metrics = &services.metrics;
    // Values the token checker keeps itself are copied in at each scrape.
    let (hits, misses) = services.tokens.cache_counts();
    metrics.token_cache(hits, misses);
    let mode = match services.config.pool.mode {
        crate::config::PoolMode::Transaction => "transaction",
        _ => "session",
    };
    let pools = [
        (mode, services.pool.as_ref()),
        ("http", services.http_pool.as_ref()),
    ];
    for (name, pool) in pools {
        for (database, user, in_use, idle) in pool.into_iter().flat_map(|p| p.census()) {
            metrics.pool_backends(name, (&database, &user), in_use, idle);
        }
    }
    for (issuer, keys) in services.tokens.providers() {
        if let Some(keys) = keys {
            let stats = keys.stats();
            metrics.jwks(issuer, stats.succeeded, stats.failed, stats.key_age);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn ready(current: Current, draining: bool) -> Response {
    if draining {
        let body = json!({"ready": false, "draining": true});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    let services = Arc::clone(&current.borrow());
    let (ready, body) = readiness(&services).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Whether the proxy can serve a new client now, and why not:
/// `{"ready":…,"providers":{"<issuer>":"ok"|"no usable keys: …"},"upstream":"ok"|"…"}`,
/// and `"tampering":[{"kind":…,"upstream_user":…,"detail":…}]` while an alarm is raised.
///
/// - Every provider must have usable keys: a cached JWKS that is fresh, or
///   stale but within `jwks_max_stale`; a provider with only a shared secret
///   always has. A provider with nothing usable is asked for its keys (past
///   its refetch cooldown), so readiness comes without waiting for a client.
/// - The upstream must accept a connection to `host:port` (or its Unix
///   socket) within `connect_timeout`. This is a plain connect, not a
///   Postgres startup: it does not log in (which would need a role's
///   password and show up in the database's logs at every probe).
/// - No [`crate::ops::tamper`] alarm may be raised: a login role whose password
///   was changed from inside a session refuses every new session, although
///   the server accepts connections.
///
/// The checks run concurrently, so one slow provider costs at most its
/// `fetch_timeout`.
pub(crate) async fn readiness(services: &Arc<Services>) -> (bool, serde_json::Value) {
    let upstream = {
        let config = &services.config.upstream;
        let (host, port, address) = (config.host.clone(), config.port, config.address());
        let limit = config.connect_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, Transport::connect(&host, port)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {address}: {e}")),
                Err(_) => Err(format!(
                    "no connection to {address} within {}",
                    humantime::format_duration(limit)
                )),
            }
        })
    };
    let checks: Vec<_> = services
        .tokens
        .providers()
        .map(|(issuer, keys)| {
            let keys = keys.cloned();
            let check = tokio::spawn(async move {
                match keys {
                    Some(keys) => keys
                        .readiness()
                        .await
                        .map_err(|e| format!("no usable keys: {e}")),
                    None => Ok(()),
                }
            });
            (issuer.to_owned(), check)
        })
        .collect();

    let mut ready = true;
    let mut providers = BTreeMap::new();
    for (issuer, check) in checks {
        let state = match check.await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(why)) => why,
            Err(e) => format!("the check failed: {e}"),
        };
        ready &= state == "ok";
        providers.insert(issuer, state);
    }
    let upstream = match upstream.await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(why)) => why,
        Err(e) => format!("the check failed: {e}"),
    };
    ready &= upstream == "ok";
    let mut body = json!({"ready": ready, "providers": providers, "upstream": upstream});
    let tampering: Vec<serde_json::Value> = services
        .tampering
        .active()
        .into_iter()
        .map(|(kind, user, detail)| {
            json!({"kind": kind.as_str(), "upstream_user": user, "detail": detail})
        })
        .collect();
    if !tampering.is_empty() {
        body["ready"] = json!(false);
        body["tampering"] = json!(tampering);
        ready = false;
    }
    (ready, body)
}
