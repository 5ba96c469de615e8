//! `[listen]`: where clients connect, and the limits on what is served at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: SocketAddr,
    /// Where the admin HTTP endpoints listen (/metrics, /healthz, /readyz);
    /// unset: no admin listener. Port 0 picks a free port.
    pub admin_address: Option<SocketAddr>,
    /// PEM certificate chain; with `tls_key`, enables TLS for clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Accept tokens over plaintext TCP on a non-loopback address.
    #[serde(default)]
    pub allow_plaintext_tokens: bool,
    /// Sessions, and HTTP requests, served at once: a session's slot is
    /// taken once its token is checked, a request's when it arrives.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections not yet authenticated (TLS handshake, startup packet,
    /// password, token check, upstream login) at once; more are refused
    /// as they connect.
    #[serde(default = "defaults::max_startups")]
    pub max_startups: usize,
    /// Of those, from one client address (IPv6: one /64 network).
    #[serde(default = "defaults::max_startups_per_address")]
    pub max_startups_per_address: usize,
    /// Time a client has from connecting until its password has arrived
    /// (within `startup_timeout`).
    #[serde(default = "defaults::auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Largest password (token) accepted, in bytes.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
    /// Time a client has from connecting to being ready for queries.
    #[serde(default = "defaults::startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On shutdown, how long new clients are still accepted after `/readyz`
    /// turned 503, for load balancers to notice and send them elsewhere.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// On shutdown, how long sessions may run on before they are ended.
    #[serde(default = "defaults::shutdown_drain", with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Verified tokens remembered so that reconnecting with one skips the
    /// signature check; 0 disables the cache.
    #[serde(default = "defaults::token_cache_entries")]
    pub token_cache_entries: usize,
    /// End each session when its token expires (after the leeway), with
    /// FATAL 28000. With `false` a session outlives its token, and so do its
    /// claims in the database; tokens are still checked when clients connect.
    #[serde(default = "defaults::yes")]
    pub end_sessions_at_token_expiry: bool,
    /// Threads that run sessions, each a single-threaded runtime (thread
    /// per core); unset: one per CPU; 0: sessions share the main
    /// multi-threaded runtime. Read at start only.
    pub workers: Option<usize>,
    /// Whether worker threads relay plain sessions through io_uring:
    /// `"auto"` where the kernel allows it, `"on"` or refuse to start,
    /// `"off"` never. Read at start only.
    #[serde(default)]
    pub io_uring: IoUring,
    /// Requests a session has had answered (ReadyForQuery) through epoll
    /// before it moves onto its worker's io_uring, at the next request
    /// that finds it idle; 0 moves it before its first. Moving costs more
    /// than io_uring saves on a few requests, so short sessions (a
    /// connection per request) stay on epoll, and so do idle ones. With
    /// transaction pooling the count is of transactions, and the client's
    /// socket moves at the first message of the next.
    #[serde(default = "defaults::io_uring_after")]
    pub io_uring_after: u64,
}

/// `[listen] io_uring`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoUring {
    #[default]
    Auto,
    On,
    Off,
}

impl Listen {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("[listen] tls_cert and tls_key must be given together")
            }
            _ => {}
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_startups", self.max_startups),
            ("max_startups_per_address", self.max_startups_per_address),
        ] {
            if value == 0 {
                bail!("[listen] {key} must be at least 1");
            }
        }
        if self.auth_timeout.is_zero() {
            bail!("[listen] auth_timeout must be longer than 0s");
        }
        if self.workers.is_some_and(|n| n > MAX_WORKERS) {
            bail!("[listen] workers must be at most {MAX_WORKERS}");
        }
        if self.io_uring == IoUring::On && self.workers == Some(0) {
            bail!(
                "[listen] io_uring = \"on\" needs worker threads: \
                 set workers to 1 or more, or leave it unset"
            );
        }
        Ok(())
    }

    /// How many worker threads run sessions: `workers`, or one per CPU.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> usize {
        1000
    }
    pub fn max_startups() -> usize {
        256
    }
    pub fn max_startups_per_address() -> usize {
        64
    }
    pub fn auth_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_token_bytes() -> usize {
        16 * 1024
    }
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn shutdown_drain() -> Duration {
        Duration::from_secs(30)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn token_cache_entries() -> usize {
        10_000
    }
    pub fn io_uring_after() -> u64 {
        16
    }
}
