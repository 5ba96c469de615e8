//! Replicas behind a load balancer (`[cluster]`): three proxies with peers
//! configured, in front of one PostgreSQL, some behind HAProxy in TCP mode.
//! A cancel request reaches the session whichever replica it is sent to; a
//! forged key cancels nothing; a draining replica turns unready and its
//! clients finish while new ones go to the others.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rlsgate::session::listener::RunningProxy;

use crate::cancel::{send_cancel, wait_until_active};
use crate::support::wire::RawSession;
use crate::support::{Harness, WAIT, http_get, poll_until};

const REPLICAS: usize = 3;

/// Three replicas of the harness's proxy on loopback, peer ids 0, 1 and 2,
/// each knowing the others (the list is given by a reload, once every
/// replica's port is known), with admin listeners and `extra` in `[listen]`.
async fn replicas(h: &Harness, listen_extra: &str) -> Vec<RunningProxy> {
    let toml = |id: usize, peers: &str| {
        format!(
            "[listen]\nadmin_address = \"127.0.0.1:0\"\n{listen_extra}\n[cluster]\npeer_id = {id}\n{peers}"
        )
    };
    let mut started = Vec::new();
    for id in 0..REPLICAS {
        let ip = std::net::Ipv4Addr::LOCALHOST.into();
        started.push(h.another_proxy(ip, &toml(id, "")).await);
    }
    let peers: String = started
        .iter()
        .enumerate()
        .map(|(id, p)| format!("[[cluster.peer]]\nid = {id}\naddress = \"{}\"\n", p.address))
        .collect();
    for (id, proxy) in started.iter().enumerate() {
        let config = crate::support::proxy_config_for(h, &toml(id, &peers));
        proxy.reload(config).expect("the peer list applies");
    }
    started
}

/// A session of `sub` on `proxy`, running `pg_sleep(30)`.
async fn sleeping(h: &Harness, port: u16, sub: &str) -> RawSession {
    let mut session = RawSession::connect(
        port,
        &[("user", "authenticated"), ("database", "app")],
        &h.token(sub),
    )
    .await
    .expect("log in");
    session.send_query("select pg_sleep(30)").await;
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_any_replica_reaches_the_session_on_another() {
    let h = Harness::start().await;
    let proxies = replicas(&h, "").await;
    let admin = h.admin().await;
    for (holder, on) in proxies.iter().enumerate() {
        for (receiver, to) in proxies.iter().enumerate() {
            if holder == receiver {
                continue;
            }
            let mut session = sleeping(&h, on.address.port(), "alice").await;
            wait_until_active(&admin, session.pid).await;
            send_cancel(to.address.port(), session.pid, session.secret).await;
            let error = session.read_result().await.expect_err("cancelled");
            assert_eq!(error.code, "57014", "held by {holder}, sent to {receiver}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_keys_and_unknown_peers_cancel_nothing() {
    let h = Harness::start().await;
    let proxies = replicas(&h, "").await;
    let admin = h.admin().await;
    let mut session = sleeping(&h, proxies[0].address.port(), "alice").await;
    wait_until_active(&admin, session.pid).await;
    let peer_bits = |id: u32| (id << 25) as i32;
    let random = session.secret & 0x01ff_ffff;
    // The right pid with another random part, as each peer's; then the
    // right random part under a peer id no replica has.
    for id in 0..REPLICAS as u32 {
        let forged = peer_bits(id) | (random ^ 0x5a5a5a);
        send_cancel(proxies[1].address.port(), session.pid, forged).await;
    }
    send_cancel(
        proxies[1].address.port(),
        session.pid,
        peer_bits(99) | random,
    )
    .await;
    let metrics = metrics_of(&proxies[1]).await;
    let count = |result: &str| {
        crate::support::metric(
            &metrics,
            "rlsgate_cancel_requests_total",
            &[("result", result)],
        )
    };
    assert_eq!(count("forwarded_to_peer"), Some(2.0), "{metrics}");
    assert_eq!(count("unknown_key"), Some(1.0), "{metrics}");
    assert_eq!(count("unknown_peer"), Some(1.0), "{metrics}");
    // Still sleeping: the right key ends it.
    send_cancel(proxies[2].address.port(), session.pid, session.secret).await;
    assert_eq!(session.read_result().await.unwrap_err().code, "57014");
}

async fn metrics_of(proxy: &RunningProxy) -> String {
    let admin = proxy.admin_address.expect("an admin listener");
    http_get(&format!("http://{admin}/metrics")).await.1
}

/// HAProxy in TCP mode, round robin over `proxies`, checking each one's
/// `/readyz`; stopped when dropped.
struct HaProxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    fn start(proxies: &[RunningProxy]) -> HaProxy {
        let binary = haproxy_binary();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let servers: String = proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let admin = p.admin_address.unwrap().port();
                format!(
                    "  server r{i} {} check port {admin} inter 200 fall 2 rise 1\n",
                    p.address
                )
            })
            .collect();
        let config = format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout check 5s\n  retries 3\n  option redispatch\nfrontend clients\n  bind 127.0.0.1:{port}\n  \
             default_backend replicas\nbackend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n{servers}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        HaProxy {
            child,
            port,
            _dir: dir,
        }
    }
}

impl HaProxy {
    /// Its port, once it accepts connections.
    async fn serving(&self) -> u16 {
        poll_until(WAIT, "haproxy serves", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
                .map(|_| self.port)
        })
        .await
    }
}

