//! Shutting down: the signals that stop the process, and the notice each
//! session listens for.

use tokio::sync::broadcast;

/// Tells a session that the proxy is stopping. Once received, it stays received.
pub(crate) struct Shutdown {
    received: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub(crate) fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            received: false,
            notify,
        }
    }

    pub(crate) fn is_received(&self) -> bool {
        self.received
    }

    /// Waits for the signal (a closed channel counts as the signal).
    pub(crate) async fn recv(&mut self) {
        if self.received {
            return;
        }
        let _ = self.notify.recv().await;
        self.received = true;
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM: what stops `serve`, `demo` and
/// `issuer`.
pub(crate) async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
