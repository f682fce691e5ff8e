//! Audience benchmark (`cargo bench --bench audiences`).
//!
//! Measures the real binary as an operator runs it, so wall time and peak RSS
//! are those of the `schematic-sync` process itself:
//!
//! 1. A temp dir gets a `config.toml` (store inside it, `synchronous = "full"`,
//!    the default) and a snapshot of `BENCH_MEMBERS` users, one id a line
//!    (`user-0000001`, ...). Not timed.
//! 2. `schematic-sync --config C audiences import big FILE` (timed), then
//!    `audiences sync big` (timed: the diff and the enqueue of one identify
//!    per member).
//! 3. A second snapshot where 1% of the members differ (half removed, spread
//!    over the id range; half new users), imported (timed),
//!    `audiences sync big --dry-run --json` (its counts printed and checked),
//!    then `audiences sync big` (timed).
//!
//! Each child runs under `/usr/bin/time -f "%M %U %S"` when that exists
//! (peak RSS and user + system CPU from the kernel's rusage of the child);
//! otherwise `/proc/<pid>/status` `VmHWM` is polled while it runs. The CPU
//! seconds show what the wall time would be on an idle machine, since the
//! work is single-threaded. Deliveries are counted in the database
//! afterwards with rusqlite. Figures are printed with PASS/FAIL against the
//! targets, never asserted; a step that fails panics, and a wrong count
//! (deliveries, superseded rows, dry-run figures) ends the run with exit 1.
//!
//! Environment: `BENCH_MEMBERS` (1000000), `BENCH_SHUFFLE` (0: snapshot
//! lines in id order; 1: a fixed pseudo-random order), `BENCH_KEEP` (1:
//! keep the temp dir and print its path), `BENCH_NO_GNU_TIME` (set: poll
//! `VmHWM` even when `/usr/bin/time` exists; CPU times are then n/a).

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_schematic-sync");
const AUDIENCE: &str = "big";

const TARGET_IMPORT_AND_FIRST_SYNC: Duration = Duration::from_secs(15);
const TARGET_CHANGE_SYNC: Duration = Duration::from_secs(3);
const TARGET_PEAK_RSS_MB: f64 = 200.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        _ => default,
    }
}

