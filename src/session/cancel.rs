//! Cancellation: a client's cancel key is its backend's real process id with
//! a secret the proxy made up; the backend's own secret never leaves the
//! proxy. The pid is the one `pg_backend_pid()` and NOTIFY show anyway, so
//! clients that compare them (skipping their own notifications,
//! `pg_terminate_backend(pid)`) work; the secret alone authenticates.
//!
//! # Limits
//!
//! Cancel requests are unauthenticated by design. What a forwarded one costs
//! is an upstream connection (a process PostgreSQL forks), and only a request
//! with a known key is forwarded; unknown keys cost nothing upstream and are
//! what guessing looks like. So the two are limited apart, with token
//! buckets:
//!
//! - Each key may be used [`KEY_BUDGET`]: 10 at once, then 5 a second. A
//!   session runs one statement at a time, so that is plenty, and it bounds
//!   what the database sees by the sessions open. Sessions behind one address
//!   (an application server) do not share a budget.
//! - Each source address (for IPv6 each /64, which one host usually has
//!   whole) may name unknown keys [`GUESS_BUDGET`]: 10 at once, then 2 a
//!   second. Once it has spent that, every request of its is ignored until
//!   the bucket refills, known keys included: else a right guess would pass
//!   however many wrong ones came before it.
//!
//! The pid is no secret, so a guess must find the 32-bit secret. An address
//! gets at most 10 + 2t guesses in t seconds, each right with probability
//! 2⁻³² per session open: a 50 % chance at one given session takes
//! 2³¹ / 2 s ≈ 34 years; against 1 000 open sessions whose pids it knows, one
//! hit every 2³² / 2 000 s ≈ 25 days. A hit cancels one running statement; a
//! cancel cannot read or change data. (PostgreSQL itself takes guesses at the
//! same secret at any rate.)
//!
//! Ignored requests are counted by `result` in
//! `rlsgate_cancel_requests_total` and logged: the first at once, those in
//! the next [`LOG_EVERY`] summed up in one line.
//!
//! # Peers
//!
//! Replicas behind one load balancer (`[cluster]`) share no state, and a
//! cancel request opens a new connection, which the balancer sends to any
//! replica. So each replica puts its `peer_id` in the top 7 bits of the
//! secrets it issues (25 random bits remain: the guessing figures above
//! become ≈ 3 months and ≈ 4.7 hours), and a replica handed a key with
//! another replica's id forwards the request to that peer's listener, with
//! a request code of the peers' own
//! ([`PEER_CANCEL_REQUEST`](crate::protocol::startup::PEER_CANCEL_REQUEST)).
//! The forwarding replica charges the client's address as for an unknown
//! key first (it cannot tell a real key of the peer's from a guess), so
//! forwarding multiplies no one's budget. The peer takes such a request only
//! from the address of a configured peer, charges only the key's budget,
//! and never forwards it again. Results: `forwarded_to_peer`,
//! `unknown_peer` (an id no `[[cluster.peer]]` has), `peer_failed`, and on
//! the peer's side `not_a_peer`.
//!
//! # Handing a backend on
//!
//! A pooled backend outlives its client, so a cancel of that client's must
//! never reach the next one. [`Registration::close`] removes the key, then
//! waits for any request already being forwarded with it: each holds the
//! registration's gate while it sends, and checks that the key is still
//! registered once it holds it. And a forwarded request ends only once
//! PostgreSQL has taken it (see [`cancel_backend`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

use crate::config::Cluster;
use crate::protocol::messages;
use crate::protocol::startup::CancelKey;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::cancel=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::cancel";

/// A token bucket's size and rate.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Requests at once.
    pub burst: u32,
    /// Requests a second once those are spent.
    pub per_second: u32,
}

/// Cancel requests one key may make.
pub(crate) const KEY_BUDGET: Budget = Budget {
    burst: 10,
    per_second: 5,
};
/// Unknown keys one source address may name.
pub const GUESS_BUDGET: Budget = Budget {
    burst: 10,
    per_second: 2,
};
/// How often ignored requests are logged, summed up.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long forwarding one request may take, connecting included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond this many addresses with guesses on record, those whose budget is
/// whole again are forgotten (at most once a second).
const TRACKED_ADDRESSES: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(budget: Budget, now: Instant) -> Bucket {
        Bucket {
            tokens: budget.burst.into(),
            at: now,
        }
    }

    /// The tokens there are now.
    fn refill(&mut self, budget: Budget, now: Instant) -> f64 {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() * f64::from(budget.per_second);
        self.tokens = (self.tokens + earned).min(budget.burst.into());
        self.at = now;
        self.tokens
    }

    fn take(&mut self, budget: Budget, now: Instant) -> bool {
        let has = self.refill(budget, now) >= 1.0;
        if has {
            self.tokens -= 1.0;
        }
        has
    }
}

