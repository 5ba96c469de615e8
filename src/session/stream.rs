//! The byte streams of a session: the client's (TCP, TLS once negotiated,
//! or a tunnel), and the upstream's (TCP, TLS as configured, or a Unix
//! socket, always plain, as libpq has it).

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;

/// The client's stream: TCP, TLS when it asked for it (SSLRequest or direct
/// TLS), or a tunnel (the WebSocket of [`crate::http`]).
pub(crate) enum ClientStream {
    Plain(TcpStream),
    /// Plain TCP, relayed through the worker's io_uring (see [`uring`](crate::session::uring)).
    #[cfg(target_os = "linux")]
    Ring(crate::session::uring::RingSocket),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Tunnel(Tunnel),
}

/// A byte stream carried inside another protocol.
pub(crate) struct Tunnel {
    pub(crate) io: Box<dyn Duplex>,
    /// The carrying connection is encrypted (wss).
    pub(crate) secure: bool,
    /// The carrying connection arrived on a loopback address.
    pub(crate) local_is_loopback: bool,
}

/// What a tunnel's stream can do.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// The connection to Postgres: TLS over TCP as `[upstream] tls` says, or
/// plain TCP or a Unix socket.
pub(crate) type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<Transport>, Transport>;

pub(crate) enum MaybeTls<T, P> {
    Plain(P),
    Tls(Box<T>),
}

/// A plain connection to Postgres: TCP, or the Unix socket in the directory
/// that `host` names.
pub(crate) enum Transport {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
    /// Either of those, relayed through the worker's io_uring (see
    /// [`uring`](crate::session::uring)); back on the reactor before it is
    /// pooled ([`UpstreamStream::off_ring`]).
    #[cfg(target_os = "linux")]
    Ring(crate::session::uring::RingSocket),
}

/// The Unix socket of a Postgres server when `host` is a directory (starts
/// with `/`), as libpq reads it: `{host}/.s.PGSQL.{port}`.
pub(crate) fn socket_path(host: &str, port: u16) -> Option<PathBuf> {
    host.starts_with('/')
        .then(|| PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
}

/// Where `host` and `port` lead, for messages: `host:port` or the socket.
pub(crate) fn address(host: &str, port: u16) -> String {
    match socket_path(host, port) {
        Some(path) => path.display().to_string(),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

impl Transport {
    /// Connects to `host:port` over TCP (tuned, see [`crate::session::net::tune`]),
    /// or to the Unix socket when `host` is a directory.
    pub(crate) async fn connect(host: &str, port: u16) -> io::Result<Transport> {
        if let Some(path) = socket_path(host, port) {
            #[cfg(unix)]
            return UnixStream::connect(path).await.map(Transport::Unix);
            #[cfg(not(unix))]
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is a Unix socket, which this system lacks",
                    path.display()
                ),
            ));
        }
        let tcp = TcpStream::connect((host, port)).await?;
        crate::session::net::tune(&tcp);
        Ok(Transport::Tcp(tcp))
    }

    /// Registers the socket with the reactor of the runtime calling this
    /// instead of the one that opened it (see
    /// [`workers`](crate::session::workers)): its readiness then wakes the
    /// calling thread alone, not the opener's thread first. The socket is
    /// the same (a duplicate descriptor takes over, the old one is closed),
    /// and so is whatever it holds unread.
    #[cfg(unix)]
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        match self {
            Transport::Tcp(tcp) => {
                let fd = tcp.as_fd().try_clone_to_owned()?;
                *tcp = TcpStream::from_std(std::net::TcpStream::from(fd))?;
            }
            Transport::Unix(unix) => {
                let fd = unix.as_fd().try_clone_to_owned()?;
                *unix = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
            }
            // A session's own thread, never pooled as it is.
            #[cfg(target_os = "linux")]
            Transport::Ring(_) => {}
        }
        Ok(())
    }

    /// Moves the socket to the calling worker's io_uring, when it has one.
    #[cfg(target_os = "linux")]
    pub(crate) fn onto_ring(self) -> io::Result<Transport> {
        use crate::session::uring::{self, RingSocket};
        if !uring::installed() {
            return Ok(self);
        }
        let (fd, unix) = match self {
            Transport::Tcp(tcp) => (tcp.into_std()?.into(), false),
            Transport::Unix(unix) => (unix.into_std()?.into(), true),
            ring @ Transport::Ring(_) => return Ok(ring),
        };
        Ok(Transport::Ring(RingSocket::adopt(fd, unix)?))
    }

    /// Moves the socket back to the reactor; false when it lost bytes on
    /// the way (see [`RingSocket::release`](crate::session::uring::RingSocket::release)).
    #[cfg(target_os = "linux")]
    pub(crate) async fn off_ring(self) -> io::Result<(Transport, bool)> {
        let Transport::Ring(socket) = self else {
            return Ok((self, true));
        };
        let (fd, unix, clean) = socket.release().await?;
        let transport = if unix {
            Transport::Unix(UnixStream::from_std(fd.into())?)
        } else {
            Transport::Tcp(TcpStream::from_std(fd.into())?)
        };
        Ok((transport, clean))
    }

    /// Elsewhere a socket stays with the reactor that opened it.
    #[cfg(not(unix))]
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl UpstreamStream {
    /// A plain connection moves to the calling worker's io_uring, when it
    /// has one, for its session's relay; TLS stays on the reactor.
    pub(crate) fn onto_ring(self) -> io::Result<UpstreamStream> {
        match self {
            #[cfg(target_os = "linux")]
            MaybeTls::Plain(transport) => transport.onto_ring().map(MaybeTls::Plain),
            other => Ok(other),
        }
    }

    /// Back from the io_uring, to be pooled: false when it is not fit to
    /// be (see [`RingSocket::release`](crate::session::uring::RingSocket::release)).
    pub(crate) async fn off_ring(self) -> io::Result<(UpstreamStream, bool)> {
        match self {
            #[cfg(target_os = "linux")]
            MaybeTls::Plain(transport) => {
                let (transport, clean) = transport.off_ring().await?;
                Ok((MaybeTls::Plain(transport), clean))
            }
            other => Ok((other, true)),
        }
    }

    /// [`Transport::rehome`], under TLS too.
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(transport) => transport.rehome(),
            MaybeTls::Tls(tls) => tls.get_mut().0.rehome(),
        }
    }
}

