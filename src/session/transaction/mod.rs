//! Transaction pooling (`[pool] mode = "transaction"`): a client holds a
//! backend only while a transaction of its runs, with its verified claims
//! bound there for exactly that lease.
//!
//! A lease begins with the client's first message after it was idle and
//! ends at the ReadyForQuery "idle" that answers everything it sent. Then
//! the backend goes back to the pool holding the client's state (its
//! envelope, its settings: its [`Tenancy`]), and the pool lends it to the
//! same client first. So a transaction costs:
//!
//! - on the backend it used last, still idle: nothing more than its own
//!   messages;
//! - on a backend that served another client: `DISCARD ALL`, then its
//!   envelope and settings bound with `set_config` in a transaction of
//!   their own, all in the same write as its first message (no round
//!   trip). No Sync separates them from the client's messages, so should
//!   the reset or the bind fail, the server skips what the client sent up
//!   to its Sync, and the session ends (08006): no statement of the client's
//!   ever runs with another client's state. What the client sends after
//!   that Sync waits for their answers;
//! - on a fresh backend, the bind alone.
//!
//! What else a client leaves on a backend is in README's table of session
//! state under transaction pooling: settings made with `SET` follow the
//! client (read back after the transaction that ran one, and bound with its
//! envelope on every backend it uses), named statements follow it
//! ([`statements`]), what cannot follow is refused ([`guard`]), and the rest
//! is reset before the backend serves anyone else.

pub(crate) mod answers;
pub(crate) mod guard;
pub(crate) mod statements;

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

use self::answers::{Answers, Expect};
use self::statements::{Forwarded, Statements, Upstream};
use crate::auth::claims::{self, Identity, SigningKey};
use crate::clock::unix_now;
use crate::ops::metrics::PoolMeters;
use crate::protocol::frame::{Answer, Frame, kind};
use crate::protocol::messages;
use crate::protocol::refusal::{Refusal, sqlstate};
use crate::session::cancel::Registration;
use crate::session::connection::Services;
use crate::session::relay::{Ending, Expiry, Side, Traffic, end_with_fatal, write};
use crate::session::shutdown::Shutdown;
use crate::session::stream::{ClientStream, UpstreamStream};
use crate::upstream::claims::SetFailure;
use crate::upstream::login::Login;
use crate::upstream::pool::{Lent, Pool, Settings, Tenancy, bind, settings_of};
use crate::upstream::prepared::Prepared;
use crate::upstream::retire::retire;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::transaction=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::transaction";

/// The longest message either side may send: PostgreSQL's own limit.
const MAX_MESSAGE: usize = (1 << 30) - 1;

/// Tells client sessions apart as tenants of a backend.
static NEXT_TENANT: AtomicU64 = AtomicU64::new(1);

/// A transaction-pooled client session: what follows it from backend to
/// backend.
pub(crate) struct Tenant {
    id: u64,
    role: String,
    database: Option<String>,
    key: SigningKey,
    identity: Identity,
    expiry: Option<Expiry>,
    /// Its settings as `set_config` pairs: the startup ones, then what its
    /// `SET`s left.
    settings: Settings,
    /// Which list `settings` is (a backend's [`Tenancy`] says which it has).
    settings_version: u64,
    statements: Statements,
    /// The ParameterStatus values the client has been told.
    reports: BTreeMap<Vec<u8>, Vec<u8>>,
    meters: PoolMeters,
}

/// The greeting of a transaction-pooled client: AuthenticationOk,
/// ParameterStatus, BackendKeyData, ReadyForQuery.
pub(crate) struct Greeting(pub(crate) BytesMut);

