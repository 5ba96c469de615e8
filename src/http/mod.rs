//! The serverless driver's front door (`[http] address`): what
//! `@neondatabase/serverless` and Drizzle's `neon-http` and
//! `neon-serverless` speak, for any Postgres.
//!
//! - `POST /sql` ([`sql`]): one statement or a batch per request, the
//!   signed-in user's token in `Authorization: Bearer`, checked as on the
//!   wire; the request's claims are bound on a shared upstream connection
//!   for that request only ([`exchange`]), and the results come back as the
//!   driver reads them ([`json`]).
//! - A WebSocket on any path ([`tunnel`]): the Postgres protocol in binary
//!   frames, served as a wire connection (the token is the password).
//! - `OPTIONS`: the CORS preflight, for browsers.
//!
//! HTTP/1.1 only. With `[listen] tls_cert`/`tls_key` a client that starts
//! a TLS handshake gets https (and wss); plain HTTP stays possible, and
//! tokens are refused over it off loopback, as on the wire.

mod exchange;
mod json;
mod request;
mod sql;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::session::connection::Services;
use crate::session::listener::Sessions;
use crate::session::stream::ClientStream;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::http=debug`).
const LOG_TARGET: &str = "rlsgate::http";

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The headers a browser may send on a cross-origin request.
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Neon-Connection-String, \
    Neon-Raw-Text-Output, Neon-Array-Mode, Neon-Pool-Opt-In, Neon-Batch-Isolation-Level, \
    Neon-Batch-Read-Only, Neon-Batch-Deferrable";

/// What is known of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) address: SocketAddr,
    pub(crate) tls: bool,
    /// The connection arrived on a loopback address: tokens may come in
    /// plaintext (as on the wire).
    pub(crate) local_is_loopback: bool,
}

/// Serves HTTP connections until `stop` completes; then each connection
/// finishes the request it is on and closes. Connections and tunnels count
/// among the sessions that shutdown drains.
pub(crate) async fn serve(
    listener: TcpListener,
    services: watch::Receiver<Arc<Services>>,
    sessions: Sessions,
    stop: impl Future,
) {
    let accept = async {
        loop {
            let (tcp, address) = crate::session::net::accept(&listener).await;
            let current = Arc::clone(&services.borrow());
            let sessions = sessions.clone();
            tokio::spawn(connection(
                tcp,
                address,
                current,
                services.clone(),
                sessions,
            ));
        }
    };
    tokio::select! {
        () = accept => {}
        _ = stop => {}
    }
}

/// One HTTP connection: TLS when configured, then HTTP/1.1 with upgrades
/// (for the tunnel). Each request is served with the services current
/// when it arrives, so a reload applies to keep-alive connections too.
async fn connection(
    tcp: tokio::net::TcpStream,
    address: SocketAddr,
    accepted_with: Arc<Services>,
    services: watch::Receiver<Arc<Services>>,
    sessions: Sessions,
) {
    crate::session::net::tune_accepted(&tcp);
    let local_is_loopback = tcp.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let handshake = accepted_with.config.listen.auth_timeout;
    let Ok(stream) = tokio::time::timeout(handshake, secure(tcp, &accepted_with)).await else {
        return;
    };
    let Some(stream) = stream else { return };
    let peer = Peer {
        address,
        tls: stream.is_tls(),
        local_is_loopback,
    };
    let mut shutdown = sessions.shutdown();
    let _counted = sessions.open();
    let draining = sessions.draining();
    let router = axum::Router::new().fallback(move |request: Request| {
        dispatch(request, services.clone(), peer, sessions.clone())
    });
    let service = TowerToHyperService::new(router);
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => return,
        () = draining => http.as_mut().graceful_shutdown(),
        () = shutdown.recv() => return,
    }
    tokio::select! {
        _ = http.as_mut() => {}
        () = shutdown.recv() => {}
    }
}

/// TLS when the client starts a handshake and TLS is configured; else
/// plain HTTP, where tokens are refused off loopback (as on the wire).
/// `None` when the handshake fails.
async fn secure(tcp: tokio::net::TcpStream, services: &Services) -> Option<ClientStream> {
    let Some(acceptor) = &services.http_tls else {
        return Some(ClientStream::Plain(tcp));
    };
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await.ok()? == 1 && first[0] == TLS_HANDSHAKE {
        let tls = acceptor.accept(tcp).await.ok()?;
        Some(ClientStream::Tls(Box::new(tls)))
    } else {
        Some(ClientStream::Plain(tcp))
    }
}

async fn dispatch(
    request: Request,
    services: watch::Receiver<Arc<Services>>,
    peer: Peer,
    sessions: Sessions,
) -> Response {
    let services = Arc::clone(&services.borrow());
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = if request.headers().contains_key(header::UPGRADE) {
        let (mut parts, _) = request.into_parts();
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => tunnel::accept(upgrade, services.clone(), peer, sessions),
            Err(rejection) => rejection.into_response(),
        }
    } else if request.method() == Method::OPTIONS {
        preflight()
    } else if request.uri().path() != "/sql" {
        not_found()
    } else if request.method() != Method::POST {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "POST, OPTIONS")],
        )
            .into_response()
    } else {
        let (parts, body) = request.into_parts();
        sql::handle(Arc::clone(&services), peer, parts.headers, body).await
    };
    cors(&mut response, &services, origin);
    response
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "rlsgate serves POST /sql and WebSocket upgrades here\n",
    )
        .into_response()
}

fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOWED_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// `Access-Control-Allow-Origin`: `*` when any origin is allowed, else the
/// request's origin when it is one of `[http] cors_origins` (and nothing
/// when it is not, which a browser takes as a refusal).
fn cors(response: &mut Response<Body>, services: &Services, origin: Option<HeaderValue>) {
    let http = &services.config.http;
    let headers = response.headers_mut();
    if http.cors_origins.iter().any(|o| o == "*") {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return;
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin
        && origin.to_str().is_ok_and(|o| http.allows_origin(o))
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
}
