//! Metrics: the names, and one small function per event so that call sites
//! stay one line.
//!
//! Each proxy has its own registry (a Prometheus recorder that is never
//! installed as the process-wide one), so several proxies in one process —
//! the tests, `demo` — count separately. `/metrics` on the admin listener
//! renders it (see [`crate::ops::admin`]).
//!
//! Labels hold only fixed words, role and upstream user names and issuer
//! URLs: never a token, subject, signature, key or password.

use std::time::Duration;

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::protocol::refusal::Reason;
use crate::session::relay::Ending;

pub(crate) const CLIENT_CONNECTIONS_ACTIVE: &str = "rlsgate_client_connections_active";
pub(crate) const CLIENT_SESSIONS_ACTIVE: &str = "rlsgate_client_sessions_active";
pub(crate) const CLIENT_SESSIONS_TOTAL: &str = "rlsgate_client_sessions_total";
pub(crate) const REFUSALS_TOTAL: &str = "rlsgate_refusals_total";
pub(crate) const JWKS_FETCHES_TOTAL: &str = "rlsgate_jwks_fetches_total";
pub(crate) const JWKS_KEY_AGE_SECONDS: &str = "rlsgate_jwks_key_age_seconds";
pub(crate) const TOKEN_VERIFICATION_SECONDS: &str = "rlsgate_token_verification_seconds";
pub(crate) const TOKEN_CACHE_HITS_TOTAL: &str = "rlsgate_token_cache_hits_total";
pub(crate) const TOKEN_CACHE_MISSES_TOTAL: &str = "rlsgate_token_cache_misses_total";
pub(crate) const UPSTREAM_CONNECT_SECONDS: &str = "rlsgate_upstream_connect_seconds";
pub(crate) const SESSION_DURATION_SECONDS: &str = "rlsgate_session_duration_seconds";
pub(crate) const RELAYED_BYTES_TOTAL: &str = "rlsgate_relayed_bytes_total";
pub(crate) const RELAYED_SESSIONS_TOTAL: &str = "rlsgate_relayed_sessions_total";
pub(crate) const CANCEL_REQUESTS_TOTAL: &str = "rlsgate_cancel_requests_total";
pub(crate) const UPSTREAM_TAMPERING: &str = "rlsgate_upstream_tampering";
pub(crate) const UPSTREAM_TAMPERING_TOTAL: &str = "rlsgate_upstream_tampering_total";
pub(crate) const HTTP_REQUESTS_TOTAL: &str = "rlsgate_http_requests_total";
pub(crate) const HTTP_REQUESTS_ACTIVE: &str = "rlsgate_http_requests_active";
pub(crate) const HTTP_REQUEST_DURATION_SECONDS: &str = "rlsgate_http_request_duration_seconds";
pub(crate) const HTTP_UPSTREAM_WAIT_SECONDS: &str = "rlsgate_http_upstream_wait_seconds";
pub(crate) const POOL_WAITING_CLIENTS: &str = "rlsgate_pool_waiting_clients";
pub(crate) const POOL_WAIT_SECONDS: &str = "rlsgate_pool_wait_seconds";
pub(crate) const POOL_LEASES_TOTAL: &str = "rlsgate_pool_leases_total";
pub(crate) const POOL_BACKENDS: &str = "rlsgate_pool_backends";

/// Buckets for the latencies (token check, upstream connect), in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets for session lifetimes, in seconds.
const SESSION_BUCKETS: &[f64] = &[
    0.1,
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    24.0 * 3600.0,
];

const METADATA: Metadata<'static> = Metadata::new("rlsgate", metrics::Level::INFO, None);

/// The outcome label of `rlsgate_client_sessions_total`.
pub(crate) fn outcome(ending: &Ending) -> &'static str {
    match ending {
        Ending::ClientClosed => "client_closed",
        Ending::UpstreamClosed => "server_closed",
        Ending::TokenExpired(_) => "token_expired",
        Ending::ShuttingDown => "shutdown",
        Ending::Failed(..) => "error",
    }
}

