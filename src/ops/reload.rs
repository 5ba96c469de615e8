//! Configuration reload: on SIGHUP `serve` reads its file again and applies
//! it to the connections accepted from then on. Sessions already running
//! keep the configuration they started with; an invalid file changes nothing.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::session::connection::Services;
use crate::session::listener;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::reload=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::reload";

/// Reloads `path` into `services` on every SIGHUP until the process ends.
#[cfg(unix)]
pub async fn on_hangup(path: &Path, services: watch::Sender<Arc<Services>>) {
    use tokio::signal::unix::{SignalKind, signal};

    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(
                target: LOG_TARGET,
                error = %e, "cannot listen for SIGHUP: reload needs a restart",
            );
            return;
        }
    };
    while hangups.recv().await.is_some() {
        reload(path, &services);
    }
}

#[cfg(not(unix))]
pub async fn on_hangup(_path: &Path, _services: watch::Sender<Arc<Services>>) {
    std::future::pending::<()>().await
}

fn reload(path: &Path, services: &watch::Sender<Arc<Services>>) {
    let next = Config::load(path).and_then(|config| listener::reloaded(&services.borrow(), config));
    match next {
        Ok(next) => {
            services.send_replace(Arc::new(next));
            tracing::info!(
                target: LOG_TARGET,
                config = %path.display(), "configuration reloaded: new connections use it",
            );
        }
        Err(e) => tracing::error!(
            target: LOG_TARGET,
            config = %path.display(),
            error = format!("{e:#}"),
            "configuration not reloaded, the previous one stays in force"
        ),
    }
}
