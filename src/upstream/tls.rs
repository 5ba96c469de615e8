//! TLS to Postgres, with libpq's `sslmode` meanings: the rustls client
//! configuration for an `[upstream] tls` mode (with the proxy's client
//! certificate, when it has one), the connection (TCP, or a Unix socket
//! without TLS) and SSLRequest negotiation used by sessions and cancel
//! requests, and a tokio-postgres connector for `rlsgate init-db`.
//!
//! | mode          | TLS                     | certificate checked          |
//! |---------------|-------------------------|------------------------------|
//! | `disable`     | never                   | —                            |
//! | `prefer`      | when the server has it  | no                           |
//! | `require`     | always                  | no (handshake signatures are) |
//! | `verify-ca`   | always                  | chain to a trusted CA        |
//! | `verify-full` | always                  | chain, and the server name   |

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Upstream, UpstreamTlsMode};
use crate::ops::tamper::TamperWatch;
use crate::protocol::messages;
use crate::protocol::refusal::{Refusal, sqlstate};
use crate::session::stream::{Transport, UpstreamStream};
use crate::session::tls::ALPN_POSTGRESQL;

/// How the proxy connects to Postgres: built once from `[upstream]`.
#[derive(Clone)]
pub(crate) struct UpstreamTls {
    mode: UpstreamTlsMode,
    /// `None` with `disable`.
    connector: Option<TlsConnector>,
    /// Set explicitly (`tls_server_name`); otherwise the host connected to.
    server_name: Option<String>,
    /// Whether a CA file (rather than the system's roots) is trusted.
    ca_file: bool,
    /// Whether the proxy presents a client certificate.
    client_cert: bool,
    /// What checks the server's certificate, kept to build the connector
    /// again with a client certificate; `None` with `disable`.
    verifier: Option<Arc<dyn ServerCertVerifier>>,
    /// What the settings are called where they were given, for messages.
    names: SettingNames,
    /// Told when Postgres refuses or accepts a login (a proxy's sessions;
    /// not `init-db` or `check`).
    tampering: Option<Arc<TamperWatch>>,
}

/// How messages name the settings to change.
#[derive(Clone, Copy, Debug)]
struct SettingNames {
    ca_file: &'static str,
    server_name: &'static str,
    client_cert: &'static str,
    client_key: &'static str,
}

const CONFIG_NAMES: SettingNames = SettingNames {
    ca_file: "[upstream] tls_ca_file",
    server_name: "set [upstream] tls_server_name to a name it carries",
    client_cert: "[upstream] tls_client_cert",
    client_key: "[upstream] tls_client_key",
};