/// Shared by the cancel requests being forwarded to a session's backend,
/// and taken whole by the session's end.
#[derive(Default)]
struct Gate {
    lock: RwLock<()>,
    /// A request was sent but not seen taken: it may still reach the backend.
    unsettled: AtomicBool,
}

struct Target {
    host: String,
    port: u16,
    /// The backend's own key; `None` while a transaction-pooled session
    /// holds no backend.
    key: Option<CancelKey>,
    budget: Bucket,
    gate: Arc<Gate>,
}

/// Addresses that named unknown keys, with what is left of their budget.
#[derive(Default)]
struct Guesses {
    buckets: HashMap<IpAddr, Bucket>,
    swept: Option<Instant>,
}

/// Why a request was ignored.
#[derive(Clone, Copy, Debug)]
enum Ignore {
    UnknownKey,
    KeyOverBudget,
    AddressOverBudget,
    /// A known key whose session holds no backend (transaction pooling):
    /// nothing of its runs, so there is nothing to cancel.
    Idle,
}

impl Ignore {
    /// The `result` label of `rlsgate_cancel_requests_total`.
    fn result(self) -> &'static str {
        match self {
            Ignore::UnknownKey => "unknown_key",
            Ignore::KeyOverBudget | Ignore::AddressOverBudget => "rate_limited",
            Ignore::Idle => "idle",
        }
    }
}

/// Ignored requests not logged yet, by [`Ignore`]; `open` while a summary
/// is due.
#[derive(Default)]
struct IgnoredLog {
    open: bool,
    counts: [u64; 3],
}

/// A request admitted: where it goes.
struct Forward {
    host: String,
    port: u16,
    upstream: CancelKey,
    gate: Arc<Gate>,
}

#[derive(Default)]
pub(crate) struct CancelRegistry {
    targets: Mutex<HashMap<CancelKey, Target>>,
    guesses: Mutex<Guesses>,
    ignored: Arc<Mutex<IgnoredLog>>,
    /// `[cluster] peer_id`, in the keys issued from now on.
    peer_id: Mutex<Option<u8>>,
}

/// Keeps a session's key registered; [`Registration::close`] (or, failing
/// that, dropping it) unregisters the key.
pub(crate) struct Registration {
    registry: Arc<CancelRegistry>,
    pub(crate) key: CancelKey,
    gate: Arc<Gate>,
}

impl Registration {
    /// Unregisters the key, then waits until no request forwarded with it
    /// is still on its way (each is bounded in time). Returns whether the
    /// backend may be handed on: not if a request was sent but not seen
    /// taken, as it might still reach the backend.
    pub(crate) async fn close(self) -> bool {
        self.unregister();
        let _alone = self.gate.lock.write().await;
        !self.gate.unsettled.load(Ordering::Acquire)
    }

    /// Points the key at the backend a transaction-pooled session holds
    /// now.
    pub(crate) fn point_at(&self, upstream: CancelKey) {
        self.set_target(Some(upstream));
    }

    /// Points the key at no backend, then waits until no request forwarded
    /// to the one it pointed at is still on its way, as
    /// [`Registration::close`] does: whether that backend may be handed on.
    pub(crate) async fn detach(&self) -> bool {
        self.set_target(None);
        let _alone = self.gate.lock.write().await;
        !self.gate.unsettled.swap(false, Ordering::AcqRel)
    }

    fn set_target(&self, upstream: Option<CancelKey>) {
        let mut targets = self.registry.targets.lock().expect("cancel lock");
        if let Some(target) = targets.get_mut(&self.key)
            && Arc::ptr_eq(&target.gate, &self.gate)
        {
            target.key = upstream;
        }
    }

