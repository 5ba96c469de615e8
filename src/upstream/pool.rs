//! Warm upstream connections (`[pool] mode = "session"`).
//!
//! A pooled connection is opened with no client's claims: like every
//! upstream session, its startup packet sets [`claims::SETTING`] to the
//! empty string, so anything that returns the setting to its startup value
//! (`RESET`, `RESET ALL`, `DISCARD ALL`) makes the `auth` functions raise
//! 28000 — a pooled session fails closed, never "no claims". Each client's
//! envelope names the backend it is lent, so it is worthless on any other.
//!
//! A client is lent an idle connection (or a new one) once its token is
//! checked, and its startup parameters and its sealed claims are set with
//! `set_config` as bound parameters of the extended protocol, so the
//! envelope never appears in query text. Startup parameters that cannot be
//! applied that way get the client a connection of its own, outside the pool.
//!
//! That bind is sent ahead of the client's greeting, and its answer read
//! after it (see [`Pool::attach`] for when, and why, it is not).
//!
//! A connection goes back to the pool only if its client left it idle (see
//! [`relay::Finish`](crate::session::relay::Finish)), and only after
//! `DISCARD ALL` answered with CommandComplete and ReadyForQuery "idle".

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::claims::{self, Backend, Identity, SigningKey};
use crate::clock::unix_now;
use crate::config::{self, Upstream};
use crate::protocol::frame::{Answer, HEADER_LEN, Header, MAX_BACKEND_MESSAGE, kind};
use crate::protocol::messages;
use crate::protocol::refusal::{Reason, Refusal, sqlstate};
use crate::protocol::startup::CancelKey;
use crate::session::stream::UpstreamStream;
use crate::session::workers;
use crate::upstream::claims::{SetFailure, bind_claims, read_set_config_answer};
use crate::upstream::login::{Login, UpstreamSession, connect};
use crate::upstream::options::split_options;
use crate::upstream::prepared::Prepared;
use crate::upstream::tls::UpstreamTls;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::pool=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::pool";

/// How long returning a connection (its `DISCARD ALL`) may take.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// How many lists of startup settings the pool remembers as taken, per
/// database and upstream user ([`Pool::known_reports`]): a bound on what
/// clients can make it hold. Past it, the list starts over.
const TAKEN_LISTS: usize = 64;

/// ParameterStatus values a bind reported, by name.
pub(crate) type Reports = BTreeMap<String, String>;

/// A client's startup settings as `set_config` pairs, in order.
pub(crate) type Settings = Vec<(String, String)>;

/// What connections are pooled by: they are interchangeable within one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    database: Option<String>,
    user: String,
    /// The worker thread whose reactor the connections are registered with
    /// ([`workers::home`]): a session uses the connections of its own
    /// worker, so that their I/O never wakes another thread.
    home: Option<usize>,
}

impl PoolKey {
    /// The key of `role`'s connections to `database`, or to the database
    /// `[upstream]` names, which wins.
    fn new(upstream: &Upstream, role: &config::Role, database: Option<&str>) -> PoolKey {
        PoolKey {
            database: upstream
                .database
                .clone()
                .or_else(|| database.map(str::to_owned)),
            user: role.upstream_user().to_owned(),
            home: workers::home(),
        }
    }

    /// The key without its worker: what a backend takes and reports does
    /// not depend on the thread that talks to it.
    fn any_worker(&self) -> PoolKey {
        PoolKey {
            home: None,
            ..self.clone()
        }
    }

    /// Whether connections of `other` reach the same database as the same
    /// user, whichever worker holds them.
    fn same_target(&self, other: &PoolKey) -> bool {
        self.database == other.database && self.user == other.user
    }
}

/// Whose state a backend holds after transaction pooling lent it: the
/// client session that used it last, which may use it again as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tenancy {
    /// The client session (see [`crate::session::transaction`]).
    pub(crate) tenant: u64,
    /// Which of the client's lists of settings is applied.
    pub(crate) settings: u64,
    /// When the envelope bound there expires (unix seconds).
    pub(crate) claims_exp: u64,
}

/// A pooled backend, lent to one client session at a time.
pub(crate) struct Lease {
    key: PoolKey,
    cancel: CancelKey,
    backend: Backend,
    /// ParameterStatus values as the connection reported them at startup:
    /// what `DISCARD ALL` returns them to.
    base: BTreeMap<String, String>,
    /// ParameterStatus values now.
    current: BTreeMap<String, String>,
    born: Instant,
    /// Clients' named statements prepared there (transaction pooling).
    pub(crate) prepared: Prepared,
    /// Whose state it holds (transaction pooling); `None`: nobody's.
    pub(crate) tenancy: Option<Tenancy>,
}

struct Idle {
    stream: UpstreamStream,
    lease: Lease,
    since: Instant,
}