/// One proxy's metrics.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections_active: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(SESSION_DURATION_SECONDS.to_owned()),
                SESSION_BUCKETS,
            )
            .and_then(|b| b.set_buckets(LATENCY_BUCKETS))
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        describe(&recorder);
        let connections_active =
            recorder.register_gauge(&Key::from_static_name(CLIENT_CONNECTIONS_ACTIVE), &METADATA);
        Metrics {
            recorder,
            handle,
            connections_active,
        }
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds pending histogram samples into their buckets. A recorder of our
    /// own gets no upkeep task from the exporter: without this, samples would
    /// pile up for as long as nobody scrapes `/metrics` (or forever, with no
    /// admin listener).
    pub(crate) fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, seconds: Duration) {
        self.recorder
            .register_histogram(&Key::from_static_name(name), &METADATA)
            .record(seconds.as_secs_f64());
    }

    /// A TCP connection arrived; the gauge goes down when the guard is dropped.
    pub(crate) fn connection_opened(&self) -> ActiveGuard {
        self.connections_active.increment(1.0);
        ActiveGuard(self.connections_active.clone())
    }

    /// A session was admitted and is about to relay.
    pub(crate) fn session_started(&self, role: &str) {
        self.gauge(
            CLIENT_SESSIONS_ACTIVE,
            vec![Label::new("role", role.to_owned())],
        )
        .increment(1.0);
    }

    /// A session that [`Metrics::session_started`] counted has ended.
    pub(crate) fn session_ended(&self, role: &str, ending: &Ending, duration: Duration) {
        self.gauge(
            CLIENT_SESSIONS_ACTIVE,
            vec![Label::new("role", role.to_owned())],
        )
        .decrement(1.0);
        self.counter(
            CLIENT_SESSIONS_TOTAL,
            vec![
                Label::new("role", role.to_owned()),
                Label::from_static_parts("outcome", outcome(ending)),
            ],
        )
        .increment(1);
        self.histogram(SESSION_DURATION_SECONDS, duration);
    }

    pub(crate) fn refused(&self, reason: Reason) {
        self.counter(
            REFUSALS_TOTAL,
            vec![Label::from_static_parts("reason", reason.as_str())],
        )
        .increment(1);
    }

    /// A token check (signature or cache) took `elapsed`, whatever its answer.
    pub(crate) fn token_checked(&self, elapsed: Duration) {
        self.histogram(TOKEN_VERIFICATION_SECONDS, elapsed);
    }

    /// Opening the upstream session (connect, authenticate, bind claims) took `elapsed`.
    pub(crate) fn upstream_connected(&self, elapsed: Duration) {
        self.histogram(UPSTREAM_CONNECT_SECONDS, elapsed);
    }

    /// `result`: forwarded, unknown_key, rate_limited or failed.
    pub(crate) fn cancel_request(&self, result: &'static str) {
        self.counter(
            CANCEL_REQUESTS_TOTAL,
            vec![Label::from_static_parts("result", result)],
        )
        .increment(1);
    }

    /// A tampering alarm (see [`crate::ops::tamper`]) of `kind` for upstream
    /// user `user` was raised, again or for the first time.
    pub(crate) fn tampering_raised(&self, kind: &'static str, user: &str) {
        self.gauge(UPSTREAM_TAMPERING, tampering_labels(kind, user))
            .set(1.0);
        self.counter(
            UPSTREAM_TAMPERING_TOTAL,
            vec![Label::from_static_parts("kind", kind)],
        )
        .increment(1);
    }

    pub(crate) fn tampering_cleared(&self, kind: &'static str, user: &str) {
        self.gauge(UPSTREAM_TAMPERING, tampering_labels(kind, user))
            .set(0.0);
    }

    /// The counters of relayed bytes, client to server and server to client,
    /// for the relay to add to as it reads.
    pub(crate) fn relayed_bytes(&self) -> (Counter, Counter) {
        let direction = |d: &'static str| vec![Label::from_static_parts("direction", d)];
        (
            self.counter(RELAYED_BYTES_TOTAL, direction("client_to_server")),
            self.counter(RELAYED_BYTES_TOTAL, direction("server_to_client")),
        )
    }

    /// A session's relay started, through io_uring or the reactor (epoll);
    /// again, through io_uring, when the session moves there.
    pub(crate) fn relay_started(&self, io_uring: bool) {
        let relay = if io_uring { "io_uring" } else { "epoll" };
        self.counter(
            RELAYED_SESSIONS_TOTAL,
            vec![Label::from_static_parts("relay", relay)],
        )
        .increment(1);
    }

    /// The token cache's running totals, copied in before each render.
    pub(crate) fn token_cache(&self, hits: u64, misses: u64) {
        self.counter(TOKEN_CACHE_HITS_TOTAL, Vec::new())
            .absolute(hits);
        self.counter(TOKEN_CACHE_MISSES_TOTAL, Vec::new())
            .absolute(misses);
    }

    /// A provider's key cache as it stands, copied in before each render:
    /// fetch totals and the age of the keys it holds (none: no gauge).
    pub(crate) fn jwks(
        &self,
        provider: &str,
        fetched: u64,
        failed: u64,
        key_age: Option<Duration>,
    ) {
        let labels = |result: &'static str| {
            vec![
                Label::new("provider", provider.to_owned()),
                Label::from_static_parts("result", result),
            ]
        };
        if fetched > 0 {
            self.counter(JWKS_FETCHES_TOTAL, labels("ok"))
                .absolute(fetched);
        }
        if failed > 0 {
            self.counter(JWKS_FETCHES_TOTAL, labels("error"))
                .absolute(failed);
        }
        if let Some(age) = key_age {
            self.gauge(
                JWKS_KEY_AGE_SECONDS,
                vec![Label::new("provider", provider.to_owned())],
            )
            .set(age.as_secs_f64());
        }
    }
}

