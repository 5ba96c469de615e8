//! Cancellation: a client's cancel key is its backend's real process id with
//! a secret the proxy made up; the backend's own secret never leaves the
//! proxy. The pid is the one `pg_backend_pid()` and NOTIFY show anyway, so
//! clients that compare them (skipping their own notifications,
//! `pg_terminate_backend(pid)`) work; the secret alone authenticates.
//!
//! Cancel requests are unauthenticated by design, so each source address
//! gets a small budget per second: a flood cannot make the proxy open
//! upstream connections at its rate.
//!
//! # Handing a backend on
//!
//! A pooled backend outlives its client, so a cancel of that client's must
//! never reach the next one. [`Registration::close`] removes the key, then
//! waits for any request already being forwarded with it: each holds the
//! registration's gate while it sends, and checks that the key is still
//! registered once it holds it. And a forwarded request ends only once
//! PostgreSQL has taken it (see [`cancel_backend`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

use crate::front_door::CancelKey;
use crate::upstream_tls::UpstreamTls;

/// Cancel requests one source address may make per [`RATE_WINDOW`].
pub const RATE_LIMIT: u32 = 10;
pub const RATE_WINDOW: Duration = Duration::from_secs(1);
/// How long forwarding one request may take, connecting included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond this many tracked addresses, expired windows are swept.
const TRACKED_ADDRESSES: usize = 10_000;

/// Shared by the cancel requests being forwarded to a session's backend,
/// and taken whole by the session's end.
#[derive(Default)]
struct Gate {
    lock: RwLock<()>,
    /// A request was sent but not seen taken: it may still reach the backend.
    unsettled: AtomicBool,
}

struct Target {
    host: String,
    port: u16,
    key: CancelKey,
    gate: Arc<Gate>,
}

/// A request admitted: where it goes.
struct Forward {
    host: String,
    port: u16,
    upstream: CancelKey,
    gate: Arc<Gate>,
}

#[derive(Default)]
pub struct CancelRegistry {
    targets: Mutex<HashMap<CancelKey, Target>>,
    /// Per source address: when its window began, and requests in it.
    recent: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Keeps a session's key registered; [`Registration::close`] (or, failing
/// that, dropping it) unregisters the key.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: CancelKey,
    gate: Arc<Gate>,
}

impl Registration {
    /// Unregisters the key, then waits until no request forwarded with it
    /// is still on its way (each is bounded in time). Returns whether the
    /// backend may be handed on: not if a request was sent but not seen
    /// taken, as it might still reach the backend.
    pub async fn close(self) -> bool {
        self.unregister();
        let _alone = self.gate.lock.write().await;
        !self.gate.unsettled.load(Ordering::Acquire)
    }

