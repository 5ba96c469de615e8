//! The two ways a session is relayed, side by side: through the worker's
//! io_uring (`[listen] io_uring = "on"`; the rest of the suite relays that
//! way too where the kernel allows it, `"auto"`) and through epoll
//! (`"off"`, the fallback). Framing, expiry at message boundaries, cancel
//! and the pool's hand-over must behave the same on both; TLS sessions stay
//! on epoll.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{Client, NoTls};

use crate::support::pki::TestPki;
use crate::support::{
    Harness, db_error, http_get, metric, pid_of, pooled, psql_ok, refusal, simple_rows,
    stream_until_ended, unix_now, user_id_of, with_admin,
};
use rlsgate::config::Config;
use rlsgate::dev::issuer::KeyKind;

#[derive(Clone, Copy, Debug)]
enum Relay {
    IoUring,
    Epoll,
}

const BOTH: [Relay; 2] = [Relay::IoUring, Relay::Epoll];

impl Relay {
    fn setting(self) -> &'static str {
        match self {
            Relay::IoUring => "io_uring = \"on\"\nio_uring_after = 0",
            Relay::Epoll => "io_uring = \"off\"",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Relay::IoUring => "io_uring",
            Relay::Epoll => "epoll",
        }
    }

    /// A proxy relaying this way, with its admin listener, its
    /// configuration edited by `edit` too.
    async fn start(self, edit: fn(&mut Config)) -> Harness {
        let toml = format!("[listen]\n{}", self.setting());
        Harness::start_configured(&toml, |config| {
            with_admin(config);
            edit(config);
        })
        .await
    }
}

/// How many sessions relayed each way so far: (io_uring, epoll).
async fn relayed(h: &Harness) -> (f64, f64) {
    let (_, text) = http_get(&h.admin_url("/metrics")).await;
    let count = |relay: &str| {
        metric(&text, "rlsgate_relayed_sessions_total", &[("relay", relay)]).unwrap_or(0.0)
    };
    (count("io_uring"), count("epoll"))
}

/// Asserts that the sessions so far relayed as `relay` says, and that
/// there were some.
async fn assert_relayed(h: &Harness, relay: Relay) {
    let (io_uring, epoll) = relayed(h).await;
    let (this, other) = match relay {
        Relay::IoUring => (io_uring, epoll),
        Relay::Epoll => (epoll, io_uring),
    };
    assert!(
        this > 0.0 && other == 0.0,
        "sessions relayed through {}: {io_uring} through io_uring, {epoll} through epoll",
        relay.label()
    );
}