/// Logs a client in: its startup settings and envelope bound once, on a
/// backend lent for that, to learn what Postgres reports with them (the
/// greeting); a setting Postgres refuses refuses the login. The backend
/// goes back to the pool holding the client's state.
pub(crate) async fn login(
    services: &Services,
    login: Login<'_>,
    (key, identity): (&SigningKey, &Identity),
    expiry: Option<Expiry>,
) -> Result<(Tenant, Registration, Greeting), Refusal> {
    let config = &services.config;
    let pool = pool_of(services)?;
    let settings = settings_of(&login.parameters).ok_or_else(|| {
        Refusal::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "with transaction pooling ([pool] mode = \"transaction\") startup parameters must be \
             settings (name=value, or -c name=value in options); this one can only be given to \
             a connection of its own",
        )
    })?;
    let role_db = (login.role, login.database);
    let mut lent = pool
        .lend(&config.upstream, &services.upstream_tls, role_db, None)
        .await?;
    if lent.lease.tenancy.is_some()
        && let Err(why) = pool.reset_lent(&mut lent).await
    {
        pool.discard(lent);
        return Err(Refusal::database_unavailable(why));
    }
    let exp = identity.envelope_expiry(unix_now());
    let sealed = key.seal(identity, lent.lease.backend(), exp);
    let bound = tokio::time::timeout(
        config.upstream.connect_timeout,
        bind(&mut lent.stream, &settings, &sealed),
    )
    .await
    .unwrap_or_else(|_| Err(SetFailure::Dead("no answer".to_owned())));
    let unasked = match bound {
        Ok((reports, unasked)) => {
            lent.lease.report(reports);
            unasked
        }
        Err(SetFailure::Refused(why)) => {
            // Rolled back: the connection holds nobody's state.
            pool.keep_lent(lent);
            let (code, message) = why.split_once(' ').unwrap_or(("08006", &why));
            return Err(Refusal::new(code.to_owned(), message.to_owned()));
        }
        Err(SetFailure::Dead(why)) => {
            pool.discard(lent);
            return Err(Refusal::database_unavailable(why));
        }
    };
    let id = NEXT_TENANT.fetch_add(1, Ordering::Relaxed);
    lent.lease.tenancy = Some(Tenancy {
        tenant: id,
        settings: 0,
        claims_exp: exp,
    });
    let reports = lent
        .lease
        .reported()
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let upstream = &config.upstream;
    let cancel = (services.cancels).register(
        upstream.host.clone(),
        upstream.port,
        lent.lease.cancel_key(),
    );
    let mut greeting = BytesMut::new();
    messages::authentication_ok(&mut greeting);
    greeting.put_slice(&lent.lease.greeting());
    messages::backend_key_data(&mut greeting, cancel.key);
    messages::ready_for_query_idle(&mut greeting);
    greeting.put_slice(&unasked);
    // Nothing ran with the client's key yet: nothing to settle.
    cancel.detach().await;
    pool.keep_lent(lent);
    let tenant = Tenant {
        id,
        role: login.role.name.clone(),
        database: login.database.map(str::to_owned),
        key: key.clone(),
        identity: identity.clone(),
        expiry,
        settings,
        settings_version: 0,
        statements: Statements::default(),
        reports,
        meters: services.metrics.pool_meters(login.role.upstream_user()),
    };
    Ok((tenant, cancel, Greeting(greeting)))
}

fn pool_of(services: &Services) -> Result<&std::sync::Arc<Pool>, Refusal> {
    services
        .pool
        .as_ref()
        .ok_or_else(|| Refusal::database_unavailable("transaction pooling has no pool"))
}

/// What a session's transactions share.
pub(crate) struct Relay<'a> {
    pub(crate) client: ClientStream,
    /// Transactions to have run before the client's socket moves onto the
    /// worker's io_uring, at the first message of the next one; `None`: it
    /// does not move.
    pub(crate) move_after: Option<u64>,
    pub(crate) tenant: Tenant,
    pub(crate) cancel: &'a Registration,
    pub(crate) services: &'a Services,
    pub(crate) shutdown: &'a mut Shutdown,
    pub(crate) traffic: &'a Traffic,
}

/// A lease's streams and buffers, for [`Relay::relay_lease`].
struct Pipes<'a> {
    upstream: &'a mut UpstreamStream,
    prepared: &'a mut Prepared,
    from_server: &'a mut Answer,
    inbox: &'a mut Answer,
    answers: &'a mut Answers,
    /// Bytes for the server, not yet written.
    up: &'a mut BytesMut,
    /// Bytes for the client, not yet written.
    down: &'a mut BytesMut,
}

/// How a lease ended.
enum LeaseEnd {
    /// Idle: the backend went back to the pool.
    Released,
    /// The session ends.
    Ended(Ending),
}

