//! The listener: accepts connections, turns away at once those over the
//! startup limits, and shuts down gracefully — stop accepting, let sessions
//! drain, then end them.

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::jwks;
use crate::auth::token_check::TokenChecker;
use crate::config::{Config, PoolMode};
use crate::ops::admin;
use crate::ops::metrics::Metrics;
use crate::ops::tamper::TamperWatch;
use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::session::connection::{self, Services};
use crate::session::front_door;
use crate::session::limit::{Limit, StartupLimitHit, StartupLimits, StartupSlot};
use crate::session::shutdown::Shutdown;
use crate::session::stream::ClientStream;
use crate::session::tls;
use crate::session::workers::Workers;
use crate::upstream::pool::Pool;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::listener=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::listener";

/// Builds what connections share from a validated configuration.
fn services(config: Config) -> anyhow::Result<Services> {
    build(None, config)
}

/// What connections accepted after a reload share. Certificates are read
/// again; cancel keys, session counts, metrics, tampering alarms and cached
/// provider keys carry over, so sessions already running are neither
/// dropped nor forgotten.
fn reloaded(previous: &Services, mut config: Config) -> anyhow::Result<Services> {
    if config.http.address != previous.config.http.address {
        tracing::warn!(
            target: LOG_TARGET,
            "[http] address changed: a restart applies it, a reload does not"
        );
    }
    if config.listen.worker_threads() != previous.config.listen.worker_threads() {
        tracing::warn!(
            target: LOG_TARGET,
            "[listen] workers changed: a restart applies it, a reload does not"
        );
    }
    if config.listen.io_uring != previous.config.listen.io_uring {
        tracing::warn!(
            target: LOG_TARGET,
            "[listen] io_uring changed: a restart applies it, a reload does not"
        );
    }
    if config.listen.address != previous.config.listen.address {
        tracing::warn!(
            target: LOG_TARGET,
            old = %previous.config.listen.address,
            new = %config.listen.address,
            "listen.address changed: a restart applies it, a reload does not"
        );
    }
    // The configuration in force says how many workers run, and how, and
    // where the listener is bound (which tells sessions whether their
    // clients arrived on loopback).
    config.listen.workers = previous.config.listen.workers;
    config.listen.io_uring = previous.config.listen.io_uring;
    config.listen.address = previous.config.listen.address;
    build(Some(previous), config)
}

fn build(previous: Option<&Services>, config: Config) -> anyhow::Result<Services> {
    let acceptor = |alpn: &[u8]| match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => anyhow::Ok(Some(front_door::acceptor(tls::server_config(
            cert, key, alpn,
        )?))),
        _ => Ok(None),
    };
    let tls = acceptor(tls::ALPN_POSTGRESQL)?;
    let http_tls = match config.http.address {
        Some(_) => acceptor(tls::ALPN_HTTP1)?,
        None => None,
    };
    let resized = |old: Option<&Arc<Limit>>, size: usize| match old {
        Some(limit) => {
            limit.resize(size);
            Arc::clone(limit)
        }
        None => Arc::new(Limit::new(size)),
    };
    let limit = resized(previous.map(|p| &p.limit), config.listen.max_connections);
    let role_limits = config
        .roles
        .iter()
        .filter_map(|role| {
            let size = role.max_connections?;
            let old = previous.and_then(|p| p.role_limits.get(&role.name));
            Some((role.name.clone(), resized(old, size)))
        })
        .collect();
    let metrics: Arc<Metrics> = previous.map_or_else(Arc::default, |p| Arc::clone(&p.metrics));
    let tampering = previous.map_or_else(
        || Arc::new(TamperWatch::new(Arc::clone(&metrics))),
        |p| Arc::clone(&p.tampering),
    );
    Ok(Services {
        limit,
        role_limits,
        tokens: TokenChecker::replacing(previous.map(|p| &p.tokens), &config, jwks::http_client()),
        cancels: {
            let cancels = previous.map_or_else(Arc::default, |p| Arc::clone(&p.cancels));
            cancels.set_peer_id(config.cluster.peer_id);
            cancels
        },
        upstream_tls: UpstreamTls::from_config(&config.upstream)?
            .watched_by(Arc::clone(&tampering)),
        tls,
        http_tls,
        metrics,
        tampering,
        pool: match previous {
            // Warm connections stay warm unless where or how they are made changed.
            Some(p) if p.config.pool == config.pool && p.config.upstream == config.upstream => {
                p.pool.clone()
            }
            _ => (config.pool.mode != PoolMode::None)
                .then(|| Arc::new(Pool::new(config.pool.clone()))),
        },
        http_pool: match previous {
            Some(p) if p.config.pool == config.pool && p.config.upstream == config.upstream => {
                p.http_pool.clone()
            }
            _ => None,
        }
        .or_else(|| {
            config
                .http
                .address
                .map(|_| Arc::new(Pool::new(config.pool.clone())))
        }),
        config,
    })
}