pub(crate) struct Pool {
    settings: config::Pool,
    /// Idle connections per key of a worker thread; `size` of them at most
    /// per database and user, over all workers ([`Pool::keep`]).
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    /// Connections out on loan per key, at most `size` ([`Pool::lend`]).
    lent: Mutex<HashMap<PoolKey, Arc<Semaphore>>>,
    /// Lists of startup settings a connection took without complaint, and
    /// what they reported, per database and user on any worker: a client
    /// with one of these has its bind sent ahead of its greeting
    /// ([`Pool::attach`]).
    taken: Mutex<HashMap<PoolKey, HashMap<Settings, Reports>>>,
    reaper: AtomicBool,
}

/// A connection lent for one request or transaction ([`Pool::lend`]),
/// idle. For a request it is clean (no claims, no session state) and goes
/// back with [`Pool::put_back`] only as clean; for a transaction it holds
/// the state its [`Tenancy`] says and goes back with [`Pool::keep_lent`].
pub(crate) struct Lent {
    pub(crate) stream: UpstreamStream,
    pub(crate) lease: Lease,
    /// Whether the connection served before: a stale one may have died
    /// since without a sign, so a request that got no answer on it may be
    /// tried once more on a fresh one.
    pub(crate) reused: bool,
    _slot: OwnedSemaphorePermit,
}

/// An upstream session ready for its client, with its claims bound.
pub(crate) struct Attached {
    pub(crate) upstream: UpstreamSession,
    /// `None` when the session is the client's own, outside the pool.
    pub(crate) lease: Option<Lease>,
    /// When the bound envelope expires (unix seconds).
    pub(crate) claims_exp: u64,
    /// The bind was sent and its answer is still to be read: see
    /// [`Attached::confirm`].
    pending: Option<Pending>,
}

/// A bind sent without waiting for its answer ([`Pool::attach`]).
struct Pending {
    pool: Arc<Pool>,
    key: PoolKey,
    settings: Settings,
    /// What the greeting told the client the bind would report.
    predicted: Reports,
    timeout: Duration,
}

impl Attached {
    /// A connection of the client's own, with its claims bound.
    pub(crate) async fn unpooled(
        upstream: &Upstream,
        tls: &UpstreamTls,
        login: Login<'_>,
        (key, identity): (&SigningKey, &Identity),
    ) -> Result<Attached, Refusal> {
        let mut session = connect(upstream, tls, login).await?;
        let bound = tokio::time::timeout(
            upstream.connect_timeout,
            bind_claims(&mut session, key, identity, unix_now()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::database_unavailable(
                "no answer while binding the session's claims",
            ))
        })?;
        Ok(Attached {
            upstream: session,
            lease: None,
            claims_exp: bound,
            pending: None,
        })
    }

    /// A pooled connection with its bind sent: the session the client is
    /// greeted with.
    fn lent(stream: UpstreamStream, lease: Lease, exp: u64, pending: Option<Pending>) -> Attached {
        let mut ready = BytesMut::new();
        messages::ready_for_query_idle(&mut ready);
        let upstream = UpstreamSession {
            stream,
            key: lease.cancel,
            backend: lease.backend,
            greeting: lease.greeting(),
            ready,
        };
        Attached {
            upstream,
            lease: Some(lease),
            claims_exp: exp,
            pending,
        }
    }

    /// Reads the answer to a bind sent ahead of the greeting, if one was:
    /// call it once the client is greeted, before anything of the client's
    /// goes upstream. Returns ParameterStatus messages for what the bind
    /// reported that the greeting did not say, for the client.
    ///
    /// A bind that failed leaves the client nothing to fall back to (it was
    /// greeted): the connection is closed, never pooled again, and the
    /// client refused with 08006; its statements never reached the backend.
    /// A list of settings refused is forgotten, so that the next client with
    /// it waits for its answer, and gets a connection of its own.
    pub(crate) async fn confirm(mut self) -> Result<(Attached, BytesMut), Refusal> {
        let mut late = BytesMut::new();
        let (Some(pending), Some(lease)) = (self.pending.take(), self.lease.as_mut()) else {
            return Ok((self, late));
        };
        let stream = &mut self.upstream.stream;
        let answer = tokio::time::timeout(pending.timeout, read_bind_answer(stream))
            .await
            .unwrap_or_else(|_| Err(SetFailure::Dead("no answer".to_owned())));
        let reason = match answer {
            Ok((reports, unasked)) => {
                for (name, value) in &reports {
                    if lease.current.get(name) != Some(value) {
                        messages::parameter_status(&mut late, name, value);
                        lease.current.insert(name.clone(), value.clone());
                    }
                }
                if reports != pending.predicted {
                    pending
                        .pool
                        .remember(&pending.key, pending.settings, reports);
                }
                late.extend_from_slice(&unasked);
                return Ok((self, late));
            }
            Err(SetFailure::Dead(reason)) => reason,
            Err(SetFailure::Refused(reason)) => {
                pending.pool.forget(&pending.key, &pending.settings);
                reason
            }
        };
        close(self.upstream.stream);
        Err(Refusal::database_unavailable(format!(
            "binding the session's claims on a pooled connection failed after the greeting: \
             {reason}"
        )))
    }
}

impl Pool {
    pub(crate) fn new(settings: config::Pool) -> Pool {
        Pool {
            settings,
            idle: Mutex::new(HashMap::new()),
            lent: Mutex::new(HashMap::new()),
            taken: Mutex::new(HashMap::new()),
            reaper: AtomicBool::new(false),
        }
    }

