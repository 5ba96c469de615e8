//! `bench/run --quick` runs end to end: PostgreSQL, pgbouncer, the issuer and
//! rlsgate start, every pgbench row, the HTTP rows (wrk against `POST /sql`,
//! every request answered 200 with its row) and the memory row get a number,
//! each proxy's CPU per transaction and its sampled system calls per
//! transaction (strace) are numbers, the transaction pooling rows have
//! throughput, CPU and the server connections each target used (no pooler
//! above its pool size; pgbouncer resetting each server connection it
//! releases among them), and everything is cleaned up. The script
//! installs pgbench, pgbouncer, wrk and strace itself when run as root;
//! otherwise it fails with the apt-get line to run.
#![cfg(target_os = "linux")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A quick run takes one to two minutes on a loaded 2-core machine; this
/// bound only stops a hung run (its trap then cleans up).
const TIMEOUT: Duration = Duration::from_secs(240);

/// Rows the report must contain, each with a measured value or the documented
/// "n/a" for pooling in a build without it.
const ROWS: &[&str] = &[
    "| -S, 8 clients, -M simple |",
    "| -S, 8 clients, -M prepared |",
    "| -S, 32 clients, -M simple |",
    "| -S, 32 clients, -M prepared |",
    "| direct |",
    "| pgbouncer (session pool, scram-sha-256) |",
    "| pgbouncer (session pool, trust) |",
    "| pgbouncer (session pool, plain) |",
    "| rlsgate (no pooling) |",
    "| rlsgate ([pool] mode = \"session\") |",
    // HTTP beside the wire protocol: this build serves [http], so no n/a.
    "| 8 clients, 8 requests |",
    "| 64 clients, 64 requests |",
];

/// The transaction pooling rows of a quick run (100 clients), and the pool
/// size the script gives rlsgate and pgbouncer there.
const TXN_ROWS: &[&str] = &["-S, 100 clients, -M simple", "-S, 100 clients, -M prepared"];
const TXN_CLIENTS: u64 = 100;
const TXN_POOL_SIZE: u64 = 20;

const STEADY_ROWS: &[&str] = &[
    "-S, 8 clients, -M simple",
    "-S, 8 clients, -M prepared",
    "-S, 32 clients, -M simple",
    "-S, 32 clients, -M prepared",
];

/// A Markdown table of the report: its column names and its rows, each a
/// list of trimmed cells.
struct Table<'a> {
    columns: Vec<&'a str>,
    rows: Vec<Vec<&'a str>>,
}

