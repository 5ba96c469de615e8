//! A throwaway PostgreSQL server for the integration tests and `rlsgate demo`.
//!
//! The server runs from the local binaries, in a temporary directory, on a free
//! port of 127.0.0.1, with SCRAM-SHA-256 required for TCP connections so that
//! the proxy's upstream authentication is exercised for real.
//!
//! `initdb` and `postgres` refuse to run as root. Under root the server runs as
//! the `postgres` system user, with the uid and gid set on the child process
//! itself: `runuser` and `su` fork, so the process we would hold is not the
//! postmaster and the server would outlive us.
#![cfg(unix)]

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::config::UpstreamTlsMode;
use crate::upstream::tls::UpstreamTls;

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
/// The system user the server runs as when we are root.
const SERVER_SYSTEM_USER: &str = "postgres";
/// Bound on waiting for a fresh server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one readiness probe, handshake included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on waiting for the postmaster to exit after SIGQUIT, before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The free port is released before the server binds it, so another process
/// may take it in between; that many ports are tried before giving up.
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 40;
/// Settings for a fast, throwaway server; durability is of no use here.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "32MB"),
    ("password_encryption", "scram-sha-256"),
];
/// Unix socket paths are limited to `sizeof(sun_path)` (108 on Linux, 104 on
/// macOS) including the terminating NUL; longer directories get no socket.
const MAX_SOCKET_PATH: usize = 100;

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, postgres) not found in \
     pg_config --bindir, /usr/lib/postgresql/*/bin, /opt/homebrew/opt/postgresql@*/bin, \
     /usr/local/opt/postgresql@*/bin or PATH; install them, e.g. `apt-get install postgresql` \
     on Debian/Ubuntu or `brew install postgresql@16` on macOS";

/// A PostgreSQL server in a temporary directory, stopped and removed on drop.
///
/// Each instance has its own directory, port and random superuser password,
/// so any number of them can run at once in one process.
pub struct TempPostgres {
    /// `None` once stopped.
    dir: Option<TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    password: String,
    /// The postmaster; `None` once stopped.
    child: Option<Child>,
    /// `ssl = on`, and TCP connections must use TLS.
    tls: bool,
    /// `ssl_ca_file` is set: TLS clients are asked for a certificate.
    client_ca: bool,
    /// Server settings given at start, over the defaults (see `launch_on`);
    /// kept so that a restart applies them again.
    settings: Vec<(String, String)>,
}

/// The uid and gid the server runs as; `None` means "as ourselves".
#[derive(Clone, Copy, Debug)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

/// Why one start attempt failed.
enum StartFailure {
    /// Another process bound the port first; worth another port.
    PortTaken(String),
    Other(anyhow::Error),
}

impl TempPostgres {
    /// Finds the server binaries, runs initdb (SCRAM-SHA-256 for host
    /// connections, superuser `postgres` with a random password), starts the
    /// server on 127.0.0.1 on a free port, and waits until it accepts
    /// connections.
    pub async fn start() -> Result<TempPostgres> {
        Self::start_inner(None, &[]).await
    }

    /// Like [`start`](Self::start), with server settings (`name`, `value`)
    /// over the defaults, e.g. `("max_connections", "500")` for a server that
    /// many tests share at once.
    pub async fn start_with_settings(settings: &[(&str, &str)]) -> Result<TempPostgres> {
        Self::start_inner(None, settings).await
    }

    /// Like [`start`](Self::start), with `ssl = on` serving this PEM
    /// certificate chain and key, and TCP connections allowed only over TLS
    /// (`hostssl` in pg_hba.conf): the server refuses plaintext ones.
    pub async fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<TempPostgres> {
        Self::start_inner(Some((cert_pem, key_pem)), &[]).await
    }