    /// An upstream session for one client, with its parameters applied and
    /// its claims bound (or on their way: see [`Attached::confirm`]). The
    /// lease is `None` when the session is the client's own, outside the pool.
    ///
    /// The bind is pipelined with the client's greeting, not with its first
    /// message: it is written to the backend, the client is greeted, and
    /// then its answer is read, before the relay forwards anything of the
    /// client's. The round trip overlaps the client's own turn (reading the
    /// greeting, sending its first statement) instead of delaying the
    /// greeting; and since no statement of the client's is forwarded before
    /// the answer is known to be a success, a bind that fails can never let
    /// one run without its claims. (Pipelining with the first message would
    /// not be safe: behind a failed bind's Sync the server runs the next
    /// statement with no claims, and without that Sync the bind would share
    /// the client's transaction, and be undone by its rollback.)
    ///
    /// Once the greeting is sent nothing can be fallen back on, so the bind
    /// waits for its answer, as it always did, when it could be refused:
    /// when the client's startup settings are a list no connection of this
    /// database and user took before. Its answer is then read before the
    /// greeting, a refusal gets the client a connection of its own, and what
    /// the bind reported is remembered for the next client with the same
    /// list, whose greeting it becomes. Only the envelope (no settings), or
    /// settings taken before, go ahead of the greeting.
    ///
    /// An idle connection whose backend has ended (the database restarted,
    /// an administrator terminated it) has said so, or closed, by the time
    /// it is taken: it is discarded and the next one tried, invisibly. One
    /// that ends between that check and its bind costs a client that was
    /// greeted an 08006 (see [`Attached::confirm`]); one that was not, a
    /// retry on the next.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        upstream: &Upstream,
        tls: &UpstreamTls,
        login: Login<'_>,
        claims: (&SigningKey, &Identity),
    ) -> Result<Attached, Refusal> {
        let Some(settings) = settings_of(&login.parameters) else {
            tracing::debug!(
                target: LOG_TARGET,
                "startup parameters a pooled connection cannot take: unpooled",
            );
            return Attached::unpooled(upstream, tls, login, claims).await;
        };
        let key = PoolKey::new(upstream, login.role, login.database);
        let known = self.known_reports(&key, &settings);
        loop {
            let (mut stream, mut lease, fresh) =
                self.connection(&key, upstream, tls, &login).await?;
            let exp = claims.1.envelope_expiry(unix_now());
            let sealed = claims.0.seal(claims.1, lease.backend, exp);
            let bound = tokio::time::timeout(upstream.connect_timeout, async {
                match &known {
                    Some(reports) => send_bind(&mut stream, &settings, &sealed)
                        .await
                        .map(|()| (reports.clone(), BytesMut::new())),
                    None => bind(&mut stream, &settings, &sealed).await,
                }
            })
            .await
            .unwrap_or_else(|_| Err(SetFailure::Dead("no answer".to_owned())));
            match bound {
                Ok((reports, unasked)) => {
                    lease.current.extend(reports.clone());
                    let pending = match known {
                        Some(predicted) => Some(Pending {
                            pool: Arc::clone(self),
                            key,
                            settings,
                            predicted,
                            timeout: upstream.connect_timeout,
                        }),
                        None => {
                            self.remember(&key, settings, reports);
                            None
                        }
                    };
                    let mut attached = Attached::lent(stream, lease, exp, pending);
                    attached.upstream.ready.extend_from_slice(&unasked);
                    return Ok(attached);
                }
                Err(SetFailure::Dead(reason)) if !fresh => {
                    tracing::info!(
                        target: LOG_TARGET,
                        %reason, "discarded a pooled upstream connection that failed",
                    );
                }
                Err(SetFailure::Dead(reason)) => {
                    return Err(Refusal::database_unavailable(format!(
                        "new upstream connection failed: {reason}"
                    )));
                }
                Err(SetFailure::Refused(reason)) => {
                    close(stream);
                    tracing::debug!(
                        target: LOG_TARGET,
                        %reason,
                        "the client's settings were refused on a pooled connection: unpooled"
                    );
                    return Attached::unpooled(upstream, tls, login, claims).await;
                }
            }
        }
    }

    /// An idle connection of `key` that is still alive, or a new one (then
    /// `true`), logged in with no client's parameters.
    async fn connection(
        &self,
        key: &PoolKey,
        upstream: &Upstream,
        tls: &UpstreamTls,
        login: &Login<'_>,
    ) -> Result<(UpstreamStream, Lease, bool), Refusal> {
        if let Some(idle) = self.take_alive(key, None) {
            return Ok((idle.stream, idle.lease, false));
        }
        let bare = Login {
            role: login.role,
            database: login.database,
            parameters: Vec::new(),
            refuse_undeclared_settings: login.refuse_undeclared_settings,
        };
        let session = connect(upstream, tls, bare).await?;
        let lease = Lease::new(key.clone(), &session);
        Ok((session.stream, lease, true))
    }

    /// What binding `settings` reports on a connection of `key`, when that
    /// is known: none for no settings; else what a connection that took
    /// them reported.
    fn known_reports(&self, key: &PoolKey, settings: &Settings) -> Option<Reports> {
        if settings.is_empty() {
            return Some(Reports::new());
        }
        let taken = self.taken.lock().expect("pool lock");
        taken.get(&key.any_worker())?.get(settings).cloned()
    }

    /// Remembers that a connection of `key` took `settings`, reporting `reports`.
    fn remember(&self, key: &PoolKey, settings: Settings, reports: Reports) {
        if settings.is_empty() {
            return;
        }
        let mut taken = self.taken.lock().expect("pool lock");
        let lists = taken.entry(key.any_worker()).or_default();
        if lists.len() >= TAKEN_LISTS && !lists.contains_key(&settings) {
            lists.clear();
        }
        lists.insert(settings, reports);
    }

    /// Forgets `settings`, refused by a connection of `key`.
    fn forget(&self, key: &PoolKey, settings: &Settings) {
        let mut taken = self.taken.lock().expect("pool lock");
        if let Some(lists) = taken.get_mut(&key.any_worker()) {
            lists.remove(settings);
        }
    }

    /// A connection for one request (or one transaction) as `role` on
    /// `database`: an idle one that is still alive, or a new one. At most
    /// `[pool] size` are lent per database and upstream user at once,
    /// whatever worker holds them; a request waits up to `wait_timeout` for
    /// one, then is refused with 53300. An idle connection whose
    /// [`Tenancy`] is `tenant`'s is preferred: its state is that client's
    /// already.
    pub(crate) async fn lend(
        self: &Arc<Self>,
        upstream: &Upstream,
        tls: &UpstreamTls,
        (role, database): (&config::Role, Option<&str>),
        tenant: Option<u64>,
    ) -> Result<Lent, Refusal> {
        let key = PoolKey::new(upstream, role, database);
        let slots = {
            let mut lent = self.lent.lock().expect("pool lock");
            let slots = lent
                .entry(key.any_worker())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.size)));
            Arc::clone(slots)
        };
        let wait = self.settings.wait_timeout;
        let slot = match tokio::time::timeout(wait, slots.acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return Err(Refusal::new(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "no database connection came free within {wait:?}: all {} of this role's \
                         connections ([pool] size) stayed busy",
                        self.settings.size
                    ),
                )
                .because(Reason::Limit));
            }
        };
        self.start_reaper();
        if let Some(idle) = self.take_alive(&key, tenant) {
            return Ok(Lent {
                stream: idle.stream,
                lease: idle.lease,
                reused: true,
                _slot: slot,
            });
        }
        let login = Login {
            role,
            database,
            parameters: Vec::new(),
            refuse_undeclared_settings: true,
        };
        let session = connect(upstream, tls, login).await?;
        let lease = Lease::new(key, &session);
        Ok(Lent {
            stream: session.stream,
            lease,
            reused: false,
            _slot: slot,
        })
    }

    /// Closes a lent connection its request could not leave clean.
    pub(crate) fn discard(&self, lent: Lent) {
        close(lent.stream);
    }

    /// Returns a lent connection to its startup state with `DISCARD ALL`
    /// (transaction pooling, before another client uses it): nobody's
    /// state, no statements. An error means it is to be discarded.
    pub(crate) async fn reset_lent(&self, lent: &mut Lent) -> Result<(), String> {
        let lease = &mut lent.lease;
        lease.tenancy = None;
        lease.prepared.clear();
        match tokio::time::timeout(RESET_TIMEOUT, reset(&mut lent.stream, lease)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer to DISCARD ALL".to_owned()),
        }
    }

    /// Takes back a lent connection its request left clean (idle, its
    /// settings reset by `DISCARD ALL`), unless it is too old.
    pub(crate) fn put_back(&self, lent: Lent) {
        let Lent {
            stream, mut lease, ..
        } = lent;
        if lease.born.elapsed() >= self.settings.max_lifetime {
            close(stream);
            return;
        }
        lease.current = lease.base.clone();
        self.keep(stream, lease);
    }

    /// Takes back a connection a transaction left idle, with whatever state
    /// its [`Tenancy`] says (transaction pooling), unless it is too old.
    pub(crate) fn keep_lent(&self, lent: Lent) {
        if lent.lease.born.elapsed() >= self.settings.max_lifetime {
            close(lent.stream);
            return;
        }
        self.keep(lent.stream, lent.lease);
    }

    /// Connections lent and idle per database and upstream user, for the
    /// metrics: (database, user, lent, idle). Lent is `None` where nothing
    /// is lent per request or transaction (a session pool's backends are
    /// attached to their sessions instead).
    pub(crate) fn census(&self) -> Vec<(String, String, Option<usize>, usize)> {
        let lent = self.lent.lock().expect("pool lock");
        let idle = self.idle.lock().expect("pool lock");
        let mut targets: BTreeMap<(String, String), (Option<usize>, usize)> = BTreeMap::new();
        for (key, list) in idle.iter() {
            let target = (key.database.clone().unwrap_or_default(), key.user.clone());
            targets.entry(target).or_default().1 += list.len();
        }
        for (key, slots) in lent.iter() {
            let target = (key.database.clone().unwrap_or_default(), key.user.clone());
            targets.entry(target).or_default().0 =
                Some(self.settings.size - slots.available_permits());
        }
        targets
            .into_iter()
            .map(|((database, user), (in_use, idle))| (database, user, in_use, idle))
            .collect()
    }

    /// Takes back a connection its client session left clean (see
    /// [`relay::Finish`](crate::session::relay::Finish)): kept, reset, unless it is
    /// too old. A connection left in any other state is retired instead.
    pub(crate) async fn give_back(self: &Arc<Self>, mut stream: UpstreamStream, mut lease: Lease) {
        self.start_reaper();
        if lease.born.elapsed() >= self.settings.max_lifetime {
            close(stream);
            return;
        }
        match tokio::time::timeout(RESET_TIMEOUT, reset(&mut stream, &mut lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::info!(
                    target: LOG_TARGET,
                    %reason, "upstream connection failed its reset: closed",
                );
                close(stream);
                return;
            }
            Err(_) => {
                tracing::info!(
                    target: LOG_TARGET,
                    "upstream connection did not answer its reset: closed",
                );
                close(stream);
                return;
            }
        }
        self.keep(stream, lease);
    }

    /// Keeps a clean connection idle on the worker it was returned on,
    /// unless `size` connections of its database and user already are, on
    /// any worker. No worker has a share of its own: sessions end where the
    /// clients happened to be, and a worker that keeps more than its part
    /// lends them to the others ([`Pool::take`]) rather than close a
    /// connection the pool has room for. (With transaction pooling every
    /// connection comes back between transactions, and `size` also bounds
    /// how many exist at all.)
    fn keep(&self, stream: UpstreamStream, lease: Lease) {
        let full = {
            let mut idle = self.idle.lock().expect("pool lock");
            let kept: usize = idle
                .iter()
                .filter(|(key, _)| key.same_target(&lease.key))
                .map(|(_, list)| list.len())
                .sum();
            if kept < self.settings.size {
                idle.entry(lease.key.clone()).or_default().push(Idle {
                    stream,
                    lease,
                    since: Instant::now(),
                });
                None
            } else {
                Some(stream)
            }
        };
        if let Some(stream) = full {
            close(stream);
        }
    }

    /// The most recently returned idle connection for `key` (or, when its
    /// worker has none, another worker's for the same database and user)
    /// that is neither idle nor alive for too long; the others are closed.
    fn take(&self, key: &PoolKey, tenant: Option<u64>) -> Option<Idle> {
        let mut expired = Vec::new();
        let found = {
            let mut idle = self.idle.lock().expect("pool lock");
            let mut found = idle
                .get_mut(key)
                .and_then(|list| self.pop_tenants(list, tenant))
                .or_else(|| {
                    idle.get_mut(key)
                        .and_then(|list| self.pop_fresh(list, &mut expired))
                });
            if found.is_none() {
                // Another worker's connection, cheaper than a new one: it
                // moves to this worker (see `take_alive`).
                let others: Vec<PoolKey> = idle
                    .keys()
                    .filter(|other| other.home != key.home && other.same_target(key))
                    .cloned()
                    .collect();
                found = others.iter().find_map(|other| {
                    let list = idle.get_mut(other)?;
                    self.pop_fresh(list, &mut expired)
                });
            }
            found
        };
        expired.into_iter().for_each(close);
        found
    }

    /// The most recently returned connection of `list` whose state is
    /// `tenant`'s, unless it is idle or alive for too long.
    fn pop_tenants(&self, list: &mut Vec<Idle>, tenant: Option<u64>) -> Option<Idle> {
        let tenant = tenant?;
        let at = list.iter().rposition(|entry| {
            entry.lease.tenancy.is_some_and(|t| t.tenant == tenant) && !self.expired(entry)
        })?;
        Some(list.remove(at))
    }

    /// The most recently returned connection of `list` that is neither
    /// idle nor alive for too long; those that are go to `expired`.
    fn pop_fresh(&self, list: &mut Vec<Idle>, expired: &mut Vec<UpstreamStream>) -> Option<Idle> {
        while let Some(entry) = list.pop() {
            if self.expired(&entry) {
                expired.push(entry.stream);
            } else {
                return Some(entry);
            }
        }
        None
    }

    /// Like [`Pool::take`], passing over (and closing) connections whose
    /// backend has ended while idle (see [`still_idle`]).
    fn take_alive(&self, key: &PoolKey, tenant: Option<u64>) -> Option<Idle> {
        while let Some(mut idle) = self.take(key, tenant) {
            if still_idle(&mut idle.stream) {
                if idle.lease.key.home != key.home {
                    // Another worker's: from now on this worker's, so that
                    // its I/O wakes this thread only. If that fails it is
                    // used from here all the same, and goes back home.
                    match idle.stream.rehome() {
                        Ok(()) => idle.lease.key.home = key.home,
                        Err(e) => {
                            tracing::debug!(target: LOG_TARGET, error = %e, "kept a connection on its worker")
                        }
                    }
                }
                return Some(idle);
            }
            tracing::debug!(target: LOG_TARGET, "discarded an idle connection that had ended");
            close(idle.stream);
        }
        None
    }

    fn expired(&self, entry: &Idle) -> bool {
        entry.since.elapsed() >= self.settings.idle_timeout
            || entry.lease.born.elapsed() >= self.settings.max_lifetime
    }

    /// Closes idle connections past their idle timeout or lifetime.
    fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().expect("pool lock");
            for list in idle.values_mut() {
                let mut kept = Vec::with_capacity(list.len());
                for entry in list.drain(..) {
                    if self.expired(&entry) {
                        expired.push(entry.stream);
                    } else {
                        kept.push(entry);
                    }
                }
                *list = kept;
            }
            idle.retain(|_, list| !list.is_empty());
        }
        expired.into_iter().for_each(close);
    }

    /// Sweeps in the background for as long as the pool exists; started by
    /// the first returned connection, inside the runtime.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let period = (self.settings.idle_timeout.min(self.settings.max_lifetime) / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let pool: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { break };
                pool.sweep();
            }
        });
    }
}

