//! The io_uring relay path: a worker thread's sockets read and written
//! through one io_uring of its own instead of a system call each.
//!
//! The relay stays readiness-based code over `AsyncRead`/`AsyncWrite`
//! (framing, expiry, cancel and hand-over are the same code on both
//! paths); [`RingSocket`] gives it those traits over completions. A read
//! keeps one receive in flight into the socket's own buffer; a write copies
//! into the socket's send buffer, queues one send and returns, and a flush
//! waits for the send to complete. The queued operations of every session
//! on the thread go to the kernel together, in one `io_uring_enter` per
//! turn of the thread's loop ([`drive`]), and their completions come back
//! together: under load a transaction costs a fraction of a system call
//! instead of a `recvfrom` and a `sendto` each way.
//!
//! Buffers and descriptors belong to the ring, not to the handle: an
//! operation the kernel still holds keeps them alive after a session drops
//! its socket (it is cancelled, and the descriptor closed once nothing is
//! in flight), so no buffer is freed, and no descriptor number reused,
//! under the kernel's feet.
//!
//! A ring lives on a worker thread (see [`workers`](crate::session::workers))
//! and its sockets never leave it: a handle used on another thread is an
//! error, not undefined behaviour.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Operations queued at once before the ring is entered regardless.
const ENTRIES: u32 = 1024;
/// Each socket's receive buffer and send buffer.
const BUFFER: usize = 16 * 1024;

/// What an operation's `user_data` says, below its socket's slot.
const RECV: u64 = 0;
const SEND: u64 = 1;
const CANCEL: u64 = 2;
const OP_BITS: u32 = 2;

static NEXT_RING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// A thread's io_uring and the sockets it serves.
struct Ring {
    /// Tells this ring from those of other threads.
    id: u64,
    uring: IoUring,
    /// Sockets by slot; a slot is free again once its socket is dropped and
    /// nothing of it is in flight.
    sockets: Vec<Option<Socket>>,
    free: Vec<usize>,
    /// Entries pushed since the ring was last entered.
    queued: usize,
    /// The [`drive`] loop, woken when entries are queued.
    driver: Option<Waker>,
}

/// A socket served by the ring, and its buffers.
struct Socket {
    fd: OwnedFd,
    unix: bool,
    recv: Op,
    received: Box<[u8]>,
    /// Received bytes not read yet: `received[read..filled]`.
    read: usize,
    filled: usize,
    send: Op,
    /// Allocated at the first write: an idle session's sockets have sent
    /// nothing since they came onto the ring.
    sending: Box<[u8]>,
    /// The send in flight carries `sending[sent..to_send]`.
    sent: usize,
    to_send: usize,
    /// Cancellations in flight.
    cancels: u8,
    /// The handle is gone: the slot is freed once nothing is in flight.
    dropped: bool,
}

/// One kind of operation of a socket: at most one in flight.
#[derive(Default)]
struct Op {
    state: OpState,
    waker: Option<Waker>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum OpState {
    #[default]
    Idle,
    InFlight,
    /// The kernel's result: a byte count, or a negated errno.
    Done(i32),
}

impl Socket {
    fn busy(&self) -> bool {
        self.recv.state == OpState::InFlight
            || self.send.state == OpState::InFlight
            || self.cancels > 0
    }
}

/// Whether this kernel lets this process use io_uring for sockets: a ring
/// can be set up (seccomp profiles, `kernel.io_uring_disabled` and old
/// kernels forbid it) and it knows the operations the relay uses.
pub(crate) fn available() -> Result<(), String> {
    let uring = new_ring(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = Probe::new();
    uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("probing io_uring failed: {e}"))?;
    for (code, name) in [
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("this kernel's io_uring lacks {name}"));
        }
    }
    Ok(())
}

