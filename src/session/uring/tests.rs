//! Tests of the io_uring path, over real sockets and this kernel's io_uring.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::session::stream::Transport;

const WAIT: Duration = Duration::from_secs(10);

/// Runs `test` on a thread of its own with a ring, as a worker has.
fn on_a_ring<F: Future + 'static>(test: impl FnOnce() -> F + Send + 'static) -> F::Output
where
    F::Output: Send + 'static,
{
    available().unwrap_or_else(|why| {
        panic!(
            "io_uring is needed here: {why} (allow it with `sysctl kernel.io_uring_disabled=0` \
             and a seccomp profile that permits io_uring_setup)"
        )
    });
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        install().unwrap();
        let out = runtime.block_on(async {
            tokio::select! {
                out = test() => out,
                stopped = drive() => panic!("the ring stopped: {stopped:?}"),
            }
        });
        uninstall();
        out
    })
    .join()
    .unwrap()
}

/// A connected pair: ours on the ring, the peer on the reactor.
async fn pair() -> (RingSocket, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (ours, _) = listener.accept().await.unwrap();
    let ours = RingSocket::adopt(ours.into_std().unwrap().into(), false).unwrap();
    (ours, peer)
}

/// Starts a receive that nothing answers yet, and leaves it in flight.
async fn start_receiving(socket: &mut RingSocket) {
    let waited = tokio::time::timeout(Duration::from_millis(50), socket.read(&mut [0; 1])).await;
    assert!(
        waited.is_err(),
        "nothing was sent, so the receive is in flight"
    );
}

/// Waits until the socket's receive is no longer in flight.
async fn until_received(socket: &RingSocket) {
    tokio::time::timeout(WAIT, async {
        while socket
            .with(|ring, slot| Ok(ring.socket(slot).recv.state == OpState::InFlight))
            .unwrap()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the receive completes");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_megabyte_each_way_at_once_arrives_whole_and_in_order() {
    on_a_ring(|| async {
        let (ours, peer) = pair().await;
        let (to_us, to_peer) = (pattern(1 << 20, 1), pattern(1 << 20, 7));
        let (mut our_read, mut our_write) = tokio::io::split(ours);
        let (mut peer_read, mut peer_write) = peer.into_split();
        let sent = to_peer.clone();
        let ours_sends = async move {
            our_write.write_all(&sent).await.unwrap();
            our_write.flush().await.unwrap();
            our_write
        };
        let peer_sends = peer_write.write_all(&to_us);
        let mut got_by_us = vec![0; to_us.len()];
        let mut got_by_peer = vec![0; to_peer.len()];
        let (_, sent, received, _) = tokio::time::timeout(WAIT, async {
            tokio::join!(
                peer_sends,
                ours_sends,
                our_read.read_exact(&mut got_by_us),
                peer_read.read_exact(&mut got_by_peer),
            )
        })
        .await
        .expect("both directions finish");
        received.unwrap();
        assert!(got_by_us == to_us, "what the peer sent arrived whole");
        assert!(got_by_peer == to_peer, "what we sent arrived whole");
        drop(sent);
    });
}

#[test]
fn a_read_shorter_than_what_arrived_leaves_the_rest_for_the_next_and_the_end_reads_as_zero() {
    on_a_ring(|| async {
        let (mut ours, mut peer) = pair().await;
        peer.write_all(b"hello world").await.unwrap();
        drop(peer);
        let mut five = [0; 5];
        ours.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, ours.read_to_end(&mut rest))
            .await
            .expect("the end of the stream is read")
            .unwrap();
        assert_eq!(rest, b" world");
    });
}

#[test]
fn a_socket_dropped_while_receiving_is_closed_and_its_slot_freed() {
    on_a_ring(|| async {
        let (mut ours, mut peer) = pair().await;
        start_receiving(&mut ours).await;
        let slot = ours.slot;
        drop(ours);
        let read = tokio::time::timeout(WAIT, peer.read(&mut [0; 1]))
            .await
            .expect("the peer sees the socket close");
        assert_eq!(read.unwrap(), 0);
        let freed = with_ring(|ring| ring.sockets[slot].is_none() && ring.free.contains(&slot));
        assert!(freed, "the slot is free once the cancelled receive ended");
    });
}

#[test]
fn a_released_socket_that_lost_nothing_is_clean_and_serves_on_the_reactor() {
    on_a_ring(|| async {
        let (mut ours, mut peer) = pair().await;
        start_receiving(&mut ours).await;
        ours.write_all(b"sent on the ring").await.unwrap();
        let transport = Transport::Ring(ours);
        let (mut transport, clean) = transport.off_ring().await.unwrap();
        assert!(clean, "its receive was cancelled before anything arrived");
        assert!(matches!(transport, Transport::Tcp(_)));
        let mut got = [0; 16];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"sent on the ring");
        peer.write_all(b"after").await.unwrap();
        let mut got = [0; 5];
        tokio::time::timeout(WAIT, transport.read_exact(&mut got))
            .await
            .expect("the reactor wakes the socket")
            .unwrap();
        assert_eq!(&got, b"after");
    });
}

#[test]
fn a_released_socket_that_received_what_nobody_read_is_not_clean() {
    on_a_ring(|| async {
        let (mut ours, mut peer) = pair().await;
        start_receiving(&mut ours).await;
        peer.write_all(b"late").await.unwrap();
        until_received(&ours).await;
        let (_, _, clean) = ours.release().await.unwrap();
        assert!(!clean, "the bytes the receive took cannot be put back");
    });
}

#[test]
fn a_unix_socket_goes_onto_the_ring_and_back() {
    on_a_ring(|| async {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let transport = Transport::Unix(ours).onto_ring().unwrap();
        let Transport::Ring(mut ours) = transport else {
            panic!("a thread with a ring takes the socket onto it");
        };
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let (transport, clean) = Transport::Ring(ours).off_ring().await.unwrap();
        assert!(clean);
        assert!(matches!(transport, Transport::Unix(_)));
    });
}

#[test]
fn a_socket_used_off_its_thread_fails_instead_of_reaching_another_ring() {
    let socket = on_a_ring(|| async {
        let (ours, peer) = pair().await;
        // The peer closes; the socket is left with the ring that ended.
        drop(peer);
        ours
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut socket = socket;
    let read = runtime.block_on(socket.read(&mut [0; 1]));
    assert_eq!(
        read.unwrap_err().to_string(),
        "an io_uring socket was used off its thread"
    );
}

#[test]
fn a_socket_dropped_while_its_send_waits_on_a_peer_that_reads_nothing_is_closed() {
    on_a_ring(|| async {
        let (mut ours, _peer) = pair().await;
        // Fill both socket buffers: a write then waits for the peer.
        let chunk = vec![7u8; BUFFER];
        loop {
            let wrote = tokio::time::timeout(Duration::from_millis(200), async {
                ours.write_all(&chunk).await.unwrap();
                ours.flush().await.unwrap();
            })
            .await;
            if wrote.is_err() {
                break;
            }
        }
        let slot = ours.slot;
        drop(ours);
        tokio::time::timeout(WAIT, async {
            while with_ring(|ring| ring.sockets[slot].is_some()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the stuck send is cancelled and the socket closed");
    });
}
