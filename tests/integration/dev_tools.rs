//! `rlsgate keygen`, `rlsgate issuer` and `rlsgate token`, run as the real
//! binary: a key made on the command line, served over HTTP and used to mint
//! a token, must get a user through the proxy like a provider's token does.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Harness, WAIT, client_config, connect, jwt_header, unix_now, user_id_of};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rlsgate::config::Config;
use rlsgate::session::listener::RunningProxy;
use serde_json::{Value, json};

/// A background `rlsgate issuer`, killed when dropped so that a failing
/// test does not leave it running.
struct IssuerProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl IssuerProcess {
    /// Starts `rlsgate issuer` with `args` and waits until it serves the
    /// discovery document at `base` (the address it listens on).
    async fn start(args: &[&str], base: &str, log: std::path::PathBuf) -> IssuerProcess {
        let child = rlsgate()
            .arg("issuer")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the issuer log"))
            .spawn()
            .expect("start rlsgate issuer");
        let mut issuer = IssuerProcess { child, log };
        let url = format!("{base}/.well-known/openid-configuration");
        let started = Instant::now();
        loop {
            if let Some(status) = issuer.child.try_wait().expect("poll rlsgate issuer") {
                panic!("rlsgate issuer exited with {status}: {}", issuer.log());
            }
            let reply = reqwest::get(&url).await;
            if reply.is_ok_and(|reply| reply.status().is_success()) {
                return issuer;
            }
            assert!(
                started.elapsed() < WAIT,
                "rlsgate issuer does not serve {url}: {}",
                issuer.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for IssuerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rlsgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rlsgate"));
    command.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    command
}

fn run(args: &[&str]) -> Output {
    rlsgate().args(args).output().expect("run rlsgate")
}

fn stdout_of(output: Output) -> String {
    assert!(
        output.status.success(),
        "rlsgate failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn stderr_of_failure(output: Output) -> String {
    assert!(
        !output.status.success(),
        "rlsgate must fail, but it printed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        output.stdout.is_empty(),
        "a failure prints nothing on stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).expect("UTF-8 errors")
}

/// Runs `keygen --out dir` plus `extra`; returns the kid it printed.
fn keygen(dir: &Path, extra: &[&str]) -> String {
    let out = stdout_of(run(&[&["keygen", "--out", path(dir)], extra].concat()));
    let kid = out
        .lines()
        .find_map(|line| line.strip_prefix("kid"))
        .unwrap_or_else(|| panic!("keygen printed no kid: {out}"))
        .trim()
        .to_owned();
    assert!(out.contains(path(&dir.join("issuer.pem"))), "{out}");
    assert!(out.contains(path(&dir.join("jwks.json"))), "{out}");
    kid
}

/// Runs `token` with `args`; returns the token, which must be all of stdout.
fn token(args: &[&str]) -> String {
    let out = stdout_of(run(&[&["token"], args].concat()));
    let token = out
        .strip_suffix('\n')
        .expect("the token ends with a newline");
    assert!(
        !token.contains(char::is_whitespace),
        "stdout is only the token: {out:?}"
    );
    assert_eq!(token.split('.').count(), 3, "{token}");
    token.to_owned()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

fn jwks_file(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("jwks.json")).unwrap()).unwrap()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_command_line_tools_gets_through_the_proxy() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kid = keygen(dir.path(), &[]);
    let key = dir.path().join("issuer.pem");
    let jwks = jwks_file(dir.path());
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    assert_eq!(jwks["keys"][0]["alg"], "ES256", "ES256 is the default");

    let port = free_port();
    let issuer_url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let issuer = IssuerProcess::start(
        &["--key", path(&key), "--listen", &listen],
        &issuer_url,
        dir.path().join("issuer.log"),
    )
    .await;
    let discovery = get_json(&format!("{issuer_url}/.well-known/openid-configuration")).await;
    assert_eq!(discovery["issuer"], issuer_url.as_str());
    assert_eq!(discovery["jwks_uri"], format!("{issuer_url}/jwks.json"));
    assert_eq!(get_json(&format!("{issuer_url}/jwks.json")).await, jwks);
    let log = issuer.log();
    assert!(
        log.contains("token issuer listening") && log.contains(&kid),
        "{log}"
    );

    let token = token(&[
        "--key",
        path(&key),
        "--issuer",
        &issuer_url,
        "--sub",
        "alice",
        "--aud",
        "todo-app",
    ]);
    assert_eq!(jwt_header(&token)["kid"], kid.as_str());

    // A proxy whose only provider is the command-line issuer.
    let toml = crate::support::sample_config_toml(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        &h.pg,
        &issuer_url,
        crate::support::SIGNING_KEY,
    );
    let proxy = RunningProxy::start(Config::parse(&toml).expect("configuration parses"))
        .await
        .expect("start the proxy");
    let client = connect(&client_config(proxy.address, "authenticated", Some(&token)))
        .await
        .unwrap_or_else(|e| panic!("alice connects: {e}; issuer log: {}", issuer.log()));
    assert_eq!(user_id_of(&client).await.as_deref(), Some("alice"));
    drop(client);
    proxy.shutdown().await;
    drop(issuer);
}

#[tokio::test]
async fn the_issuer_serves_several_keys_under_an_advertised_url_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    let old_kid = keygen(&old, &["--alg", "rs256"]);
    let new_kid = keygen(&new, &["--alg", "eddsa"]);
    assert_eq!(jwks_file(&new)["keys"][0]["alg"], "EdDSA");

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut issuer = IssuerProcess::start(
        &[
            "--key",
            path(&old.join("issuer.pem")),
            "--key",
            path(&new.join("issuer.pem")),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--issuer",
            "http://issuer:8080",
        ],
        &base,
        dir.path().join("issuer.log"),
    )
    .await;
    let discovery = get_json(&format!("{base}/.well-known/openid-configuration")).await;
    assert_eq!(discovery["issuer"], "http://issuer:8080");
    assert_eq!(discovery["jwks_uri"], "http://issuer:8080/jwks.json");
    let kids: Vec<Value> = get_json(&format!("{base}/jwks.json")).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].clone())
        .collect();
    assert_eq!(kids, vec![json!(old_kid), json!(new_kid)]);

    #[cfg(unix)]
    {
        let pid = libc::pid_t::try_from(issuer.child.id()).unwrap();
        // SAFETY: kill(2) on the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = issuer.child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < WAIT, "the issuer ignores SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status}: {}", issuer.log());
    }
}

#[test]
fn the_issuer_refuses_a_url_it_cannot_serve_and_the_same_key_twice() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), &[]);
    let key = dir.path().join("issuer.pem");
    let message = stderr_of_failure(run(&[
        "issuer",
        "--key",
        path(&key),
        "--listen",
        "127.0.0.1:0",
        "--issuer",
        "http://issuer:8080/realms/app",
    ]));
    assert!(message.contains("must have no path"), "{message}");
    let message = stderr_of_failure(run(&[
        "issuer",
        "--key",
        path(&key),
        "--key",
        path(&key),
        "--listen",
        "127.0.0.1:0",
    ]));
    assert!(message.contains("hold the same key"), "{message}");
}