fn tampering_labels(kind: &'static str, user: &str) -> Vec<Label> {
    vec![
        Label::from_static_parts("kind", kind),
        Label::new("user", user.to_owned()),
    ]
}

impl Metrics {
    /// An HTTP request arrived; the gauge goes down when the guard is dropped.
    pub(crate) fn http_request_started(&self) -> ActiveGuard {
        let gauge = self.gauge(HTTP_REQUESTS_ACTIVE, Vec::new());
        gauge.increment(1.0);
        ActiveGuard(gauge)
    }

    /// An HTTP request was answered with `status` after `elapsed`;
    /// `outcome`: ok, database_error, refused, too_large, upstream_error,
    /// client_closed.
    pub(crate) fn http_request_ended(&self, outcome: &'static str, status: u16, elapsed: Duration) {
        self.counter(
            HTTP_REQUESTS_TOTAL,
            vec![
                Label::from_static_parts("outcome", outcome),
                Label::new("status", status.to_string()),
            ],
        )
        .increment(1);
        self.histogram(HTTP_REQUEST_DURATION_SECONDS, elapsed);
    }

    /// A request waited `elapsed` for its upstream connection (one that
    /// had to be opened included).
    pub(crate) fn http_upstream_waited(&self, elapsed: Duration) {
        self.histogram(HTTP_UPSTREAM_WAIT_SECONDS, elapsed);
    }
}

/// The pool's meters for one transaction-pooled session, registered once:
/// looking them up by name and labels on every transaction would cost more
/// than counting.
pub(crate) struct PoolMeters {
    waiting: Gauge,
    reused: Counter,
    reset: Counter,
    wait: metrics::Histogram,
}

impl PoolMeters {
    /// A transaction waits for a backend; the gauge goes down when the
    /// guard is dropped.
    pub(crate) fn waiting(&self) -> ActiveGuard {
        self.waiting.increment(1.0);
        ActiveGuard(self.waiting.clone())
    }

    /// A transaction was lent a backend after `waited`; `reused`: the
    /// backend held its client's state already.
    pub(crate) fn leased(&self, reused: bool, waited: Duration) {
        let leases = if reused { &self.reused } else { &self.reset };
        leases.increment(1);
        self.wait.record(waited.as_secs_f64());
    }
}

impl Metrics {
    /// The meters of a transaction-pooled session whose backends are
    /// `user`'s.
    pub(crate) fn pool_meters(&self, user: &str) -> PoolMeters {
        let user = || Label::new("user", user.to_owned());
        let leases = |kind: &'static str| {
            self.counter(
                POOL_LEASES_TOTAL,
                vec![user(), Label::from_static_parts("backend", kind)],
            )
        };
        PoolMeters {
            waiting: self.gauge(POOL_WAITING_CLIENTS, vec![user()]),
            reused: leases("reused"),
            reset: leases("reset"),
            wait: self
                .recorder
                .register_histogram(&Key::from_static_name(POOL_WAIT_SECONDS), &METADATA),
        }
    }

    /// A pool's backends as they stand, copied in before each render;
    /// `pool`: `session`, `transaction` or `http`. `in_use` is `None` for
    /// the session pool, whose backends in use are its sessions'.
    pub(crate) fn pool_backends(
        &self,
        pool: &'static str,
        (database, user): (&str, &str),
        in_use: Option<usize>,
        idle: usize,
    ) {
        let states = in_use.map(|n| ("in_use", n)).into_iter();
        for (state, count) in states.chain([("idle", idle)]) {
            self.gauge(
                POOL_BACKENDS,
                vec![
                    Label::from_static_parts("pool", pool),
                    Label::new("database", database.to_owned()),
                    Label::new("user", user.to_owned()),
                    Label::from_static_parts("state", state),
                ],
            )
            .set(count as f64);
        }
    }
}

