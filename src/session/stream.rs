//! The byte streams of a session: the client's (TCP, TLS once negotiated,
//! or a tunnel), and the upstream's (TCP, TLS as configured, or a Unix
//! socket, always plain, as libpq has it).

use std::io;
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
pub(crate) type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>, Transport>;

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
}

impl ClientStream {
    /// Encrypted: TLS, or a tunnel inside TLS.
    pub(crate) fn is_tls(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(_) => true,
            ClientStream::Tunnel(tunnel) => tunnel.secure,
        }
    }

    /// Whether the client reached a loopback address of ours, where tokens
    /// may travel in plaintext.
    pub(crate) fn local_is_loopback(&self) -> bool {
        let tcp = match self {
            ClientStream::Plain(tcp) => tcp,
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
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Tunnel(t) => Pin::new(t.io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
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
}