    fn unregister(&self) {
        let mut targets = self.registry.targets.lock().expect("cancel lock");
        // The same key may since have been issued again, to another session.
        if targets
            .get(&self.key)
            .is_some_and(|t| Arc::ptr_eq(&t.gate, &self.gate))
        {
            targets.remove(&self.key);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl CancelRegistry {
    /// Issues a key for a session whose backend is `upstream`: the backend's
    /// pid with a fresh random secret.
    pub(crate) fn register(
        self: &Arc<Self>,
        host: String,
        port: u16,
        upstream: CancelKey,
    ) -> Registration {
        let mut targets = self.targets.lock().expect("cancel lock");
        // A backend serves one session at a time, but across a reload that
        // changes [upstream] two servers may have a backend with this pid.
        let peer_id = *self.peer_id.lock().expect("cancel lock");
        let key = loop {
            let key = CancelKey {
                pid: upstream.pid,
                secret: secret_of(peer_id, rand::random()),
            };
            if key.secret != upstream.secret && !targets.contains_key(&key) {
                break key;
            }
        };
        let gate = Arc::new(Gate::default());
        targets.insert(
            key,
            Target {
                host,
                port,
                key: Some(upstream),
                budget: Bucket::full(KEY_BUDGET, Instant::now()),
                gate: Arc::clone(&gate),
            },
        );
        Registration {
            registry: Arc::clone(self),
            key,
            gate,
        }
    }

    /// Sets the peer id the keys issued from now on carry (`[cluster]
    /// peer_id`; a reload may change it).
    pub(crate) fn set_peer_id(&self, peer_id: Option<u8>) {
        *self.peer_id.lock().expect("cancel lock") = peer_id;
    }

    /// Handles a client's cancel request: a key of another replica's goes
    /// to that peer (see [`peers`](crate::session::cancel#peers)), any
    /// other is this replica's to forward upstream.
    pub(crate) async fn cancel(
        &self,
        key: CancelKey,
        source: IpAddr,
        (tls, cluster): (&UpstreamTls, &Cluster),
    ) -> &'static str {
        let own = *self.peer_id.lock().expect("cancel lock");
        match (own, peer_of(key)) {
            (Some(own), owner) if owner != own => self.to_peer(key, source, owner, cluster).await,
            _ => self.forward(key, source, true, tls).await,
        }
    }

    /// Handles a cancel request a peer forwarded: only from a peer's
    /// address, charged to the key's budget (the peer charged the client's
    /// address), and never forwarded again.
    pub(crate) async fn cancel_for_peer(
        &self,
        key: CancelKey,
        source: IpAddr,
        (tls, cluster): (&UpstreamTls, &Cluster),
    ) -> &'static str {
        if !is_a_peer(source, cluster).await {
            tracing::warn!(
                target: LOG_TARGET,
                %source, "a peer's cancel request from an address that is no peer's: ignored",
            );
            return "not_a_peer";
        }
        self.forward(key, source, false, tls).await
    }

    /// Sends a request for `owner`'s key to that peer, once the client's
    /// address has paid for it from its guess budget: this replica cannot
    /// tell a real key of the peer's from a guess.
    async fn to_peer(
        &self,
        key: CancelKey,
        source: IpAddr,
        owner: u8,
        cluster: &Cluster,
    ) -> &'static str {
        if !self.charge_address(source) {
            self.log_ignored(Ignore::AddressOverBudget, source);
            return Ignore::AddressOverBudget.result();
        }
        let Some(peer) = cluster.others().find(|p| p.id == owner) else {
            tracing::info!(
                target: LOG_TARGET,
                %source, peer = owner, "cancel request for a peer that is not configured: ignored",
            );
            return "unknown_peer";
        };
        match forward_to_peer(&peer.address, key).await {
            Ok(()) => "forwarded_to_peer",
            Err(e) => {
                tracing::warn!(
                    target: LOG_TARGET,
                    peer = owner, address = %peer.address, error = %e,
                    "cannot forward a cancel request to its peer",
                );
                "peer_failed"
            }
        }
    }

    /// Takes one request from `source`'s guess budget; `false` when spent.
    fn charge_address(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let mut guesses = self.guesses.lock().expect("cancel rate lock");
        guesses.sweep(now);
        guesses
            .buckets
            .entry(budget_address(source))
            .or_insert_with(|| Bucket::full(GUESS_BUDGET, now))
            .take(GUESS_BUDGET, now)
    }

