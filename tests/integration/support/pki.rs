//! A throwaway public-key infrastructure: a test CA and a server certificate
//! it signed, as PEM files in a temporary directory, for TLS between clients
//! and the proxy and between the proxy and PostgreSQL, and client
//! certificates it signs on request.

use std::net::IpAddr;
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rlsgate::dev::postgres::TempPostgres;
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;

pub struct TestPki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl TestPki {
    /// A server certificate for `localhost`, 127.0.0.1 and `extra_ips`.
    pub fn generate(extra_ips: &[IpAddr]) -> TestPki {
        Self::generate_named("rlsgate test CA", extra_ips)
    }

    /// With a CA of this name: two CAs of one name would make OpenSSL check
    /// a signature with the wrong key rather than report an unknown issuer.
    pub fn generate_named(ca_name: &str, extra_ips: &[IpAddr]) -> TestPki {
        let dir = tempfile::tempdir().unwrap();

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(extra_ips.iter().map(IpAddr::to_string));
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&server_key, &ca).unwrap();

        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("server.pem");
        let key_pem = dir.path().join("server.key");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();
        TestPki {
            ca_der: ca.der().clone(),
            ca,
            dir,
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// A client certificate for `common_name` (a Postgres role, for pg_hba's
    /// `cert` method) signed by this CA: its PEM certificate and key files.
    pub fn client_certificate(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_pem = self.dir.path().join(format!("{common_name}.pem"));
        let key_pem = self.dir.path().join(format!("{common_name}.key"));
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        (cert_pem, key_pem)
    }

    /// The CA certificate, as PEM text.
    pub fn ca_text(&self) -> String {
        std::fs::read_to_string(&self.ca_pem).unwrap()
    }

    /// The `[listen]` section that enables TLS with this certificate.
    pub fn listen_toml(&self) -> String {
        format!(
            "[listen]\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            self.cert_pem.display(),
            self.key_pem.display()
        )
    }

    /// A PostgreSQL server presenting this server certificate that accepts
    /// TCP connections only over TLS.
    pub async fn postgres(&self) -> TempPostgres {
        let cert = std::fs::read_to_string(&self.cert_pem).unwrap();
        let key = std::fs::read_to_string(&self.key_pem).unwrap();
        TempPostgres::start_with_tls(&cert, &key)
            .await
            .expect("start PostgreSQL with TLS")
    }
}
