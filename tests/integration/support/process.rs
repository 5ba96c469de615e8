//! The real `rlsgate serve` binary as a child process, with its JSON log
//! lines collected, for tests that must read what an operator would read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::WAIT;

pub struct Served {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Everything it prints on stdout, once it has exited.
    stdout: tokio::task::JoinHandle<String>,
    pub config: PathBuf,
    pub address: SocketAddr,
    /// Where the admin endpoints listen, when `admin_address` is set.
    pub admin: Option<SocketAddr>,
}

impl Served {
    /// Serves `config` with `--log-format json` and waits until it listens.
    pub async fn start(config: &Path) -> Served {
        Self::start_logging(config, "info").await
    }

    /// Like [`Served::start`], with `RUST_LOG` set to `rust_log`.
    pub async fn start_logging(config: &Path, rust_log: &str) -> Served {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rlsgate"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start rlsgate serve");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let collected = Arc::clone(&lines);
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        let mut stdout = child.stdout.take().unwrap();
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
            text
        });
        let mut served = Served {
            child,
            lines,
            stdout,
            config: config.to_owned(),
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
        };
        let listening = served.wait_for("rlsgate listening", 1).await.remove(0);
        let field = |name: &str| -> Option<SocketAddr> {
            listening["fields"][name]
                .as_str()
                .and_then(|a| a.parse().ok())
        };
        served.address = field("address")
            .unwrap_or_else(|| panic!("the listening line names the address: {listening}"));
        served.admin = field("admin");
        served
    }

    /// Every log line so far, parsed.
    pub fn logs(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("--log-format json printed a non-JSON line ({e}): {line}")
                })
            })
            .collect()
    }

    /// Every log line as printed, for assertions about what never appears.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Log entries whose message contains `text`.
    pub fn logged(&self, text: &str) -> Vec<Value> {
        self.logged_where(|m| m.contains(text))
    }

    /// Log entries whose message is exactly `message`.
    pub fn logged_exactly(&self, message: &str) -> Vec<Value> {
        self.logged_where(|m| m == message)
    }

    fn logged_where(&self, matches: impl Fn(&str) -> bool) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|entry| entry["fields"]["message"].as_str().is_some_and(&matches))
            .collect()
    }

    /// Waits until `count` entries' messages contain `text`, and returns them.
    pub async fn wait_for(&self, text: &str, count: usize) -> Vec<Value> {
        self.wait_until(text, count, |m| m.contains(text)).await
    }

    /// Waits until `count` entries' messages are exactly `message`, and
    /// returns them.
    pub async fn wait_for_exactly(&self, message: &str, count: usize) -> Vec<Value> {
        self.wait_until(message, count, |m| m == message).await
    }

    async fn wait_until(
        &self,
        what: &str,
        count: usize,
        matches: impl Fn(&str) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let found = self.logged_where(&matches);
            if found.len() >= count {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {count} log lines with {what:?} within {WAIT:?}; the log:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM; once it has exited successfully, everything it printed.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("rlsgate exits on SIGTERM")
            .unwrap();
        assert!(status.success(), "rlsgate exited with {status}");
        let stdout = (&mut self.stdout).await.unwrap();
        format!("{stdout}\n{}", self.text())
    }

    /// Writes `toml` over the configuration file and sends SIGHUP; waits
    /// until the reload is logged.
    pub async fn reload(&self, toml: &str) {
        let before = self.logged("configuration reloaded").len();
        std::fs::write(&self.config, toml).unwrap();
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGHUP);
        }
        self.wait_for("configuration reloaded", before + 1).await;
    }

    /// `http://ADMIN{path}` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        let admin = self.admin.expect("the configuration sets admin_address");
        format!("http://{admin}{path}")
    }
}
