//! The PostgreSQL the tests run against: one cluster shared by the whole test
//! process, started on first use, with a fresh database per test copied from
//! a template that already holds schema `auth` and the sample application;
//! or, for a test that changes the server itself or cluster-wide state
//! (roles, restarts, authentication), a cluster of its own.
//!
//! The shared cluster is stopped and its directory removed when the process
//! exits (`atexit`, which also runs after failing tests). A run killed before
//! that leaves a marker naming the cluster's directory; the next run stops
//! and removes what such markers name once their process is gone.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rlsgate::dev::postgres::TempPostgres;

use super::{SIGNING_KEY, TEST_SCHEMA};

/// The database every test's database is copied from.
const TEMPLATE: &str = "rlsgate_template";
/// Room for every test of a run with 4 to 8 test threads at once: each holds
/// a few sessions, pooled ones and a superuser connection or two.
const SHARED_MAX_CONNECTIONS: &str = "500";
/// The database name of a test on a cluster of its own, as before sharing.
const OWN_DATABASE: &str = "app";

/// A test's database: its own on the shared cluster, or `app` on a cluster of
/// its own. Derefs to the server, for its port, password and connections;
/// changing the server (restart, pause, authentication) is only allowed on a
/// cluster of the test's own.
pub struct TestDb {
    name: String,
    server: Server,
}

enum Server {
    Shared(&'static TempPostgres),
    Own(TempPostgres),
}

impl TestDb {
    /// A fresh database on the shared cluster, with the sample application.
    pub async fn shared() -> TestDb {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let pg = shared_cluster();
        let name = format!("app_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let admin = pg
            .connect("postgres")
            .await
            .expect("connect to the shared cluster");
        admin
            .batch_execute(&format!("create database {name} template {TEMPLATE}"))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        TestDb {
            name,
            server: Server::Shared(pg),
        }
    }

    /// Database `app` with the sample application on `pg`, a cluster of the
    /// test's own.
    pub async fn own(pg: TempPostgres) -> TestDb {
        let admin = pg.connect("postgres").await.expect("connect as superuser");
        admin.batch_execute("create database app").await.unwrap();
        install_sample(&pg, OWN_DATABASE).await;
        TestDb {
            name: OWN_DATABASE.to_owned(),
            server: Server::Own(pg),
        }
    }

    /// The test's database on the server (`app` on a cluster of its own).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database the proxy must send its sessions to, whatever the client
    /// asked for: the test's, when it is not the `app` clients ask for.
    pub fn upstream_database(&self) -> Option<&str> {
        (self.name != OWN_DATABASE).then_some(self.name.as_str())
    }
}

impl Deref for TestDb {
    type Target = TempPostgres;

    fn deref(&self) -> &TempPostgres {
        match &self.server {
            Server::Shared(pg) => pg,
            Server::Own(pg) => pg,
        }
    }
}

impl DerefMut for TestDb {
    fn deref_mut(&mut self) -> &mut TempPostgres {
        match &mut self.server {
            Server::Shared(_) => panic!(
                "this test changes the PostgreSQL server, which other tests share; \
                 start it on a cluster of its own (Harness::start_alone)"
            ),
            Server::Own(pg) => pg,
        }
    }
}

impl Drop for TestDb {
    /// Drops the test's database from the shared cluster, so that a long run
    /// does not fill the disk. On a thread of its own: this may run inside
    /// the test's runtime, which must not be blocked on.
    fn drop(&mut self) {
        let Server::Shared(pg) = &self.server else {
            return;
        };
        let pg: &'static TempPostgres = pg;
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            runtime.block_on(async {
                let admin = pg.connect("postgres").await?;
                admin
                    .batch_execute(&format!("drop database if exists {name} with (force)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop a test database: {e:#}");
        }
    }
}

/// Schema `auth` with the test signing key, the sample application and the
/// tests' additions, in `database` on `pg`.
async fn install_sample(pg: &TempPostgres, database: &str) {
    let app = pg.connect(database).await.unwrap();
    let key = rlsgate::auth::claims::SigningKey::from_base64(SIGNING_KEY).unwrap();
    rlsgate::commands::init_db::install(&app, &[key.bytes().to_vec()])
        .await
        .expect("install schema auth");
    app.batch_execute(rlsgate::dev::SAMPLE_SCHEMA)
        .await
        .expect("create sample schema");
    app.batch_execute(TEST_SCHEMA)
        .await
        .expect("create test schema");
}

/// The shared cluster, started with its template on first use. Started on a
/// thread with a runtime of its own: the connections made while setting it
/// up must not belong to the runtime of whichever test came first.
fn shared_cluster() -> &'static TempPostgres {
    static SHARED: OnceLock<TempPostgres> = OnceLock::new();
    SHARED.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to start the shared cluster")
                .block_on(start_shared())
        })
        .join()
        .expect("start the shared PostgreSQL cluster")
    })
}