impl Lent {
    /// The connection to retire, and the slot it holds until it is gone.
    pub(crate) fn into_parts(self) -> (UpstreamStream, Lease, OwnedSemaphorePermit) {
        (self.stream, self.lease, self._slot)
    }
}

impl Lease {
    /// The backend, as claims envelopes name it.
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// The backend's own cancel key.
    pub(crate) fn cancel_key(&self) -> CancelKey {
        self.cancel
    }

    fn new(key: PoolKey, session: &UpstreamSession) -> Lease {
        let mut base = BTreeMap::new();
        let mut raw = &session.greeting[..];
        while let Some((header, rest)) = raw.split_first_chunk::<HEADER_LEN>()
            && let Some(header) = Header::parse(*header)
            && let Some((body, rest)) = rest.split_at_checked(header.body_len)
        {
            if header.kind == kind::PARAMETER_STATUS
                && let Some((name, value)) = parameter_status(body)
            {
                base.insert(name, value);
            }
            raw = rest;
        }
        Lease {
            key,
            cancel: session.key,
            backend: session.backend,
            current: base.clone(),
            base,
            born: Instant::now(),
            prepared: Prepared::default(),
            tenancy: None,
        }
    }

    /// The connection's ParameterStatus values now.
    pub(crate) fn reported(&self) -> &Reports {
        &self.current
    }

