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

/// One listening socket per worker on `address`, all in one `SO_REUSEPORT`
/// group: the kernel spreads new connections over them by a hash of their
/// addresses, and each worker accepts its own on its own thread, with no
/// hand-over between threads (which cost a wake-up of the accepting thread,
/// one of the worker's, and two `epoll_ctl` calls per connection).
///
/// A group shares its port with any socket of the same user that joins it,
/// another rlsgate too. So the address is first bound without
/// `SO_REUSEPORT`, and that socket closed: if something listens there
/// already, that bind fails as a plain bind does ("address in use"), and
/// the port, when `address` asks for any (port 0), is the one it got.
#[cfg(target_os = "linux")]
pub(crate) fn bind_group(
    address: std::net::SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let address = std::net::TcpListener::bind(address)?.local_addr()?;
    (0..count)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.set_cloexec(true)?;
            socket.bind(&address.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            set_options(SockRef::from(&socket));
            Ok(socket.into())
        })
        .collect()
}

/// The queue of connections not yet accepted, per listening socket: tokio's
/// `TcpListener::bind` asks for the same.
#[cfg(target_os = "linux")]
const LISTEN_BACKLOG: i32 = 1024;

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

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_group_shares_one_port_and_refuses_a_port_someone_listens_on() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let address = group[0].local_addr().unwrap();
        assert_eq!(group[1].local_addr().unwrap(), address);
        for listener in &group {
            assert!(SockRef::from(listener).tcp_nodelay().unwrap(), "tuned");
        }

        // Another rlsgate, or anything else, on the same port: refused.
        let again = bind_group(address, 2).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse, "{again}");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = bind_group(taken.local_addr().unwrap(), 1).unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse, "{taken}");

        // Every connection is accepted by one of the group.
        let listeners: Vec<_> = group
            .into_iter()
            .map(|l| TcpListener::from_std(l).unwrap())
            .collect();
        for _ in 0..8 {
            let _client = TcpStream::connect(address).await.unwrap();
            tokio::select! {
                accepted = listeners[0].accept() => { accepted.unwrap(); }
                accepted = listeners[1].accept() => { accepted.unwrap(); }
            }
        }
    }
}
