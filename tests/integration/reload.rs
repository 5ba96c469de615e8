//! Configuration reload: a new configuration applies to the connections
//! accepted after it, sessions already open carry on, and an invalid one
//! changes nothing.

use std::net::{Ipv4Addr, TcpListener as StdTcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::support::config_file::{edit_toml, section, set};
use crate::support::{
    Harness, WAIT, client_config, connect, db_error, proxy_config_toml, user_id_of,
};
use rlsgate::dev::issuer::{DevIssuer, KeyKind};
use serde_json::json;

async fn second_issuer() -> DevIssuer {
    DevIssuer::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("start a second token issuer")
}

fn provider_toml(issuer: &DevIssuer) -> String {
    format!(
        "[[provider]]\nissuer = \"{}\"\naudience = [\"todo-app\"]\n",
        issuer.issuer()
    )
}

fn token_from(issuer: &DevIssuer, sub: &str) -> String {
    issuer.mint(KeyKind::Rs256, json!({"sub": sub, "aud": "todo-app"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_provider_and_sessions_already_open_carry_on() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let other = second_issuer().await;
    let carol_token = token_from(&other, "carol");
    let before = h.connect_refused("authenticated", &carol_token).await;
    assert!(before.contains("not configured"), "{before}");

    h.reload_with(&provider_toml(&other)).expect("reload");

    let carol = h.connect("authenticated", &carol_token).await.unwrap();
    assert_eq!(user_id_of(&carol).await.as_deref(), Some("carol"));
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    // The first provider's keys were kept, and its tokens still connect.
    let fetches = h.issuer.jwks_fetches();
    let bob = h.connect_as("bob").await;
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
    assert_eq!(h.issuer.jwks_fetches(), fetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_removing_a_provider_refuses_its_tokens_even_when_verified_before() {
    let other = second_issuer().await;
    let h = Harness::start_with(&provider_toml(&other)).await;
    let carol_token = token_from(&other, "carol");
    let carol = h.connect("authenticated", &carol_token).await.unwrap();

    h.reload_with("").expect("reload");

    let message = h.connect_refused("authenticated", &carol_token).await;
    assert!(message.contains("not configured"), "{message}");
    assert_eq!(user_id_of(&carol).await.as_deref(), Some("carol"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_an_unreadable_certificate_keeps_the_configuration_in_force() {
    let h = Harness::start().await;
    let error = h
        .reload_with(
            "[listen]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"",
        )
        .expect_err("a missing certificate is refused");
    assert!(
        format!("{error:#}").contains("/nonexistent/cert.pem"),
        "{error:#}"
    );
    let alice = h.connect_as("alice").await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowering_max_connections_applies_to_new_sessions_only() {
    let h = Harness::start().await;
    let first = h.connect_as("alice").await;
    let second = h.connect_as("bob").await;

    h.reload_with("[listen]\nmax_connections = 1")
        .expect("reload");

    let refused = h.connect("authenticated", &h.token("carol")).await.err();
    let (code, message) = db_error(&refused.expect("a third session is refused"));
    assert_eq!(code, "53300", "{message}");
    assert_eq!(user_id_of(&first).await.as_deref(), Some("alice"));
    assert_eq!(user_id_of(&second).await.as_deref(), Some("bob"));
    drop(first);
    drop(second);
    assert_eq!(
        crate::support::carol_once_a_slot_frees(&h, "authenticated").await,
        "carol"
    );
}

/// `rlsgate serve` as a process, with its log in a file.
struct Served {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Served {
    fn start(config: &Path) -> Served {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rlsgate"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start rlsgate serve");
        Served { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in:\n{}", self.log());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_provider_and_keeps_the_old_configuration_when_invalid() {
    let h = Harness::start().await;
    let other = second_issuer().await;
    let port = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = |extra: &str| {
        let toml = proxy_config_toml(Ipv4Addr::LOCALHOST.into(), &h.pg, &h.issuer.issuer(), extra);
        edit_toml(&toml, |doc| {
            set(
                section(doc, "listen"),
                "address",
                format!("127.0.0.1:{port}"),
            );
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rlsgate.toml");
    std::fs::write(&path, toml("")).unwrap();
    let served = Served::start(&path);
    served.wait_for_log("rlsgate listening").await;
    let address = (Ipv4Addr::LOCALHOST, port).into();
    let alice = connect(&client_config(
        address,
        "authenticated",
        Some(&h.token("alice")),
    ))
    .await
    .unwrap();
    let carol = client_config(address, "authenticated", Some(&token_from(&other, "carol")));
    assert!(
        connect(&carol).await.is_err(),
        "the second issuer is not configured yet"
    );

    std::fs::write(&path, toml(&provider_toml(&other))).unwrap();
    served.signal(libc::SIGHUP);
    served.wait_for_log("configuration reloaded").await;
    let carol_session = connect(&carol)
        .await
        .expect("carol connects after the reload");
    assert_eq!(user_id_of(&carol_session).await.as_deref(), Some("carol"));
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    std::fs::write(&path, "[listen]\naddress = \"not an address\"\n").unwrap();
    served.signal(libc::SIGHUP);
    served
        .wait_for_log("configuration not reloaded, the previous one stays in force")
        .await;
    assert!(served.log().contains("address"), "{}", served.log());
    let again = connect(&carol)
        .await
        .expect("the reloaded configuration stays");
    assert_eq!(user_id_of(&again).await.as_deref(), Some("carol"));
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));

    drop((alice, carol_session, again));
    served.signal(libc::SIGTERM);
    let mut served = served;
    let status = served.child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", served.log());
}