    /// Records what a bind on the connection reported.
    pub(crate) fn report(&mut self, reports: Reports) {
        self.current.extend(reports);
    }

    /// ParameterStatus messages for the connection's current values.
    pub(crate) fn greeting(&self) -> BytesMut {
        let mut out = BytesMut::new();
        for (name, value) in &self.current {
            messages::parameter_status(&mut out, name, value);
        }
        out
    }
}

/// The body of a ParameterStatus message.
fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// The client's forwarded startup parameters as `set_config` pairs, or
/// `None` when some cannot be applied that way (protocol extensions,
/// backend switches in `options` other than `-c name=value`).
pub(crate) fn settings_of(parameters: &[(String, String)]) -> Option<Vec<(String, String)>> {
    let mut settings = Vec::with_capacity(parameters.len());
    let mut encoding = None;
    for (name, value) in parameters {
        if name == "options" {
            let mut words = split_options(value).into_iter();
            while let Some(word) = words.next() {
                if word != "-c" {
                    return None;
                }
                let setting = words.next()?;
                let (name, value) = setting.split_once('=')?;
                settings.push((name.replace('-', "_"), value.to_owned()));
            }
        } else if name.starts_with("_pq_.") || name.is_empty() {
            return None;
        } else if name.eq_ignore_ascii_case("client_encoding") {
            // Last, so that the values before it are read in the encoding
            // the connection was opened with.
            encoding = Some((name.clone(), value.clone()));
        } else {
            settings.push((name.clone(), value.clone()));
        }
    }
    settings.extend(encoding);
    Some(settings)
}