/// Debian's haproxy, installed once when missing (as root, like
/// `clients/install.sh` installs the drivers).
fn haproxy_binary() -> &'static str {
    static INSTALLED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let find = || {
        ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
    };
    let _one_at_a_time = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = find() {
        return found;
    }
    let installed = Command::new("sh")
        .args([
            "-c",
            "apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends haproxy",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run apt-get");
    find().unwrap_or_else(|| {
        panic!(
            "haproxy is not installed and apt-get could not install it (run as root: \
             apt-get install haproxy): {}",
            String::from_utf8_lossy(&installed.stderr)
        )
    })
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_through_haproxy_each_see_their_own_rows_and_their_cancels_land() {
    let h = Harness::start().await;
    // Behind a TCP load balancer every client has its address; and all
    // three hundred may be logging in at once.
    let proxies = replicas(&h, "max_startups = 1000\nmax_startups_per_address = 1000").await;
    let haproxy = HaProxy::start(&proxies);
    let port = haproxy.serving().await;
    let h = &h;
    let clients = (0..300).map(|i| async move {
        let sub = format!("user-{i}");
        let mut session = RawSession::connect(
            port,
            &[("user", "authenticated"), ("database", "app")],
            &h.token(&sub),
        )
        .await
        .expect("log in through haproxy");
        let title = format!("todo of {sub}");
        session
            .query(&format!("insert into todos (title) values ('{title}')"))
            .await
            .expect("insert");
        let seen = session
            .query("select user_id, title from todos")
            .await
            .unwrap();
        assert_eq!(seen, [vec![Some(sub.clone()), Some(title)]]);
        session.terminate().await;
    });
    futures_util::future::join_all(clients).await;

    // Round robin sends each cancel connection to the next replica, not
    // (for most) the one holding the session.
    let admin = h.admin().await;
    for sub in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut session = sleeping(h, port, sub).await;
        wait_until_active(&admin, session.pid).await;
        send_cancel(port, session.pid, session.secret).await;
        assert_eq!(
            session.read_result().await.unwrap_err().code,
            "57014",
            "{sub}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_turns_unready_finishes_its_sessions_and_haproxy_routes_around_it() {
    let h = Harness::start().await;
    let mut proxies = replicas(&h, "shutdown_delay = \"1s\"").await;
    let haproxy = HaProxy::start(&proxies);
    let port = haproxy.serving().await;
    // A session on the replica that will drain, mid-statement.
    let leaving = proxies.remove(0);
    let mut held = RawSession::connect(
        leaving.address.port(),
        &[("user", "authenticated"), ("database", "app")],
        &h.token("alice"),
    )
    .await
    .unwrap();
    held.send_query("select pg_sleep(1), 'finished'").await;
    let admin_url = format!("http://{}/readyz", leaving.admin_address.unwrap());
    let stopping = tokio::spawn(leaving.shutdown());
    poll_until(WAIT, "the draining replica is unready", || async {
        (http_get(&admin_url).await.0 == 503).then_some(())
    })
    .await;
    // New clients keep succeeding throughout, through the others.
    for i in 0..30 {
        let mut session = RawSession::connect(
            port,
            &[("user", "authenticated"), ("database", "app")],
            &h.token(&format!("new-{i}")),
        )
        .await
        .expect("a new client through haproxy");
        assert_eq!(session.query_value("select 1").await.as_deref(), Some("1"));
        session.terminate().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = held.read_result().await.expect("the held session finishes");
    assert_eq!(rows[0][1].as_deref(), Some("finished"));
    held.terminate().await;
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_cancel_request_from_an_address_that_is_no_peers_is_ignored() {
    use rlsgate::protocol::startup::PEER_CANCEL_REQUEST;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = Harness::start().await;
    let proxies = replicas(&h, "").await;
    let admin = h.admin().await;
    let mut session = sleeping(&h, proxies[0].address.port(), "alice").await;
    wait_until_active(&admin, session.pid).await;
    // The peers are on 127.0.0.1; this comes from 127.0.0.2.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind("127.0.0.2:0".parse().unwrap())
        .expect("bind 127.0.0.2");
    let mut stream = socket.connect(proxies[0].address).await.unwrap();
    let mut packet = Vec::new();
    packet.extend_from_slice(&16u32.to_be_bytes());
    packet.extend_from_slice(&PEER_CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&session.pid.to_be_bytes());
    packet.extend_from_slice(&session.secret.to_be_bytes());
    stream.write_all(&packet).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    let metrics = metrics_of(&proxies[0]).await;
    assert_eq!(
        crate::support::metric(
            &metrics,
            "rlsgate_cancel_requests_total",
            &[("result", "not_a_peer")]
        ),
        Some(1.0),
        "{metrics}"
    );
    // Still sleeping; a client's own request, sent to a peer, ends it.
    send_cancel(proxies[1].address.port(), session.pid, session.secret).await;
    assert_eq!(session.read_result().await.unwrap_err().code, "57014");
}