fn no_edit(_: &mut Config) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_both_relays_large_results_copy_and_pipelines_pass_whole() {
    for relay in BOTH {
        let h = relay.start(no_edit).await;
        let alice = h.connect_as("alice").await;

        // Four rows of one MiB each, every row a different letter.
        let rows = alice
            .query(
                "select i, repeat(chr(97 + i), 1024 * 1024) from generate_series(0, 3) i order by i",
                &[],
            )
            .await
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            let letter = char::from(b'a' + i as u8);
            let value: &str = row.get(1);
            assert_eq!(value.len(), 1024 * 1024, "{relay:?}: row {i}");
            assert!(value.chars().all(|c| c == letter), "{relay:?}: row {i}");
        }

        // COPY in, in many CopyData messages, and out again.
        alice
            .batch_execute("create temp table copied (n int, body text)")
            .await
            .unwrap();
        let sink = alice
            .copy_in("copy copied from stdin")
            .await
            .expect("COPY FROM STDIN starts");
        futures_util::pin_mut!(sink);
        for n in 0..3000 {
            let line = format!("{n}\t{}\n", "y".repeat(n % 97));
            sink.send(bytes::Bytes::from(line)).await.unwrap();
        }
        assert_eq!(sink.finish().await.unwrap(), 3000, "{relay:?}");
        let out = alice
            .copy_out("copy (select n from copied order by n) to stdout")
            .await
            .unwrap();
        let chunks: Vec<bytes::Bytes> = out.map(Result::unwrap).collect().await;
        let text: String = chunks
            .iter()
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        assert_eq!(text.lines().count(), 3000, "{relay:?}");
        assert_eq!(text.lines().last(), Some("2999"), "{relay:?}");

        // Fifty statements pipelined, each answered in order.
        let statement = alice.prepare("select $1::int * 2").await.unwrap();
        let numbers: Vec<i32> = (0..50).collect();
        let answers = futures_util::future::join_all(numbers.iter().map(|n| {
            let statement = &statement;
            let alice = &alice;
            async move { alice.query_one(statement, &[n]).await }
        }))
        .await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap().get::<_, i32>(0), 2 * n as i32, "{relay:?}");
        }
        assert_relayed(&h, relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_both_relays_a_streaming_result_is_cut_between_messages_at_expiry() {
    for relay in BOTH {
        let h = relay.start(no_edit).await;
        let token = h.token_with(
            KeyKind::Rs256,
            serde_json::json!({"sub": "alice", "aud": "todo-app", "exp": unix_now() + 2}),
        );
        let client = h.connect("authenticated", &token).await.unwrap();
        let (received, err) = stream_until_ended(&client).await;
        assert!(received > 0, "{relay:?}: rows were streaming at expiry");
        let message = refusal(&err);
        assert!(
            message.starts_with("token expired at "),
            "{relay:?}: {message}"
        );
        assert_relayed(&h, relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_both_relays_a_cancel_request_ends_the_running_statement_and_the_session_goes_on() {
    for relay in BOTH {
        let h = relay.start(no_edit).await;
        let alice = h.connect_as("alice").await;
        let token = alice.cancel_token();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let err = alice
            .batch_execute("select pg_sleep(30)")
            .await
            .unwrap_err();
        let (code, message) = db_error(&err);
        assert_eq!(code, "57014", "{relay:?}: {message}");
        canceller
            .await
            .unwrap()
            .expect("the cancel request is sent");
        assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
        assert_relayed(&h, relay).await;
    }
}

/// A notification for a session that is idle, its worker asleep, wakes the
/// worker: through io_uring the kernel hands the receive's completion over
/// at the thread's next system call, and must wake a thread asleep in
/// `epoll_wait` for it (cooperative task running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_both_relays_a_notification_reaches_a_session_that_waits_idle() {
    for relay in BOTH {
        let h = relay.start(no_edit).await;
        let (alice, mut connection) = h
            .client_config("authenticated", &h.token("alice"))
            .connect(NoTls)
            .await
            .unwrap();
        let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        alice.batch_execute("listen wake_up").await.unwrap();
        let admin = h.admin().await;
        for round in 0..3 {
            // Long enough for the worker, with nothing else to do, to sleep.
            tokio::time::sleep(Duration::from_millis(200)).await;
            admin
                .batch_execute(&format!("notify wake_up, 'round {round}'"))
                .await
                .unwrap();
            let payload = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
                .await
                .unwrap_or_else(|_| panic!("{relay:?}: round {round}'s notification arrives"));
            assert_eq!(payload.as_deref(), Some(format!("round {round}").as_str()));
        }
        assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
        assert_relayed(&h, relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_both_relays_a_pooled_backend_goes_back_clean_and_serves_the_next_client() {
    for relay in BOTH {
        let h = relay.start(pooled).await;
        let admin = h.admin().await;
        let alice = h.connect_as("alice").await;
        let pid = pid_of(&alice).await;
        alice
            .batch_execute("create temp table alice_notes (body text)")
            .await
            .unwrap();
        drop(alice);
        h.wait_until_pooled(&admin, pid).await;

        let bob = h.connect_as("bob").await;
        let bobs = pid_of(&bob).await;
        assert_eq!(bobs, pid, "{relay:?}: bob is served by alice's backend");
        assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"), "{relay:?}");
        let notes: i64 = bob
            .query_one(
                "select count(*) from pg_class where relname = 'alice_notes'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(notes, 0, "{relay:?}: nothing of alice's is left");
        assert_relayed(&h, relay).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_relays_through_epoll_beside_plain_ones_on_io_uring() {
    let pki = TestPki::generate(&[]);
    let toml = format!("{}\n{}", pki.listen_toml(), Relay::IoUring.setting());
    let h = Harness::start_configured(&toml, with_admin).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=authenticated dbname=app sslmode=require",
        h.port()
    );
    let text = psql_ok(&conninfo, &h.token("alice"), &["select auth.user_id()"]);
    assert_eq!(text.trim(), "alice");
    let plain = h.connect_as("bob").await;
    assert_eq!(user_id_of(&plain).await.as_deref(), Some("bob"));
    assert_eq!(relayed(&h).await, (1.0, 1.0), "one each way");
}

/// `(io_uring, epoll)` of [`relayed`] as whole numbers.
async fn relays(h: &Harness) -> (u64, u64) {
    let (io_uring, epoll) = relayed(h).await;
    (io_uring as u64, epoll as u64)
}

/// Sixteen simple queries, each answered by one ReadyForQuery (and, with
/// transaction pooling, each a transaction) with `client` on epoll, then a
/// seventeenth, which moves it onto io_uring. `epoll`: the sessions that
/// started on epoll by then, this one included.
async fn sixteen_answers_then_a_move(h: &Harness, client: &Client, epoll: u64) {
    for i in 1..=16 {
        let rows = client.simple_query(&format!("select {i}")).await.unwrap();
        assert_eq!(simple_rows(&rows), [[Some(i.to_string())]]);
    }
    assert_eq!(relays(h).await, (0, epoll), "16 answers on epoll");
    let rows = client.simple_query("select 17").await.unwrap();
    assert_eq!(simple_rows(&rows), [[Some("17".to_owned())]]);
    assert_eq!(relays(h).await, (1, epoll), "the 17th request moved it");
}

/// Three rows of a MiB each, each whole.
async fn assert_three_mib_rows_pass(client: &Client) {
    let rows = client
        .query(
            "select repeat('x', 1024 * 1024) from generate_series(1, 3)",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.iter()
            .all(|r| r.get::<_, &str>(0).len() == 1024 * 1024)
    );
}

/// By default a session starts on epoll and moves onto io_uring at the
/// first request that finds it idle after 16 were answered. It carries on
/// whole there, and its pooled backend serves the next client. A session
/// of a few requests stays on epoll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_onto_io_uring_after_sixteen_answers_and_carries_on_whole() {
    let h = Harness::start_configured("[listen]\nio_uring = \"on\"", pooled).await;
    let admin = h.admin().await;
    let short = h.connect_as("bob").await;
    for _ in 0..3 {
        short.simple_query("select 1").await.unwrap();
    }
    assert_eq!(relays(&h).await, (0, 1), "a short session stays on epoll");
    // Back in the pool before alice comes, so that hers is the only
    // backend there: else carol's worker may lend her bob's.
    let bobs = pid_of(&short).await;
    drop(short);
    h.wait_until_pooled(&admin, bobs).await;

    let alice = h.connect_as("alice").await;
    sixteen_answers_then_a_move(&h, &alice, 2).await;
    assert_three_mib_rows_pass(&alice).await;
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    let pid = pid_of(&alice).await;
    drop(alice);
    h.wait_until_pooled(&admin, pid).await;
    let carol = h.connect_as("carol").await;
    let carols = pid_of(&carol).await;
    assert_eq!(carols, pid, "the backend came off the ring into the pool");
    assert_eq!(user_id_of(&carol).await.as_deref(), Some("carol"));
}

/// With transaction pooling a session's client socket moves onto io_uring
/// at the first message of its 17th transaction, and carries on whole
/// there: large results, a pipeline, its own claims. A session of a few
/// transactions stays on epoll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_transaction_mode_a_client_moves_onto_io_uring_after_sixteen_transactions_and_carries_on_whole()
 {
    let h = Harness::start_configured(
        "[listen]\nio_uring = \"on\"\n[pool]\nmode = \"transaction\"\nsize = 2\n",
        with_admin,
    )
    .await;
    let bob = h.connect_as("bob").await;
    for _ in 0..3 {
        bob.simple_query("select 1").await.unwrap();
    }
    assert_eq!(relays(&h).await, (0, 1), "a short session stays on epoll");

    let alice = h.connect_as("alice").await;
    sixteen_answers_then_a_move(&h, &alice, 2).await;
    assert_three_mib_rows_pass(&alice).await;
    let statement = alice.prepare("select $1::int * 2").await.unwrap();
    let answers = futures_util::future::join_all((0..50).map(|n: i32| {
        let (statement, alice) = (&statement, &alice);
        async move { alice.query_one(statement, &[&n]).await }
    }))
    .await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.unwrap().get::<_, i32>(0), 2 * n as i32);
    }
    assert_eq!(user_id_of(&alice).await.as_deref(), Some("alice"));
    assert_eq!(user_id_of(&bob).await.as_deref(), Some("bob"));
    assert_eq!(relays(&h).await, (1, 2), "bob is still on epoll");
}
