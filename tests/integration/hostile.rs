//! Hostile and broken clients before authentication: silent ones, slow ones,
//! ones that speak another protocol or declare absurd lengths, and ones that
//! vanish halfway. Each gets an ErrorResponse or a close within bounded time,
//! none holds a connection slot or stays counted once it is gone, and real
//! clients are served all along.

use std::time::{Duration, Instant};

use crate::support::wire::{self, APP_STARTUP, ErrorResponse};
use crate::support::{Harness, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A startup timeout short enough that the tests of it run quickly.
const SHORT_STARTUP: &str = "[listen]\nstartup_timeout = \"2s\"\nmax_connections = 4";
/// A startup timeout longer than any wait in these tests, so that whatever
/// happens within `WAIT` did not happen because of it.
const LONG_STARTUP: &str = "[listen]\nstartup_timeout = \"60s\"\nmax_connections = 4";
/// The `max_connections` of both.
const SLOTS: usize = 4;

async fn connect(h: &Harness) -> TcpStream {
    TcpStream::connect(("127.0.0.1", h.port()))
        .await
        .expect("connect to the proxy")
}

/// Everything the proxy sends until it closes the connection, and how long
/// that took; its staying open beyond `WAIT` is a failure. A reset counts as
/// a close.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the proxy kept the connection open for {WAIT:?} (it sent {received:?})"
    );
    (received, started.elapsed())
}

/// The ErrorResponse that `received` starts with, if it starts with one.
fn first_error(received: &[u8]) -> Option<ErrorResponse> {
    let (kind, body) = first_message(received)?;
    (kind == b'E').then(|| wire::error_response(body))
}

/// The first backend message of `received`: its type byte and body.
fn first_message(received: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, rest) = received.split_first()?;
    let (len, _) = rest.split_first_chunk::<4>()?;
    let len = (u32::from_be_bytes(*len) as usize).checked_sub(4)?;
    Some((kind, rest.get(4..4 + len)?))
}