struct Settings {
    members: usize,
    shuffle: bool,
    keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            members: env_or("BENCH_MEMBERS", 1_000_000usize).max(200),
            shuffle: env_or("BENCH_SHUFFLE", 0u8) == 1,
            keep: env_or("BENCH_KEEP", 0u8) == 1,
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------

fn user(n: usize) -> String {
    format!("user-{n:07}")
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fixed pseudo-random order (Fisher-Yates over splitmix64).
fn shuffle(ids: &mut [usize]) {
    let mut state = 0x5eed_a0d1_u64;
    for i in (1..ids.len()).rev() {
        state = splitmix64(state);
        ids.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

fn write_snapshot(path: &Path, ids: &mut [usize], shuffled: bool) -> u64 {
    if shuffled {
        shuffle(ids);
    }
    let mut out = BufWriter::new(std::fs::File::create(path).expect("create snapshot"));
    for &n in ids.iter() {
        writeln!(out, "{}", user(n)).expect("write snapshot");
    }
    out.flush().expect("flush snapshot");
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Users removed by the 1% change: every `stride`-th member, spread over the
/// id range; users added: new ids after the last one.
struct Change {
    removed: usize,
    added: usize,
    stride: usize,
}

impl Change {
    fn of(members: usize) -> Change {
        let changed = (members / 100).max(2);
        let removed = changed / 2;
        Change {
            removed,
            added: changed - removed,
            stride: members / removed,
        }
    }
    fn is_removed(&self, n: usize) -> bool {
        n.is_multiple_of(self.stride) && n / self.stride <= self.removed
    }
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

struct Step {
    name: &'static str,
    wall: Duration,
    peak_rss_kib: Option<u64>,
    /// user + system CPU seconds of the child (from `/usr/bin/time` only)
    cpu: Option<f64>,
    stdout: String,
}

impl Step {
    fn rss_mb(&self) -> Option<f64> {
        self.peak_rss_kib.map(|k| k as f64 / 1024.0)
    }
}

fn have_gnu_time() -> bool {
    Command::new("/usr/bin/time")
        .args(["-f", "%M", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs `schematic-sync --config CONFIG ARGS...`, timing it from spawn to
/// exit and taking its peak RSS.
fn run(name: &'static str, dir: &Path, config: &Path, args: &[&str], gnu_time: bool) -> Step {
    let rss_file = dir.join(format!("rss-{}.txt", name.replace(' ', "-")));
    let mut cmd = if gnu_time {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-f")
            .arg("%M %U %S")
            .arg("-o")
            .arg(&rss_file)
            .arg(BIN);
        c
    } else {
        Command::new(BIN)
    };
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn schematic-sync");
    let pid = child.id();
    let (output, polled) = if gnu_time {
        (child.wait_with_output().expect("wait"), None)
    } else {
        // Poll VmHWM while it runs; the output pipes are drained by a thread.
        let waiter = std::thread::spawn(move || child.wait_with_output());
        let mut hwm = 0u64;
        while !waiter.is_finished() {
            if let Some(k) = vm_hwm_kib(pid) {
                hwm = hwm.max(k);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (waiter.join().unwrap().expect("wait"), Some(hwm))
    };
    let wall = start.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() {
        panic!(
            "`schematic-sync {}` failed ({}):\n{}\n{}",
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // `/usr/bin/time` writes "maxrss_kib user_s system_s" as its last line
    let timed: Vec<f64> = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last().map(str::to_string))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let (peak_rss_kib, cpu) = match polled {
        // a child that exits before the first sample that sees it exec'd
        // reads as a few KiB: no figure rather than a wrong one
        Some(k) => ((k >= 1024).then_some(k), None),
        None if timed.len() == 3 => (Some(timed[0] as u64), Some(timed[1] + timed[2])),
        None => (None, None),
    };
    Step {
        name,
        wall,
        peak_rss_kib,
        cpu,
        stdout,
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mb(step: &Step) -> String {
    step.rss_mb()
        .map(|m| format!("{m:.1} MB"))
        .unwrap_or_else(|| "n/a".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn cpu(step: &Step) -> String {
    step.cpu
        .map(|c| format!("{c:.2} s"))
        .unwrap_or_else(|| "n/a".into())
}

/// `name  wall  (cpu)  peak RSS`, the row of one step.
fn step_row(step: &Step) -> String {
    format!(
        "{:<20} {:>9}  cpu {:>9}  peak RSS {:>9}",
        step.name,
        secs(step.wall),
        cpu(step),
        mb(step)
    )
}

fn print_step(step: &Step) {
    println!("  {}", step_row(step));
    for line in step.stdout.lines().take(3) {
        println!("      | {line}");
    }
}

// ---------------------------------------------------------------------------
// The database afterwards
// ---------------------------------------------------------------------------

fn count(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> i64 {
    conn.query_row(sql, params, |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn db_size_mb(db: &Path) -> f64 {
    let main = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::fs::metadata(PathBuf::from(wal))
        .map(|m| m.len())
        .unwrap_or(0);
    (main + wal) as f64 / 1_048_576.0
}

/// The 1, 5 and 15 minute load averages: other work on the machine shows
/// in wall times, not in the CPU times of the children.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let settings = Settings::from_env();
    let tmp = tempfile::Builder::new()
        .prefix("schematic-sync-bench-aud-")
        .tempdir()
        .expect("temp dir");
    let dir = tmp.path().to_path_buf();
    let db = dir.join("bench.db");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {:?}\nsynchronous = \"full\"\n\n[log]\nlevel = \"warn\"\n",
            db.to_str().expect("utf-8 temp path")
        ),
    )
    .expect("write config");
    let gnu_time = std::env::var_os("BENCH_NO_GNU_TIME").is_none() && have_gnu_time();
    let members = settings.members;
    let change = Change::of(members);

    println!("schematic-sync audience benchmark");
    println!(
        "  {members} members, 1% change = {} removed + {} new, snapshot lines {}, synchronous FULL, {} CPU(s)",
        change.removed,
        change.added,
        if settings.shuffle { "shuffled" } else { "in id order" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "  binary {BIN}\n  load average {}\n  peak RSS from {}",
        load_average(),
        if gnu_time {
            "/usr/bin/time -f %M (rusage of the child)"
        } else {
            "polling /proc/<pid>/status VmHWM every 5 ms"
        }
    );

    let first = dir.join("snapshot-1.txt");
    let second = dir.join("snapshot-2.txt");
    let t = Instant::now();
    let mut ids: Vec<usize> = (1..=members).collect();
    let first_bytes = write_snapshot(&first, &mut ids, settings.shuffle);
    let mut ids: Vec<usize> = (1..=members)
        .filter(|&n| !change.is_removed(n))
        .chain(members + 1..=members + change.added)
        .collect();
    assert_eq!(ids.len(), members - change.removed + change.added);
    write_snapshot(&second, &mut ids, settings.shuffle);
    drop(ids);
    println!(
        "  snapshots written in {} ({:.1} MB each), not timed\n",
        secs(t.elapsed()),
        first_bytes as f64 / 1_048_576.0
    );

    let file1 = first.to_str().expect("utf-8 path");
    let file2 = second.to_str().expect("utf-8 path");
    let import = run(
        "import",
        &dir,
        &config,
        &["audiences", "import", AUDIENCE, file1],
        gnu_time,
    );
    print_step(&import);
    let sync1 = run(
        "first sync",
        &dir,
        &config,
        &["audiences", "sync", AUDIENCE],
        gnu_time,
    );
    print_step(&sync1);
    let import2 = run(
        "1% import",
        &dir,
        &config,
        &["audiences", "import", AUDIENCE, file2],
        gnu_time,
    );
    print_step(&import2);
    let dry = run(
        "1% sync --dry-run",
        &dir,
        &config,
        &["audiences", "sync", AUDIENCE, "--dry-run", "--json"],
        gnu_time,
    );
    let dry_json: Value = serde_json::from_str(&dry.stdout).expect("dry-run JSON");
    let dry_outcome = &dry_json["audiences"][0];
    let (dry_added, dry_removed) = (
        dry_outcome["added"].as_i64().unwrap_or(-1),
        dry_outcome["removed"].as_i64().unwrap_or(-1),
    );
    println!("  {}", step_row(&dry));
    println!(
        "      | would add {dry_added} (e.g. {}), would remove {dry_removed} (e.g. {})",
        dry_outcome["sample_added"], dry_outcome["sample_removed"]
    );
    let sync2 = run(
        "1% sync",
        &dir,
        &config,
        &["audiences", "sync", AUDIENCE],
        gnu_time,
    );
    print_step(&sync2);

    // What the store holds now.
    let conn = Connection::open(&db).expect("open the bench store");
    let runs: Vec<(i64, i64, i64, i64)> = {
        let mut stmt = conn
            .prepare("SELECT id, added, removed, enqueued FROM sync_runs WHERE audience = ?1 ORDER BY id")
            .unwrap();
        let rows = stmt
            .query_map([AUDIENCE], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    };
    assert_eq!(runs.len(), 2, "two sync runs recorded: {runs:?}");
    let per_run = |run: i64| {
        count(
            &conn,
            "SELECT count(*) FROM deliveries WHERE sync_run_id = ?1",
            [run],
        )
    };
    let enqueued1 = per_run(runs[0].0);
    let enqueued2 = per_run(runs[1].0);
    let superseded = count(
        &conn,
        "SELECT count(*) FROM deliveries WHERE state = 'superseded'",
        [],
    );
    let pending = count(
        &conn,
        "SELECT count(*) FROM deliveries WHERE state = 'pending'",
        [],
    );
    let desired = count(
        &conn,
        "SELECT count(*) FROM audience_members WHERE audience_key = ?1 AND desired = 1",
        [AUDIENCE],
    );
    let left_diff = count(
        &conn,
        "SELECT count(*) FROM audience_members WHERE audience_key = ?1
           AND ((desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))",
        [AUDIENCE],
    );
    let db_mb = db_size_mb(&db);
    drop(conn);

    let mut problems = String::new();
    let mut expect = |what: &str, got: i64, want: i64| {
        if got != want {
            let _ = writeln!(problems, "  {what}: {got}, expected {want}");
        }
    };
    expect("first sync: deliveries enqueued", enqueued1, members as i64);
    expect("first sync: run.added", runs[0].1, members as i64);
    expect("dry run: would add", dry_added, change.added as i64);
    expect("dry run: would remove", dry_removed, change.removed as i64);
    expect(
        "1% sync: deliveries enqueued",
        enqueued2,
        (change.added + change.removed) as i64,
    );
    expect("1% sync: run.added", runs[1].1, change.added as i64);
    expect("1% sync: run.removed", runs[1].2, change.removed as i64);
    expect(
        "superseded (removed users' undelivered `true`)",
        superseded,
        change.removed as i64,
    );
    expect(
        "pending deliveries",
        pending,
        (members + change.added) as i64,
    );
    expect(
        "desired members",
        desired,
        (members - change.removed + change.added) as i64,
    );
    expect("pairs still to sync", left_diff, 0);

    let first_total = import.wall + sync1.wall;
    let steps = [&import, &sync1, &import2, &dry, &sync2];
    let peak = steps
        .iter()
        .filter_map(|s| s.rss_mb())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let pass_first = first_total < TARGET_IMPORT_AND_FIRST_SYNC;
    let pass_change = sync2.wall < TARGET_CHANGE_SYNC;
    let pass_rss = peak.is_some_and(|p| p < TARGET_PEAK_RSS_MB);

    let cpu_sum = |a: &Step, b: &Step| a.cpu.zip(b.cpu).map(|(a, b)| format!("{:.2} s", a + b));
    println!("\nreport ({members} members; wall time, and user+system CPU of the process)");
    for step in steps {
        println!("  {}", step_row(step));
    }
    println!(
        "  {:<20} {:>9}  cpu {:>9}  target < {} s    {}",
        "import + first sync",
        secs(first_total),
        cpu_sum(&import, &sync1).unwrap_or_else(|| "n/a".into()),
        TARGET_IMPORT_AND_FIRST_SYNC.as_secs(),
        verdict(pass_first)
    );
    println!(
        "  {:<20} {:>9}  cpu {:>9}  target < {} s     {}",
        "1% sync",
        secs(sync2.wall),
        cpu(&sync2),
        TARGET_CHANGE_SYNC.as_secs(),
        verdict(pass_change)
    );
    println!(
        "  {:<20} {:>9}  (max of the steps)  target < {TARGET_PEAK_RSS_MB:.0} MB  {}",
        "peak RSS",
        peak.map(|p| format!("{p:.1} MB"))
            .unwrap_or_else(|| "n/a".into()),
        verdict(pass_rss)
    );
    println!(
        "  deliveries enqueued: first sync {enqueued1}, 1% sync {enqueued2} \
         (+{} / -{}); superseded {superseded}; pending {pending}",
        runs[1].1, runs[1].2
    );
    println!("  store on disk {db_mb:.1} MB (with WAL)");
    println!("  load average at the end {}", load_average());
    if problems.is_empty() {
        println!("  counts: all as expected");
    } else {
        println!("  counts: WRONG\n{problems}");
    }
    if settings.keep {
        let kept = tmp.keep();
        println!("  kept {}", kept.display());
    }
    if !problems.is_empty() {
        std::process::exit(1);
    }
}
