//! The byte streams of a session, on each side plain or TLS over TCP once
//! negotiated: the client's, and the upstream's, which may also be a Unix
//! socket (always plain, as libpq has it).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;

/// The client's stream: TLS when it asked for it (SSLRequest or direct TLS).
pub(crate) type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The connection to Postgres: TLS over TCP as `[upstream] tls` says, or
/// plain TCP or a Unix socket.
pub(crate) type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>, Transport>;

pub(crate) enum MaybeTls<T, P = TcpStream> {
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

/// A TLS stream over TCP, either side's.
pub(crate) trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl OverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl<T, P> MaybeTls<T, P> {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<T: OverTcp> MaybeTls<T> {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(tls) => tls.tcp(),
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
