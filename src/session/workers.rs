//! Thread-per-core: sessions run on single-threaded runtimes, one per
//! worker thread, each session on one thread from its handover to its end.
//!
//! On tokio's multi-thread runtime a session's two directions, its timers
//! and its sockets' readiness are spread over threads that wake each other
//! (futex calls) several times per transaction; on a thread of its own a
//! session costs the same system calls as pgbouncer's single loop. The
//! listener accepts on the first worker ([`Workers::accept_on_first`]) and
//! hands each connection to the worker with the fewest sessions: one it
//! keeps starts at once, and one for another worker moves to that worker's
//! reactor (two `epoll_ctl` calls per connection, none per message).
//!
//! What the sessions share (token cache, keys, limits, metrics, pool) is
//! already shared across threads. The exception is a socket: it is
//! registered with the reactor of the runtime that opened it, so a pooled
//! upstream connection is kept for sessions of the worker that opened it
//! ([`home`]), and one another worker takes moves to that worker's reactor
//! (`Transport::rehome`).

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::config::IoUring;

/// Log lines name the subsystem, not the file: operators filter on it
/// (`RUST_LOG=rlsgate::listener=debug`), so it outlives a move of the code.
const LOG_TARGET: &str = "rlsgate::listener";

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static HOME: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker the calling thread is, or `None` off the workers (the main
/// runtime, which serves HTTP and, with `workers = 0`, every session).
pub(crate) fn home() -> Option<usize> {
    HOME.with(Cell::get)
}

/// The worker threads; dropping this stops them (sessions still running on
/// them end with their runtime).
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Sessions on this worker now.
    sessions: Arc<AtomicUsize>,
    /// Dropped to stop the worker.
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `count` worker threads; none with 0, and then sessions run
    /// on the caller's runtime. `io_uring` says whether they relay through
    /// an io_uring each (see [`uring`](crate::session::uring)); which way
    /// they relay is logged.
    pub(crate) fn start(count: usize, io_uring: IoUring) -> anyhow::Result<Workers> {
        let ring = relay_through_io_uring(count, io_uring)?;
        let workers = (0..count)
            .map(|index| start_worker(index, ring))
            .collect::<anyhow::Result<_>>()?;
        Ok(Workers { workers })
    }

    /// Runs `session` on the worker with the fewest sessions, or on the
    /// current runtime when there are no workers. `session` gets the socket
    /// registered with the reactor of the runtime it runs on.
    pub(crate) fn spawn<F, Fut>(&self, tcp: tokio::net::TcpStream, session: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some((index, worker)) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.sessions.load(Ordering::Relaxed))
        else {
            tokio::spawn(Box::pin(session(tcp)));
            return;
        };
        let counted = Counted::new(&worker.sessions);
        if home() == Some(index) {
            // Accepted on this worker (see `accept_on_first`): the socket is
            // registered with its reactor already.
            tokio::spawn(Box::pin(async move {
                let _counted = counted;
                session(tcp).await;
            }));
            return;
        }
        let std_tcp = match tcp.into_std() {
            Ok(std_tcp) => std_tcp,
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, error = %e, "cannot hand a connection over");
                return;
            }
        };
        // Boxed: a session's future is some 16 KiB, which the runtime would
        // otherwise copy each time it moves it into and within the task.
        worker.handle.spawn(Box::pin(async move {
            let _counted = counted;
            match tokio::net::TcpStream::from_std(std_tcp) {
                Ok(tcp) => session(tcp).await,
                Err(e) => {
                    tracing::warn!(target: LOG_TARGET, error = %e, "cannot take a connection over");
                }
            }
        }));
    }

    /// Runs `accept` on the first worker, with `listener` registered with
    /// that worker's reactor, or on the current runtime when there are no
    /// workers. A connection it hands to the worker it runs on ([`spawn`])
    /// starts there without waking another thread, and no thread wakes only
    /// to accept: with one worker a connection never crosses threads.
    ///
    /// [`spawn`]: Workers::spawn
    pub(crate) fn accept_on_first<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        accept: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let run = async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => accept(listener).await,
                Err(e) => {
                    tracing::error!(target: LOG_TARGET, error = %e, "cannot accept on a worker");
                }
            }
        };
        match self.workers.first() {
            Some(worker) => worker.handle.spawn(run),
            None => tokio::spawn(run),
        }
    }
}

