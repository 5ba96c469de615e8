//! Configuration reload: on SIGHUP `serve` reads its file again and applies
//! it to the connections accepted from then on. Sessions already running
//! keep the configuration they started with; an invalid file changes nothing.

use std::path::Path;

use crate::config::Config;
use crate::session::listener::Reloader;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::reload=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::reload";

/// Reloads `path` into the proxy on every SIGHUP until the process ends,
/// through the same [`Reloader`] as `RunningProxy::reload`.
#[cfg(unix)]
pub(crate) async fn on_hangup(path: &Path, proxy: Reloader) {
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
        reload(path, &proxy);
    }
}

#[cfg(not(unix))]
pub(crate) async fn on_hangup(_path: &Path, _proxy: Reloader) {
    std::future::pending::<()>().await
}

fn reload(path: &Path, proxy: &Reloader) {
    match Config::load(path).and_then(|config| proxy.reload(config)) {
        Ok(()) => {
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