const URL_NAMES: SettingNames = SettingNames {
    ca_file: "sslrootcert",
    server_name: "connect by a name it carries",
    client_cert: "sslcert",
    client_key: "sslkey",
};

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl UpstreamTls {
    /// From a validated `[upstream]` section.
    pub(crate) fn from_config(upstream: &Upstream) -> anyhow::Result<UpstreamTls> {
        let tls = Self::new(
            upstream.tls,
            upstream.tls_ca_file.as_deref(),
            upstream.tls_server_name.as_deref(),
        )?;
        match (&upstream.tls_client_cert, &upstream.tls_client_key) {
            (Some(cert), Some(key)) => tls.with_client_certificate(cert, key),
            _ => Ok(tls),
        }
    }

    /// `ca_file` is read only by the verifying modes; without it they trust
    /// the system's roots. `server_name` unset: the host of each connection.
    pub(crate) fn new(
        mode: UpstreamTlsMode,
        ca_file: Option<&Path>,
        server_name: Option<&str>,
    ) -> anyhow::Result<UpstreamTls> {
        if let Some(name) = server_name {
            ServerName::try_from(name).map_err(|_| {
                anyhow::anyhow!("TLS server name {name:?} is not a DNS name or IP address")
            })?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier: Option<Arc<dyn ServerCertVerifier>> = match mode {
            UpstreamTlsMode::Disable => None,
            UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => {
                Some(Arc::new(AnyCertificate(Arc::clone(&provider))))
            }
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull => {
                let store = match ca_file {
                    Some(path) => ca_roots(path)?,
                    None => system_roots()?,
                };
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                        .build()
                        .context("cannot build the upstream certificate verifier")?;
                if mode == UpstreamTlsMode::VerifyCa {
                    Some(Arc::new(ChainOnly(webpki)))
                } else {
                    Some(webpki)
                }
            }
        };
        let connector = match &verifier {
            None => None,
            Some(verifier) => Some(connector(Arc::clone(verifier), None)?),
        };
        Ok(UpstreamTls {
            mode,
            connector,
            server_name: server_name.map(str::to_owned),
            ca_file: ca_file.is_some(),
            client_cert: false,
            verifier,
            names: CONFIG_NAMES,
            tampering: None,
        })
    }

    /// Presents the certificate chain in PEM file `cert`, with the private
    /// key in `key`, to servers that ask for one (pg_hba's `cert` method).
    /// Errors name the settings the files were given in. Without TLS
    /// (`disable`) there is nothing to present it in, and the files are
    /// not read, as libpq does.
    pub(crate) fn with_client_certificate(
        mut self,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Self> {
        let Some(verifier) = &self.verifier else {
            return Ok(self);
        };
        let names = self.names;
        let chain = client_chain(cert, names.client_cert)?;
        let key_der = private_key(key, names.client_key)?;
        self.connector = Some(
            connector(Arc::clone(verifier), Some((chain, key_der))).map_err(|e| {
                e.context(format!(
                    "{} {} and {} {} do not make a usable client certificate",
                    names.client_cert,
                    cert.display(),
                    names.client_key,
                    key.display()
                ))
            })?,
        );
        self.client_cert = true;
        Ok(self)
    }

    /// Messages name libpq's URL parameters instead of `[upstream]` keys.
    pub(crate) fn named_as_in_urls(mut self) -> UpstreamTls {
        self.names = URL_NAMES;
        self
    }

    /// Logins made through this are reported to `watch`: a refused
    /// password raises [`Tampering::PasswordRejected`](crate::ops::tamper::Tampering),
    /// a login that works clears it.
    pub(crate) fn watched_by(mut self, watch: Arc<TamperWatch>) -> UpstreamTls {
        self.tampering = Some(watch);
        self
    }

    pub(crate) fn tampering(&self) -> Option<&TamperWatch> {
        self.tampering.as_deref()
    }

    /// Whether the proxy presents a client certificate.
    pub(crate) fn has_client_certificate(&self) -> bool {
        self.client_cert
    }

    pub(crate) fn mode(&self) -> UpstreamTlsMode {
        self.mode
    }

    /// Asks for TLS on a fresh connection (SSLRequest) and performs the
    /// handshake as the mode says; `host` names the server when no
    /// `tls_server_name` is set. Refusals carry SQLSTATE 08006.
    pub(crate) async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
    ) -> Result<UpstreamStream, Refusal> {
        let Some(connector) = &self.connector else {
            return Ok(UpstreamStream::Plain(Transport::Tcp(tcp)));
        };
        let lost = |e: io::Error| {
            Refusal::database_unavailable(format!("connection lost while asking for TLS: {e}"))
        };
        let mut request = BytesMut::new();
        messages::ssl_request(&mut request);
        tcp.write_all(&request).await.map_err(lost)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(lost)?;
        match answer[0] {
            b'S' => {}
            b'N' if self.mode.requires_tls() => {
                return Err(Refusal::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!(
                        "the database refused TLS, which [upstream] tls = \"{}\" requires; \
                         enable ssl on the server or lower the mode",
                        self.mode.as_str()
                    ),
                ));
            }
            b'N' => return Ok(UpstreamStream::Plain(Transport::Tcp(tcp))),
            // An ErrorResponse: a server too old for SSLRequest, or one that
            // is shutting down. Either way there is no session to have.
            other => {
                return Err(Refusal::database_unavailable(format!(
                    "unexpected answer {:?} to SSLRequest",
                    other as char
                )));
            }
        }
        let name = self.server_name(host)?;
        match connector.connect(name, Transport::Tcp(tcp)).await {
            Ok(tls) => Ok(UpstreamStream::Tls(Box::new(tls))),
            Err(e) => Err(Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                self.describe(&e, self.server_name.as_deref().unwrap_or(host)),
            )
            .with_detail(e.to_string())),
        }
    }

    /// Opens a TCP connection to `host:port` (keepalive on) and negotiates;
    /// or, when `host` is a directory, connects to the Unix socket in it
    /// without TLS, as libpq does (there is none over a socket).
    pub(crate) async fn connect(&self, host: &str, port: u16) -> Result<UpstreamStream, Refusal> {
        let cannot = |e: io::Error| {
            Refusal::database_unavailable(format!(
                "cannot connect to {}: {e}",
                crate::session::stream::address(host, port)
            ))
        };
        match Transport::connect(host, port).await.map_err(cannot)? {
            Transport::Tcp(tcp) => self.negotiate(tcp, host).await,
            #[cfg(unix)]
            socket @ Transport::Unix(_) if !self.mode.requires_tls() => {
                Ok(UpstreamStream::Plain(socket))
            }
            #[cfg(unix)]
            Transport::Unix(_) => Err(Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "[upstream] tls = \"{}\" requires TLS, which a Unix socket does not have",
                    self.mode.as_str()
                ),
            )),
            #[cfg(target_os = "linux")]
            Transport::Ring(_) => unreachable!("a new connection is on the reactor"),
        }
    }

    /// What a connection lost during startup means when it ended with a TLS
    /// alert about the proxy's client certificate: with TLS 1.3 the server
    /// checks it after the handshake, and its refusal comes with the first read.
    pub(crate) fn client_certificate_refusal(&self, error: &io::Error) -> Option<String> {
        let alert = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|e| match e {
                rustls::Error::AlertReceived(alert) => Some(*alert),
                _ => None,
            })?;
        self.describe_alert(alert)
    }

    /// A TLS alert from the server about the client certificate, in words.
    fn describe_alert(&self, alert: AlertDescription) -> Option<String> {
        use AlertDescription as A;
        let names = self.names;
        match alert {
            A::CertificateRequired | A::HandshakeFailure if !self.client_cert => Some(format!(
                "the database asks for a client certificate and the proxy has none: set {} \
                 and {} (TLS alert {alert:?})",
                names.client_cert, names.client_key
            )),
            A::UnknownCA
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::DecryptError
            | A::AccessDenied
                if self.client_cert =>
            {
                Some(format!(
                    "the database refused the proxy's client certificate ({}): TLS alert \
                     {alert:?}; it must be signed by a CA in the server's ssl_ca_file and be \
                     valid now",
                    names.client_cert
                ))
            }
            _ => None,
        }
    }

    fn server_name(&self, host: &str) -> Result<ServerName<'static>, Refusal> {
        let name = self.server_name.as_deref().unwrap_or(host);
        if self.mode != UpstreamTlsMode::VerifyFull && ServerName::try_from(name).is_err() {
            // The name is not checked; without a valid one no SNI is sent.
            return Ok(ServerName::IpAddress(
                std::net::IpAddr::from([0u8, 0, 0, 0]).into(),
            ));
        }
        ServerName::try_from(name.to_owned()).map_err(|_| {
            Refusal::new(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "cannot check the database's TLS certificate: {name:?} is not a DNS name \
                     or IP address; set [upstream] tls_server_name"
                ),
            )
        })
    }

    /// What went wrong in a handshake, in words that say what to fix.
    fn describe(&self, error: &io::Error, name: &str) -> String {
        let tls_error = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let Some(tls_error) = tls_error else {
            return format!("the TLS handshake with the database failed: {error}");
        };
        if let rustls::Error::AlertReceived(alert) = tls_error
            && let Some(refused) = self.describe_alert(*alert)
        {
            return refused;
        }
        let rustls::Error::InvalidCertificate(problem) = tls_error else {
            return format!("the TLS handshake with the database failed: {tls_error}");
        };
        match problem {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                if self.ca_file {
                    format!(
                        "the database's TLS certificate is not trusted: it is not signed by a \
                         CA in {}",
                        self.names.ca_file
                    )
                } else {
                    format!(
                        "the database's TLS certificate is not trusted: it is not signed by a \
                         CA the system trusts; name its CA in {}",
                        self.names.ca_file
                    )
                }
            }
            CertificateError::NotValidForName => format!(
                "the database's TLS certificate is not valid for the name {name:?}; {}",
                self.names.server_name
            ),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "the database's TLS certificate is not valid for the name {name:?} (it is for \
                 {}); {}",
                presented.join(", "),
                self.names.server_name
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the database's TLS certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the database's TLS certificate is not valid yet (check the clocks)".to_owned()
            }
            other => format!("the database's TLS certificate is refused: {other:?}"),
        }
    }

    /// A connector for tokio-postgres with the same verification.
    pub(crate) fn for_postgres(&self) -> MakeRustlsConnect {
        MakeRustlsConnect { tls: self.clone() }
    }
}