#[test]
fn keygen_refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let kid = keygen(dir.path(), &[]);
    let key = dir.path().join("issuer.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is owner-only");
    }
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");

    let message = stderr_of_failure(run(&["keygen", "--out", path(dir.path())]));
    assert!(
        message.contains("issuer.pem already exists") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), pem, "key unchanged");

    // A leftover jwks.json alone is refused too, before anything is written.
    std::fs::remove_file(&key).unwrap();
    let message = stderr_of_failure(run(&["keygen", "--out", path(dir.path())]));
    assert!(message.contains("jwks.json already exists"), "{message}");
    assert!(!key.exists());

    let new_kid = keygen(dir.path(), &["--force"]);
    assert_ne!(new_kid, kid);
    assert_eq!(jwks_file(dir.path())["keys"][0]["kid"], new_kid.as_str());
}

#[test]
fn token_sets_its_claims_from_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let kid = keygen(dir.path(), &["--alg", "eddsa"]);
    let key = dir.path().join("issuer.pem");
    let before = unix_now();
    let token = token(&[
        "--key",
        path(&key),
        "--issuer",
        "http://issuer:8080",
        "--sub",
        "bob",
        "--aud",
        "todo-app",
        "--aud",
        "admin-app",
        "--claim",
        "tier=3",
        "--claim",
        "admin=true",
        "--claim",
        r#"org="42""#,
        "--claim",
        r#"groups=["a","b"]"#,
        "--claim",
        "email=bob@example.com",
        "--claim",
        "nbf=0",
        "--ttl",
        "15m",
    ]);
    let header = jwt_header(&token);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["kid"], kid.as_str());
    let claims = claims_of(&token);
    assert_eq!(claims["iss"], "http://issuer:8080");
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["aud"], json!(["todo-app", "admin-app"]));
    assert_eq!(claims["tier"], 3);
    assert_eq!(claims["admin"], true);
    assert_eq!(claims["org"], "42");
    assert_eq!(claims["groups"], json!(["a", "b"]));
    assert_eq!(claims["email"], "bob@example.com");
    assert_eq!(claims["nbf"], 0);
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat >= before && iat <= unix_now(), "{claims}");
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 15 * 60);

    // One --aud gives a string; none gives no aud; the ttl defaults to 1h.
    let claims = claims_of(&token_for(&key, &["--aud", "todo-app"]));
    assert_eq!(claims["aud"], "todo-app");
    let claims = claims_of(&token_for(&key, &[]));
    assert!(claims.get("aud").is_none(), "{claims}");
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
}

