//! The listener: accepts connections, caps how many are served at once, and
//! shuts down gracefully — stop accepting, let sessions drain, then end them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::{Config, PoolMode};
use crate::connection::{self, Services};
use crate::front_door;
use crate::jwks;
use crate::limit::Limit;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::shutdown::Shutdown;
use crate::tamper::TamperWatch;
use crate::tls;
use crate::token_check::TokenChecker;
use crate::upstream_tls::UpstreamTls;

/// Builds what connections share from a validated configuration.
pub fn services(config: Config) -> anyhow::Result<Services> {
    build(None, config)
}

/// What connections accepted after a reload share. Certificates are read
/// again; cancel keys, session counts, metrics, tampering alarms and cached
/// provider keys carry over, so sessions already running are neither
/// dropped nor forgotten.
pub fn reloaded(previous: &Services, config: Config) -> anyhow::Result<Services> {
    if config.listen.address != previous.config.listen.address {
        tracing::warn!(
            old = %previous.config.listen.address,
            new = %config.listen.address,
            "listen.address changed: a restart applies it, a reload does not"
        );
    }
    build(Some(previous), config)
}

fn build(previous: Option<&Services>, config: Config) -> anyhow::Result<Services> {
    let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Some(front_door::acceptor(tls::server_config(cert, key)?)),
        _ => None,
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
        cancels: previous.map_or_else(Arc::default, |p| Arc::clone(&p.cancels)),
        upstream_tls: UpstreamTls::from_config(&config.upstream)?
            .watched_by(Arc::clone(&tampering)),
        tls,
        metrics,
        tampering,
        pool: match previous {
            // Warm connections stay warm unless where or how they are made changed.
            Some(p) if p.config.pool == config.pool && p.config.upstream == config.upstream => {
                p.pool.clone()
            }
            _ => (config.pool.mode == PoolMode::Session)
                .then(|| Arc::new(Pool::new(config.pool.clone()))),
        },
        config,
    })
}

/// Binds `[listen] admin_address`, when it is set.
pub async fn bind_admin(config: &Config) -> anyhow::Result<Option<TcpListener>> {
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
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    services: watch::Receiver<Arc<Services>>,
    shutdown: impl Future,
) {
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let admin = admin.map(|admin| {
        tokio::spawn(admin::serve(admin, services.clone(), async move {
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

    let accept = async {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let services = Arc::clone(&services.borrow());
            let permit = services.limit.try_acquire();
            let shutdown = Shutdown::new(notify_shutdown.subscribe());
            let done = session_done_tx.clone();
            tokio::spawn(async move {
                connection::serve(tcp, peer, services, permit, shutdown).await;
                drop(done);
            });
        }
    };
    tokio::select! {
        () = accept => {}
        _ = shutdown => tracing::info!("shutting down: no new connections"),
    }
    drop(listener);
    drop(session_done_tx);

    let drain = services.borrow().config.listen.shutdown_drain;
    if tokio::time::timeout(drain, all_done_rx.recv())
        .await
        .is_err()
    {
        tracing::info!("drain time over: ending remaining sessions");
        let _ = notify_shutdown.send(());
        let _ = all_done_rx.recv().await;
    }
    tracing::info!("all sessions ended");
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

/// How long the admin listener may take to finish its requests at shutdown.
const ADMIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often pending histogram samples are folded into their buckets.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// A proxy serving in the background, as the tests and `demo` use it.
pub struct RunningProxy {
    pub address: SocketAddr,
    /// Where the admin endpoints listen, when `admin_address` is set.
    pub admin_address: Option<SocketAddr>,
    services: watch::Sender<Arc<Services>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    /// Binds `config.listen.address` and, when set, `admin_address` (port 0
    /// picks a free one) and serves.
    pub async fn start(config: Config) -> anyhow::Result<RunningProxy> {
        let listener = TcpListener::bind(config.listen.address)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen.address))?;
        let address = listener.local_addr()?;
        let admin = bind_admin(&config).await?;
        let admin_address = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let (services, current) = watch::channel(Arc::new(services(config)?));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, admin, current, stopped));
        Ok(RunningProxy {
            address,
            admin_address,
            services,
            stop: Some(stop),
            task,
        })
    }

    /// Applies `config` to the connections accepted from now on, as SIGHUP
    /// does for `rlsgate serve`; on error the current configuration stays.
    pub fn reload(&self, config: Config) -> anyhow::Result<()> {
        let next = reloaded(&self.services.borrow(), config)?;
        self.services.send_replace(Arc::new(next));
        Ok(())
    }

    /// Stops accepting, drains and waits until every session has ended.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