/// The rustls connector for a server verifier, with the proxy's client
/// certificate and key when it has them.
fn connector(
    verifier: Arc<dyn ServerCertVerifier>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    anyhow::anyhow!("the key is not the certificate's key")
                }
                other => anyhow::Error::new(other),
            })?,
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The certificate chain of a PEM file, the proxy's own first.
fn client_chain(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{setting} {} is not a PEM certificate file", path.display()))?;
    if chain.is_empty() {
        bail!("{setting} {} holds no PEM certificate", path.display());
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{setting} {} is not a PEM key file", path.display()))?
        .with_context(|| format!("{setting} {} holds no PEM private key", path.display()))
}

fn ca_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the upstream CA file {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the upstream CA file {} holds no certificate",
            path.display()
        );
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert).with_context(|| {
            format!(
                "{} holds a certificate that cannot be a trust anchor",
                path.display()
            )
        })?;
    }
    Ok(store)
}

fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        bail!(
            "no trusted root certificates found on this system to check the database's \
             certificate; install the CA certificates (e.g. the ca-certificates package) or \
             set [upstream] tls_ca_file"
        );
    }
    Ok(store)
}

/// `prefer` and `require`: any certificate, as libpq. The handshake's
/// signatures are still verified, so the peer holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not
/// checked. The webpki verifier checks the chain before the name, so a name
/// mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// TLS settings taken out of a libpq connection string: tokio-postgres
/// knows `sslmode` only up to `require`, and no `sslrootcert`, `sslcert`
/// or `sslkey`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct UrlTls {
    /// The connection string without the settings below.
    pub(crate) rest: String,
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
    pub(crate) sslcert: Option<String>,
    pub(crate) sslkey: Option<String>,
}