/// Holds one count of a gauge of things open now, such as
/// `rlsgate_client_connections_active`.
pub(crate) struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn describe(recorder: &PrometheusRecorder) {
    let help: [(&'static str, Option<Unit>, &'static str); 24] = [
        (
            CLIENT_CONNECTIONS_ACTIVE,
            None,
            "Client TCP connections open now, those still in startup included.",
        ),
        (
            CLIENT_SESSIONS_ACTIVE,
            None,
            "Sessions relaying now, by role.",
        ),
        (
            CLIENT_SESSIONS_TOTAL,
            None,
            "Sessions ended, by role and outcome (client_closed, server_closed, token_expired, shutdown, error).",
        ),
        (REFUSALS_TOTAL, None, "Connections refused, by reason."),
        (
            JWKS_FETCHES_TOTAL,
            None,
            "Discovery and JWKS fetches, by provider (issuer URL) and result.",
        ),
        (
            JWKS_KEY_AGE_SECONDS,
            Some(Unit::Seconds),
            "Age of the signing keys cached for each provider.",
        ),
        (
            TOKEN_VERIFICATION_SECONDS,
            Some(Unit::Seconds),
            "Time to check a token, cached or not, accepted or not.",
        ),
        (
            TOKEN_CACHE_HITS_TOTAL,
            None,
            "Tokens served from the verified-token cache.",
        ),
        (
            TOKEN_CACHE_MISSES_TOTAL,
            None,
            "Tokens that needed the full signature check.",
        ),
        (
            UPSTREAM_CONNECT_SECONDS,
            Some(Unit::Seconds),
            "Time to open an upstream session: connect, authenticate, bind claims.",
        ),
        (
            SESSION_DURATION_SECONDS,
            Some(Unit::Seconds),
            "How long sessions lasted, from ready for queries to the end.",
        ),
        (
            RELAYED_BYTES_TOTAL,
            Some(Unit::Bytes),
            "Bytes relayed after startup, by direction.",
        ),
        (
            RELAYED_SESSIONS_TOTAL,
            None,
            "Sessions' relays started, by how their sockets are read and written \
             (io_uring, or epoll); a session that moves onto io_uring counts once each way.",
        ),
        (
            CANCEL_REQUESTS_TOTAL,
            None,
            "Cancel requests received, by result.",
        ),
        (
            UPSTREAM_TAMPERING,
            None,
            "1 while Postgres refuses the login role as if it was changed from inside a session, by kind and upstream user.",
        ),
        (
            UPSTREAM_TAMPERING_TOTAL,
            None,
            "Upstream logins refused as if the login role was changed from inside a session, by kind.",
        ),
        (
            HTTP_REQUESTS_TOTAL,
            None,
            "HTTP /sql requests answered, by outcome (ok, database_error, refused, too_large, upstream_error, client_closed) and status.",
        ),
        (
            HTTP_REQUESTS_ACTIVE,
            None,
            "HTTP /sql requests being served now.",
        ),
        (
            HTTP_REQUEST_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Time to answer an HTTP /sql request, from its headers to its answer.",
        ),
        (
            HTTP_UPSTREAM_WAIT_SECONDS,
            Some(Unit::Seconds),
            "Time an HTTP request waited for its upstream connection.",
        ),
        (
            POOL_WAITING_CLIENTS,
            None,
            "Transaction-pooled clients waiting for a backend now, by upstream user.",
        ),
        (
            POOL_WAIT_SECONDS,
            Some(Unit::Seconds),
            "Time a transaction-pooled client's transaction waited for its backend.",
        ),
        (
            POOL_LEASES_TOTAL,
            None,
            "Backends lent to a transaction-pooled client's transaction, by upstream user and whether the backend held that client's state already (reused) or had to be reset for it (reset).",
        ),
        (
            POOL_BACKENDS,
            None,
            "Pooled backends by pool (session, transaction, http), database, upstream user and state (in_use, idle; the session pool's are idle only), at the scrape.",
        ),
    ];
    for (name, unit, text) in help {
        let (key, text) = (name.into(), text.into());
        if name.ends_with("_total") {
            recorder.describe_counter(key, unit, text);
        } else if name.ends_with("_active")
            || name == POOL_WAITING_CLIENTS
            || name == POOL_BACKENDS
            || name == JWKS_KEY_AGE_SECONDS
            || name == UPSTREAM_TAMPERING
        {
            recorder.describe_gauge(key, unit, text);
        } else {
            recorder.describe_histogram(key, unit, text);
        }
    }
}
