//! Query cancellation through the proxy: the client's cancel key (one the
//! proxy made up) cancels the statement running in its upstream backend; a
//! wrong key cancels nothing; the upstream's real key never reaches the client.

mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use support::{Harness, db_error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// How long any single wait in these tests may take before it is a failure.
const WAIT: Duration = Duration::from_secs(10);

/// Sends a CancelRequest to the proxy by hand and waits until the proxy has
/// dealt with it (it closes the connection without an answer, as Postgres does).
async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut packet = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    stream.write_all(&packet).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes a cancel connection");
    assert!(
        read.is_err() || rest.is_empty(),
        "a cancel request gets no answer, got {rest:?}"
    );
}

/// A session through the proxy spoken by hand, to see the BackendKeyData.
struct RawSession {
    stream: TcpStream,
    /// The cancel key the client was given.
    pid: i32,
    secret: i32,
}

type QueryResult = Result<Vec<Vec<Option<String>>>, (String, String)>;

impl RawSession {
    async fn connect(h: &Harness, sub: &str) -> RawSession {
        let mut stream = TcpStream::connect(("127.0.0.1", h.port())).await.unwrap();
        let mut buf = BytesMut::new();
        frontend::startup_message([("user", "authenticated"), ("database", "app")], &mut buf)
            .unwrap();
        stream.write_all(&buf).await.unwrap();

        let (kind, body) = read_message(&mut stream).await;
        assert_eq!(kind, b'R', "the proxy asks for a password");
        assert_eq!(
            i32::from_be_bytes(body[..4].try_into().unwrap()),
            3,
            "cleartext password"
        );
        buf.clear();
        frontend::password_message(h.token(sub).as_bytes(), &mut buf).unwrap();
        stream.write_all(&buf).await.unwrap();

        let mut key = None;
        loop {
            let (kind, body) = read_message(&mut stream).await;
            match kind {
                b'R' => assert_eq!(body, [0, 0, 0, 0], "AuthenticationOk"),
                b'K' => {
                    assert_eq!(body.len(), 8);
                    key = Some((
                        i32::from_be_bytes(body[..4].try_into().unwrap()),
                        i32::from_be_bytes(body[4..].try_into().unwrap()),
                    ));
                }
                b'Z' => break,
                b'E' => panic!("connect refused: {:?}", error_fields(&body)),
                _ => {}
            }
        }
        let (pid, secret) = key.expect("BackendKeyData before ReadyForQuery");
        RawSession {
            stream,
            pid,
            secret,
        }
    }

    async fn send_query(&mut self, sql: &str) {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        self.stream.write_all(&buf).await.unwrap();
    }