/// Binds `[listen] admin_address`, when it is set.
async fn bind_admin(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    let Some(address) = config.listen.admin_address else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} (admin_address)"))?;
    Ok(Some(listener))
}

/// Serves until `shutdown` completes, then drains. Each connection is
/// served with the services current when it was accepted. The admin
/// endpoints, when `admin` is given, serve until the last session has ended.
async fn run(
    (listener, workers): (std::net::TcpListener, Workers),
    (admin, http): (Option<TcpListener>, Option<TcpListener>),
    services: watch::Receiver<Arc<Services>>,
    shutdown: impl Future,
) {
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let (start_draining, draining) = watch::channel(false);
    let (not_ready, stopping) = watch::channel(false);
    let admin = admin.map(|admin| {
        let state = (services.clone(), stopping);
        tokio::spawn(admin::serve(admin, state, async move {
            let _ = admin_stopped.await;
        }))
    });
    let upkeep = {
        let services = services.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            loop {
                every.tick().await;
                services.borrow().metrics.run_upkeep();
            }
        })
    };
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let (session_done_tx, mut all_done_rx) = mpsc::channel::<()>(1);
    let startups = {
        let listen = &services.borrow().config.listen;
        StartupLimits::new(listen.max_startups, listen.max_startups_per_address)
    };
    let sessions = Sessions {
        startups: Arc::clone(&startups),
        notify_shutdown: notify_shutdown.clone(),
        open: session_done_tx.clone(),
        draining,
    };
    let http = http.map(|http| {
        let mut stop = sessions.draining.clone();
        tokio::spawn(crate::http::serve(
            http,
            services.clone(),
            sessions,
            async move {
                let _ = stop.wait_for(|draining| *draining).await;
            },
        ))
    });
    let workers = Arc::new(workers);
    let (stop_accepting, accepting_stopped) = oneshot::channel::<()>();
    let mut accepting = {
        let wire = Wire {
            services: services.clone(),
            startups: Arc::clone(&startups),
            notify_shutdown: notify_shutdown.clone(),
            done: session_done_tx.clone(),
            workers: Arc::clone(&workers),
        };
        workers.accept_on_first(listener, move |listener| async move {
            tokio::select! {
                () = wire.accept(listener) => {}
                _ = accepting_stopped => {}
            }
        })
    };
    tokio::select! {
        ended = &mut accepting => return resume_panic(ended),
        _ = shutdown => {}
    }
    // Not ready from now on; new connections are still accepted for
    // shutdown_delay, while load balancers notice.
    not_ready.send_replace(true);
    let delay = services.borrow().config.listen.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(
            target: LOG_TARGET,
            "shutting down: not ready, accepting for {delay:?} more"
        );
        tokio::select! {
            ended = &mut accepting => return resume_panic(ended),
            () = tokio::time::sleep(delay) => {}
        }
    }
    // The listener closes as the accept loop ends.
    drop(stop_accepting);
    resume_panic(accepting.await);
    tracing::info!(target: LOG_TARGET, "shutting down: no new connections");
    start_draining.send_replace(true);
    drop(session_done_tx);
    if let Some(http) = http {
        // It stops accepting at once; its connections count as sessions.
        let _ = http.await;
    }

    let drain = services.borrow().config.listen.shutdown_drain;
    if tokio::time::timeout(drain, all_done_rx.recv())
        .await
        .is_err()
    {
        tracing::info!(target: LOG_TARGET, "drain time over: ending remaining sessions");
        let _ = notify_shutdown.send(());
        let _ = all_done_rx.recv().await;
    }
    tracing::info!(target: LOG_TARGET, "all sessions ended");
    upkeep.abort();
    drop(stop_admin);
    if let Some(mut admin) = admin {
        // Graceful, but an HTTP client holding a connection open cannot keep
        // the process alive.
        if tokio::time::timeout(ADMIN_GRACE, &mut admin).await.is_err() {
            admin.abort();
        }
    }
}