impl Relay<'_> {
    /// Serves the session's transactions, each on a backend lent for it,
    /// until the client leaves or the session must end.
    pub(crate) async fn run(mut self) -> Ending {
        let mut inbox = Answer::new(MAX_MESSAGE);
        let expiry = self.tenant.expiry;
        let mut expires = Box::pin(tokio::time::sleep_until(
            expiry.map_or_else(far_future, |e| e.at),
        ));
        let mut transactions = 0;
        loop {
            let first = tokio::select! {
                frame = inbox.next(&mut self.client) => frame,
                () = &mut expires, if expiry.is_some() => {
                    let exp = expiry.map_or(0, |e| e.exp);
                    return end_with_fatal(&mut self.client, Ending::TokenExpired(exp)).await;
                }
                () = self.shutdown.recv(), if !self.shutdown.is_received() => {
                    return end_with_fatal(&mut self.client, Ending::ShuttingDown).await;
                }
            };
            let first = match first {
                Ok(frame) if frame.kind() == kind::TERMINATE => return Ending::ClientClosed,
                Ok(frame) => frame,
                Err(e) => return client_failed(e),
            };
            if self.move_after.is_some_and(|after| transactions >= after) {
                self = match self.client_onto_ring() {
                    Ok(moved) => moved,
                    Err(ending) => return ending,
                };
            }
            let lent = match take_backend(&self.tenant, self.services).await {
                Ok(lent) => lent,
                Err(refusal) => {
                    let mut out = BytesMut::new();
                    refusal.encode(&mut out);
                    let _ = write(&mut self.client, &out).await;
                    self.services.metrics.refused(refusal.reason);
                    let why = io::Error::other(refusal.to_string());
                    return Ending::Failed(Side::Upstream, why);
                }
            };
            match self.lease(lent, first, &mut inbox, expires.as_mut()).await {
                LeaseEnd::Released => transactions += 1,
                LeaseEnd::Ended(ending) => return ending,
            }
        }
    }

    /// The client's socket, moved onto the worker's io_uring at the first
    /// message of a transaction, before any backend is lent: nothing is in
    /// flight on it then (that message, and whatever the client sent with
    /// it, is already read into the inbox).
    fn client_onto_ring(self) -> Result<Self, Ending> {
        let client = self
            .client
            .onto_ring()
            .map_err(|e| Ending::Failed(Side::Client, e))?;
        if client.on_ring() {
            self.services.metrics.relay_started(true);
        }
        Ok(Relay {
            client,
            move_after: None,
            ..self
        })
    }

    /// One lease: the client's messages from `first` to the ReadyForQuery
    /// "idle" that answers them all.
    async fn lease(
        &mut self,
        mut lent: Lent,
        first: Frame,
        inbox: &mut Answer,
        expires: Pin<&mut Sleep>,
    ) -> LeaseEnd {
        self.cancel.point_at(lent.lease.cancel_key());
        self.tenant.statements.new_lease();
        let mut answers = Answers::new();
        let (mut up, mut down) = (BytesMut::new(), BytesMut::new());
        if let Err(ending) = self.bind_claims(&mut lent, &mut up, &mut answers, &mut down) {
            let _ = write(&mut self.client, &down).await;
            return self.end(lent, &answers, ending).await;
        }
        let mut from_server = Answer::new(MAX_MESSAGE);
        let pipes = Pipes {
            upstream: &mut lent.stream,
            prepared: &mut lent.lease.prepared,
            from_server: &mut from_server,
            inbox,
            answers: &mut answers,
            up: &mut up,
            down: &mut down,
        };
        let ending = match self.relay_lease(pipes, first, expires).await {
            None => return self.release(lent, answers, from_server).await,
            Some(ending) => ending,
        };
        let _ = write(&mut self.client, &down).await;
        let ending = match ending {
            Ending::TokenExpired(_) | Ending::ShuttingDown => {
                end_with_fatal(&mut self.client, ending).await
            }
            other => other,
        };
        self.end(lent, &answers, ending).await
    }

    /// Relays a lease's messages both ways until everything the client sent
    /// is answered and it is idle (`None`), or the session must end.
    ///
    /// The upstream is written only as fast as it takes the bytes, while its
    /// answers go on being read: a client that pipelines more than the
    /// socket buffers hold would otherwise leave the server blocked writing
    /// answers nobody reads, and the proxy blocked writing messages the
    /// server no longer reads.
    async fn relay_lease(
        &mut self,
        pipes: Pipes<'_>,
        first: Frame,
        mut expires: Pin<&mut Sleep>,
    ) -> Option<Ending> {
        let Pipes {
            upstream,
            prepared,
            from_server,
            inbox,
            answers,
            up,
            down,
        } = pipes;
        let (mut from_upstream, mut to_upstream) = tokio::io::split(upstream);
        let max_prepared = self.services.config.pool.max_prepared_statements;
        let expiry = self.tenant.expiry;
        let mut next = Some(first);
        let mut unflushed = false;
        // Whether the client's first Query or Sync went up behind statements
        // sent ahead: what follows it waits for their answers, since the
        // server would run it even if they failed.
        let mut synced = false;
        loop {
            while let Some(frame) = next.take() {
                if synced && answers.ahead() {
                    next = Some(frame);
                    break;
                }
                synced |= matches!(frame.kind(), b'S' | b'Q' | b'F');
                let upstream = Upstream {
                    out: &mut *up,
                    prepared: &mut *prepared,
                    max_prepared,
                };
                let statements = &mut self.tenant.statements;
                if statements.forward(&frame, upstream, answers, down) == Forwarded::Terminate {
                    return Some(Ending::ClientClosed);
                }
                next = match inbox.buffered() {
                    Ok(frame) => frame,
                    Err(e) => return Some(client_failed(e)),
                };
            }
            if !down.is_empty() {
                if let Err(e) = write(&mut self.client, down).await {
                    return Some(client_failed(e));
                }
                self.traffic.to_client(down.len());
                down.clear();
            }
            let sent = up.is_empty() && !unflushed;
            if sent
                && answers.settled()
                && !self.tenant.statements.sent.unsynced
                && answers.status == b'I'
            {
                return None;
            }
            tokio::select! {
                // Write what is there, then flush (TLS buffers records).
                sent = async {
                    if up.is_empty() {
                        to_upstream.flush().await.map(|()| None)
                    } else {
                        to_upstream.write_buf(&mut *up).await.map(Some)
                    }
                }, if !up.is_empty() || unflushed => match sent {
                    Ok(Some(n)) => {
                        self.traffic.to_server(n);
                        unflushed = true;
                    }
                    Ok(None) => unflushed = false,
                    Err(e) => return Some(upstream_failed(e)),
                },
                frame = inbox.next(&mut self.client), if next.is_none() => match frame {
                    Ok(frame) if frame.kind() == kind::TERMINATE => {
                        return Some(Ending::ClientClosed);
                    }
                    Ok(frame) => next = Some(frame),
                    Err(e) => return Some(client_failed(e)),
                },
                frame = from_server.next(&mut from_upstream) => {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(e) => return Some(upstream_failed(e)),
                    };
                    if let Err(ending) = self.answer(frame, from_server, prepared, answers, down) {
                        return Some(ending);
                    }
                }
                () = &mut expires, if expiry.is_some() => {
                    return Some(Ending::TokenExpired(expiry.map_or(0, |e| e.exp)));
                }
                () = self.shutdown.recv(), if !self.shutdown.is_received() => {
                    return Some(Ending::ShuttingDown);
                }
            }
        }
    }

    /// Binds the client's envelope and settings on the lent backend ahead of
    /// its first message, unless the backend holds them already and the
    /// envelope is not due for renewal. A backend another client used last,
    /// or that holds an older list of this client's settings, is reset
    /// first, in the same write (see
    /// [`bind_ahead`](crate::protocol::messages::bind_ahead)).
    fn bind_claims(
        &self,
        lent: &mut Lent,
        up: &mut BytesMut,
        answers: &mut Answers,
        down: &mut BytesMut,
    ) -> Result<(), Ending> {
        let tenant = &self.tenant;
        let now = unix_now();
        let tenancy = lent.lease.tenancy;
        let settings_held =
            tenancy.is_some_and(|t| t.tenant == tenant.id && t.settings == tenant.settings_version);
        let claims_held = settings_held
            && tenancy.is_some_and(|t| !tenant.identity.refresh_due(t.claims_exp, now));
        if claims_held {
            return Ok(());
        }
        let reset = tenancy.is_some() && !settings_held;
        if reset {
            lent.lease.prepared.clear();
        }
        let exp = tenant.identity.envelope_expiry(now);
        let sealed = tenant.key.seal(&tenant.identity, lent.lease.backend(), exp);
        let pairs = std::iter::once((claims::SETTING, sealed.as_str())).chain(
            tenant
                .settings
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        let Ok(commands) = messages::bind_ahead(up, reset, pairs) else {
            // The settings were all taken before, so none holds a NUL byte.
            let refusal = Refusal::database_unavailable("a setting of the client cannot be bound");
            refusal.encode(down);
            return Err(Ending::Failed(
                Side::Upstream,
                io::Error::other(refusal.to_string()),
            ));
        };
        answers.expect(Expect::Ahead { commands }, down);
        lent.lease.tenancy = Some(Tenancy {
            tenant: tenant.id,
            settings: tenant.settings_version,
            claims_exp: exp,
        });
        Ok(())
    }

    /// Takes a message from the server, and any others read whole with it.
    fn answer(
        &mut self,
        frame: Frame,
        from_server: &mut Answer,
        prepared: &mut Prepared,
        answers: &mut Answers,
        down: &mut BytesMut,
    ) -> Result<(), Ending> {
        let mut frame = Some(frame);
        while let Some(next) = frame.take() {
            if let Err(failed) = answers.take(next, prepared, &mut self.tenant.reports, down) {
                tracing::warn!(
                    target: LOG_TARGET,
                    error = %failed.0,
                    "resetting a backend or binding the client's claims on it failed",
                );
                let refusal = Refusal::database_unavailable(failed.0);
                refusal.encode(down);
                let why = io::Error::other(refusal.to_string());
                return Err(Ending::Failed(Side::Upstream, why));
            }
            frame = from_server.buffered().map_err(upstream_failed)?;
        }
        Ok(())
    }

    /// The lease is over and the backend idle: what the transaction left
    /// that must not outlive it is seen to, then the backend goes back to
    /// the pool (or, if that fails, is retired).
    async fn release(
        &mut self,
        mut lent: Lent,
        answers: Answers,
        mut from_server: Answer,
    ) -> LeaseEnd {
        let effects = answers.effects;
        let tidy = async {
            if effects.sql_statements {
                deallocate_all(&mut lent.stream, &mut from_server).await?;
                lent.lease.prepared.clear();
            }
            if effects.settings {
                let settings = read_settings(&mut lent.stream, &mut from_server).await?;
                if settings != self.tenant.settings {
                    self.tenant.settings = settings;
                    self.tenant.settings_version += 1;
                }
                // A RESET ALL or DISCARD ALL cleared the envelope too: bound
                // again with the next transaction.
                lent.lease.tenancy = Some(Tenancy {
                    tenant: self.tenant.id,
                    settings: self.tenant.settings_version,
                    claims_exp: 0,
                });
            }
            io::Result::Ok(())
        };
        let timeout = self.services.config.upstream.connect_timeout;
        let tidied = tokio::time::timeout(timeout, tidy)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        let settled = self.cancel.detach().await;
        match tidied {
            Ok(()) if settled && !from_server.is_midway() => {
                if let Ok(pool) = pool_of(self.services) {
                    pool.keep_lent(lent);
                }
            }
            tidied => {
                if let Err(e) = tidied {
                    tracing::info!(
                        target: LOG_TARGET,
                        error = %e,
                        "a backend could not be tidied after a transaction: closed",
                    );
                }
                retire_lent(self.services, lent, false).await;
            }
        }
        LeaseEnd::Released
    }

    /// The session ends during a lease: its backend is retired, statements
    /// still running cancelled.
    async fn end(&mut self, lent: Lent, answers: &Answers, ending: Ending) -> LeaseEnd {
        let in_flight = !answers.settled() || self.tenant.statements.sent.unsynced;
        self.cancel.detach().await;
        retire_lent(self.services, lent, in_flight).await;
        LeaseEnd::Ended(ending)
    }
}