/// Sets up the calling thread's ring. Call it on a worker thread before its
/// runtime runs [`drive`].
pub(crate) fn install() -> io::Result<()> {
    let uring = new_ring(ENTRIES)?;
    RING.with(|ring| {
        *ring.borrow_mut() = Some(Ring {
            id: NEXT_RING.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            uring,
            sockets: Vec::new(),
            free: Vec::new(),
            queued: 0,
            driver: None,
        });
    });
    Ok(())
}

/// A ring with cooperative task running: the kernel does not interrupt the
/// thread while it runs to hand a completion over (an interrupt per
/// completion cost more CPU than relaying through epoll at 8 clients); the
/// completion is handed over at the thread's next system call, which this
/// loop makes soon, whatever it does. A thread asleep in `epoll_wait` is
/// still woken for it: the kernel's notice (`TWA_SIGNAL_NO_IPI`) skips only
/// the interrupt of a running thread, and wakes a sleeping one
/// (`__set_notify_signal`), whose `epoll_wait` returns early, hands the
/// completion over on its way out and finds the ring's descriptor ready on
/// the next call. With the task-run flag the ring says when completions wait
/// for an enter ([`Ring::turn`]). Kernels before 5.19 refuse both flags
/// and get the default ring.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
}

/// Takes the calling thread's ring down (it failed): its sockets' handles
/// fail from then on, and new sessions relay through the reactor.
pub(crate) fn uninstall() {
    let ring = RING.with(|ring| ring.borrow_mut().take());
    drop(ring);
}

impl Drop for Ring {
    /// Buffers the kernel may still write into, or send from, are leaked
    /// rather than freed: the ring's end cancels its operations, but not
    /// before this returns. Descriptors close: an operation in flight holds
    /// its own reference to its socket, and nothing is submitted any more.
    fn drop(&mut self) {
        for mut socket in self.sockets.drain(..).flatten() {
            if socket.busy() {
                std::mem::forget(std::mem::take(&mut socket.received));
                std::mem::forget(std::mem::take(&mut socket.sending));
            }
        }
    }
}

/// Whether the calling thread has a ring: its sessions relay through it.
pub(crate) fn installed() -> bool {
    RING.with(|ring| ring.borrow().is_some())
}