impl UrlTls {
    /// Splits a `postgresql://` URL or a `key=value` string.
    pub(crate) fn split(conninfo: &str) -> UrlTls {
        if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
            Self::split_url(conninfo)
        } else {
            Self::split_keywords(conninfo)
        }
    }

    fn split_url(conninfo: &str) -> UrlTls {
        let Ok(mut url) = url::Url::parse(conninfo) else {
            // tokio-postgres explains what is wrong with it.
            return UrlTls {
                rest: conninfo.to_owned(),
                ..UrlTls::default()
            };
        };
        let mut split = UrlTls::default();
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            if !split.take(&key, &value) {
                kept.push((key.into_owned(), value.into_owned()));
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        split.rest = url.to_string();
        split
    }

    /// `key = value` pairs, values optionally in single quotes with
    /// backslash escapes, as libpq reads them.
    fn split_keywords(conninfo: &str) -> UrlTls {
        let mut split = UrlTls::default();
        let mut kept: Vec<&str> = Vec::new();
        let bytes = conninfo.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= bytes.len() {
                break;
            }
            let start = i;
            while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let key = &conninfo[start..i];
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'=' {
                i += 1;
            }
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < bytes.len() && bytes[i] == b'\'' {
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    let c = conninfo[i..].chars().next().unwrap_or_default();
                    value.push(c);
                    i += c.len_utf8();
                }
                i += 1;
            } else {
                while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    let c = conninfo[i..].chars().next().unwrap_or_default();
                    value.push(c);
                    i += c.len_utf8();
                }
            }
            let end = i.min(bytes.len());
            if !split.take(key, &value) {
                kept.push(&conninfo[start..end]);
            }
        }
        split.rest = kept.join(" ");
        split
    }

    /// Keeps `value` if `key` is one of the TLS settings; says whether it was.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value.to_owned());
        true
    }

    /// The client certificate and key files, as libpq finds them: `sslcert`
    /// and `sslkey`, by default `~/.postgresql/postgresql.crt` and `.key`. A
    /// default certificate file that does not exist means none; a named one
    /// that does not exist is an error when it is read.
    pub(crate) fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
        let default = |name: &str| home.as_ref().map(|dir| dir.join(name));
        let cert = match &self.sslcert {
            Some(path) => PathBuf::from(path),
            None => default("postgresql.crt").filter(|path| path.exists())?,
        };
        let key = match &self.sslkey {
            Some(path) => PathBuf::from(path),
            None => default("postgresql.key")?,
        };
        Some((cert, key))
    }

    /// The mode and CA file these settings mean, as libpq reads them:
    /// `sslrootcert=system` trusts the system's roots and defaults to
    /// `verify-full`; `require` with a CA file checks the chain
    /// (`verify-ca`). `None` when the string says nothing about TLS.
    pub(crate) fn resolve(&self) -> anyhow::Result<Option<(UpstreamTlsMode, Option<PathBuf>)>> {
        let mode = match self.sslmode.as_deref() {
            None => None,
            Some(value) => Some(UpstreamTlsMode::from_sslmode(value).with_context(|| {
                format!(
                    "sslmode={value:?} is not one of disable, allow, prefer, require, \
                     verify-ca, verify-full"
                )
            })?),
        };
        let (ca, system) = match self.sslrootcert.as_deref() {
            None => (None, false),
            Some("system") => (None, true),
            Some(path) => (Some(PathBuf::from(path)), false),
        };
        let client = self.sslcert.is_some() || self.sslkey.is_some();
        let mode = match (mode, system, &ca) {
            (None, false, None) if !client => return Ok(None),
            (None, false, None) => UpstreamTlsMode::Prefer,
            (None, true, _) => UpstreamTlsMode::VerifyFull,
            (None, false, Some(_)) => UpstreamTlsMode::Prefer,
            (Some(mode), true, _) if !mode.verifies_chain() => bail!(
                "sslrootcert=system needs sslmode=verify-ca or verify-full, not {}",
                mode.as_str()
            ),
            (Some(UpstreamTlsMode::Require), false, Some(_)) => UpstreamTlsMode::VerifyCa,
            (Some(mode), _, _) => mode,
        };
        Ok(Some((mode, ca)))
    }
}

