//! `[upstream]`: the Postgres server the proxy logs in to, and how (TCP or a
//! Unix socket, TLS with libpq's `sslmode` meanings, a client certificate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub host: String,
    #[serde(default = "defaults::postgres_port")]
    pub port: u16,
    /// Database to connect to; by default the one the client asked for.
    pub database: Option<String>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to Postgres, with libpq's `sslmode` meanings.
    #[serde(default)]
    pub tls: UpstreamTlsMode,
    /// PEM CA certificates that sign the server's certificate, for
    /// `verify-ca` and `verify-full`; unset: the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// The name sent in SNI and checked by `verify-full`; unset: `host`.
    pub tls_server_name: Option<String>,
    /// PEM client certificate (chain) and its key, presented to Postgres
    /// for pg_hba's `cert` method; read at start and on reload.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
}

impl Upstream {
    /// Whether `host` names a directory holding the server's Unix socket
    /// (it starts with `/`, as in libpq).
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Where the proxy connects, for messages: `host:port` or the socket.
    pub fn address(&self) -> String {
        crate::session::stream::address(&self.host, self.port)
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        self.validate_transport()?;
        if self.tls_ca_file.is_some() && !self.tls.verifies_chain() {
            bail!(
                "[upstream] tls_ca_file is only used with tls = \"verify-ca\" or \"verify-full\" \
                 (tls = \"{}\" does not check the certificate)",
                self.tls.as_str()
            );
        }
        if let Some(name) = &self.tls_server_name {
            if self.tls == UpstreamTlsMode::Disable {
                bail!("[upstream] tls_server_name is set but tls = \"disable\"");
            }
            rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                anyhow::anyhow!(
                    "[upstream] tls_server_name = {name:?} is not a DNS name or IP address"
                )
            })?;
        }
        Ok(())
    }

    /// A Unix socket has no TLS (libpq asks for none there either), and a
    /// client certificate needs TLS that is never skipped.
    fn validate_transport(&self) -> anyhow::Result<()> {
        if self.is_socket() && self.tls.requires_tls() {
            bail!(
                "[upstream] host = {:?} is a Unix socket directory, which has no TLS, but \
                 [upstream] tls = \"{}\" requires it: use tls = \"prefer\" or \"disable\" with a \
                 socket, or a TCP host",
                self.host,
                self.tls.as_str()
            );
        }
        if self.is_socket() && self.tls_server_name.is_some() {
            bail!(
                "[upstream] tls_server_name is set but host = {:?} is a Unix socket directory, \
                 which has no TLS",
                self.host
            );
        }
        match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => return Ok(()),
            (Some(_), None) | (None, Some(_)) => {
                bail!("[upstream] tls_client_cert and tls_client_key must be given together")
            }
            (Some(_), Some(_)) => {}
        }
        if self.is_socket() {
            bail!(
                "[upstream] tls_client_cert is set but host = {:?} is a Unix socket directory, \
                 which has no TLS: there Postgres identifies the proxy by peer authentication \
                 (pg_hba `local ... peer`)",
                self.host
            );
        }
        if !self.tls.requires_tls() {
            bail!(
                "[upstream] tls_client_cert is set but tls = \"{}\" may connect without TLS, \
                 where no certificate is presented: use tls = \"require\", \"verify-ca\" or \
                 \"verify-full\"",
                self.tls.as_str()
            );
        }
        Ok(())
    }
}

/// `[upstream] tls`: whether and how the connection to Postgres is encrypted,
/// as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Never: plaintext TCP.
    Disable,
    /// TLS when the server offers it, else plaintext; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or no session; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by a trusted CA, for any name.
    VerifyCa,
    /// TLS with a trusted certificate for `tls_server_name`.
    VerifyFull,
}

impl UpstreamTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTlsMode::Disable => "disable",
            UpstreamTlsMode::Prefer => "prefer",
            UpstreamTlsMode::Require => "require",
            UpstreamTlsMode::VerifyCa => "verify-ca",
            UpstreamTlsMode::VerifyFull => "verify-full",
        }
    }

    /// libpq's `sslmode` value of the same meaning.
    pub fn from_sslmode(value: &str) -> Option<UpstreamTlsMode> {
        Some(match value {
            "disable" => UpstreamTlsMode::Disable,
            // libpq's `allow` tries plaintext first; TLS-if-offered is closest.
            "allow" | "prefer" => UpstreamTlsMode::Prefer,
            "require" => UpstreamTlsMode::Require,
            "verify-ca" => UpstreamTlsMode::VerifyCa,
            "verify-full" => UpstreamTlsMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a session without TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, UpstreamTlsMode::Disable | UpstreamTlsMode::Prefer)
    }

    /// Whether the certificate chain is checked against trusted roots.
    pub fn verifies_chain(self) -> bool {
        matches!(
            self,
            UpstreamTlsMode::VerifyCa | UpstreamTlsMode::VerifyFull
        )
    }
}

mod defaults {
    use std::time::Duration;
    pub fn postgres_port() -> u16 {
        5432
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
}