/// Ends a lent backend for good (see [`retire`]); its slot is free once it
/// is gone.
async fn retire_lent(services: &Services, lent: Lent, in_flight: bool) {
    let (stream, lease, slot) = lent.into_parts();
    let config = &services.config.upstream;
    let target = (config.host.as_str(), config.port, lease.cancel_key());
    retire(stream, target, in_flight, &services.upstream_tls).await;
    drop(slot);
}

/// A backend for the client's next transaction: the one it used last if
/// that is idle, else another (which [`Relay::bind_claims`] resets).
async fn take_backend(tenant: &Tenant, services: &Services) -> Result<Lent, Refusal> {
    let config = &services.config;
    let pool = pool_of(services)?;
    let role = config.role(&tenant.role).ok_or_else(|| {
        Refusal::database_unavailable("the client's role is no longer configured")
    })?;
    let waiting = tenant.meters.waiting();
    let started = Instant::now();
    let role_db = (role, tenant.database.as_deref());
    let lent = pool.lend(
        &config.upstream,
        &services.upstream_tls,
        role_db,
        Some(tenant.id),
    );
    let lent = lent.await?;
    drop(waiting);
    let own = lent.lease.tenancy.is_some_and(|t| t.tenant == tenant.id);
    tenant.meters.leased(own, started.elapsed());
    Ok(lent)
}