/// The claims and each setting, by `set_config` with bound parameters, one
/// Sync: written, not waited for (see [`read_bind_answer`]).
async fn send_bind(
    stream: &mut UpstreamStream,
    settings: &[(String, String)],
    sealed: &str,
) -> Result<(), SetFailure> {
    let mut out = BytesMut::new();
    let claims = (claims::SETTING, sealed);
    let all = std::iter::once(claims).chain(settings.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    if messages::set_config(&mut out, "", all).is_err() {
        return Err(SetFailure::Refused("a setting has a NUL byte".to_owned()));
    }
    let sent = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    sent.await.map_err(|e| SetFailure::Dead(e.to_string()))
}

/// The answer to [`send_bind`]: the ParameterStatus values it reported,
/// and what the server sent unasked after it, for the client.
async fn read_bind_answer(stream: &mut UpstreamStream) -> Result<(Reports, BytesMut), SetFailure> {
    let mut reports = Reports::new();
    let unasked = read_set_config_answer(stream, |body| {
        reports.extend(parameter_status(body));
    })
    .await?;
    Ok((reports, unasked))
}

/// One round trip: [`send_bind`], then its answer.
pub(crate) async fn bind(
    stream: &mut UpstreamStream,
    settings: &[(String, String)],
    sealed: &str,
) -> Result<(Reports, BytesMut), SetFailure> {
    send_bind(stream, settings, sealed).await?;
    read_bind_answer(stream).await
}

/// Why a connection failed its reset; it is closed, not pooled.
#[derive(Debug, thiserror::Error)]
enum ResetError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Anything but what a clean `DISCARD ALL` answers: the session was
    /// not as idle as it looked.
    #[error("unexpected message {:?} in answer to DISCARD ALL", char::from(*.0))]
    Unexpected(u8),
}

