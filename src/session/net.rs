//! TCP settings shared by both sides of a session.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::net=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::net";

/// Idle time before the first keepalive probe, and between probes. A peer
/// that vanished (a laptop closed, a NAT entry dropped) is noticed within a
/// few minutes instead of holding its session and upstream backend for hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// No Nagle delay (the protocol is request/response) and keepalive probes.
pub(crate) fn tune(stream: &TcpStream) {
    set_options(SockRef::from(stream));
}

/// The same for every connection a listener accepts. On Linux an accepted
/// socket inherits these options from its listening socket, so they are set
/// once there and cost no system call per connection ([`tune_accepted`]).
pub(crate) fn tune_listener(listener: &TcpListener) {
    set_options(SockRef::from(listener));
}

/// The next connection on `listener`. A failed accept (out of file
/// descriptors and the like) is logged and tried again after a pause: the
/// listener keeps serving.
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What an accepted connection still needs after [`tune_listener`]: nothing
/// on Linux, [`tune`] elsewhere.
pub(crate) fn tune_accepted(stream: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(stream);
    }
}

fn set_options(socket: SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(target: LOG_TARGET, error = %e, "cannot enable TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tuned_sockets_probe_idle_peers_and_send_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&client);
        let socket = SockRef::from(&client);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert!(client.nodelay().unwrap());
    }

    #[tokio::test]
    async fn accepted_sockets_are_tuned_like_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(&listener);
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_accepted(&accepted);
        let socket = SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert!(accepted.nodelay().unwrap());
    }
}