/// Runs the calling thread's ring for as long as the thread's runtime runs:
/// enters it when entries were queued, and hands completions to the
/// sockets that wait for them. Completions that arrive while the thread
/// sleeps wake it through the ring's descriptor, registered with the
/// runtime's reactor.
pub(crate) async fn drive() -> io::Result<()> {
    // A descriptor of the ring's own, for the reactor to hold.
    let fd = RING.with(|ring| {
        let ring = ring.borrow();
        let ring = ring
            .as_ref()
            .ok_or_else(|| io::Error::other("no io_uring on this thread"))?;
        // SAFETY: the ring's descriptor is open while the ring is.
        unsafe { BorrowedFd::borrow_raw(ring.uring.as_raw_fd()) }.try_clone_to_owned()
    })?;
    // SAFETY: an owned descriptor stays open, and the same, while it is
    // held.
    let completions = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(io::Error::from)?;
    loop {
        poll_fn(|cx| {
            let queued = with_ring(|ring| {
                ring.driver = Some(cx.waker().clone());
                ring.queued > 0
            });
            if queued {
                return Poll::Ready(());
            }
            match completions.poll_read_ready(cx) {
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    Poll::Ready(())
                }
                Poll::Ready(Err(_)) => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        with_ring(Ring::turn)?;
    }
}

fn with_ring<T>(f: impl FnOnce(&mut Ring) -> T) -> T {
    RING.with(|ring| {
        let mut ring = ring.borrow_mut();
        let ring = ring
            .as_mut()
            .expect("only threads with a ring hold its sockets");
        f(ring)
    })
}

impl Ring {
    /// Enters the ring for what was queued, then hands out what completed.
    fn turn(&mut self) -> io::Result<()> {
        // Completions held back by the kernel (an overflow), or waiting for
        // this thread to run them (cooperative task running), need an enter.
        let sq = self.uring.submission();
        let held = sq.cq_overflow() || sq.taskrun();
        drop(sq);
        if self.queued > 0 || held {
            self.enter()?;
        }
        let (sockets, free) = (&mut self.sockets, &mut self.free);
        for cqe in self.uring.completion() {
            complete(sockets, free, cqe.user_data(), cqe.result());
        }
        Ok(())
    }

    fn enter(&mut self) -> io::Result<()> {
        match self.uring.submit() {
            Ok(_) => {
                self.queued = self.uring.submission().len();
                Ok(())
            }
            // The completion queue is full: drained by the caller, and the
            // rest goes in on the next turn.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Queues `entry`; the ring is entered on the driver's next turn, or
    /// now when the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: what the entry points at is a socket's buffer, which
            // the ring frees only once no operation of the socket is in
            // flight (see `complete`), and its descriptor, closed only then.
            let pushed = unsafe { self.uring.submission().push(entry) };
            if pushed.is_ok() {
                break;
            }
            self.enter()?;
            if self.uring.submission().is_full() {
                return Err(io::Error::other("the io_uring queue stays full"));
            }
        }
        self.queued += 1;
        if let Some(driver) = self.driver.take() {
            driver.wake();
        }
        Ok(())
    }

    fn socket(&mut self, slot: usize) -> &mut Socket {
        self.sockets[slot]
            .as_mut()
            .expect("a handle's slot holds its socket until the handle is dropped")
    }

    fn start_recv(&mut self, slot: usize) -> io::Result<()> {
        let socket = self.socket(slot);
        let entry = opcode::Recv::new(
            types::Fd(socket.fd.as_raw_fd()),
            socket.received.as_mut_ptr(),
            socket.received.len() as u32,
        )
        .build()
        .user_data(((slot as u64) << OP_BITS) | RECV);
        self.push(&entry)?;
        self.socket(slot).recv.state = OpState::InFlight;
        Ok(())
    }

    fn start_send(&mut self, slot: usize) -> io::Result<()> {
        let socket = self.socket(slot);
        let pending = &socket.sending[socket.sent..socket.to_send];
        let entry = opcode::Send::new(
            types::Fd(socket.fd.as_raw_fd()),
            pending.as_ptr(),
            pending.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(((slot as u64) << OP_BITS) | SEND);
        self.push(&entry)?;
        self.socket(slot).send.state = OpState::InFlight;
        Ok(())
    }

    /// Cancels the socket's operation `op` (RECV or SEND).
    fn cancel(&mut self, slot: usize, op: u64) -> io::Result<()> {
        let target = ((slot as u64) << OP_BITS) | op;
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(((slot as u64) << OP_BITS) | CANCEL);
        self.push(&entry)?;
        self.socket(slot).cancels += 1;
        Ok(())
    }
}

/// Hands an operation's result to its socket, and frees the socket's slot
/// when its handle is gone and nothing of it is in flight any more.
fn complete(sockets: &mut [Option<Socket>], free: &mut Vec<usize>, user_data: u64, result: i32) {
    let slot = (user_data >> OP_BITS) as usize;
    let Some(Some(socket)) = sockets.get_mut(slot) else {
        return;
    };
    let op = match user_data & ((1 << OP_BITS) - 1) {
        RECV => {
            socket.recv.state = OpState::Done(result);
            &mut socket.recv
        }
        SEND => {
            socket.send.state = OpState::Done(result);
            &mut socket.send
        }
        // A cancellation's end is awaited by whoever waits on the receive
        // (see `RingSocket::release`).
        _ => {
            socket.cancels -= 1;
            &mut socket.recv
        }
    };
    if let Some(waker) = op.waker.take() {
        waker.wake();
    }
    if socket.dropped && !socket.busy() {
        sockets[slot] = None;
        free.push(slot);
    }
}

/// A socket read and written through the thread's ring.
pub(crate) struct RingSocket {
    slot: usize,
    /// The ring's [`Ring::id`]: a handle works on its ring's thread only.
    ring: u64,
    /// Cleared once the socket is handed back ([`RingSocket::release`]).
    live: bool,
}

impl RingSocket {
    /// Takes a connected, non-blocking socket (a Unix one when `unix`)
    /// into the calling thread's ring.
    pub(crate) fn adopt(fd: OwnedFd, unix: bool) -> io::Result<RingSocket> {
        let socket = Socket {
            fd,
            unix,
            recv: Op::default(),
            received: vec![0; BUFFER].into_boxed_slice(),
            read: 0,
            filled: 0,
            send: Op::default(),
            sending: Box::default(),
            sent: 0,
            to_send: 0,
            cancels: 0,
            dropped: false,
        };
        RING.with(|ring| {
            let mut ring = ring.borrow_mut();
            let ring = ring
                .as_mut()
                .ok_or_else(|| io::Error::other("no io_uring on this thread"))?;
            let slot = match ring.free.pop() {
                Some(slot) => {
                    ring.sockets[slot] = Some(socket);
                    slot
                }
                None => {
                    ring.sockets.push(Some(socket));
                    ring.sockets.len() - 1
                }
            };
            Ok(RingSocket {
                slot,
                ring: ring.id,
                live: true,
            })
        })
    }

    /// Runs `f` on the ring and this handle's slot.
    fn with<T>(&self, f: impl FnOnce(&mut Ring, usize) -> io::Result<T>) -> io::Result<T> {
        RING.with(|ring| match ring.borrow_mut().as_mut() {
            Some(ring) if ring.id == self.ring && self.live => f(ring, self.slot),
            _ => Err(io::Error::other(
                "an io_uring socket was used off its thread",
            )),
        })
    }

    /// Poll-shaped [`RingSocket::with`].
    fn poll_with<T>(
        &self,
        f: impl FnOnce(&mut Ring, usize) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.with(|ring, slot| Ok(f(ring, slot))) {
            Ok(polled) => polled,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// The socket's local address (the handle keeps the descriptor).
    pub(crate) fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.with(|ring, slot| {
            let fd = std::os::fd::AsFd::as_fd(&ring.socket(slot).fd);
            socket2::SockRef::from(&fd)
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an IP socket"))
        })
    }

    /// Hands the socket back once its send is done and its receive
    /// cancelled: its descriptor, whether it is a Unix socket, and whether
    /// it is clean. It is not when bytes arrived that no reader took (the
    /// receive completed before its cancellation, or was read in part, or
    /// found the end of the stream): they cannot be put back, so the
    /// connection must not serve anyone else.
    pub(crate) async fn release(mut self) -> io::Result<(OwnedFd, bool, bool)> {
        poll_fn(|cx| Pin::new(&mut self).poll_flush(cx)).await?;
        self.with(|ring, slot| match ring.socket(slot).recv.state {
            OpState::InFlight => ring.cancel(slot, RECV),
            _ => Ok(()),
        })?;
        poll_fn(|cx| {
            self.poll_with(|ring, slot| {
                let socket = ring.socket(slot);
                if socket.busy() {
                    socket.recv.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(Ok(()))
            })
        })
        .await?;
        let socket = self.with(|ring, slot| {
            ring.free.push(slot);
            Ok(ring.sockets[slot]
                .take()
                .expect("the socket is this handle's"))
        })?;
        self.live = false;
        let unread = socket.read < socket.filled;
        let late = matches!(socket.recv.state, OpState::Done(n) if n != -libc::ECANCELED);
        Ok((socket.fd, socket.unix, !unread && !late))
    }
}

impl Drop for RingSocket {
    /// What is in flight is cancelled; the descriptor closes, and the
    /// buffers go, once the kernel holds nothing of them. Off its thread a
    /// handle leaves its socket to the ring (it cannot be reached).
    fn drop(&mut self) {
        let _ = self.with(|ring, slot| {
            // A send stuck on a peer that reads nothing would hold the
            // descriptor open, and the peer would never see it close.
            if ring.socket(slot).recv.state == OpState::InFlight {
                ring.cancel(slot, RECV)?;
            }
            if ring.socket(slot).send.state == OpState::InFlight {
                ring.cancel(slot, SEND)?;
            }
            let socket = ring.socket(slot);
            socket.dropped = true;
            socket.recv.waker = None;
            socket.send.waker = None;
            if !socket.busy() {
                ring.sockets[slot] = None;
                ring.free.push(slot);
            }
            Ok(())
        });
    }
}

impl AsyncRead for RingSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        self.poll_with(|ring, slot| {
            let socket = ring.socket(slot);
            if socket.read < socket.filled {
                let n = buf.remaining().min(socket.filled - socket.read);
                buf.put_slice(&socket.received[socket.read..socket.read + n]);
                socket.read += n;
                return Poll::Ready(Ok(()));
            }
            match socket.recv.state {
                OpState::Done(result) => {
                    socket.recv.state = OpState::Idle;
                    if result < 0 {
                        return Poll::Ready(Err(io::Error::from_raw_os_error(-result)));
                    }
                    let n = (result as usize).min(buf.remaining());
                    buf.put_slice(&socket.received[..n]);
                    socket.read = n;
                    socket.filled = result as usize;
                    Poll::Ready(Ok(()))
                }
                OpState::InFlight => {
                    socket.recv.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                OpState::Idle => {
                    socket.recv.waker = Some(cx.waker().clone());
                    ring.start_recv(slot)?;
                    Poll::Pending
                }
            }
        })
    }
}

/// Where a socket's send stands.
enum Sending {
    Free,
    Busy,
}

impl Ring {
    /// Settles the socket's last send, sending on the rest of a short one;
    /// a failed send is reported to the next write or flush.
    fn settle_send(&mut self, slot: usize, cx: &mut Context<'_>) -> io::Result<Sending> {
        let socket = self.socket(slot);
        let result = match socket.send.state {
            OpState::Idle => return Ok(Sending::Free),
            OpState::InFlight => {
                socket.send.waker = Some(cx.waker().clone());
                return Ok(Sending::Busy);
            }
            OpState::Done(result) => result,
        };
        socket.send.state = OpState::Idle;
        if result < 0 {
            return Err(io::Error::from_raw_os_error(-result));
        }
        if result == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        socket.sent += result as usize;
        if socket.sent >= socket.to_send {
            return Ok(Sending::Free);
        }
        socket.send.waker = Some(cx.waker().clone());
        self.start_send(slot)?;
        Ok(Sending::Busy)
    }
}

impl AsyncWrite for RingSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        if bytes.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_with(|ring, slot| match ring.settle_send(slot, cx)? {
            Sending::Busy => Poll::Pending,
            Sending::Free => {
                let socket = ring.socket(slot);
                if socket.sending.is_empty() {
                    socket.sending = vec![0; BUFFER].into_boxed_slice();
                }
                let n = bytes.len().min(socket.sending.len());
                socket.sending[..n].copy_from_slice(&bytes[..n]);
                (socket.sent, socket.to_send) = (0, n);
                ring.start_send(slot)?;
                Poll::Ready(Ok(n))
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_with(|ring, slot| match ring.settle_send(slot, cx)? {
            Sending::Busy => Poll::Pending,
            Sending::Free => Poll::Ready(Ok(())),
        })
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        let fd = self.with(|ring, slot| Ok(ring.socket(slot).fd.as_raw_fd()))?;
        // SAFETY: `fd` is the socket's, open while the ring holds it.
        let shut = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        Poll::Ready(if shut == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}

#[cfg(test)]
mod tests;