/// `DISCARD ALL`, answered by exactly CommandComplete and ReadyForQuery
/// "idle" (ParameterStatus, notices and notifications aside).
///
/// What the server sent unasked after that ReadyForQuery, if the buffered
/// read took any (see [`Answer`]), is the idle connection's, not the next
/// client's: it is taken by the same rules as before it, so a
/// ParameterStatus still reaches the lease and anything else retires the
/// connection.
async fn reset(stream: &mut UpstreamStream, lease: &mut Lease) -> Result<(), ResetError> {
    let mut out = BytesMut::new();
    messages::query(&mut out, "DISCARD ALL")?;
    stream.write_all(&out).await?;
    let mut reported = Vec::new();
    let mut completed = false;
    let mut answer = Answer::new(MAX_BACKEND_MESSAGE);
    loop {
        let frame = answer.next(stream).await?;
        match frame.kind() {
            b'N' | b'A' => {}
            b'S' => reported.extend(parameter_status(frame.body())),
            b'C' if !completed && frame.body() == b"DISCARD ALL\0" => completed = true,
            b'Z' if completed && frame.body().first() == Some(&b'I') => break,
            other => return Err(ResetError::Unexpected(other)),
        }
    }
    let unasked = answer.finish(stream).await?;
    let mut raw = &unasked[..];
    while let Some((header, rest)) = raw.split_first_chunk::<HEADER_LEN>()
        && let Some(header) = Header::parse(*header)
        && let Some((body, rest)) = rest.split_at_checked(header.body_len)
    {
        match header.kind {
            b'N' | b'A' => {}
            b'S' => reported.extend(parameter_status(body)),
            other => return Err(ResetError::Unexpected(other)),
        }
        raw = rest;
    }
    // Everything is back at its startup value, and what was reported just
    // now is the newest word on it (a reloaded default, say).
    for (name, value) in reported {
        lease.base.insert(name, value);
    }
    lease.current = lease.base.clone();
    Ok(())
}

/// Whether an idle connection has nothing to say. A backend that ended
/// while idle (the database restarted, an administrator terminated it) has
/// sent its FATAL error, or closed, and is discarded before anyone uses it.
fn still_idle(stream: &mut UpstreamStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(stream)
        .poll_read(&mut cx, &mut buf)
        .is_pending()
}