/// An accept loop ending by a panic ends serving with it: the process must
/// not stay up without accepting.
fn resume_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// What the wire protocol's accept loop needs, on the worker it runs on.
struct Wire {
    services: watch::Receiver<Arc<Services>>,
    startups: Arc<StartupLimits>,
    notify_shutdown: broadcast::Sender<()>,
    done: mpsc::Sender<()>,
    workers: Arc<Workers>,
}

impl Wire {
    /// Accepts until dropped, turning away at once a connection over the
    /// startup limits, and hands each other one to a worker.
    async fn accept(self, listener: TcpListener) {
        let mut turned_away = TurnedAway::default();
        loop {
            let (tcp, peer) = crate::session::net::accept(&listener).await;
            let services = Arc::clone(&self.services.borrow());
            // The limits of the configuration in force, reloaded or not.
            let listen = &services.config.listen;
            self.startups
                .resize(listen.max_startups, listen.max_startups_per_address);
            let startup = match self.startups.try_acquire(peer.ip()) {
                Ok(slot) => slot,
                Err(hit) => {
                    services.metrics.refused(Reason::Limit);
                    turned_away.log(peer, hit);
                    turn_away(tcp, &startup_refusal(hit));
                    continue;
                }
            };
            let shutdown = Shutdown::new(self.notify_shutdown.subscribe());
            let done = self.done.clone();
            self.workers.spawn(tcp, move |tcp| async move {
                crate::session::net::tune_accepted(&tcp);
                let client = ClientStream::Plain(tcp);
                connection::serve(client, peer, services, startup, shutdown).await;
                drop(done);
            });
        }
    }
}

/// What the wire's and HTTP's accept loops share: the startup limits, the
/// shutdown notice, and the count of connections still open, which
/// shutdown waits for.
#[derive(Clone)]
pub(crate) struct Sessions {
    startups: Arc<StartupLimits>,
    notify_shutdown: broadcast::Sender<()>,
    open: mpsc::Sender<()>,
    draining: watch::Receiver<bool>,
}

/// Held while a connection is open: shutdown waits until none is.
pub(crate) struct Open {
    _counted: mpsc::Sender<()>,
}

impl Sessions {
    /// The notice that the drain time is over and sessions must end.
    pub(crate) fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.notify_shutdown.subscribe())
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn open(&self) -> Open {
        Open {
            _counted: self.open.clone(),
        }
    }

    /// Completes once the proxy stops accepting: connections finish what
    /// they are doing and close.
    pub(crate) fn draining(&self) -> impl Future<Output = ()> + use<> {
        let mut draining = self.draining.clone();
        async move {
            let _ = draining.wait_for(|d| *d).await;
        }
    }

    /// A startup slot for a client at `ip`, under the limits of `services`'
    /// configuration; a refusal that names the limit when none is free.
    pub(crate) fn startup_slot(
        &self,
        ip: std::net::IpAddr,
        services: &Services,
    ) -> Result<StartupSlot, Refusal> {
        let listen = &services.config.listen;
        self.startups
            .resize(listen.max_startups, listen.max_startups_per_address);
        self.startups.try_acquire(ip).map_err(|hit| {
            services.metrics.refused(Reason::Limit);
            startup_refusal(hit)
        })
    }
}