/// Whether the workers relay through io_uring, as `[listen] io_uring` asks
/// and the kernel allows.
fn relay_through_io_uring(workers: usize, setting: IoUring) -> anyhow::Result<bool> {
    if setting == IoUring::Off {
        tracing::info!(target: LOG_TARGET, "sessions relay through epoll ([listen] io_uring = \"off\")");
        return Ok(false);
    }
    if workers == 0 {
        tracing::info!(target: LOG_TARGET, "sessions relay through epoll: io_uring needs worker threads");
        return Ok(false);
    }
    match io_uring_available() {
        Ok(()) => {
            tracing::info!(target: LOG_TARGET, "sessions relay through io_uring");
            Ok(true)
        }
        Err(why) if setting == IoUring::On => {
            anyhow::bail!("[listen] io_uring = \"on\", but {why}")
        }
        Err(why) => {
            tracing::info!(target: LOG_TARGET, "sessions relay through epoll: {why}");
            Ok(false)
        }
    }
}

#[cfg(target_os = "linux")]
fn io_uring_available() -> Result<(), String> {
    crate::session::uring::available()
}

#[cfg(not(target_os = "linux"))]
fn io_uring_available() -> Result<(), String> {
    Err("io_uring is Linux's".to_owned())
}

fn start_worker(index: usize, ring: bool) -> anyhow::Result<Worker> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a worker's runtime")?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("rlsgate-worker-{index}"))
        .spawn(move || {
            HOME.with(|home| home.set(Some(index)));
            runtime.block_on(async {
                #[cfg(target_os = "linux")]
                if ring {
                    return drive_ring(stopped).await;
                }
                let _ = (ring, stopped.await);
            });
        })
        .context("cannot start a worker thread")?;
    Ok(Worker {
        handle,
        sessions: Arc::new(AtomicUsize::new(0)),
        _stop: stop,
    })
}

/// Runs the worker's io_uring until the worker stops. Without it (it could
/// not be set up, or failed) sessions relay through epoll.
#[cfg(target_os = "linux")]
async fn drive_ring(stopped: oneshot::Receiver<()>) {
    use crate::session::uring;
    if let Err(e) = uring::install() {
        tracing::warn!(target: LOG_TARGET, error = %e, "cannot set up io_uring; this worker relays through epoll");
        let _ = stopped.await;
        return;
    }
    tokio::select! {
        _ = stopped => {}
        driven = uring::drive() => {
            if let Err(e) = driven {
                tracing::error!(target: LOG_TARGET, error = %e, "io_uring failed; this worker's sessions on it end, and new ones relay through epoll");
            }
            uring::uninstall();
        }
    }
}

/// Counts a session on its worker while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(sessions: &Arc<AtomicUsize>) -> Counted {
        sessions.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(sessions))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_run_on_them() {
        let workers = Workers::start(2, IoUring::Auto).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(address).await.unwrap());
            let (tcp, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            workers.spawn(tcp, move |mut tcp| async move {
                tx.send(home()).unwrap();
                // Holds its worker until its client leaves.
                let _ = tcp.read(&mut [0u8; 1]).await;
            });
        }
        let mut homes = Vec::new();
        for _ in 0..4 {
            homes.push(rx.recv().await.unwrap());
        }
        homes.sort();
        assert_eq!(homes, [Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(home(), None, "the caller is no worker");
    }

    #[tokio::test]
    async fn the_first_worker_accepts_and_starts_there_what_it_hands_itself() {
        let workers = Arc::new(Workers::start(2, IoUring::Off).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let handing = Arc::clone(&workers);
        let accepting = workers.accept_on_first(listener, move |listener| async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tx.send(("accepted on", home())).unwrap();
                let tx = tx.clone();
                handing.spawn(tcp, move |mut tcp| async move {
                    tx.send(("runs on", home())).unwrap();
                    // Holds its worker until its client leaves.
                    let _ = tcp.read(&mut [0u8; 1]).await;
                });
            }
        });
        let _first = tokio::net::TcpStream::connect(address).await.unwrap();
        assert_eq!(rx.recv().await, Some(("accepted on", Some(0))));
        assert_eq!(
            rx.recv().await,
            Some(("runs on", Some(0))),
            "no sessions yet"
        );
        let _second = tokio::net::TcpStream::connect(address).await.unwrap();
        assert_eq!(rx.recv().await, Some(("accepted on", Some(0))));
        assert_eq!(
            rx.recv().await,
            Some(("runs on", Some(1))),
            "the fewest sessions"
        );
        accepting.abort();
    }

    #[tokio::test]
    async fn without_workers_a_session_runs_on_the_callers_runtime() {
        let workers = Workers::start(0, IoUring::Auto).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (tx, rx) = oneshot::channel();
        workers.spawn(tcp, move |_| async move {
            tx.send(home()).unwrap();
        });
        assert_eq!(rx.await.unwrap(), None);
    }
}
