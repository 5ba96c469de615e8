//! `bench/run --quick` runs end to end: PostgreSQL, pgbouncer, the issuer and
//! rlsgate start, every pgbench row, the HTTP rows (wrk against `POST /sql`,
//! every request answered 200 with its row) and the memory row get a number,
//! and everything is cleaned up. The script installs pgbench, pgbouncer and
//! wrk itself when run as root; otherwise it fails with the apt-get line to
//! run.
#![cfg(target_os = "linux")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A quick run takes about a minute even on a loaded 2-core machine; this
/// bound only stops a hung run (its trap then cleans up).
const TIMEOUT: Duration = Duration::from_secs(180);

/// Rows the report must contain, each with a measured value or the documented
/// "n/a" for pooling in a build without it.
const ROWS: &[&str] = &[
    "| -S, 8 clients, -M simple |",
    "| -S, 8 clients, -M prepared |",
    "| -S, 32 clients, -M simple |",
    "| -S, 32 clients, -M prepared |",
    "| direct |",
    "| pgbouncer (session pool) |",
    "| rlsgate (no pooling) |",
    "| rlsgate ([pool] mode = \"session\") |",
    // HTTP beside the wire protocol: this build serves [http], so no n/a.
    "| 8 clients, 8 requests |",
    "| 64 clients, 64 requests |",
];

#[test]
fn bench_script_runs_end_to_end_in_quick_form() {
    let root = env!("CARGO_MANIFEST_DIR");
    let results = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(format!("{root}/bench/run"))
        .arg("--quick")
        .current_dir(root)
        // The binary this test run built; the script builds a release one otherwise.
        .env("RLSGATE_BIN", env!("CARGO_BIN_EXE_rlsgate"))
        .env("BENCH_RESULTS", results.path())
        .env("CI", "true")
        .env_remove("ROUNDS")
        .env_remove("DURATION")
        .env_remove("SCALE")
        .env_remove("IDLE_CLIENTS")
        .env_remove("HTTP_USERS")
        .env_remove("HTTP_POOL_SIZE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start bench/run");

    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            // SIGTERM lets the script's trap stop what it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let context = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");

    let status =
        status.unwrap_or_else(|| panic!("bench/run --quick took over {TIMEOUT:?}\n{context}"));
    assert!(
        status.success(),
        "bench/run --quick failed: {status}\n{context}"
    );
    for row in ROWS {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in the report\n{context}"));
        // The cells after the label: the first a number (or the pooling
        // row's n/a), the rest numbers or the ratio placeholder.
        let cells: Vec<&str> = line[row.len()..]
            .split('|')
            .map(str::trim)
            .filter(|cell| !cell.is_empty())
            .collect();
        let number = |cell: &str| cell.parse::<f64>().is_ok();
        let first_ok = cells.first().is_some_and(|cell| {
            number(cell) || *cell == "n/a (pooling not available in this build)"
        });
        assert!(
            first_ok && cells[1..].iter().all(|cell| number(cell) || *cell == "–"),
            "row without a measured value: {line}\n{context}"
        );
    }
    let memory = stdout
        .lines()
        .find(|line| line.starts_with("| 100 |") && line.ends_with("KiB |"))
        .unwrap_or_else(|| panic!("no memory row for 100 idle clients\n{context}"));
    assert!(memory.contains(" KiB | "), "{memory}");
    assert!(
        !stdout.to_lowercase().contains("error"),
        "the report has an error\n{context}"
    );
    let written = std::fs::read_to_string(results.path()).unwrap();
    assert_eq!(
        written.trim(),
        stdout.trim(),
        "the results file differs from stdout"
    );
}