    /// Forwards a cancel request upstream; an unknown key is ignored, as
    /// Postgres does, and so is a request over a budget (see the module's
    /// doc; `charge_address`: whether `source` pays for unknown keys).
    /// Returns what became of it, for `rlsgate_cancel_requests_total{result}`:
    /// `forwarded`, `unknown_key`, `rate_limited` or `failed`.
    async fn forward(
        &self,
        key: CancelKey,
        source: IpAddr,
        charge_address: bool,
        tls: &UpstreamTls,
    ) -> &'static str {
        let forward = match self.admit(key, source, charge_address) {
            Ok(forward) => forward,
            Err(Ignore::Idle) => return Ignore::Idle.result(),
            Err(why) => {
                self.log_ignored(why, source);
                return why.result();
            }
        };
        let _sending = forward.gate.lock.read().await;
        if !self.is_registered(key, &forward.gate) {
            // Its session ended while the request waited for the gate.
            self.log_ignored(Ignore::UnknownKey, source);
            return Ignore::UnknownKey.result();
        }
        match forward_request(&forward.host, forward.port, forward.upstream, tls).await {
            Ok(()) => "forwarded",
            Err(failed) => {
                if failed.maybe_sent {
                    forward.gate.unsettled.store(true, Ordering::Release);
                }
                let address = crate::session::stream::address(&forward.host, forward.port);
                tracing::warn!(
                    target: LOG_TARGET,
                    %address, error = %failed.reason, "cannot cancel upstream",
                );
                "failed"
            }
        }
    }

    /// Charges `source`'s (when `charge_address`) and the key's budgets;
    /// the target if admitted.
    fn admit(
        &self,
        key: CancelKey,
        source: IpAddr,
        charge_address: bool,
    ) -> Result<Forward, Ignore> {
        let now = Instant::now();
        let source = budget_address(source);
        let mut guesses = self.guesses.lock().expect("cancel rate lock");
        guesses.sweep(now);
        let spent = guesses
            .buckets
            .get_mut(&source)
            .is_some_and(|b| b.refill(GUESS_BUDGET, now) < 1.0);
        if spent && charge_address {
            return Err(Ignore::AddressOverBudget);
        }
        let mut targets = self.targets.lock().expect("cancel lock");
        let Some(target) = targets.get_mut(&key) else {
            if charge_address {
                let bucket = guesses
                    .buckets
                    .entry(source)
                    .or_insert_with(|| Bucket::full(GUESS_BUDGET, now));
                bucket.take(GUESS_BUDGET, now);
            }
            return Err(Ignore::UnknownKey);
        };
        if !target.budget.take(KEY_BUDGET, now) {
            return Err(Ignore::KeyOverBudget);
        }
        let upstream = target.key.ok_or(Ignore::Idle)?;
        Ok(Forward {
            host: target.host.clone(),
            port: target.port,
            upstream,
            gate: Arc::clone(&target.gate),
        })
    }

    fn is_registered(&self, key: CancelKey, gate: &Arc<Gate>) -> bool {
        let targets = self.targets.lock().expect("cancel lock");
        targets
            .get(&key)
            .is_some_and(|t| Arc::ptr_eq(&t.gate, gate))
    }

    /// Logs the first ignored request at once and sums up the others of the
    /// next [`LOG_EVERY`] in one line, so a flood cannot flood the log.
    fn log_ignored(&self, why: Ignore, source: IpAddr) {
        self.log_ignored_every(why, source, LOG_EVERY);
    }

    fn log_ignored_every(&self, why: Ignore, source: IpAddr, window: Duration) {
        if matches!(why, Ignore::Idle) {
            // Nothing suspect: a cancel that came after its statement ended.
            return;
        }
        {
            let mut log = self.ignored.lock().expect("cancel log lock");
            if log.open {
                log.counts[why as usize] += 1;
                return;
            }
            log.open = true;
        }
        let summed = format!("those in the next {window:?} are summed up");
        match why {
            Ignore::UnknownKey => {
                tracing::info!(
                    target: LOG_TARGET,
                    %source, "cancel request with an unknown key ignored; {summed}",
                );
            }
            Ignore::KeyOverBudget => tracing::warn!(
                target: LOG_TARGET,
                %source,
                "cancel request ignored: its key was used more than {} times at once or {} a \
                 second; {summed}",
                KEY_BUDGET.burst,
                KEY_BUDGET.per_second
            ),
            Ignore::AddressOverBudget => tracing::warn!(
                target: LOG_TARGET,
                %source,
                "cancel request ignored: its address named more than {} unknown keys at once \
                 or {} a second; {summed}",
                GUESS_BUDGET.burst,
                GUESS_BUDGET.per_second
            ),
            Ignore::Idle => {}
        }
        let log = Arc::clone(&self.ignored);
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let counts = {
                let mut log = log.lock().expect("cancel log lock");
                log.open = false;
                std::mem::take(&mut log.counts)
            };
            log_summary(counts, window);
        });
    }
}

