//! Logging for every command: to stderr, as text or JSON lines, filtered by
//! RUST_LOG (default: info).

use crate::commands::cli::LogFormat;

/// Installs the global subscriber; called once, before any command runs.
pub(crate) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
