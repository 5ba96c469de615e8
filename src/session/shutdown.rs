//! The shutdown signal each session listens for.

use tokio::sync::broadcast;

/// Tells a session that the proxy is stopping. Once received, it stays received.
pub struct Shutdown {
    received: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            received: false,
            notify,
        }
    }

    pub fn is_received(&self) -> bool {
        self.received
    }

    /// Waits for the signal (a closed channel counts as the signal).
    pub async fn recv(&mut self) {
        if self.received {
            return;
        }
        let _ = self.notify.recv().await;
        self.received = true;
    }
}