/// The line for the requests ignored in the `window` after the first.
fn log_summary([unknown_key, key_over_budget, address_over_budget]: [u64; 3], window: Duration) {
    if key_over_budget + address_over_budget > 0 {
        tracing::warn!(
            target: LOG_TARGET,
            unknown_key,
            key_over_budget,
            address_over_budget,
            "more cancel requests ignored in {window:?}, some over a rate limit"
        );
    } else if unknown_key > 0 {
        tracing::info!(
            target: LOG_TARGET,
            unknown_key,
            "more cancel requests with unknown keys ignored in {window:?}"
        );
    }
}

impl Guesses {
    /// Forgets addresses whose budget is whole again, once there are many.
    fn sweep(&mut self, now: Instant) {
        let recently = self
            .swept
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1));
        if self.buckets.len() <= TRACKED_ADDRESSES || recently {
            return;
        }
        let whole = f64::from(GUESS_BUDGET.burst);
        self.buckets
            .retain(|_, b| b.refill(GUESS_BUDGET, now) < whole);
        self.swept = Some(now);
    }
}

/// Whose budget a request from `ip` is charged to: an IPv4 address (also
/// when mapped into IPv6), or an IPv6 /64, which one host usually has whole.
fn budget_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// The secret of a key issued by replica `peer_id` (none: all random): its
/// top 7 bits are the peer id, the other 25 random.
fn secret_of(peer_id: Option<u8>, random: u32) -> i32 {
    let bits = match peer_id {
        Some(id) => (u32::from(id) << PEER_SHIFT) | (random & !(u32::MAX << PEER_SHIFT)),
        None => random,
    };
    bits as i32
}

/// Which replica issued `key`, if the cluster is configured.
fn peer_of(key: CancelKey) -> u8 {
    ((key.secret as u32) >> PEER_SHIFT) as u8
}

/// Where the peer id starts in a secret.
const PEER_SHIFT: u32 = 25;

/// Whether `source` is the address of one of the configured peers, as
/// their names resolve now (peers' addresses change, in Kubernetes with
/// every restart).
async fn is_a_peer(source: IpAddr, cluster: &Cluster) -> bool {
    let source = budget_address(source);
    for peer in cluster.others() {
        let resolved =
            tokio::time::timeout(FORWARD_TIMEOUT, tokio::net::lookup_host(&peer.address));
        if let Ok(Ok(mut addresses)) = resolved.await
            && addresses.any(|a| budget_address(a.ip()) == source)
        {
            return true;
        }
    }
    false
}

/// Sends a peer's cancel request to it and waits until it has closed the
/// connection (it has then handled the request).
async fn forward_to_peer(address: &str, key: CancelKey) -> std::io::Result<()> {
    let mut packet = BytesMut::with_capacity(16);
    messages::peer_cancel_request(&mut packet, key);
    let sent = tokio::time::timeout(FORWARD_TIMEOUT * 2, async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(&packet).await?;
        let mut sink = [0u8; 64];
        while let Ok(1..) = stream.read(&mut sink).await {}
        Ok(())
    });
    sent.await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer did not take the request in time",
        ))
    })
}

/// A forward that failed; `maybe_sent` once the request may have reached
/// the server.
struct Failed {
    maybe_sent: bool,
    reason: CancelError,
}

/// Why a cancel request could not be handed to the server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CancelError {
    /// No connection to the server: the request never left.
    #[error("{0}")]
    Connect(crate::protocol::refusal::Refusal),
    #[error(transparent)]
    Send(#[from] std::io::Error),
    #[error("the server did not take the cancel request within {FORWARD_TIMEOUT:?}")]
    TimedOut,
}