/// What a client over a startup limit is told.
fn startup_refusal(hit: StartupLimitHit) -> Refusal {
    let message = match hit {
        StartupLimitHit::Overall(size) => format!(
            "too many connections are authenticating: rlsgate authenticates at most {size} at once \
             (max_startups); try again later"
        ),
        StartupLimitHit::PerAddress(size) => format!(
            "too many connections from your address are authenticating: rlsgate authenticates at \
             most {size} at once from one address (max_startups_per_address); try again later"
        ),
    };
    Refusal::new(sqlstate::TOO_MANY_CONNECTIONS, message).because(Reason::Limit)
}

/// Turns a connection away at once, without a task or a wait: a FATAL
/// ErrorResponse as the server's first message, which every client reads
/// whatever it sent first (PostgreSQL answers so when it cannot start a
/// backend; only a client using direct TLS sees a TLS error instead), then
/// the close.
fn turn_away(tcp: TcpStream, refusal: &Refusal) {
    let Ok(mut tcp) = tcp.into_std() else { return };
    let mut out = BytesMut::new();
    refusal.encode(&mut out);
    // The socket is non-blocking; a fresh one's send buffer takes these
    // few bytes at once.
    let _ = tcp.write_all(&out);
    // What the client has sent so far is read, and no more: closing with
    // unread input would answer with a reset that can destroy the error.
    let mut sink = [0u8; 4096];
    for _ in 0..TURN_AWAY_READS {
        match tcp.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = tcp.shutdown(std::net::Shutdown::Write);
}

/// Reads of what a turned-away client sent before it is closed: enough for
/// a startup packet (at most 10 000 bytes) and a TLS hello.
const TURN_AWAY_READS: usize = 4;

/// Aggregates the log of connections turned away at the startup limits:
/// one line at once, then at most one per [`TURNED_AWAY_LOG_EVERY`] that
/// counts those since the last line, so that a flood of connections is not
/// also a flood of log lines.
#[derive(Default)]
struct TurnedAway {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl TurnedAway {
    fn log(&mut self, peer: SocketAddr, hit: StartupLimitHit) {
        let Some(unlogged) = self.note(Instant::now()) else {
            return;
        };
        tracing::warn!(
            target: LOG_TARGET,
            client = %peer.ip(),
            limit = hit.key(),
            size = hit.size(),
            refused_since_last_line = unlogged,
            "refused a connection at a startup limit (logged at most every {}s)",
            TURNED_AWAY_LOG_EVERY.as_secs()
        );
    }

    /// Counts one connection turned away at `now`; when it is to be logged,
    /// how many were turned away since the last line.
    fn note(&mut self, now: Instant) -> Option<u64> {
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < TURNED_AWAY_LOG_EVERY)
        {
            self.unlogged += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

const TURNED_AWAY_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the admin listener may take to finish its requests at shutdown.
const ADMIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often pending histogram samples are folded into their buckets.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// A proxy serving in the background: `rlsgate serve`, `demo` and the tests
/// all start it with [`RunningProxy::start`], so they run the same code.
pub struct RunningProxy {
    pub address: SocketAddr,
    /// Where the admin endpoints listen, when `admin_address` is set.
    pub admin_address: Option<SocketAddr>,
    /// Where HTTP and WebSocket clients connect, when `[http] address` is set.
    pub http_address: Option<SocketAddr>,
    reloader: Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Applies a configuration to the connections a running proxy accepts from
/// then on; a handle of its own, so that a task (SIGHUP) can hold one.
#[derive(Clone)]
pub(crate) struct Reloader(watch::Sender<Arc<Services>>);

impl Reloader {
    /// On error the current configuration stays.
    pub(crate) fn reload(&self, config: Config) -> anyhow::Result<()> {
        let next = reloaded(&self.0.borrow(), config)?;
        self.0.send_replace(Arc::new(next));
        Ok(())
    }
}

impl RunningProxy {
    /// Binds `config.listen.address` and, when set, `admin_address` (port 0
    /// picks a free one) and serves.
    pub async fn start(mut config: Config) -> anyhow::Result<RunningProxy> {
        // Resolved once: the number of CPUs may change, the workers do not.
        config.listen.workers = Some(config.listen.worker_threads());
        let listener = TcpListener::bind(config.listen.address)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen.address))?;
        let address = listener.local_addr()?;
        let admin = bind_admin(&config).await?;
        let admin_address = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let http = match config.http.address {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} ([http] address)"))?,
            ),
            None => None,
        };
        let http_address = http.as_ref().map(TcpListener::local_addr).transpose()?;
        // What every accepted connection inherits (see net::tune_accepted).
        std::iter::once(&listener)
            .chain(&http)
            .for_each(crate::session::net::tune_listener);
        let workers = Workers::start(config.listen.worker_threads(), config.listen.io_uring)?;
        let (services, current) = watch::channel(Arc::new(services(config)?));
        let (stop, stopped) = oneshot::channel();
        // Accepted on a worker's reactor (see Workers::accept_on_first).
        let listener = listener.into_std()?;
        let task = tokio::spawn(run((listener, workers), (admin, http), current, stopped));
        Ok(RunningProxy {
            address,
            admin_address,
            http_address,
            reloader: Reloader(services),
            stop: Some(stop),
            task,
        })
    }

    /// Applies `config` to the connections accepted from now on, as SIGHUP
    /// does for `rlsgate serve`; on error the current configuration stays.
    pub fn reload(&self, config: Config) -> anyhow::Result<()> {
        self.reloader.reload(config)
    }

    /// A handle that reloads this proxy, for a task of its own.
    pub(crate) fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `stop` completes, then shuts down as
    /// [`shutdown`](Self::shutdown) does: how `rlsgate serve` runs, with the
    /// shutdown signals as `stop`. Serving ends by itself only by panicking;
    /// the panic goes on here, so that the process does not stay up without
    /// accepting.
    pub(crate) async fn run_until(mut self, stop: impl Future) {
        tokio::select! {
            _ = stop => {}
            ended = &mut self.task => {
                if let Err(e) = ended
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
                return;
            }
        }
        self.shutdown().await;
    }

    /// Stops accepting, drains and waits until every session has ended.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_logged_once_then_counted() {
        let mut turned_away = TurnedAway::default();
        let start = Instant::now();
        assert_eq!(turned_away.note(start), Some(0));
        for ms in 1..=500 {
            assert_eq!(turned_away.note(start + Duration::from_millis(ms)), None);
        }
        let later = start + TURNED_AWAY_LOG_EVERY;
        assert_eq!(turned_away.note(later), Some(500));
        assert_eq!(turned_away.note(later), None);
        assert_eq!(turned_away.note(later + TURNED_AWAY_LOG_EVERY), Some(1));
    }

    #[test]
    fn a_refusal_at_a_startup_limit_names_the_limit() {
        for (hit, key) in [
            (StartupLimitHit::Overall(7), "(max_startups)"),
            (StartupLimitHit::PerAddress(3), "(max_startups_per_address)"),
        ] {
            let refusal = startup_refusal(hit);
            assert_eq!(refusal.sqlstate, sqlstate::TOO_MANY_CONNECTIONS);
            assert_eq!(refusal.reason, Reason::Limit);
            assert!(refusal.message.contains(key), "{}", refusal.message);
            assert!(
                refusal.message.contains(&format!("at most {}", hit.size())),
                "{}",
                refusal.message
            );
        }
    }
}