    async fn start_inner(
        tls: Option<(&str, &str)>,
        settings: &[(&str, &str)],
    ) -> Result<TempPostgres> {
        let bindir = find_server_binaries()?;
        let user = server_user()?;

        let dir = tempfile::Builder::new()
            .prefix("rlsgate-pg-")
            .tempdir()
            .context("creating a temporary directory for PostgreSQL")?;
        let root = dir.path().to_path_buf();
        // The root must be traversable by the server user; 0700 keeps others out.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", root.display()))?;
        give_to(&root, user)?;

        // From here on, dropping `pg` cleans up whatever was created.
        let mut pg = TempPostgres {
            dir: Some(dir),
            data_dir: root.join("data"),
            log_path: root.join("server.log"),
            port: 0,
            password: hex::encode(rand::random::<[u8; 16]>()),
            child: None,
            tls: tls.is_some(),
            client_ca: false,
            settings: settings
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        };
        pg.initdb(&bindir, user).await?;
        if let Some((cert_pem, key_pem)) = tls {
            pg.set_up_tls(cert_pem, key_pem, user)?;
        }

        let mut last_conflict = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match pg.launch(&bindir, user).await {
                Ok(()) => {
                    tracing::debug!(
                        port = pg.port,
                        dir = %root.display(),
                        "temporary PostgreSQL server is up"
                    );
                    return Ok(pg);
                }
                Err(StartFailure::PortTaken(log)) => last_conflict = log,
                Err(StartFailure::Other(e)) => return Err(e),
            }
        }
        bail!(
            "PostgreSQL could not bind a free port on {HOST} in {PORT_ATTEMPTS} attempts; \
             the last server log ends with:\n{last_conflict}"
        )
    }

    /// Always "127.0.0.1": the server listens on loopback TCP only.
    pub fn host(&self) -> &str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always "postgres".
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// Random per instance, so a client can't reach another instance's server
    /// by mistake.
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// `postgresql://postgres:PASSWORD@127.0.0.1:PORT/DATABASE`
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}:{}@{HOST}:{}/{}",
            self.password,
            self.port,
            percent_encode(database)
        )
    }

    /// Connection settings for the superuser, for callers that want to adjust
    /// them (another user or password, a TLS connector) before connecting.
    pub fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(5));
        config
    }

    /// A connected superuser client (over TLS, unchecked, when the server
    /// was started with TLS); the connection task is spawned on the current
    /// runtime.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        self.connect_with(self.config(database))
            .await
            .with_context(|| {
                format!(
                    "connecting to database {database:?} on {HOST}:{} as {SUPERUSER}",
                    self.port
                )
            })
    }

    /// Whether the server was started with TLS (and requires it).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    async fn connect_with(
        &self,
        mut config: tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        fn spawn<T>(connection: T)
        where
            T: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection to the temporary PostgreSQL server ended");
                }
            });
        }
        if self.tls {
            let connector = UpstreamTls::new(UpstreamTlsMode::Require, None, None)
                .expect("a TLS configuration that checks no certificate")
                .for_postgres();
            config.ssl_mode(connector.ssl_mode());
            let (client, connection) = config.connect(connector).await?;
            spawn(connection);
            Ok(client)
        } else {
            let (client, connection) = config.connect(NoTls).await?;
            spawn(connection);
            Ok(client)
        }
    }

    /// Writes the certificate and key where the server reads them (owned by
    /// the server user, mode 0600, as PostgreSQL demands of a key) and allows
    /// TCP connections only over TLS.
    fn set_up_tls(&self, cert_pem: &str, key_pem: &str, user: Option<ServerUser>) -> Result<()> {
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = self.root().join(name);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(pem.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            give_to(&path, user)?;
        }
        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(
            &hba,
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n",
        )
        .with_context(|| format!("writing {}", hba.display()))?;
        Ok(())
    }

    /// Replaces pg_hba.conf and pg_ident.conf, trusts `client_ca_pem` (when
    /// given) to sign TLS client certificates (`ssl_ca_file`), and restarts
    /// the server so that all of it applies. `hba` must still let the
    /// superuser log in over TCP with its password, as the readiness check
    /// and [`TempPostgres::connect`] do.
    pub async fn set_authentication(
        &mut self,
        hba: &str,
        ident: &str,
        client_ca_pem: Option<&str>,
    ) -> Result<()> {
        for (name, text) in [("pg_hba.conf", hba), ("pg_ident.conf", ident)] {
            let path = self.data_dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(pem) = client_ca_pem {
            let path = self.root().join("client_ca.crt");
            fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            give_to(&path, server_user()?)?;
            self.client_ca = true;
        }
        self.restart().await
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.{port}`):
    /// the temporary directory, unless its path is too long for a socket.
    pub fn socket_dir(&self) -> Option<PathBuf> {
        socket_dir_of(self.root()).map(PathBuf::from)
    }

    /// The cluster's data directory (inside the temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file, for diagnosing a failing test.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the server (immediate shutdown) and removes the directory; also
    /// done by `Drop`. Calling it again does nothing.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_postmaster(&mut child);
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove the temporary PostgreSQL directory");
            }
        }
    }

    /// Stops the server (immediate shutdown) but keeps its data and port, so
    /// that [`TempPostgres::resume`] can start it again: a database outage.
    /// Calling it again does nothing.
    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_postmaster(&mut child);
        }
    }

    /// Starts a paused server again, on the same port and with the same
    /// data, and waits until it accepts connections. Does nothing while it runs.
    pub async fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        anyhow::ensure!(self.dir.is_some(), "the server was stopped for good");
        let bindir = find_server_binaries()?;
        let user = server_user()?;
        match self.launch_on(self.port, &bindir, user).await {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken(log)) => bail!(
                "PostgreSQL could not take its port {} again; the server log ends with:\n{log}",
                self.port
            ),
            Err(StartFailure::Other(e)) => Err(e),
        }
    }

    /// Stops the server but leaves its directory, whose path is returned, so
    /// that the data can be inspected or started again by hand.
    pub fn stop_and_keep(mut self) -> PathBuf {
        if let Some(mut child) = self.child.take() {
            stop_postmaster(&mut child);
        }
        let dir = self.dir.take().expect("a running server has its directory");
        dir.keep()
    }

    /// Stops the server the way a crash or an operator would (immediate
    /// shutdown: every connection is dropped) and starts it again on the
    /// same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.child.is_some(),
            "restarting a PostgreSQL server that is not running"
        );
        self.pause();
        self.resume().await
    }

    fn root(&self) -> &Path {
        self.data_dir
            .parent()
            .expect("the data dir is inside the root")
    }

    async fn initdb(&self, bindir: &Path, user: Option<ServerUser>) -> Result<()> {
        let pwfile = self.root().join("pwfile");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)
                .with_context(|| format!("creating {}", pwfile.display()))?;
            writeln!(f, "{}", self.password)
                .with_context(|| format!("writing {}", pwfile.display()))?;
        }
        give_to(&pwfile, user)?;

        let mut pwfile_arg = OsString::from("--pwfile=");
        pwfile_arg.push(&pwfile);
        let mut cmd = Command::new(bindir.join("initdb"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "--no-sync",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg(pwfile_arg)
            .current_dir(self.root())
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_as(&mut cmd, user);

        let output = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await;
        let _ = fs::remove_file(&pwfile);
        let output =
            output.with_context(|| format!("running {}", bindir.join("initdb").display()))?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Starts the postmaster on a fresh free port and waits until it answers.
    async fn launch(
        &mut self,
        bindir: &Path,
        user: Option<ServerUser>,
    ) -> Result<(), StartFailure> {
        let port = free_port().map_err(StartFailure::Other)?;
        self.launch_on(port, bindir, user).await
    }

    async fn launch_on(
        &mut self,
        port: u16,
        bindir: &Path,
        user: Option<ServerUser>,
    ) -> Result<(), StartFailure> {
        self.port = port;
        // A fresh log per attempt, so an error shows this attempt's messages.
        let log = File::create(&self.log_path)
            .with_context(|| format!("creating {}", self.log_path.display()))
            .map_err(StartFailure::Other)?;
        give_to(&self.log_path, user).map_err(StartFailure::Other)?;
        let log_err = log
            .try_clone()
            .context("duplicating the log file handle")
            .map_err(StartFailure::Other)?;

        let root = self.root();
        let socket_dir = socket_dir_of(root).unwrap_or_default();

        let mut cmd = Command::new(bindir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg(format!("listen_addresses={HOST}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={socket_dir}"))
            .args(
                self.server_settings()
                    .flat_map(|setting| ["-c".to_owned(), setting]),
            );
        if self.tls {
            let dir = root.display();
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={dir}/server.crt"))
                .arg("-c")
                .arg(format!("ssl_key_file={dir}/server.key"));
            if self.client_ca {
                cmd.arg("-c")
                    .arg(format!("ssl_ca_file={dir}/client_ca.crt"));
            }
        }
        cmd.current_dir(root)
            .env("LC_ALL", "C")
            // Never the caller's stdio: a server holding a test's pipe would
            // keep whoever reads it waiting.
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        run_as(&mut cmd, user);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bindir.join("postgres").display()))
            .map_err(StartFailure::Other)?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// `name=value` for each server setting: the defaults, each replaced by
    /// a setting given at start of the same name, then the other given ones.
    fn server_settings(&self) -> impl Iterator<Item = String> + '_ {
        let given = |name: &str| self.settings.iter().find(|(n, _)| n == name);
        let defaults = DEFAULT_SETTINGS
            .iter()
            .filter(move |(name, _)| given(name).is_none())
            .map(|(name, value)| format!("{name}={value}"));
        let extra = self
            .settings
            .iter()
            .map(|(name, value)| format!("{name}={value}"));
        defaults.chain(extra)
    }

    /// Polls with a real, authenticated connection: that is what callers need,
    /// and the random password makes sure it is this server that answered.
    async fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        loop {
            let child = self.child.as_mut().expect("the postmaster was started");
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    self.child = None;
                    let log = fs::read_to_string(&self.log_path).unwrap_or_default();
                    let tail = tail(&log);
                    if log.contains("could not create any TCP/IP sockets")
                        || log.contains("Address already in use")
                    {
                        return Err(StartFailure::PortTaken(tail));
                    }
                    return Err(StartFailure::Other(anyhow!(
                        "PostgreSQL exited ({status}) before accepting connections; \
                         the server log {} ends with:\n{tail}",
                        self.log_path.display()
                    )));
                }
                Err(e) => {
                    return Err(StartFailure::Other(
                        anyhow!(e).context("checking on the PostgreSQL server process"),
                    ));
                }
            }

            // Bounded: whatever else holds the port may accept and say nothing.
            let config = self.config("postgres");
            let error = match tokio::time::timeout(PROBE_TIMEOUT, self.connect_with(config)).await {
                Ok(Ok(client)) => {
                    // Dropping the client makes the connection say goodbye.
                    drop(client);
                    return Ok(());
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            };
            if Instant::now() >= deadline {
                let log = fs::read_to_string(&self.log_path).unwrap_or_default();
                return Err(StartFailure::Other(anyhow!(
                    "PostgreSQL on {HOST}:{} did not accept connections within {} s \
                     (last error: {error}); the server log {} ends with:\n{}",
                    self.port,
                    READY_TIMEOUT.as_secs(),
                    self.log_path.display(),
                    tail(&log)
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPostgres")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

/// Where the server in `root` puts its Unix socket: `root` itself, unless
/// the socket's path would be too long or the directory's name would need
/// quoting in `unix_socket_directories`.
fn socket_dir_of(root: &Path) -> Option<String> {
    let fits = root.join(".s.PGSQL.65535.lock").as_os_str().len() <= MAX_SOCKET_PATH;
    let plain = !root.to_string_lossy().contains([',', '"', '\'', ' ', '\\']);
    (fits && plain).then(|| root.to_string_lossy().into_owned())
}

/// SIGQUIT is PostgreSQL's immediate shutdown: no checkpoint, nothing to
/// keep. Bounded, then SIGKILL, so a wedged server can't hang a test.
fn stop_postmaster(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // The child is not reaped yet, so its pid can't have been reused.
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGQUIT);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break,
        }
    }
    tracing::warn!(pid, "PostgreSQL did not stop after SIGQUIT; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Where the server binaries are: `pg_config --bindir`, then the highest
/// `/usr/lib/postgresql/*/bin`, then Homebrew's `postgresql@*` (highest
/// first), then PATH. A directory counts only if it holds both `initdb` and
/// `postgres`: Debian's `pg_config` comes with the client library and names
/// the server's directory whether or not the server is installed.
pub fn find_server_binaries() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    let pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = pg_config {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !dir.is_empty() {
            candidates.push(PathBuf::from(dir));
        }
    }
    candidates.extend(versioned_dirs(Path::new("/usr/lib/postgresql"), "", "bin"));
    for prefix in ["/opt/homebrew/opt", "/usr/local/opt"] {
        candidates.extend(versioned_dirs(Path::new(prefix), "postgresql@", "bin"));
        candidates.push(Path::new(prefix).join("postgresql/bin"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|dir| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres")))
        .ok_or_else(|| anyhow!(INSTALL_HINT))
}

/// `parent/PREFIXversion/sub` for every version found, highest version first.
fn versioned_dirs(parent: &Path, prefix: &str, sub: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key = version
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key, entry.path().join(sub)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, path)| path).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `None` when we aren't root; the `postgres` system user when we are.
fn server_user() -> Result<Option<ServerUser>> {
    // SAFETY: geteuid has no preconditions and can't fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    match lookup_user(SERVER_SYSTEM_USER)? {
        Some(user) if user.uid != 0 => Ok(Some(user)),
        Some(_) => bail!(
            "running as root, and the `{SERVER_SYSTEM_USER}` user has uid 0; initdb and postgres \
             refuse to run as root, so the server needs a non-root `{SERVER_SYSTEM_USER}` user"
        ),
        None => bail!(
            "running as root, and initdb and postgres refuse to run as root, but there is no \
             `{SERVER_SYSTEM_USER}` system user to run them as; create one \
             (`useradd --system {SERVER_SYSTEM_USER}`) or install the postgresql package, which \
             creates it"
        ),
    }
}

fn lookup_user(name: &str) -> Result<Option<ServerUser>> {
    let cname = CString::new(name).context("user name contains NUL")?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain data; all-zero is a valid value to be overwritten.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and buf.len() is its size.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                return Ok(Some(ServerUser {
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                }));
            }
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            _ => {
                return Err(std::io::Error::from_raw_os_error(rc))
                    .with_context(|| format!("looking up the `{name}` user"));
            }
        }
    }
}

/// Makes `path` owned by the server user, when the server runs as another user.
fn give_to(path: &Path, user: Option<ServerUser>) -> Result<()> {
    if let Some(user) = user {
        chown(path, Some(user.uid), Some(user.gid)).with_context(|| {
            format!(
                "giving {} to the `{SERVER_SYSTEM_USER}` user",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Runs the child as the server user. The standard library sets the gid,
/// clears the supplementary groups (we are root), then sets the uid.
fn run_as(cmd: &mut Command, user: Option<ServerUser>) {
    if let Some(user) = user {
        cmd.uid(user.uid).gid(user.gid);
    }
}

/// A port that was free a moment ago; the caller retries if it got taken.
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind((HOST, 0)).context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    if lines.is_empty() {
        "(empty)".to_owned()
    } else {
        lines[start..].join("\n")
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::error::SqlState;

    #[tokio::test]
    async fn starts_and_answers_a_query() {
        let mut pg = TempPostgres::start().await.expect("start PostgreSQL");
        let data_dir = pg.data_dir().to_path_buf();
        assert!(data_dir.join("PG_VERSION").is_file());

        let client = pg.connect("postgres").await.expect("connect");
        let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let non_scram: i64 = client
            .query_one(
                "select count(*) from pg_hba_file_rules \
                 where type like 'host%' and auth_method <> 'scram-sha-256'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(non_scram, 0, "every host rule must require SCRAM");

        let mut wrong = pg.config("postgres");
        wrong.password("not-the-password");
        let err = match wrong.connect(NoTls).await {
            Ok(_) => panic!("a wrong password was accepted"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

        drop(client);
        pg.stop();
        assert!(!data_dir.exists(), "{} is left behind", data_dir.display());
        pg.stop();
    }

    #[tokio::test]
    async fn settings_given_at_start_replace_the_defaults_and_outlive_a_restart() {
        let mut pg = TempPostgres::start_with_settings(&[("max_connections", "500")])
            .await
            .expect("start PostgreSQL");
        for _ in 0..2 {
            let client = pg.connect("postgres").await.expect("connect");
            for (name, expected) in [("max_connections", "500"), ("fsync", "off")] {
                let value: String = client
                    .query_one(&format!("show {name}"), &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(value, expected, "{name}");
            }
            drop(client);
            pg.restart().await.expect("restart PostgreSQL");
        }
    }
}