/// Sends a CancelRequest for the backend with `key` over a connection of
/// its own and waits until the server has closed it (up to
/// [`FORWARD_TIMEOUT`] in all). Like libpq, the request goes over TLS as
/// `[upstream] tls` says (a server that only accepts `hostssl` connections
/// ignores a plaintext one).
///
/// Why wait: PostgreSQL reads the request, signals the backend (SIGINT) and
/// only then closes the connection. Once it has, the signal is pending on the
/// backend and is taken before the backend reads anything more from its
/// client; a backend that is waiting for its client's next command drops a
/// cancel. So a session's end that waits for this (through
/// [`Registration::close`]) can hand the backend on without a cancel of its
/// client's still on the way to the next client's statement.
pub(crate) async fn cancel_backend(
    host: &str,
    port: u16,
    key: CancelKey,
    tls: &UpstreamTls,
) -> Result<(), CancelError> {
    forward_request(host, port, key, tls)
        .await
        .map_err(|failed| failed.reason)
}

async fn forward_request(
    host: &str,
    port: u16,
    key: CancelKey,
    tls: &UpstreamTls,
) -> Result<(), Failed> {
    let mut packet = BytesMut::with_capacity(16);
    messages::cancel_request(&mut packet, key);
    let mut maybe_sent = false;
    let forwarded = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let mut stream = tls
            .connect(host, port)
            .await
            .map_err(CancelError::Connect)?;
        maybe_sent = true;
        stream.write_all(&packet).await?;
        stream.flush().await?;
        // PostgreSQL answers nothing; an error is a close too.
        let mut sink = [0u8; 64];
        while let Ok(1..) = stream.read(&mut sink).await {}
        Ok(())
    })
    .await
    .unwrap_or(Err(CancelError::TimedOut));
    forwarded.map_err(|reason| Failed { maybe_sent, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let budget = Budget {
            burst: 3,
            per_second: 2,
        };
        let start = Instant::now();
        let mut bucket = Bucket::full(budget, start);
        assert!((0..3).all(|_| bucket.take(budget, start)));
        assert!(!bucket.take(budget, start));
        let half_second = start + Duration::from_millis(500);
        assert!(bucket.take(budget, half_second));
        assert!(!bucket.take(budget, half_second));
        // Never more than the burst, however long it rested.
        let later = start + Duration::from_secs(60);
        assert_eq!(bucket.refill(budget, later), 3.0);
    }

    #[test]
    fn ipv6_addresses_share_a_budget_per_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(budget_address(a), budget_address(b));
        assert_ne!(budget_address(a), budget_address(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            budget_address(mapped),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }

    fn registry_with_one_key() -> (Arc<CancelRegistry>, Registration) {
        let registry = Arc::new(CancelRegistry::default());
        let upstream = CancelKey {
            pid: 4242,
            secret: 7,
        };
        let registration = registry.register("127.0.0.1".into(), 1, upstream);
        (registry, registration)
    }

    #[test]
    fn the_key_carries_the_backends_pid_and_a_secret_of_its_own() {
        let (_registry, registration) = registry_with_one_key();
        assert_eq!(registration.key.pid, 4242);
        assert_ne!(registration.key.secret, 7);
    }

    #[test]
    fn a_key_over_its_budget_is_limited_but_others_from_the_same_address_are_not() {
        let (registry, first) = registry_with_one_key();
        let second = registry.register("127.0.0.1".into(), 1, CancelKey { pid: 1, secret: 2 });
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..KEY_BUDGET.burst {
            assert!(registry.admit(first.key, source, true).is_ok());
        }
        assert!(matches!(
            registry.admit(first.key, source, true),
            Err(Ignore::KeyOverBudget)
        ));
        assert!(registry.admit(second.key, source, true).is_ok());
    }

    #[test]
    fn an_address_that_spent_its_guesses_is_ignored_even_with_a_right_key() {
        let (registry, registration) = registry_with_one_key();
        let guesser: IpAddr = "192.0.2.1".parse().unwrap();
        let wrong = CancelKey {
            pid: registration.key.pid,
            secret: registration.key.secret.wrapping_add(1),
        };
        for _ in 0..GUESS_BUDGET.burst {
            assert!(matches!(
                registry.admit(wrong, guesser, true),
                Err(Ignore::UnknownKey)
            ));
        }
        assert!(matches!(
            registry.admit(registration.key, guesser, true),
            Err(Ignore::AddressOverBudget)
        ));
        // Another address is not affected.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(registry.admit(registration.key, other, true).is_ok());
    }

    #[test]
    fn a_replicas_keys_carry_its_peer_id_in_the_top_bits_and_random_below() {
        for id in [0, 1, 42, crate::config::MAX_PEER_ID] {
            for random in [0, u32::MAX, 0x1234_5678] {
                let key = CancelKey {
                    pid: 1,
                    secret: secret_of(Some(id), random),
                };
                assert_eq!(peer_of(key), id);
                assert_eq!(key.secret as u32 & 0x01ff_ffff, random & 0x01ff_ffff);
            }
        }
        assert_eq!(secret_of(None, 0xdead_beef) as u32, 0xdead_beef);
        let registry = Arc::new(CancelRegistry::default());
        registry.set_peer_id(Some(5));
        let registration =
            registry.register("127.0.0.1".into(), 1, CancelKey { pid: 3, secret: 4 });
        assert_eq!(peer_of(registration.key), 5);
    }

    #[test]
    fn a_peers_request_is_charged_to_the_key_not_to_the_peers_address() {
        let (registry, registration) = registry_with_one_key();
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let wrong = CancelKey {
            pid: registration.key.pid,
            secret: registration.key.secret.wrapping_add(1),
        };
        for _ in 0..GUESS_BUDGET.burst * 2 {
            assert!(matches!(
                registry.admit(wrong, peer, false),
                Err(Ignore::UnknownKey)
            ));
        }
        assert!(registry.admit(registration.key, peer, false).is_ok());
    }

    #[tokio::test]
    async fn a_closed_registration_is_forgotten_and_its_key_admits_nothing() {
        let (registry, registration) = registry_with_one_key();
        let key = registration.key;
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(registration.close().await, "nothing was forwarded");
        assert!(matches!(
            registry.admit(key, source, true),
            Err(Ignore::UnknownKey)
        ));
        assert!(registry.targets.lock().unwrap().is_empty());
    }

    /// Log lines written while the subscriber is the thread's default.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    #[tokio::test]
    async fn a_flood_of_ignored_requests_is_logged_as_the_first_and_a_sum_of_the_rest() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let registry = CancelRegistry::default();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let window = Duration::from_millis(50);
        registry.log_ignored_every(Ignore::UnknownKey, source, window);
        for _ in 0..7 {
            registry.log_ignored_every(Ignore::UnknownKey, source, window);
        }
        for _ in 0..5 {
            registry.log_ignored_every(Ignore::AddressOverBudget, source, window);
        }
        assert_eq!(captured.lines().len(), 1, "{:?}", captured.lines());
        for _ in 0..200 {
            if captured.lines().len() > 1 {
                break;
            }
            tokio::time::sleep(window).await;
        }
        let lines = captured.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("cancel request with an unknown key ignored"),
            "{lines:?}"
        );
        assert!(lines[0].contains("192.0.2.1"), "{lines:?}");
        assert!(lines[1].contains("WARN"), "{lines:?}");
        for field in [
            "unknown_key=7",
            "key_over_budget=0",
            "address_over_budget=5",
        ] {
            assert!(lines[1].contains(field), "{field}: {lines:?}");
        }
        // The next one opens a new window and is logged at once.
        registry.log_ignored_every(Ignore::KeyOverBudget, source, window);
        let lines = captured.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[2].contains("its key was used more than"), "{lines:?}");
    }

    #[tokio::test]
    async fn close_waits_for_a_request_being_forwarded_and_reports_an_unsettled_one() {
        let (registry, registration) = registry_with_one_key();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let forward = registry.admit(registration.key, source, true).unwrap();
        let sending = forward.gate.lock.read().await;
        let closing = tokio::spawn(registration.close());
        for _ in 0..100 {
            if registry.targets.lock().unwrap().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            registry.targets.lock().unwrap().is_empty(),
            "close unregisters at once"
        );
        assert!(!closing.is_finished(), "close waits for the request");
        forward.gate.unsettled.store(true, Ordering::Release);
        drop(sending);
        assert!(
            !closing.await.unwrap(),
            "a request sent but not seen taken keeps the backend from being handed on"
        );
    }
}
