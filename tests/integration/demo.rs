//! `rlsgate demo`, run as a user runs it: the printed details work, and
//! stopping it leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::NoTls;

/// The demo process, killed if a test fails before stopping it.
struct Demo {
    child: Child,
    details: Value,
}

impl Demo {
    fn start(extra_args: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rlsgate"))
            .args(["demo", "--json", "--port", "0", "--http-port", "0"])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run rlsgate demo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the demo's details");
        let details = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the demo prints one JSON line ({e}): {line:?}"));
        Demo { child, details }
    }

    fn url(&self, user: &str) -> &str {
        self.details["users"][user]["url"].as_str().unwrap()
    }

    fn data_dir(&self) -> PathBuf {
        PathBuf::from(self.details["data_dir"].as_str().unwrap())
    }

    /// SIGTERM, as Ctrl-C or a service manager would, then wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the demo exits cleanly: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the demo stops within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn titles(url: &str) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect with the printed URL");
    tokio::spawn(connection);
    client
        .query("select title from todos order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Processes whose command line mentions `path`: a server left running.
fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_alice_and_bob_their_own_todos_and_leaves_nothing_behind() {
    let demo = Demo::start(&[]);
    assert_eq!(
        titles(demo.url("alice")).await,
        ["water the plants", "call mum"]
    );
    assert_eq!(titles(demo.url("bob")).await, ["fix the bike"]);

    // The printed psql line works when pasted into a shell.
    let psql = demo.details["users"]["bob"]["psql"].as_str().unwrap();
    let out = Command::new("sh")
        .args(["-c", psql])
        .output()
        .expect("run the printed psql line");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("fix the bike"), "{printed}");
    assert!(!printed.contains("water the plants"), "{printed}");

    // Over HTTP, with the printed endpoint and a token per request.
    let sql = demo.details["http"]["sql"].as_str().unwrap();
    for (user, titles) in [
        ("alice", json!([["water the plants"], ["call mum"]])),
        ("bob", json!([["fix the bike"]])),
    ] {
        let token = demo.details["users"][user]["token"].as_str().unwrap();
        let answer: Value = reqwest::Client::new()
            .post(sql)
            .header(
                "Neon-Connection-String",
                "postgresql://authenticated@127.0.0.1/app",
            )
            .header("Neon-Array-Mode", "true")
            .bearer_auth(token)
            .body(r#"{"query": "select title from todos order by id"}"#)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["rows"], titles, "{user}: {answer}");
    }

    let data_dir = demo.data_dir();
    assert!(data_dir.exists());
    demo.stop();
    assert!(!data_dir.exists(), "the data directory is removed");
    assert!(
        !data_dir.parent().unwrap().exists(),
        "its temporary parent too"
    );
    assert_eq!(processes_using(&data_dir), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_its_data_directory_when_asked() {
    let demo = Demo::start(&["--keep"]);
    assert_eq!(titles(demo.url("bob")).await, ["fix the bike"]);
    let data_dir = demo.data_dir();
    demo.stop();
    assert!(
        data_dir.join("PG_VERSION").exists(),
        "the data directory is kept"
    );
    assert_eq!(
        processes_using(&data_dir),
        Vec::<String>::new(),
        "the server is stopped"
    );
    std::fs::remove_dir_all(data_dir.parent().unwrap()).unwrap();
}