/// Whether the proxy still holds `stream` open: nothing to read yet, and no
/// end of stream.
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Connects `SLOTS` real clients at the same time and has each ask who it
/// is: possible only when every slot is free. A slot still held by a client
/// that has gone is retried until `WAIT` runs out, then is a failure.
async fn all_slots_serve_real_clients(h: &Harness) {
    let deadline = Instant::now() + WAIT;
    let mut clients = Vec::new();
    while clients.len() < SLOTS {
        let name = format!("user{}", clients.len());
        match h.connect("authenticated", &h.token(&name)).await {
            Ok(client) => clients.push((name, client)),
            Err(e) => {
                assert_eq!(crate::support::db_error(&e).0, "53300", "{e}");
                assert!(
                    Instant::now() < deadline,
                    "only {} of {SLOTS} slots freed within {WAIT:?}",
                    clients.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for (name, client) in &clients {
        assert_eq!(
            crate::support::user_id_of(client).await.as_deref(),
            Some(name.as_str())
        );
    }
    drop(clients);
    connections_gauge_returns_to_zero(h).await;
}

/// Once every client has gone, `rlsgate_client_connections_active` must
/// come back to zero: no connection, hostile or not, is still counted.
async fn connections_gauge_returns_to_zero(h: &Harness) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, text) = crate::support::http_get(&h.admin_url("/metrics")).await;
        let active = crate::support::metric(&text, "rlsgate_client_connections_active", &[]);
        if active == Some(0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rlsgate_client_connections_active is {active:?} {WAIT:?} after every client left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A StartupMessage for `authenticated` on `app`.
fn startup() -> Vec<u8> {
    wire::startup_message(APP_STARTUP)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_at_the_startup_timeout() {
    let h = Harness::start_with_admin(SHORT_STARTUP).await;
    let mut silent = connect(&h).await;
    let (received, took) = read_until_closed(&mut silent).await;
    assert_eq!(received, b"", "a client that said nothing is told nothing");
    // Closed by the timeout, not at once.
    assert!(took >= Duration::from_secs(1), "closed after {took:?}");
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_per_second_client_is_closed_at_the_startup_timeout() {
    let h = Harness::start_with_admin(SHORT_STARTUP).await;
    let (mut read, mut write) = connect(&h).await.into_split();
    let packet = startup();
    let drip = async {
        for (sent, byte) in packet.iter().enumerate() {
            if write.write_all(&[*byte]).await.is_err() {
                return sent;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        packet.len()
    };
    let closed = async {
        let mut buf = [0u8; 64];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let outcome = tokio::time::timeout(WAIT, async {
        tokio::select! {
            sent = drip => Err(sent),
            () = closed => Ok(()),
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(sent)) => panic!("the proxy let a client drip its {sent}-byte startup packet"),
        Err(_) => panic!("a client dripping a byte a second was still connected after {WAIT:?}"),
    }
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_an_error_or_a_close() {
    let h = Harness::start_with_admin(SHORT_STARTUP).await;

    // Random bytes (a fixed sequence, so that a failure repeats).
    let mut state: u32 = 0x2545_f491;
    let random: Vec<u8> = (0..512)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    let mut stream = connect(&h).await;
    stream.write_all(&random).await.unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    if !received.is_empty() {
        let error = first_error(&received)
            .unwrap_or_else(|| panic!("random bytes were answered with {received:?}"));
        assert_eq!(error.severity, "FATAL", "{error:?}");
        assert_eq!(error.code.len(), 5, "{error:?}");
    }

    // Other protocols: their first four bytes read as an absurd length.
    let http = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    let client_hello = tls_client_hello();
    for (what, bytes) in [
        ("an HTTP request", http),
        ("a TLS ClientHello", client_hello),
    ] {
        let mut stream = connect(&h).await;
        stream.write_all(&bytes).await.unwrap();
        let (received, _) = read_until_closed(&mut stream).await;
        let error = first_error(&received)
            .unwrap_or_else(|| panic!("{what} was answered with {received:?}"));
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "08P01"),
            "{what}: {error:?}"
        );
        assert!(
            error.message.contains("invalid length of startup packet"),
            "{what}: {error:?}"
        );
    }
    all_slots_serve_real_clients(&h).await;
}

/// A TLS 1.3 ClientHello with one cipher suite and no extensions, as a
/// client using direct TLS sends first.
fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03]; // client_version TLS 1.2
    hello.extend([0x5a; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x02, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    hello.extend([0x01, 0x00]); // null compression
    hello.extend([0x00, 0x00]); // no extensions
    let mut handshake = vec![0x01, 0, 0, hello.len() as u8];
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_of_one_gigabyte_is_refused_without_reading_it() {
    let h = Harness::start_with_admin(LONG_STARTUP).await;
    let mut stream = connect(&h).await;
    // A startup packet of 1 GiB, of which only the version follows.
    let mut packet = (1u32 << 30).to_be_bytes().to_vec();
    packet.extend(196_608u32.to_be_bytes());
    stream.write_all(&packet).await.unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    let error = first_error(&received).unwrap_or_else(|| panic!("answered with {received:?}"));
    assert_eq!(error.code, "08P01", "{error:?}");
    assert_eq!(
        error.message, "invalid length of startup packet: 1073741824",
        "{error:?}"
    );
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_of_one_gigabyte_is_refused_without_reading_it() {
    let h = Harness::start_with_admin(LONG_STARTUP).await;
    let mut stream = connect(&h).await;
    stream.write_all(&startup()).await.unwrap();
    let (kind, body) = tokio::time::timeout(WAIT, wire::read_message(&mut stream))
        .await
        .expect("the password request within the timeout")
        .unwrap();
    assert_eq!((kind, body), (b'R', 3u32.to_be_bytes().to_vec()));
    // A password message of 1 GiB, of which only a few bytes follow.
    let mut message = vec![b'p'];
    message.extend((1u32 << 30).to_be_bytes());
    message.extend(b"eyJ");
    stream.write_all(&message).await.unwrap();
    let (received, _) = read_until_closed(&mut stream).await;
    let error = first_error(&received).unwrap_or_else(|| panic!("answered with {received:?}"));
    assert_eq!(error.code, "28000", "{error:?}");
    assert!(
        error
            .message
            .contains("more than the 16384-byte token limit"),
        "{error:?}"
    );
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_startup_frees_its_slot() {
    // The startup timeout is far away: only noticing the disconnect frees
    // the slots within the wait.
    let h = Harness::start_with_admin(LONG_STARTUP).await;
    let packet = startup();
    for _ in 0..SLOTS {
        let mut stream = connect(&h).await;
        stream.write_all(&packet[..packet.len() / 2]).await.unwrap();
        drop(stream);
    }
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_password_frees_its_slot() {
    let h = Harness::start_with_admin(LONG_STARTUP).await;
    let password = wire::password_message(&h.token("mallory"));
    for _ in 0..SLOTS {
        let mut stream = connect(&h).await;
        stream.write_all(&startup()).await.unwrap();
        let (kind, _) = tokio::time::timeout(WAIT, wire::read_message(&mut stream))
            .await
            .expect("the password request within the timeout")
            .unwrap();
        assert_eq!(kind, b'R');
        stream
            .write_all(&password[..password.len() / 2])
            .await
            .unwrap();
        drop(stream);
    }
    all_slots_serve_real_clients(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_clients_are_unaffected() {
    let h = Harness::start_with_admin(LONG_STARTUP).await;
    // Three hostile clients hang in the front door: one silent, one halfway
    // through its startup packet, one halfway through its password.
    let silent = connect(&h).await;
    let mut half_startup = connect(&h).await;
    let packet = startup();
    half_startup
        .write_all(&packet[..packet.len() / 2])
        .await
        .unwrap();
    let mut half_password = connect(&h).await;
    half_password.write_all(&startup()).await.unwrap();
    let (kind, _) = tokio::time::timeout(WAIT, wire::read_message(&mut half_password))
        .await
        .expect("the password request within the timeout")
        .unwrap();
    assert_eq!(kind, b'R');
    half_password.write_all(b"p\0\0\x01\0eyJ").await.unwrap();

    // The one slot left serves a real client, with a real query.
    let alice = tokio::time::timeout(WAIT, h.connect_as("alice"))
        .await
        .expect("alice connects while hostile clients hang");
    let rows = alice
        .simple_query("select count(*) from todos")
        .await
        .expect("alice's query");
    assert_eq!(crate::support::simple_rows(&rows).len(), 1);
    assert_eq!(
        crate::support::user_id_of(&alice).await.as_deref(),
        Some("alice")
    );

    // The hostile clients were still hanging all along.
    for (what, stream) in [
        ("silent", &silent),
        ("half startup", &half_startup),
        ("half password", &half_password),
    ] {
        assert!(still_open(stream), "the {what} client was closed early");
    }
    drop((silent, half_startup, half_password));
    drop(alice);
    all_slots_serve_real_clients(&h).await;
}
