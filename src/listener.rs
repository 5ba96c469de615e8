//! The listener: accepts connections, caps how many are served at once, and
//! shuts down gracefully — stop accepting, let sessions drain, then end them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cancel::CancelRegistry;
use crate::config::{Config, PoolMode};
use crate::connection::{self, Services};
use crate::front_door;
use crate::jwks;
use crate::pool::Pool;
use crate::shutdown::Shutdown;
use crate::tls;
use crate::token_check::TokenChecker;

/// Builds what connections share from a validated configuration.
pub fn services(config: Config) -> anyhow::Result<Services> {
    let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Some(front_door::acceptor(tls::server_config(cert, key)?)),
        _ => None,
    };
    let role_slots = config
        .roles
        .iter()
        .filter_map(|role| {
            let limit = role.max_connections?;
            Some((role.name.clone(), Arc::new(Semaphore::new(limit))))
        })
        .collect();
    Ok(Services {
        role_slots,
        tokens: TokenChecker::new(&config, jwks::http_client()),
        cancels: Arc::new(CancelRegistry::default()),
        tls,
        pool: (config.pool.mode == PoolMode::Session)
            .then(|| Arc::new(Pool::new(config.pool.clone()))),
        config,
    })
}

/// Serves until `shutdown` completes, then drains.
pub async fn run(listener: TcpListener, services: Services, shutdown: impl Future) {
    let services = Arc::new(services);
    let limit = Arc::new(Semaphore::new(services.config.listen.max_connections));
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
            let permit = Arc::clone(&limit).try_acquire_owned().ok();
            let services = Arc::clone(&services);
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

    let drain = services.config.listen.shutdown_drain;
    if tokio::time::timeout(drain, all_done_rx.recv())
        .await
        .is_err()
    {
        tracing::info!("drain time over: ending remaining sessions");
        let _ = notify_shutdown.send(());
        let _ = all_done_rx.recv().await;
    }
    tracing::info!("all sessions ended");
}

/// A proxy serving in the background, as the tests and `demo` use it.
pub struct RunningProxy {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    /// Binds `config.listen.address` (port 0 picks a free one) and serves.
    pub async fn start(config: Config) -> anyhow::Result<RunningProxy> {
        let listener = TcpListener::bind(config.listen.address)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen.address))?;
        let address = listener.local_addr()?;
        let services = services(config)?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, services, stopped));
        Ok(RunningProxy {
            address,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting, drains and waits until every session has ended.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
