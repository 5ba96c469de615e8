//! Connections that have not authenticated yet are limited apart from
//! sessions: overall (`max_startups`) and per client address
//! (`max_startups_per_address`), with their own timeout (`auth_timeout`).
//! Idle connections from one address cannot lock others out, those over a
//! limit get SQLSTATE 53300 at once, and their slots come back when they go.
//!
//! Client sockets are bound to other loopback addresses (127.0.0.2, …) to
//! play clients on other machines; counts stay small and every wait is
//! bounded by `WAIT`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::config_file::{edit_toml, section, set};
use crate::support::wire::{self, APP_STARTUP, ErrorResponse};
use crate::support::{Harness, WAIT, with_admin};
use rlsgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

const FLOODER: &str = "127.0.0.2";
const NEIGHBOUR: &str = "127.0.0.3";
const ANOTHER_FLOODER: &str = "127.0.0.4";

/// The flooding address may have this many connections authenticating.
const PER_ADDRESS: usize = 4;
/// Connections the flooding address opens and holds.
const FLOOD: usize = 12;

/// Fails, with what to do, unless the process may open all the sockets a
/// test needs: each connection is two descriptors here (client and proxy
/// side), plus PostgreSQL's and the harness's own.
fn enough_file_descriptors(connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit"
    );
    let needed = (connections * 2 + 256) as u64;
    assert!(
        limit.rlim_cur >= needed,
        "ulimit -n is {}; these tests need {needed}: raise it (ulimit -n {needed})",
        limit.rlim_cur
    );
}

/// A TCP connection to the proxy from `ip`, as a client on that machine.
async fn connect_from(ip: &str, h: &Harness) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap_or_else(|e| panic!("bind a client socket to {ip}: {e}"));
    socket
        .connect(h.proxy.address)
        .await
        .unwrap_or_else(|e| panic!("connect to the proxy from {ip}: {e}"))
}

/// A tokio-postgres session as `sub` from a socket bound to `ip`.
async fn session_from(ip: &str, h: &Harness, sub: &str) -> Result<Client, tokio_postgres::Error> {
    let stream = connect_from(ip, h).await;
    let (client, connection) = h
        .client_config("authenticated", &h.token(sub))
        .connect_raw(stream, NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Reads everything the proxy sends on `stream` until it closes it.
fn read_to_close(mut stream: TcpStream) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut received = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return received,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// The ErrorResponse `received` consists of: one message, nothing after it.
fn the_error(received: &[u8]) -> ErrorResponse {
    assert_eq!(received.first(), Some(&b'E'), "{received:?}");
    let len = u32::from_be_bytes(received[1..5].try_into().unwrap()) as usize;
    assert_eq!(received.len(), len + 1, "one ErrorResponse: {received:?}");
    wire::error_response(&received[5..])
}

/// The current value of a metric, polled until `wanted` returns true for
/// it; still false when `WAIT` is over is a failure.
async fn metric_becomes(
    h: &Harness,
    name: &str,
    labels: &[(&str, &str)],
    wanted: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, text) = crate::support::http_get(&h.admin_url("/metrics")).await;
        let value = crate::support::metric(&text, name, labels).unwrap_or(0.0);
        if wanted(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const ACTIVE: &str = "rlsgate_client_connections_active";
const REFUSALS: &str = "rlsgate_refusals_total";
const LIMIT: &[(&str, &str)] = &[("reason", "limit")];

/// Waits for `count` of `readers` to finish, each with a FATAL 53300 that
/// names `key`, and returns the rest, still open.
async fn refused_with(
    readers: Vec<JoinHandle<Vec<u8>>>,
    count: usize,
    key: &str,
) -> Vec<JoinHandle<Vec<u8>>> {
    let deadline = Instant::now() + WAIT;
    while readers.iter().filter(|r| r.is_finished()).count() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} connections were refused within {WAIT:?}",
            readers.iter().filter(|r| r.is_finished()).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (finished, open): (Vec<_>, Vec<_>) = readers.into_iter().partition(|r| r.is_finished());
    for reader in finished {
        let error = the_error(&reader.await.unwrap());
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "53300")
        );
        assert!(error.message.contains(&format!("({key})")), "{error:?}");
    }
    open
}