impl ClientStream {
    /// Plain TCP moves to the calling worker's io_uring, when it has one,
    /// for the session's relay; TLS and tunnels stay on the reactor.
    pub(crate) fn onto_ring(self) -> io::Result<ClientStream> {
        #[cfg(target_os = "linux")]
        if let ClientStream::Plain(tcp) = self {
            use crate::session::uring::{self, RingSocket};
            if !uring::installed() {
                return Ok(ClientStream::Plain(tcp));
            }
            let fd = tcp.into_std()?.into();
            return RingSocket::adopt(fd, false).map(ClientStream::Ring);
        }
        Ok(self)
    }

    /// Plain TCP on a worker with an io_uring: [`ClientStream::onto_ring`]
    /// would move it.
    pub(crate) fn can_ride_ring(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let ClientStream::Plain(_) = self {
            return crate::session::uring::installed();
        }
        false
    }

    /// Relayed through an io_uring.
    pub(crate) fn on_ring(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let ClientStream::Ring(_) = self {
            return true;
        }
        false
    }

    /// Encrypted: TLS, or a tunnel inside TLS.
    pub(crate) fn is_tls(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            #[cfg(target_os = "linux")]
            ClientStream::Ring(_) => false,
            ClientStream::Tls(_) => true,
            ClientStream::Tunnel(tunnel) => tunnel.secure,
        }
    }

    /// Whether the client reached a loopback address of ours, where tokens
    /// may travel in plaintext. `listening` is the address the client's
    /// listener is bound to: when it is one address, not all of them, it is
    /// where every client of that listener arrived, and no system call asks.
    pub(crate) fn local_is_loopback(&self, listening: IpAddr) -> bool {
        if !listening.is_unspecified() && !matches!(self, ClientStream::Tunnel(_)) {
            return listening.is_loopback();
        }
        let tcp = match self {
            ClientStream::Plain(tcp) => tcp,
            #[cfg(target_os = "linux")]
            ClientStream::Ring(socket) => {
                return socket.local_addr().is_ok_and(|a| a.ip().is_loopback());
            }
            ClientStream::Tls(tls) => tls.get_ref().0,
            ClientStream::Tunnel(tunnel) => return tunnel.local_is_loopback,
        };
        tcp.local_addr().is_ok_and(|a| a.ip().is_loopback())
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(target_os = "linux")]
            ClientStream::Ring(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(target_os = "linux")]
            ClientStream::Ring(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            #[cfg(target_os = "linux")]
            ClientStream::Ring(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(target_os = "linux")]
            ClientStream::Ring(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl<T: AsyncRead + Unpin, P: AsyncRead + Unpin> AsyncRead for MaybeTls<T, P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin, P: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T, P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(target_os = "linux")]
            Transport::Ring(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(target_os = "linux")]
            Transport::Ring(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            #[cfg(target_os = "linux")]
            Transport::Ring(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(target_os = "linux")]
            Transport::Ring(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_starting_with_a_slash_is_a_socket_directory_as_in_libpq() {
        assert_eq!(
            socket_path("/var/run/postgresql", 5433),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433"))
        );
        assert_eq!(socket_path("db.internal", 5432), None);
        assert_eq!(
            address("/var/run/postgresql", 5432),
            "/var/run/postgresql/.s.PGSQL.5432"
        );
        assert_eq!(address("db.internal", 5432), "db.internal:5432");
        assert_eq!(address("::1", 5432), "[::1]:5432");
    }

    #[cfg(unix)]
    #[test]
    fn a_socket_moved_to_another_runtime_is_woken_by_it_and_keeps_what_it_held_unread() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        // Opened on a runtime that is not driven any more, like another
        // worker's, busy elsewhere.
        let opener = runtime();
        let mut transport =
            opener.block_on(async { Transport::Tcp(TcpStream::from_std(ours).unwrap()) });
        peer.write_all(b"before").unwrap();

        runtime().block_on(async {
            transport.rehome().unwrap();
            let mut got = [0; 6];
            let read = transport.read_exact(&mut got);
            tokio::time::timeout(std::time::Duration::from_secs(10), read)
                .await
                .expect("woken by this runtime's reactor")
                .unwrap();
            assert_eq!(&got, b"before");
            transport.write_all(b"after").await.unwrap();
        });
        let mut got = [0; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after");
        drop(opener);
    }
}