/// `DEALLOCATE ALL`: SQL-level prepared statements do not outlive their
/// transaction (and a `DEALLOCATE` may have closed one of the proxy's).
async fn deallocate_all(stream: &mut UpstreamStream, from_server: &mut Answer) -> io::Result<()> {
    let mut out = BytesMut::new();
    messages::query(&mut out, "DEALLOCATE ALL")?;
    write(stream, &out).await?;
    read_rows(stream, from_server).await.map(drop)
}

/// What the client's `SET`s left: every setting whose value comes from the
/// session (its envelope aside), and its role.
const SETTINGS_QUERY: &str = "select name, setting from pg_catalog.pg_settings \
     where source = 'session' and name <> 'rlsgate.session' \
     union all select 'role', pg_catalog.current_setting('role') \
     where pg_catalog.current_setting('role') <> 'none'";

/// The client's settings as the backend has them now, in the order they
/// are applied: `client_encoding` first (the values after it are in that
/// encoding), the role last (the others may need the login role's rights).
async fn read_settings(
    stream: &mut UpstreamStream,
    from_server: &mut Answer,
) -> io::Result<Settings> {
    let mut out = BytesMut::new();
    messages::query(&mut out, SETTINGS_QUERY)?;
    write(stream, &out).await?;
    let mut settings = read_rows(stream, from_server).await?;
    settings.sort_by_key(|(name, _)| match name.as_str() {
        "client_encoding" => 0,
        "role" => 2,
        _ => 1,
    });
    Ok(settings)
}

