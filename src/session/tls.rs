//! The server-side TLS configuration for clients.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol name that PostgreSQL 17+ clients send with direct TLS.
pub(crate) const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// ALPN protocol name of HTTP/1.1, for the HTTP front door.
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Loads a PEM certificate chain and private key into a rustls server
/// config that offers `alpn` (one protocol: a client that offers others
/// only is turned away, so a connection meant for one protocol never
/// reaches a server of the other).
pub(crate) fn server_config(
    cert_path: &Path,
    key_path: &Path,
    alpn: &[u8],
) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read(cert_path)?.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "tls_cert {} is not a PEM certificate chain",
                    cert_path.display()
                )
            })?;
    if certs.is_empty() {
        bail!("tls_cert {} holds no certificate", cert_path.display());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(key_path)?.as_slice())
        .with_context(|| format!("tls_key {} is not a PEM private key", key_path.display()))?
        .with_context(|| format!("tls_key {} holds no private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
