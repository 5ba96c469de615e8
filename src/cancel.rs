//! Cancellation: clients hold keys the proxy made up; each maps to the
//! upstream backend's real key, which never leaves the proxy.
//!
//! Cancel requests are unauthenticated by design, so each source address
//! gets a small budget per second: guessing a 64-bit key stays hopeless, and
//! a flood cannot make the proxy open upstream connections at its rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use crate::front_door::CancelKey;
use crate::upstream_tls::UpstreamTls;

struct Target {
    host: String,
    port: u16,
    key: CancelKey,
}

/// Cancel requests one source address may make per [`RATE_WINDOW`].
pub const RATE_LIMIT: u32 = 10;
pub const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Beyond this many tracked addresses, expired windows are swept.
const TRACKED_ADDRESSES: usize = 10_000;

#[derive(Default)]
pub struct CancelRegistry {
    targets: Mutex<HashMap<CancelKey, Target>>,
    /// Per source address: when its window began, and requests in it.
    recent: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Keeps a session's key registered; dropping it unregisters the key.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: CancelKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .targets
            .lock()
            .expect("cancel lock")
            .remove(&self.key);
    }
}

impl CancelRegistry {
    /// Issues a fresh random key for a session whose backend is `upstream`.
    pub fn register(
        self: &Arc<Self>,
        host: String,
        port: u16,
        upstream: CancelKey,
    ) -> Registration {
        let mut targets = self.targets.lock().expect("cancel lock");
        let key = loop {
            let key = CancelKey {
                pid: rand::random::<i32>() & i32::MAX,
                secret: rand::random(),
            };
            if !targets.contains_key(&key) {
                break key;
            }
        };
        targets.insert(
            key,
            Target {
                host,
                port,
                key: upstream,
            },
        );
        Registration {
            registry: Arc::clone(self),
            key,
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

    /// Forwards a cancel request; an unknown key is ignored, as Postgres
    /// does, and so is a request over `source`'s rate. Like libpq, the
    /// request goes over TLS as `[upstream] tls` says (a server that only
    /// accepts `hostssl` connections ignores a plaintext one). Returns what
    /// became of it, for `rlsgate_cancel_requests_total{result}`:
    /// `forwarded`, `unknown_key`, `rate_limited` or `failed`.
    pub async fn cancel(&self, key: CancelKey, source: IpAddr, tls: &UpstreamTls) -> &'static str {
        if !self.admit(source) {
            tracing::info!(%source, "cancel request over the rate limit ignored");
            return "rate_limited";
        }
        let target = {
            let targets = self.targets.lock().expect("cancel lock");
            targets.get(&key).map(|t| (t.host.clone(), t.port, t.key))
        };
        let Some((host, port, upstream)) = target else {
            tracing::info!("cancel request with an unknown key ignored");
            return "unknown_key";
        };
        match cancel_backend(&host, port, upstream, tls).await {
            Ok(()) => "forwarded",
            Err(e) => {
                let address = crate::stream::address(&host, port);
                tracing::warn!(%address, error = %e, "cannot cancel upstream");
                "failed"
            }
        }
    }
}

/// Sends a CancelRequest for the backend with `key` over a connection of
/// its own. Like libpq, the request goes over TLS as `[upstream] tls` says
/// (a server that only accepts `hostssl` connections ignores a plaintext
/// one).
pub async fn cancel_backend(
    host: &str,
    port: u16,
    key: CancelKey,
    tls: &UpstreamTls,
) -> Result<(), String> {
    let mut packet = BytesMut::with_capacity(16);
    frontend::cancel_request(key.pid, key.secret, &mut packet);
    let mut stream = tls.connect(host, port).await.map_err(|r| r.to_string())?;
    let sent = async {
        stream.write_all(&packet).await?;
        stream.flush().await
    };
    sent.await.map_err(|e| e.to_string())?;
    // The server closes the connection once it has read the request.
    let _ = stream.shutdown().await;
    Ok(())
}