    fn unregister(&self) {
        let mut targets = self.registry.targets.lock().expect("cancel lock");
        // The same key may since have been issued again, to another session.
        if targets
            .get(&self.key)
            .is_some_and(|t| Arc::ptr_eq(&t.gate, &self.gate))
        {
            targets.remove(&self.key);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl CancelRegistry {
    /// Issues a key for a session whose backend is `upstream`: the backend's
    /// pid with a fresh random secret.
    pub fn register(
        self: &Arc<Self>,
        host: String,
        port: u16,
        upstream: CancelKey,
    ) -> Registration {
        let mut targets = self.targets.lock().expect("cancel lock");
        // A backend serves one session at a time, but across a reload that
        // changes [upstream] two servers may have a backend with this pid.
        let key = loop {
            let key = CancelKey {
                pid: upstream.pid,
                secret: rand::random(),
            };
            if key.secret != upstream.secret && !targets.contains_key(&key) {
                break key;
            }
        };
        let gate = Arc::new(Gate::default());
        targets.insert(
            key,
            Target {
                host,
                port,
                key: upstream,
                gate: Arc::clone(&gate),
            },
        );
        Registration {
            registry: Arc::clone(self),
            key,
            gate,
        }
    }

    /// Forwards a cancel request; an unknown key is ignored, as Postgres
    /// does, and so is a request over `source`'s rate.
    /// Returns what became of it, for `rlsgate_cancel_requests_total{result}`:
    /// `forwarded`, `unknown_key`, `rate_limited` or `failed`.
    pub async fn cancel(&self, key: CancelKey, source: IpAddr, tls: &UpstreamTls) -> &'static str {
        if !self.admit(source) {
            tracing::info!(%source, "cancel request over the rate limit ignored");
            return "rate_limited";
        }
        let Some(forward) = self.target(key) else {
            tracing::info!("cancel request with an unknown key ignored");
            return "unknown_key";
        };
        let _sending = forward.gate.lock.read().await;
        if !self.is_registered(key, &forward.gate) {
            tracing::info!("cancel request for a session that just ended ignored");
            return "unknown_key";
        }
        match forward_request(&forward.host, forward.port, forward.upstream, tls).await {
            Ok(()) => "forwarded",
            Err(failed) => {
                if failed.maybe_sent {
                    forward.gate.unsettled.store(true, Ordering::Release);
                }
                let address = format!("{}:{}", forward.host, forward.port);
                tracing::warn!(%address, error = %failed.reason, "cannot cancel upstream");
                "failed"
            }
        }
    }

    /// Whether `source` may make another cancel request now.
    fn admit(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let mut recent = self.recent.lock().expect("cancel rate lock");
        if recent.len() > TRACKED_ADDRESSES {
            recent.retain(|_, (start, _)| now.duration_since(*start) < RATE_WINDOW);
        }
        let (start, count) = recent.entry(source).or_insert((now, 0));
        if now.duration_since(*start) >= RATE_WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= RATE_LIMIT
    }

    fn target(&self, key: CancelKey) -> Option<Forward> {
        let targets = self.targets.lock().expect("cancel lock");
        targets.get(&key).map(|target| Forward {
            host: target.host.clone(),
            port: target.port,
            upstream: target.key,
            gate: Arc::clone(&target.gate),
        })
    }

    fn is_registered(&self, key: CancelKey, gate: &Arc<Gate>) -> bool {
        let targets = self.targets.lock().expect("cancel lock");
        targets
            .get(&key)
            .is_some_and(|t| Arc::ptr_eq(&t.gate, gate))
    }
}

/// A forward that failed; `maybe_sent` once the request may have reached
/// the server.
struct Failed {
    maybe_sent: bool,
    reason: String,
}

/// Sends a CancelRequest for the backend with `key` over a connection of
/// its own and waits until the server has closed it (up to
/// [`FORWARD_TIMEOUT`] in all). Like libpq, the request goes over TLS as
/// `[upstream] tls` says (a server that only accepts `hostssl` connections
/// ignores a plaintext one).
///
/// Why wait: PostgreSQL reads the request, signals the backend (SIGINT) and
/// only then closes the connection. Once it has, the signal is pending on the
/// backend and is taken before the backend reads anything more from its
/// client; a backend that is waiting for its client's next command drops a
/// cancel. So a session's end that waits for this (through
/// [`Registration::close`]) can hand the backend on without a cancel of its
/// client's still on the way to the next client's statement.
pub async fn cancel_backend(
    host: &str,
    port: u16,
    key: CancelKey,
    tls: &UpstreamTls,
) -> Result<(), String> {
    forward_request(host, port, key, tls)
        .await
        .map_err(|failed| failed.reason)
}

async fn forward_request(
    host: &str,
    port: u16,
    key: CancelKey,
    tls: &UpstreamTls,
) -> Result<(), Failed> {
    let mut packet = BytesMut::with_capacity(16);
    frontend::cancel_request(key.pid, key.secret, &mut packet);
    let mut maybe_sent = false;
    let forwarded = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let mut stream = tls.connect(host, port).await.map_err(|r| r.to_string())?;
        maybe_sent = true;
        stream.write_all(&packet).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        // PostgreSQL answers nothing; an error is a close too.
        let mut sink = [0u8; 64];
        while let Ok(1..) = stream.read(&mut sink).await {}
        Ok(())
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "the server did not take the cancel request within {FORWARD_TIMEOUT:?}"
        ))
    });
    forwarded.map_err(|reason| Failed { maybe_sent, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with_one_key() -> (Arc<CancelRegistry>, Registration) {
        let registry = Arc::new(CancelRegistry::default());
        let upstream = CancelKey {
            pid: 4242,
            secret: 7,
        };
        let registration = registry.register("127.0.0.1".into(), 1, upstream);
        (registry, registration)
    }

    #[test]
    fn the_key_carries_the_backends_pid_and_a_secret_of_its_own() {
        let (_registry, registration) = registry_with_one_key();
        assert_eq!(registration.key.pid, 4242);
        assert_ne!(registration.key.secret, 7);
    }

    #[tokio::test]
    async fn a_closed_registration_is_forgotten_and_its_key_admits_nothing() {
        let (registry, registration) = registry_with_one_key();
        let key = registration.key;
        assert!(registration.close().await, "nothing was forwarded");
        assert!(registry.target(key).is_none());
        assert!(registry.targets.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn close_waits_for_a_request_being_forwarded_and_reports_an_unsettled_one() {
        let (registry, registration) = registry_with_one_key();
        let forward = registry.target(registration.key).unwrap();
        let sending = forward.gate.lock.read().await;
        let closing = tokio::spawn(registration.close());
        for _ in 0..100 {
            if registry.targets.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            registry.targets.lock().unwrap().is_empty(),
            "close unregisters at once"
        );
        assert!(!closing.is_finished(), "close waits for the request");
        forward.gate.unsettled.store(true, Ordering::Release);
        drop(sending);
        assert!(
            !closing.await.unwrap(),
            "a request sent but not seen taken keeps the backend from being handed on"
        );
    }
}