    /// Reads the answer to a query up to ReadyForQuery: the rows, or the
    /// SQLSTATE and message of the error.
    async fn read_result(&mut self) -> QueryResult {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = tokio::time::timeout(WAIT, read_message(&mut self.stream))
                .await
                .expect("an answer within the timeout");
            match kind {
                b'D' => rows.push(data_row(&body)),
                b'E' => error = Some(error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    async fn query(&mut self, sql: &str) -> QueryResult {
        self.send_query(sql).await;
        self.read_result().await
    }
}

async fn read_message(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .expect("a message header");
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.expect("a message body");
    (header[0], body)
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let count = i16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    (0..count)
        .map(|_| {
            let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                return None;
            }
            let value = String::from_utf8(body[at..at + len as usize].to_vec()).unwrap();
            at += len as usize;
            Some(value)
        })
        .collect()
}

/// The SQLSTATE and message of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut at = 0;
    while at < body.len() && body[at] != 0 {
        let field = body[at];
        let end = at + 1 + body[at + 1..].iter().position(|&b| b == 0).unwrap();
        let value = String::from_utf8_lossy(&body[at + 1..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        at = end + 1;
    }
    (code, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_sleep_is_cancelled_with_the_cancel_token_and_returns_57014_within_two_seconds() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    // Twice: once in the simple protocol, once in the extended one; the key
    // stays valid for the whole session.
    for round in 0..2 {
        let token = alice.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let started = Instant::now();
        let err = if round == 0 {
            alice
                .batch_execute("select pg_sleep(30)")
                .await
                .unwrap_err()
        } else {
            alice
                .query("select pg_sleep($1)", &[&30f64])
                .await
                .unwrap_err()
        };
        let elapsed = started.elapsed();
        let (code, message) = db_error(&err);
        assert_eq!(code, "57014", "round {round}: {message}");
        assert!(
            message.contains("canceling statement due to user request"),
            "{message}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "round {round}: cancelled after {elapsed:?}"
        );
        canceller
            .await
            .unwrap()
            .expect("the cancel request is sent");

        // The session is usable afterwards, with its claims intact.
        let who: String = alice
            .query_one("select auth.user_id()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "alice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_session_leaves_another_running() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;
    let bob = h.connect_as("bob").await;

    let token = alice.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let (alice_result, bob_result) = tokio::join!(
        alice.batch_execute("select pg_sleep(30)"),
        bob.query_one("select pg_sleep(1.5)::text, auth.user_id()", &[]),
    );
    canceller.await.unwrap().unwrap();
    assert_eq!(db_error(&alice_result.unwrap_err()).0, "57014");
    let row = bob_result.expect("bob's statement is not cancelled");
    assert_eq!(row.get::<_, String>(1), "bob");
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_with_a_wrong_key_cancels_nothing() {
    let h = Harness::start().await;
    let alice = h.connect_as("alice").await;

    let port = h.port();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..3 {
            send_cancel(port, rand::random(), rand::random()).await;
        }
    });
    let started = Instant::now();
    let row = alice
        .query_one("select pg_sleep(1)::text, 'done'", &[])
        .await
        .expect("the statement completes normally");
    assert_eq!(row.get::<_, String>(1), "done");
    assert!(started.elapsed() >= Duration::from_secs(1));
    sender.await.unwrap();

    // Near misses of a real key, and the upstream backend's real pid, cancel
    // nothing either; the right key then does.
    let mut raw = RawSession::connect(&h, "bob").await;
    let upstream_pid: i32 = raw.query("select pg_backend_pid()").await.unwrap()[0][0]
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    raw.send_query("select pg_sleep(1), 'done'").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_cancel(port, raw.pid, raw.secret.wrapping_add(1)).await;
    send_cancel(port, raw.pid ^ 1, raw.secret).await;
    send_cancel(port, upstream_pid, raw.secret).await;
    let rows = raw
        .read_result()
        .await
        .expect("not cancelled by a wrong key");
    assert_eq!(rows, [vec![Some(String::new()), Some("done".to_owned())]]);

    raw.send_query("select pg_sleep(30)").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    send_cancel(port, raw.pid, raw.secret).await;
    let (code, _) = raw.read_result().await.unwrap_err();
    assert_eq!(code, "57014");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Both sessions are still usable.
    let n: i32 = alice.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(
        raw.query("select auth.user_id()").await.unwrap(),
        [vec![Some("bob".to_owned())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_key_given_to_the_client_is_not_the_upstream_backends() {
    let h = Harness::start().await;
    let mut raw = RawSession::connect(&h, "alice").await;
    let upstream_pid: i32 = raw.query("select pg_backend_pid()").await.unwrap()[0][0]
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        raw.pid, upstream_pid,
        "the client must not get the upstream backend's pid"
    );

    // No backend at all has the pid the client was given.
    let admin = h.admin().await;
    let backends: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where pid = $1",
            &[&raw.pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(backends, 0);
    let upstream_user: String = admin
        .query_one(
            "select usename::text from pg_stat_activity where pid = $1",
            &[&upstream_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(upstream_user, "authenticated");

    // Every session gets its own key.
    let other = RawSession::connect(&h, "alice").await;
    assert_ne!((other.pid, other.secret), (raw.pid, raw.secret));
}