async fn start_shared() -> TempPostgres {
    remove_leftovers();
    let pg = TempPostgres::start_with_settings(&[("max_connections", SHARED_MAX_CONNECTIONS)])
        .await
        .expect("start PostgreSQL");
    let root = pg.data_dir().parent().expect("a root").to_path_buf();
    std::fs::create_dir_all(markers()).expect("create the marker directory");
    std::fs::write(
        marker(std::process::id()),
        root.as_os_str().as_encoded_bytes(),
    )
    .expect("write the shared cluster's marker");
    ROOT.set(root).expect("one shared cluster per process");
    // SAFETY: `stop_shared` is an `extern "C" fn()` that does not unwind.
    unsafe {
        libc::atexit(stop_shared);
    }

    let admin = pg.connect("postgres").await.expect("connect as superuser");
    admin
        .batch_execute(&format!("create database {TEMPLATE}"))
        .await
        .unwrap();
    install_sample(&pg, TEMPLATE).await;
    // No connections to the template from here on, so copying it never
    // waits; `is_template` says what it is.
    admin
        .batch_execute(&format!(
            "alter database {TEMPLATE} with is_template true allow_connections false"
        ))
        .await
        .unwrap();
    pg
}

/// The shared cluster's directory, for `stop_shared`.
static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(root) = ROOT.get() {
        stop_and_remove(root, true);
        let _ = std::fs::remove_file(marker(std::process::id()));
    }
}

/// Where processes note their shared cluster's directory.
fn markers() -> PathBuf {
    std::env::temp_dir().join("rlsgate-test-clusters")
}

fn marker(pid: u32) -> PathBuf {
    markers().join(pid.to_string())
}

/// Stops and removes the clusters of test processes that were killed before
/// they could (their marker is there, their process is not).
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(markers()) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if process_exists(pid) {
            continue;
        }
        if let Ok(root) = std::fs::read_to_string(entry.path()) {
            stop_and_remove(Path::new(&root), false);
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// Stops the postmaster whose data is in `root/data` (immediate shutdown,
/// then SIGKILL), and removes `root`. A leftover's pid file may name a
/// process that has since died and whose pid was reused: unless the
/// postmaster is `ours`, it is signalled only if it serves that directory.
fn stop_and_remove(root: &Path, ours: bool) {
    let data = root.join("data");
    let pid = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|&pid| ours || serves(pid, &data)) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_exists(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if process_exists(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_dir_all(root);
}

/// Whether process `pid` is a postmaster with its data in `data` (it is
/// started with `-D DATA`).
fn serves(pid: i32, data: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == data.as_os_str().as_encoded_bytes())
    })
}

/// Whether `pid` runs; our own exited child is reaped on the way, so that it
/// does not linger as a zombie that still "exists".
fn process_exists(pid: i32) -> bool {
    // SAFETY: waitpid with WNOHANG and a valid status pointer; it fails
    // harmlessly (ECHILD) for a process that is not our child.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid, &mut status, libc::WNOHANG);
        libc::kill(pid, 0) == 0
    }
}