fn cells(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

impl<'a> Table<'a> {
    /// The table whose header line starts with HEADER.
    fn find(report: &'a str, header: &str) -> Table<'a> {
        let mut lines = report.lines().skip_while(|line| !line.starts_with(header));
        let columns = cells(
            lines
                .next()
                .unwrap_or_else(|| panic!("no table {header:?}")),
        );
        let rows = lines
            .skip(1) // the |---| line
            .take_while(|line| line.starts_with('|'))
            .map(cells)
            .collect();
        Table { columns, rows }
    }

    /// The cell in COLUMN of the row whose first cells are KEY.
    fn cell(&self, key: &[&str], column: &str) -> &'a str {
        let index = self
            .columns
            .iter()
            .position(|name| *name == column)
            .unwrap_or_else(|| panic!("no column {column:?} in {:?}", self.columns));
        let row = self
            .rows
            .iter()
            .find(|row| row.starts_with(key))
            .unwrap_or_else(|| panic!("no row {key:?} under {:?}", self.columns));
        row[index]
    }
}

/// A measured quantity: a finite number above zero (not "error", "–" or empty).
fn positive(cell: &str) -> bool {
    cell.parse::<f64>().is_ok_and(|v| v.is_finite() && v > 0.0)
}

/// The CPU and system-call columns hold numbers for pgbouncer and rlsgate on
/// every row where the proxy relays, and the per-call breakdown names calls.
fn check_cpu_and_syscalls(report: &str) {
    let steady = Table::find(report, "| row | direct TPS |");
    for row in STEADY_ROWS {
        for column in [
            "pgbouncer CPU µs/tx",
            "rlsgate CPU µs/tx",
            "CPU rlsgate ÷ pgbouncer (lower is better)",
            "pgbouncer syscalls/tx",
            "rlsgate syscalls/tx",
        ] {
            let cell = steady.cell(&[row], column);
            assert!(positive(cell), "{row}, {column}: {cell:?}\n{report}");
        }
    }
    let connect = Table::find(report, "| target | TPS |");
    for row in [
        "pgbouncer (session pool, scram-sha-256)",
        "pgbouncer (session pool, trust)",
        "pgbouncer (session pool, plain)",
        "rlsgate (no pooling)",
        "rlsgate ([pool] mode = \"session\")",
    ] {
        for column in [
            "CPU µs/tx",
            "CPU ÷ pgbouncer (trust) (lower is better)",
            "CPU ÷ pgbouncer (plain)",
        ] {
            let cell = connect.cell(&[row], column);
            assert!(positive(cell), "{row}, {column}: {cell:?}\n{report}");
        }
    }
    assert_eq!(connect.cell(&["direct"], "CPU µs/tx"), "–", "{report}");
    let http = Table::find(report, "| at a time | wire -S |");
    for row in ["8 clients, 8 requests", "64 clients, 64 requests"] {
        for column in ["wire CPU µs/tx", "HTTP CPU µs/request"] {
            let cell = http.cell(&[row], column);
            assert!(positive(cell), "{row}, {column}: {cell:?}\n{report}");
        }
    }
    let calls = Table::find(report, "| row | proxy |");
    for row in STEADY_ROWS {
        for proxy in ["pgbouncer", "rlsgate"] {
            let key = [*row, proxy];
            let sampled = calls.cell(&key, "transactions in the sample");
            assert!(
                sampled.parse::<u64>().is_ok_and(|n| n > 0),
                "{key:?}: {sampled:?}\n{report}"
            );
            // The same total as in the steady table, and a breakdown of
            // "name per-transaction" pairs.
            let total = calls.cell(&key, "syscalls/tx");
            assert_eq!(total, steady.cell(&[row], &format!("{proxy} syscalls/tx")));
            let top = calls.cell(&key, "most frequent, per transaction");
            let pairs: Vec<(&str, &str)> = top
                .split(", ")
                .map(|pair| pair.split_once(' ').unwrap_or((pair, "")))
                .collect();
            assert!(
                !pairs.is_empty()
                    && pairs.iter().all(|(name, n)| {
                        !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                            && n.parse::<f64>().is_ok()
                    }),
                "{key:?}: breakdown {top:?}\n{report}"
            );
        }
    }
}

/// The report's pgbouncer version (its version line: "PgBouncer 1.18.0"),
/// major and minor.
fn bouncer_version(report: &str) -> (u64, u64) {
    let version = report
        .split("PgBouncer ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("no pgbouncer version in the report\n{report}"));
    let number = |part: Option<&str>| -> u64 {
        part.and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("pgbouncer version {version:?}"))
    };
    let mut parts = version.split('.');
    (number(parts.next()), number(parts.next()))
}

/// Every transaction pooling row has throughput, CPU per transaction and
/// backends for direct, both pgbouncers and rlsgate; a pgbouncer's prepared
/// row says "n/a" only where its version cannot relay named statements in
/// transaction mode (1.21) or, for the one running DISCARD ALL on each
/// release, cannot keep track of the statements that drops (1.22); no
/// pooler had more server connections open than its pool size, and direct
/// no more than one per client.
fn check_transaction_pooling(report: &str) {
    let table = Table::find(report, "| transaction pooling |");
    let version = bouncer_version(report);
    for row in TXN_ROWS {
        let simple = row.ends_with("-M simple");
        let bouncer = simple || version >= (1, 21);
        let reset = simple || version >= (1, 22);
        check_bouncer(report, &table, row, "pgbouncer", bouncer, "needs 1.21)");
        let why = "max_prepared_statements with DISCARD ALL needs 1.22)";
        check_bouncer(report, &table, row, "pgbouncer-reset", reset, why);
        let mut columns = vec![
            "direct TPS",
            "rlsgate TPS",
            "rlsgate ÷ direct",
            "rlsgate CPU µs/tx",
        ];
        if bouncer {
            columns.push("CPU rlsgate ÷ pgbouncer (lower is better)");
        }
        for column in columns {
            let cell = table.cell(&[row], column);
            assert!(positive(cell), "{row}, {column}: {cell:?}\n{report}");
        }
        check_at_most(report, &table, row, "direct backends", TXN_CLIENTS);
        check_at_most(report, &table, row, "rlsgate backends", TXN_POOL_SIZE);
    }
}

/// The cells of pgbouncer NAME ("pgbouncer" or "pgbouncer-reset") in ROW:
/// where it RELAYS the row, measured, its backends within the pool size;
/// otherwise its TPS is the "n/a" ending with REASON_END, the rest dashes.
fn check_bouncer(
    report: &str,
    table: &Table,
    row: &str,
    name: &str,
    relays: bool,
    reason_end: &str,
) {
    let tps = format!("{name} TPS");
    let others = [
        format!("rlsgate ÷ {name}"),
        format!("{name} CPU µs/tx"),
        format!("{name} backends"),
    ];
    if relays {
        for column in [&tps, &others[0], &others[1]] {
            let cell = table.cell(&[row], column);
            assert!(positive(cell), "{row}, {column}: {cell:?}\n{report}");
        }
        check_at_most(report, table, row, &others[2], TXN_POOL_SIZE);
    } else {
        let cell = table.cell(&[row], &tps);
        assert!(
            cell.starts_with("n/a (PgBouncer 1.") && cell.ends_with(reason_end),
            "{row}, {tps}: {cell:?}\n{report}"
        );
        for column in &others {
            assert_eq!(table.cell(&[row], column), "–", "{row}, {column}\n{report}");
        }
    }
}

/// The server connections in COLUMN of ROW: a count no larger than BOUND.
fn check_at_most(report: &str, table: &Table, row: &str, column: &str, bound: u64) {
    let cell = table.cell(&[row], column);
    assert!(
        cell.parse::<u64>().is_ok_and(|n| n <= bound),
        "{row}, {column}: {cell:?}, more than {bound}\n{report}"
    );
}

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
        .env_remove("TXN_CLIENTS")
        .env_remove("TXN_POOL_SIZE")
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
    check_cpu_and_syscalls(&stdout);
    check_transaction_pooling(&stdout);
    let written = std::fs::read_to_string(results.path()).unwrap();
    assert_eq!(
        written.trim(),
        stdout.trim(),
        "the results file differs from stdout"
    );
}