/// tokio-postgres's TLS hook over [`UpstreamTls`].
#[derive(Clone, Debug)]
pub(crate) struct MakeRustlsConnect {
    tls: UpstreamTls,
}

impl MakeRustlsConnect {
    /// The tokio-postgres `sslmode` that makes it call this connector as
    /// the mode asks (it knows nothing stricter than `require`).
    pub(crate) fn ssl_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self.tls.mode {
            UpstreamTlsMode::Disable => SslMode::Disable,
            UpstreamTlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = self
            .tls
            .server_name(domain)
            .map_err(|refusal| io::Error::other(refusal.message))?;
        let connector = self.tls.connector.clone().ok_or_else(|| {
            io::Error::other("TLS is disabled for this connection (sslmode=disable)")
        })?;
        Ok(RustlsConnect {
            tls: self.tls.clone(),
            connector,
            name,
        })
    }
}

pub(crate) struct RustlsConnect {
    tls: UpstreamTls,
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.to_str().into_owned();
            match self.connector.connect(self.name, stream).await {
                Ok(tls) => Ok(RustlsStream(Box::new(tls))),
                Err(e) => Err(io::Error::other(self.tls.describe(&e, &name))),
            }
        })
    }
}

/// A TLS stream for tokio-postgres.
pub(crate) struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_a_url() {
        let split = UrlTls::split(
            "postgresql://u:p@db.example:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        );
        assert_eq!(
            split.rest,
            "postgresql://u:p@db.example:5432/app?application_name=x"
        );
        assert_eq!(split.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/ca.pem"));
        let split = UrlTls::split("postgresql://u@h/app?sslmode=require");
        assert_eq!(split.rest, "postgresql://u@h/app");
        assert_eq!(
            split.resolve().unwrap(),
            Some((UpstreamTlsMode::Require, None))
        );
        assert_eq!(
            UrlTls::split("postgresql://u@h/app").resolve().unwrap(),
            None
        );
    }

    #[test]
    fn tls_settings_are_taken_out_of_keywords() {
        let split = UrlTls::split(
            "host=h sslmode = 'verify-ca' password='a b\\'c' sslrootcert=/etc/ca.pem dbname=app",
        );
        assert_eq!(split.rest, "host=h password='a b\\'c' dbname=app");
        assert_eq!(
            split.resolve().unwrap(),
            Some((
                UpstreamTlsMode::VerifyCa,
                Some(PathBuf::from("/etc/ca.pem"))
            ))
        );
    }

    #[test]
    fn client_certificate_settings_are_taken_out_and_say_something_about_tls() {
        let split =
            UrlTls::split("postgresql://u@h/app?sslcert=/c.pem&sslkey=/k.pem&sslmode=verify-full");
        assert_eq!(split.rest, "postgresql://u@h/app");
        assert_eq!(
            split.client_certificate(),
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let split = UrlTls::split("host=h sslcert='/my certs/c.pem' dbname=app");
        assert_eq!(split.rest, "host=h dbname=app");
        assert_eq!(split.sslcert.as_deref(), Some("/my certs/c.pem"));
        // A certificate alone asks for nothing stricter than libpq's default.
        assert_eq!(
            split.resolve().unwrap(),
            Some((UpstreamTlsMode::Prefer, None))
        );
    }

    #[test]
    fn a_client_certificate_must_fit_its_key_and_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let not_pem = write("not.pem", "hello");
        let missing = dir.path().join("missing.pem");
        let tls = || UpstreamTls::new(UpstreamTlsMode::Require, None, None).unwrap();
        let err = format!(
            "{:#}",
            tls()
                .with_client_certificate(&missing, &not_pem)
                .unwrap_err()
        );
        assert!(err.contains("[upstream] tls_client_cert"), "{err}");
        assert!(err.contains("missing.pem"), "{err}");
        let err = format!(
            "{:#}",
            tls()
                .with_client_certificate(&not_pem, &not_pem)
                .unwrap_err()
        );
        assert!(err.contains("holds no PEM certificate"), "{err}");

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["authenticated".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_pem = write("client.pem", &cert.pem());
        let key_pem = write("client.key", &key.serialize_pem());
        let other_key = write(
            "other.key",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        let err = format!(
            "{:#}",
            tls()
                .named_as_in_urls()
                .with_client_certificate(&cert_pem, &not_pem)
                .unwrap_err()
        );
        assert!(err.contains("sslkey"), "{err}");
        assert!(err.contains("no PEM private key"), "{err}");
        let err = format!(
            "{:#}",
            tls()
                .with_client_certificate(&cert_pem, &other_key)
                .unwrap_err()
        );
        assert!(err.contains("not the certificate's key"), "{err}");
        assert!(err.contains("[upstream] tls_client_key"), "{err}");
        let with = tls().with_client_certificate(&cert_pem, &key_pem).unwrap();
        assert!(with.has_client_certificate());
        // Without TLS there is nothing to present it in, and nothing is read.
        let plain = UpstreamTls::new(UpstreamTlsMode::Disable, None, None)
            .unwrap()
            .with_client_certificate(&missing, &missing)
            .unwrap();
        assert!(!plain.has_client_certificate());
    }

    #[test]
    fn libpq_rules_for_root_certificates() {
        let resolve = |s: &str| UrlTls::split(s).resolve();
        assert_eq!(
            resolve("host=h sslrootcert=system").unwrap(),
            Some((UpstreamTlsMode::VerifyFull, None))
        );
        assert!(resolve("host=h sslrootcert=system sslmode=require").is_err());
        assert_eq!(
            resolve("host=h sslmode=require sslrootcert=/ca").unwrap(),
            Some((UpstreamTlsMode::VerifyCa, Some(PathBuf::from("/ca"))))
        );
        assert!(resolve("host=h sslmode=sometimes").is_err());
    }
}