/// The answer to one of the proxy's simple queries: its rows' first two
/// columns, as text. An error fails it.
async fn read_rows(
    stream: &mut UpstreamStream,
    from_server: &mut Answer,
) -> io::Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    let mut failed = None;
    loop {
        let frame = from_server.next(stream).await?;
        match frame.kind() {
            b'D' => rows.extend(two_columns(frame.body())),
            b'E' => {
                failed = Some(crate::protocol::server_error::ServerError::from_frame(
                    frame,
                ))
            }
            b'Z' => break,
            _ => {}
        }
    }
    match failed {
        Some(error) => Err(io::Error::other(format!(
            "{} {}",
            error.code, error.message
        ))),
        None => Ok(rows),
    }
}

/// The first two columns of a DataRow, as text, both non-null.
fn two_columns(body: &[u8]) -> Option<(String, String)> {
    let mut at = 2;
    let mut column = || {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        let value = body.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        Some(String::from_utf8_lossy(value).into_owned())
    };
    Some((column()?, column()?))
}

fn client_failed(e: io::Error) -> Ending {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Ending::ClientClosed
    } else {
        Ending::Failed(Side::Client, e)
    }
}

fn upstream_failed(e: io::Error) -> Ending {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Ending::UpstreamClosed
    } else {
        Ending::Failed(Side::Upstream, e)
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(100 * 365 * 24 * 3600)
}
