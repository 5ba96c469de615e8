//! `rlsgate serve`: the proxy, started as the tests start it
//! ([`RunningProxy::start`]), plus what only the process has: the signals
//! that reload its configuration (SIGHUP) and that stop it.

use std::path::PathBuf;

use crate::config::Config;
use crate::ops::reload;
use crate::session::listener::RunningProxy;
use crate::session::shutdown;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::cli=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::cli";

/// Serves with the configuration at `path` until SIGINT or SIGTERM, then
/// drains.
pub(crate) async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let proxy = RunningProxy::start(config).await?;
    // The bound addresses, which differ from the configured ones for port 0.
    tracing::info!(
        target: LOG_TARGET,
        address = %proxy.address,
        admin = proxy.admin_address.map(tracing::field::display),
        http = proxy.http_address.map(tracing::field::display),
        config = %path.display(),
        "rlsgate listening"
    );
    let reloader = proxy.reloader();
    tokio::spawn(async move { reload::on_hangup(&path, reloader).await });
    proxy.run_until(shutdown::signal()).await;
    Ok(())
}