fn token_for(key: &Path, extra: &[&str]) -> String {
    token(
        &[
            &[
                "--key",
                path(key),
                "--issuer",
                "http://issuer",
                "--sub",
                "bob",
            ],
            extra,
        ]
        .concat(),
    )
}

#[test]
fn token_refuses_claims_that_would_override_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), &[]);
    let key = dir.path().join("issuer.pem");
    let base = [
        "token",
        "--key",
        path(&key),
        "--issuer",
        "http://issuer",
        "--sub",
        "bob",
    ];
    for (extra, expected) in [
        (&["--claim", "exp=1"][..], "exp is set by --ttl"),
        (&["--claim", "iss=http://evil"], "iss is set by --issuer"),
        (&["--claim", "sub=root"], "sub is set by --sub"),
        (&["--claim", "aud=x"], "aud is set by --aud"),
        (&["--claim", "iat=1"], "iat is set by the current time"),
        (&["--claim", "role"], "expected KEY=VALUE"),
        (&["--claim", "=1"], "name before '=' is empty"),
        (
            &["--claim", "a=1", "--claim", "a=2"],
            "--claim a is given twice",
        ),
        (&["--ttl", "soon"], "--ttl"),
        (&["--ttl", "0s"], "at least 1s"),
    ] {
        let message = stderr_of_failure(run(&[&base[..], extra].concat()));
        assert!(message.contains(expected), "{extra:?}: {message}");
    }

    let message = stderr_of_failure(run(&[
        "token",
        "--key",
        path(&dir.path().join("missing.pem")),
        "--issuer",
        "http://issuer",
        "--sub",
        "bob",
    ]));
    assert!(message.contains("cannot read the key file"), "{message}");
    std::fs::write(dir.path().join("cert.pem"), "not a key").unwrap();
    let message = stderr_of_failure(run(&[
        "token",
        "--key",
        path(&dir.path().join("cert.pem")),
        "--issuer",
        "http://issuer",
        "--sub",
        "bob",
    ]));
    assert!(message.contains("is not a usable signing key"), "{message}");
}