/// Timeouts beyond any wait of these tests: only the limits refuse.
fn patient(config: &mut Config) {
    config.listen.auth_timeout = Duration::from_secs(60);
    config.listen.startup_timeout = Duration::from_secs(60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_from_one_address_does_not_lock_out_others() {
    enough_file_descriptors(FLOOD + 8);
    let h = Harness::start_configured("", |c| {
        with_admin(c);
        patient(c);
        c.listen.max_startups_per_address = PER_ADDRESS;
        c.listen.max_connections = 2;
    })
    .await;

    // The flood: connections that say nothing, held open.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(read_to_close(connect_from(FLOODER, &h).await));
    }
    // The neighbour's clients are served, both of the two sessions
    // max_connections allows: the silent connections hold none.
    let alice = session_from(NEIGHBOUR, &h, "alice")
        .await
        .expect("alice connects from another address during the flood");
    let bob = session_from(NEIGHBOUR, &h, "bob")
        .await
        .expect("bob connects too");
    assert_eq!(
        crate::support::user_id_of(&alice).await.as_deref(),
        Some("alice")
    );
    assert_eq!(
        crate::support::user_id_of(&bob).await.as_deref(),
        Some("bob")
    );
    // Sessions beyond max_connections still get the error they can read.
    let carol = session_from(NEIGHBOUR, &h, "carol").await.err();
    let (code, message) = crate::support::db_error(&carol.expect("a third session is refused"));
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("at most 2"), "{message}");

    // The flooding address's connections beyond its share were refused at
    // once with 53300; its share is still held.
    let held = refused_with(flood, FLOOD - PER_ADDRESS, "max_startups_per_address").await;
    assert_eq!(held.len(), PER_ADDRESS);
    metric_becomes(&h, ACTIVE, &[], |v| v == (PER_ADDRESS + 2) as f64).await;
    // A real client from the flooding address reads the refusal too.
    let refused = session_from(FLOODER, &h, "mallory").await.err();
    let (code, message) =
        crate::support::db_error(&refused.expect("refused at the address's limit"));
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("max_startups_per_address"), "{message}");
    let refusals = FLOOD - PER_ADDRESS + 2;
    metric_becomes(&h, REFUSALS, LIMIT, |v| v == refusals as f64).await;

    // Once the flood and the sessions are gone, every slot is free again.
    for reader in &held {
        reader.abort();
    }
    drop((alice, bob));
    metric_becomes(&h, ACTIVE, &[], |v| v == 0.0).await;
    let mallory = session_from(FLOODER, &h, "mallory")
        .await
        .expect("the flooding address is served once its connections are gone");
    assert_eq!(
        crate::support::user_id_of(&mallory).await.as_deref(),
        Some("mallory")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_startups_are_refused_whatever_their_address() {
    enough_file_descriptors(16);
    let h = Harness::start_configured("", |c| {
        with_admin(c);
        patient(c);
        c.listen.max_startups = 3;
        c.listen.max_startups_per_address = 2;
    })
    .await;
    let mut silent = Vec::new();
    for ip in [FLOODER, FLOODER, ANOTHER_FLOODER] {
        silent.push(read_to_close(connect_from(ip, &h).await));
    }
    let refused = session_from(NEIGHBOUR, &h, "alice").await.err();
    let (code, message) = crate::support::db_error(&refused.expect("refused at max_startups"));
    assert_eq!(code, "53300", "{message}");
    assert!(message.contains("at most 3"), "{message}");
    assert!(message.contains("(max_startups)"), "{message}");
    metric_becomes(&h, REFUSALS, LIMIT, |v| v == 1.0).await;

    // One silent connection goes: its slot serves the neighbour.
    silent.pop().unwrap().abort();
    let deadline = Instant::now() + WAIT;
    let alice = loop {
        match session_from(NEIGHBOUR, &h, "alice").await {
            Ok(alice) => break alice,
            Err(e) => {
                assert_eq!(crate::support::db_error(&e).0, "53300", "{e}");
                assert!(
                    Instant::now() < deadline,
                    "no startup slot freed in {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        crate::support::user_id_of(&alice).await.as_deref(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_startup_limits_to_the_next_connections() {
    enough_file_descriptors(16);
    let limits = |per_address: usize| {
        move |c: &mut Config| {
            patient(c);
            c.listen.max_startups_per_address = per_address;
        }
    };
    let h = Harness::start_configured("", |c| {
        with_admin(c);
        limits(2)(c);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(read_to_close(connect_from(FLOODER, &h).await));
    }
    let third = read_to_close(connect_from(FLOODER, &h).await);
    let error = the_error(&tokio::time::timeout(WAIT, third).await.unwrap().unwrap());
    assert!(error.message.contains("at most 2"), "{error:?}");

    h.reload_configured("", limits(3)).expect("reload");
    held.push(read_to_close(connect_from(FLOODER, &h).await));
    metric_becomes(&h, ACTIVE, &[], |v| v == 3.0).await;
    let fourth = read_to_close(connect_from(FLOODER, &h).await);
    let error = the_error(&tokio::time::timeout(WAIT, fourth).await.unwrap().unwrap());
    assert!(error.message.contains("at most 3"), "{error:?}");
    assert!(
        held.iter().all(|r| !r.is_finished()),
        "held connections stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_authenticate_is_closed_at_the_auth_timeout() {
    // startup_timeout is beyond the wait: only auth_timeout can close them.
    let h = Harness::start_configured("", |c| {
        with_admin(c);
        c.listen.auth_timeout = Duration::from_secs(2);
        c.listen.startup_timeout = Duration::from_secs(60);
    })
    .await;

    let started = Instant::now();
    let silent = read_to_close(connect_from(NEIGHBOUR, &h).await);
    let mut no_password = connect_from(NEIGHBOUR, &h).await;
    no_password
        .write_all(&wire::startup_message(APP_STARTUP))
        .await
        .unwrap();
    let no_password = read_to_close(no_password);

    let silent = tokio::time::timeout(WAIT, silent)
        .await
        .expect("a silent client is closed within the wait")
        .unwrap();
    assert_eq!(silent, b"", "a client that said nothing is told nothing");
    let no_password = tokio::time::timeout(WAIT, no_password)
        .await
        .expect("a client that sends no password is closed within the wait")
        .unwrap();
    assert_eq!(
        no_password,
        [b'R', 0, 0, 0, 8, 0, 0, 0, 3],
        "only the password request"
    );
    // Closed by the timeout, not at once.
    assert!(started.elapsed() >= Duration::from_secs(1));
    metric_becomes(&h, ACTIVE, &[], |v| v == 0.0).await;

    // A client that authenticates in time is served.
    let alice = session_from(NEIGHBOUR, &h, "alice").await.unwrap();
    assert_eq!(
        crate::support::user_id_of(&alice).await.as_deref(),
        Some("alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_the_limit_is_logged_once_not_per_connection() {
    enough_file_descriptors(FLOOD);
    // No session is opened: nothing upstream or at the issuer is reached.
    let toml = rlsgate::dev::sample_config(
        "127.0.0.1:0".parse().unwrap(),
        1,
        "http://127.0.0.1:1",
        crate::support::SIGNING_KEY,
    );
    let toml = edit_toml(&toml, |doc| {
        let listen = section(doc, "listen");
        set(listen, "max_startups_per_address", 2);
        set(listen, "auth_timeout", "60s");
        set(listen, "admin_address", "127.0.0.1:0");
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rlsgate.toml");
    std::fs::write(&config, toml).unwrap();
    let served = crate::support::process::Served::start(&config).await;
    let (address, admin) = (served.address, served.admin.expect("admin_address is set"));
    // Log entries whose message is exactly `message`.
    let logged = |message: &str| -> Vec<Value> {
        served
            .logs()
            .into_iter()
            .filter(|entry| entry["fields"]["message"] == message)
            .collect()
    };
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let url = format!("http://{admin}/metrics");
        async move {
            let (_, text) = crate::support::http_get(&url).await;
            crate::support::metric(&text, name, labels).unwrap_or(0.0)
        }
    };

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(FLOODER.parse().unwrap(), 0))
            .unwrap();
        flood.push(read_to_close(socket.connect(address).await.unwrap()));
    }
    let held = refused_with(flood, FLOOD - 2, "max_startups_per_address").await;
    assert_eq!(held.len(), 2);
    assert_eq!(metric(REFUSALS, LIMIT).await, (FLOOD - 2) as f64);
    assert_eq!(metric(ACTIVE, &[]).await, 2.0, "the two held");

    // Connections that come and go without a word are told and logged
    // nothing either.
    for _ in 0..3 {
        let mut probe = TcpStream::connect(address).await.unwrap();
        probe.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, probe.read_to_end(&mut answer))
            .await
            .expect("the proxy closes a connection that left without a word")
            .unwrap();
        assert_eq!(answer, b"");
    }
    // Then one that sends garbage is refused, and logged: its line comes
    // after any the probes caused.
    let mut garbage = TcpStream::connect(address).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let answer = tokio::time::timeout(WAIT, read_to_close(garbage)).await;
    assert_eq!(the_error(&answer.unwrap().unwrap()).code, "08P01");
    let deadline = Instant::now() + WAIT;
    while logged("refused").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the refusal was not logged in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let refused = logged("refused");
    assert_eq!(
        refused.len(),
        1,
        "one refusal line, for the garbage: {refused:?}"
    );
    assert_eq!(refused[0]["fields"]["reason"], "malformed", "{refused:?}");
    let lines = logged("refused a connection at a startup limit (logged at most every 10s)");
    assert_eq!(lines.len(), 1, "one line for the whole flood: {lines:?}");
    let fields = &lines[0]["fields"];
    assert_eq!(fields["client"], FLOODER, "{fields}");
    assert_eq!(fields["limit"], "max_startups_per_address", "{fields}");
    assert_eq!(fields["size"], 2, "{fields}");
    assert_eq!(fields["refused_since_last_line"], 0, "{fields}");
}