/// Closes a connection in the background: Terminate, so the backend ends
/// cleanly, then the socket (and its TLS session).
fn close(mut stream: UpstreamStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(RESET_TIMEOUT, async {
            let mut terminate = BytesMut::new();
            messages::terminate(&mut terminate);
            stream.write_all(&terminate).await?;
            stream.shutdown().await
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::stream::{MaybeTls, Transport};

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_become_settings_with_client_encoding_last() {
        let settings = settings_of(&pairs(&[
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            (
                "options",
                "-c statement_timeout=5s -c search_path=a\\ b -c log-min-messages=debug1",
            ),
            ("TimeZone", "UTC"),
        ]))
        .unwrap();
        assert_eq!(
            settings,
            pairs(&[
                ("application_name", "psql"),
                ("statement_timeout", "5s"),
                ("search_path", "a b"),
                ("log_min_messages", "debug1"),
                ("TimeZone", "UTC"),
                ("client_encoding", "UTF8"),
            ])
        );
    }

    #[test]
    fn protocol_extensions_and_other_switches_are_not_pooled() {
        assert_eq!(settings_of(&pairs(&[("_pq_.compression", "on")])), None);
        assert_eq!(settings_of(&pairs(&[("options", "-d 5")])), None);
        assert_eq!(settings_of(&pairs(&[("options", "-c novalue")])), None);
    }

    #[test]
    fn settings_are_known_once_taken_until_refused_and_the_lists_are_bounded() {
        let pool = Pool::new(config::Pool::default());
        let key = PoolKey {
            database: None,
            user: "u".into(),
            home: None,
        };
        let other = PoolKey {
            database: Some("other".into()),
            user: "u".into(),
            home: None,
        };
        let app = pairs(&[("application_name", "a")]);
        assert_eq!(pool.known_reports(&key, &Vec::new()), Some(Reports::new()));
        assert_eq!(pool.known_reports(&key, &app), None);

        let reported: Reports = [("application_name".to_owned(), "a".to_owned())].into();
        pool.remember(&key, app.clone(), reported.clone());
        assert_eq!(pool.known_reports(&key, &app), Some(reported.clone()));
        assert_eq!(pool.known_reports(&other, &app), None, "per key");
        let on_a_worker = PoolKey {
            home: Some(1),
            ..key.clone()
        };
        assert_eq!(
            pool.known_reports(&on_a_worker, &app),
            Some(reported),
            "known on every worker"
        );
        pool.forget(&key, &app);
        assert_eq!(pool.known_reports(&key, &app), None);

        for n in 0..=TAKEN_LISTS {
            let list = pairs(&[("application_name", &n.to_string())]);
            pool.remember(&key, list, Reports::new());
        }
        let lists = pool.taken.lock().unwrap()[&key].len();
        assert!(lists <= TAKEN_LISTS, "{lists} lists remembered");
    }

    /// An idle connection of `key` over loopback, as the pool keeps it.
    async fn idle_connection(key: PoolKey, pid: i32) -> (UpstreamStream, Lease) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let lease = Lease {
            key,
            cancel: CancelKey { pid, secret: 2 },
            backend: Backend { pid, started: 3 },
            base: BTreeMap::new(),
            current: BTreeMap::new(),
            born: Instant::now(),
            prepared: Prepared::default(),
            tenancy: None,
        };
        (MaybeTls::Plain(Transport::Tcp(tcp)), lease)
    }

    #[tokio::test]
    async fn a_client_is_lent_the_backend_whose_state_is_its_own_before_a_newer_one() {
        let pool = Pool::new(config::Pool::default());
        let key = PoolKey {
            database: None,
            user: "u".into(),
            home: Some(0),
        };
        for (pid, tenant) in [(1, Some(10)), (2, Some(20)), (3, None)] {
            let (stream, mut lease) = idle_connection(key.clone(), pid).await;
            lease.tenancy = tenant.map(|tenant| Tenancy {
                tenant,
                settings: 0,
                claims_exp: 0,
            });
            pool.keep(stream, lease);
        }
        let pid_for = |tenant| pool.take(&key, tenant).map(|idle| idle.lease.backend.pid);
        assert_eq!(pid_for(Some(10)), Some(1), "its own");
        assert_eq!(pid_for(Some(30)), Some(3), "nobody's own: the newest");
        assert_eq!(pid_for(Some(10)), Some(2), "its own is gone: the newest");
    }

    #[tokio::test]
    async fn a_worker_with_no_idle_connection_takes_another_workers() {
        let pool = Pool::new(config::Pool::default());
        let of = |home, user: &str| PoolKey {
            database: None,
            user: user.into(),
            home,
        };
        let (stream, lease) = idle_connection(of(Some(0), "u"), 7).await;
        pool.keep(stream, lease);
        assert!(
            pool.take(&of(Some(1), "other"), None).is_none(),
            "another user's"
        );
        let taken = pool
            .take(&of(Some(1), "u"), None)
            .expect("worker 0's connection");
        assert_eq!(taken.lease.backend.pid, 7);
        assert_eq!(taken.lease.key.home, Some(0), "it goes back to worker 0");
        assert!(pool.take(&of(Some(0), "u"), None).is_none(), "taken once");
    }

    #[tokio::test]
    async fn a_worker_keeps_what_the_others_leave_room_for_up_to_the_pool_size() {
        let settings = config::Pool {
            size: 3,
            ..config::Pool::default()
        };
        let pool = Pool::new(settings);
        let of = |home, user: &str| PoolKey {
            database: None,
            user: user.into(),
            home,
        };
        let (stream, lease) = idle_connection(of(Some(1), "u"), 9).await;
        pool.keep(stream, lease);
        let (stream, lease) = idle_connection(of(Some(1), "other"), 8).await;
        pool.keep(stream, lease);
        for pid in 0..3 {
            let (stream, lease) = idle_connection(of(Some(0), "u"), pid).await;
            pool.keep(stream, lease);
        }
        let kept = |home| pool.idle.lock().unwrap()[&of(home, "u")].len();
        assert_eq!(kept(Some(0)), 2, "3 in all, one of them on worker 1");
        assert_eq!(kept(Some(1)), 1);
        pool.take(&of(Some(1), "u"), None).expect("worker 1's own");
        let (stream, lease) = idle_connection(of(Some(0), "u"), 3).await;
        pool.keep(stream, lease);
        assert_eq!(kept(Some(0)), 3, "worker 1 took its own: room for one more");
    }

    #[test]
    fn a_greeting_is_rebuilt_from_parameter_status_values() {
        let session_greeting = {
            let lease = Lease {
                key: PoolKey {
                    database: None,
                    user: "u".into(),
                    home: None,
                },
                cancel: CancelKey { pid: 1, secret: 2 },
                backend: Backend { pid: 1, started: 3 },
                base: BTreeMap::new(),
                current: [("TimeZone".to_owned(), "UTC".to_owned())].into(),
                born: Instant::now(),
                prepared: Prepared::default(),
                tenancy: None,
            };
            lease.greeting()
        };
        assert_eq!(&session_greeting[..], b"S\0\0\0\x11TimeZone\0UTC\0");
        assert_eq!(
            parameter_status(&session_greeting[5..]),
            Some(("TimeZone".to_owned(), "UTC".to_owned()))
        );
    }
}
