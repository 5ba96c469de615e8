//! TLS between clients and the proxy: SSLRequest with certificate
//! verification through psql, direct TLS with ALPN `postgresql`, and the rule
//! that tokens travel in plaintext only over loopback unless allowed.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;

use crate::support::pki::TestPki;
use crate::support::wire::{self, APP_STARTUP, RawSession};
use crate::support::{
    Harness, WAIT, client_config, connect, db_error, proxy_config_for, psql_binary, psql_err,
    psql_ok, user_id_of,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn psql_major_version() -> u32 {
    let out = Command::new(psql_binary())
        .arg("--version")
        .output()
        .expect("run psql --version");
    // "psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the psql version from {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_verify_full_against_the_test_ca() {
    let pki = TestPki::generate(&[]);
    let h = Harness::start_with(&pki.listen_toml()).await;
    let conninfo = format!(
        "host=localhost port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={}",
        h.port(),
        pki.ca_pem.display()
    );
    let text = psql_ok(
        &conninfo,
        &h.token("alice"),
        &["\\conninfo", "select auth.user_id()"],
    );
    assert!(text.contains("SSL connection"), "psql reports TLS: {text}");
    assert_eq!(text.lines().last().unwrap().trim(), "alice", "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_sslmode_require() {
    let pki = TestPki::generate(&[]);
    let h = Harness::start_with(&pki.listen_toml()).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=authenticated dbname=app sslmode=require",
        h.port()
    );
    let text = psql_ok(
        &conninfo,
        &h.token("alice"),
        &["\\conninfo", "select auth.user_id()"],
    );
    assert!(text.contains("SSL connection"), "{text}");
    assert_eq!(text.lines().last().unwrap().trim(), "alice", "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_refuses_the_proxy_certificate_when_it_trusts_another_ca() {
    let pki = TestPki::generate(&[]);
    let other = TestPki::generate_named("some other CA", &[]);
    let h = Harness::start_with(&pki.listen_toml()).await;
    let conninfo = format!(
        "host=localhost port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={}",
        h.port(),
        other.ca_pem.display()
    );
    let stderr = psql_err(&conninfo, &h.token("alice"), &["select 1"]);
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_renewed_certificate() {
    let old = TestPki::generate_named("rlsgate old CA", &[]);
    let renewed = TestPki::generate_named("rlsgate renewed CA", &[]);
    let served = TestPki::generate_named("rlsgate served CA", &[]);
    let install = |pki: &TestPki| {
        std::fs::copy(&pki.cert_pem, &served.cert_pem).unwrap();
        std::fs::copy(&pki.key_pem, &served.key_pem).unwrap();
    };
    install(&old);
    let h = Harness::start_with(&served.listen_toml()).await;
    let verify_full = |ca: &TestPki| {
        format!(
            "host=localhost port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={}",
            h.port(),
            ca.ca_pem.display()
        )
    };
    psql_ok(&verify_full(&old), &h.token("alice"), &["select 1"]);

    install(&renewed);
    h.reload_with(&served.listen_toml()).expect("reload");

    let text = psql_ok(
        &verify_full(&renewed),
        &h.token("alice"),
        &["select auth.user_id()"],
    );
    assert_eq!(text.trim(), "alice", "{text}");
    let stderr = psql_err(&verify_full(&old), &h.token("alice"), &["select 1"]);
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
}

fn client_tls(ca: &CertificateDer<'static>, alpn: Option<&[u8]>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    TlsConnector::from(Arc::new(config))
}

/// Opens TCP and starts TLS at once, as libpq's `sslnegotiation=direct`.
async fn direct_tls(
    port: u16,
    ca: &CertificateDer<'static>,
    alpn: Option<&[u8]>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    client_tls(ca, alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql_is_served() {
    let pki = TestPki::generate(&[]);
    let h = Harness::start_with(&pki.listen_toml()).await;

    // psql 17+ can do this itself; older ones cannot, so the handshake is
    // done by hand below in any case.
    let major = psql_major_version();
    if major >= 17 {
        let conninfo = format!(
            "host=localhost port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={} sslnegotiation=direct",
            h.port(),
            pki.ca_pem.display()
        );
        let who = psql_ok(&conninfo, &h.token("alice"), &["select auth.user_id()"]);
        assert_eq!(who, "alice");
    } else {
        eprintln!(
            "psql {major} has no sslnegotiation=direct (17+): direct TLS is tested with rustls only"
        );
    }

    let tls = within(
        "direct TLS handshake",
        direct_tls(h.port(), &pki.ca_der, Some(b"postgresql")),
    )
    .await
    .expect("direct TLS with ALPN postgresql is accepted");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));

    let mut session = RawSession::login(tls, APP_STARTUP, &h.token("alice"))
        .await
        .unwrap_or_else(|e| panic!("login over direct TLS refused: {e:?}"));
    let who = session.query_value("select auth.user_id()").await;
    assert_eq!(who.as_deref(), Some("alice"));
    session.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_alpn_postgresql_is_rejected() {
    let pki = TestPki::generate(&[]);
    let h = Harness::start_with(&pki.listen_toml()).await;

    // No ALPN at all: the handshake may complete, but the proxy then closes
    // the connection without speaking the protocol.
    match within(
        "direct TLS without ALPN",
        direct_tls(h.port(), &pki.ca_der, None),
    )
    .await
    {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls.write_all(&wire::startup_message(APP_STARTUP)).await;
            let mut answer = Vec::new();
            let read = within("proxy closes", tls.read_to_end(&mut answer)).await;
            assert!(
                answer.is_empty(),
                "a direct TLS client without ALPN got protocol bytes: {answer:?} ({read:?})"
            );
        }
    }

    // Another protocol's ALPN: no common protocol, the handshake fails.
    let result = within(
        "direct TLS with ALPN http/1.1",
        direct_tls(h.port(), &pki.ca_der, Some(b"http/1.1")),
    )
    .await;
    assert!(result.is_err(), "ALPN http/1.1 must not be accepted");

    // The proxy still serves TLS clients that do it right.
    let conninfo = format!(
        "host=localhost port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={}",
        h.port(),
        pki.ca_pem.display()
    );
    let who = psql_ok(&conninfo, &h.token("alice"), &["select auth.user_id()"]);
    assert_eq!(who, "alice");
}

/// An IPv4 address of this machine that is not loopback. Tests that need
/// one fail, rather than skip, when there is none.
pub(crate) fn non_loopback_ipv4() -> Ipv4Addr {
    // Connecting a UDP socket sends nothing; it only picks the route and so
    // the local address (198.51.100.0/24 is TEST-NET-2).
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("198.51.100.1:9")?;
            socket.local_addr()
        })
        .ok()
        .and_then(|addr| match addr.ip() {
            IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
            _ => None,
        });
    if let Some(ip) = routed {
        return ip;
    }
    let listed = Command::new("hostname")
        .arg("-I")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    listed
        .split_whitespace()
        .filter_map(|word| word.parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .unwrap_or_else(|| {
            panic!(
                "this machine has no non-loopback IPv4 address (no route, `hostname -I` printed {listed:?}): \
                 the plaintext-token refusal needs a listener on a non-loopback address; \
                 give the machine a network interface with an IPv4 address"
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_plaintext_to_a_non_loopback_listener_is_refused_as_tls_is_required() {
    let ip = non_loopback_ipv4();
    let pki = TestPki::generate(&[IpAddr::V4(ip)]);
    let h = Harness::start().await;
    let proxy = h.another_proxy(ip.into(), &pki.listen_toml()).await;
    assert!(!proxy.address.ip().is_loopback());

    // Plaintext with a token: refused before the token is even asked for.
    let alice = client_config(proxy.address, "authenticated", Some(&h.token("alice")));
    let err = connect(&alice)
        .await
        .expect_err("a token over plaintext to a non-loopback address is refused");
    let (code, message) = db_error(&err);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("TLS is required"), "{message}");

    // A role without a token sends nothing secret, so plaintext is fine.
    let anonymous = connect(&client_config(proxy.address, "anonymous", None))
        .await
        .expect("anonymous over plaintext");
    let none: bool = anonymous
        .query_one("select auth.session() is null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(none);
    drop(anonymous);

    // The same token over TLS to the same address is accepted.
    let conninfo = format!(
        "host={ip} port={} user=authenticated dbname=app sslmode=verify-full sslrootcert={}",
        proxy.address.port(),
        pki.ca_pem.display()
    );
    let who = psql_ok(&conninfo, &h.token("alice"), &["select auth.user_id()"]);
    assert_eq!(who, "alice");

    // psql shows the refusal too.
    let conninfo = format!(
        "host={ip} port={} user=authenticated dbname=app sslmode=disable",
        proxy.address.port()
    );
    let stderr = psql_err(&conninfo, &h.token("alice"), &["select 1"]);
    assert!(stderr.contains("TLS is required"), "{stderr}");
    proxy.shutdown().await;
}

/// On a listener bound to every address, where a client arrived is asked
/// of its socket: plaintext tokens are taken on loopback only, and a reload
/// that names a loopback address (applied at restart only) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_every_address_takes_plaintext_tokens_on_loopback_only() {
    let ip = non_loopback_ipv4();
    let h = Harness::start().await;
    let proxy = h.another_proxy(Ipv4Addr::UNSPECIFIED.into(), "").await;
    let port = proxy.address.port();
    let token = h.token("alice");
    let connect_via = |proxy_ip: IpAddr| {
        let config = client_config((proxy_ip, port).into(), "authenticated", Some(&token));
        async move { connect(&config).await.map(|_| ()) }
    };
    for round in ["as started", "after a reload naming 127.0.0.1"] {
        let err = connect_via(ip.into())
            .await
            .expect_err("a token over plaintext to a non-loopback address is refused");
        let (code, message) = db_error(&err);
        assert_eq!(code, "28000", "{round}: {message}");
        assert!(message.contains("TLS is required"), "{round}: {message}");
        connect_via(Ipv4Addr::LOCALHOST.into())
            .await
            .unwrap_or_else(|e| panic!("{round}: plaintext on loopback is taken: {e}"));
        // The harness's configuration: listening on 127.0.0.1.
        proxy.reload(proxy_config_for(&h, "")).unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_plaintext_tokens_lifts_the_refusal_on_a_non_loopback_listener() {
    let ip = non_loopback_ipv4();
    let h = Harness::start().await;
    let proxy = h
        .another_proxy(ip.into(), "[listen]\nallow_plaintext_tokens = true")
        .await;
    let config = client_config(proxy.address, "authenticated", Some(&h.token("alice")));
    let alice = connect(&config)
        .await
        .expect("a plaintext token is accepted when explicitly allowed");
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    drop(alice);
    proxy.shutdown().await;
}
