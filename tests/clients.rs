//! Segment's real client libraries, unchanged, against the daemon (SPEC 2.1,
//! 3, 4): `segment-analytics-python` from PyPI and `@segment/analytics-node`
//! from npm, each pointed at the daemon with its own host setting, send
//! tracks and identifies in batches (`tests/clients/*_client.*`); every
//! message must reach the strict mock Schematic with the preset mappings'
//! exact body.
//!
//! The libraries live in `target/test-clients/venv` (Python) and
//! `target/test-clients/node` (npm), which `.ci/run` fills before
//! `cargo test`. When a folder is missing or broken, its test installs the
//! library itself (network to PyPI / npm needed), under a file lock so that
//! parallel runs do not install over each other; if that fails the test
//! fails and says what to run.

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::mock_schematic::MockSchematic;
use support::{eventually, Daemon, TestEnv};

const API_KEY: &str = "sch_clients_key";
const WRITE_KEY: &str = "wk_clients_test";
/// Tracks sent per run; as many identifies again.
const COUNT: usize = 25;
/// Messages per request the clients are set to (`upload_size` / `flushAt`).
const BATCH: usize = 10;
/// Event names the client scripts cycle through, and what Schematic gets.
const NAMES: [(&str, &str); 4] = [
    ("Order Completed", "order_completed"),
    ("Checkout Started", "checkout_started"),
    ("Product Added", "product_added"),
    ("orderShipped", "order_shipped"),
];
const PYTHON_LIBRARY: &str = "analytics-python";
const NODE_LIBRARY: &str = "@segment/analytics-node";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn clients_dir() -> PathBuf {
    repo().join("target").join("test-clients")
}

// ---------------------------------------------------------------------------
// Where the clients come from.
// ---------------------------------------------------------------------------

/// Runs one install step; its output is kept for the failure message.
fn step(what: &str, cmd: &mut Command, log: &mut String) -> bool {
    log.push_str(&format!("$ {what}\n"));
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => {
            log.push_str(&String::from_utf8_lossy(&out.stdout));
            log.push_str(&String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                log.push_str(&format!("(exit status {})\n", out.status));
            }
            out.status.success()
        }
        Err(e) => {
            log.push_str(&format!("cannot run it: {e}\n"));
            false
        }
    }
}

/// Makes sure `ready()` holds, running `install` under `lock_name` (a file
/// lock in `target/test-clients`) when it does not. Panics with the install
/// log and `manual` (the commands to run by hand) if it still does not hold.
fn ensure(
    label: &str,
    lock_name: &str,
    ready: impl Fn() -> bool,
    install: impl FnOnce(&mut String) -> bool,
    manual: &str,
) {
    if ready() {
        return;
    }
    let dir = clients_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
        panic!(
            "cannot create {}: {e}; run by hand:\n{manual}",
            dir.display()
        )
    });
    let lock = File::create(dir.join(lock_name)).expect("create the install lock file");
    lock.lock().expect("take the install lock");
    // Another test process may have installed it while this one waited.
    if ready() {
        return;
    }
    eprintln!("installing {label} into {} ...", dir.display());
    let started = Instant::now();
    let mut log = String::new();
    let installed = install(&mut log);
    drop(lock);
    assert!(
        installed && ready(),
        "{label} is not installed and installing it failed (it needs the network to reach the \
         package registry). Install it by hand from the repository root, or run .ci/run:\n\
         {manual}\n--- install log ---\n{log}"
    );
    eprintln!("installed {label} in {:.1?}", started.elapsed());
}

/// `target/test-clients/venv/bin/python` with `segment-analytics-python`.
fn python() -> PathBuf {
    let venv = clients_dir().join("venv");
    let python = venv.join("bin").join("python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import segment.analytics"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success())
    };
    ensure(
        "segment-analytics-python",
        "venv.lock",
        ready,
        |log| {
            // --clear: a venv that exists but cannot import the library is
            // broken (half-installed, or made by another Python).
            step(
                "python3 -m venv --clear target/test-clients/venv",
                Command::new("python3")
                    .arg("-m")
                    .arg("venv")
                    .arg("--clear")
                    .arg(&venv),
                log,
            ) && step(
                "target/test-clients/venv/bin/python -m pip install segment-analytics-python",
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "segment-analytics-python",
                ]),
                log,
            )
        },
        "  python3 -m venv target/test-clients/venv\n  \
         target/test-clients/venv/bin/python -m pip install segment-analytics-python",
    );
    python
}

/// `target/test-clients/node`, where `@segment/analytics-node` is installed.
fn node_dir() -> PathBuf {
    let dir = clients_dir().join("node");
    let ready = || {
        Command::new("node")
            .args(["-e", "require('@segment/analytics-node')"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success())
    };
    ensure(
        "@segment/analytics-node",
        "node.lock",
        ready,
        |log| {
            let manifest = dir.join("package.json");
            if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| {
                if manifest.exists() {
                    Ok(())
                } else {
                    // Without one, npm would look for a project in the
                    // folders above.
                    std::fs::write(
                        &manifest,
                        "{\"name\": \"schematic-sync-test-clients\", \"private\": true}\n",
                    )
                }
            }) {
                log.push_str(&format!("cannot prepare {}: {e}\n", dir.display()));
                return false;
            }
            step(
                "npm install @segment/analytics-node (in target/test-clients/node)",
                Command::new("npm")
                    .args([
                        "install",
                        "--no-audit",
                        "--no-fund",
                        "@segment/analytics-node",
                    ])
                    .current_dir(&dir),
                log,
            )
        },
        "  mkdir -p target/test-clients/node && cd target/test-clients/node\n  \
         echo '{\"private\": true}' > package.json && npm install @segment/analytics-node",
    );
    dir
}

// ---------------------------------------------------------------------------
// Running a client against the daemon.
// ---------------------------------------------------------------------------

/// What a client script prints as its last stdout line.
struct Summary {
    json: Value,
    elapsed: Duration,
}

/// Runs a client script to its end (at most 2 minutes), stdout and stderr
/// going to files in the env's folder; panics with both unless it exits 0.
fn run_client(env: &TestEnv, name: &str, cmd: &mut Command) -> Summary {
    let out_path = env.dir.path().join(format!("{name}.stdout"));
    let err_path = env.dir.path().join(format!("{name}.stderr"));
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("client stdout file"))
        .stderr(File::create(&err_path).expect("client stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {name} client {cmd:?}: {e}"));
    let deadline = started + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let output = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    match status {
        None => panic!("the {name} client did not finish within 120 s\n{output}"),
        Some(status) => assert!(
            status.success(),
            "the {name} client failed ({status})\n{output}"
        ),
    }
    let line = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the {name} client's summary is not JSON ({e})\n{output}"));
    Summary { json, elapsed }
}

/// A short id unique to this run, so the user ids of a run are its own.
fn run_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!("{prefix}{}x{nanos:x}", std::process::id())
}

fn env_for(mock: &MockSchematic) -> TestEnv {
    TestEnv::with_sections(
        "",
        &format!("write_keys = [{WRITE_KEY:?}]"),
        &format!(
            "[schematic]\ncapture_url = {url:?}\ntimeout = \"5s\"\n\n[delivery]\nschedule = \"* * * * * *\"\nbackoff_base = \"100ms\"\nbackoff_max = \"1s\"\n",
            url = mock.url()
        ),
    )
}

fn start(env: &TestEnv) -> Daemon {
    env.start_with_env(&[("SCHEMATIC_API_KEY", API_KEY)])
}

// ---------------------------------------------------------------------------
// What must come out.
// ---------------------------------------------------------------------------

/// The Schematic bodies the preset mappings make of the `i`th track and
/// identify of a run (the rules are in the client scripts' comments).
fn expected_bodies(run: &str, i: usize) -> (Value, Value) {
    let user = format!("{run}-u{i}");
    let group = format!("{run}-g{}", i % 3);
    let (raw_name, name) = NAMES[i % NAMES.len()];
    let mut track = json!({
        "event": name,
        "user": {"userId": user},
        "traits": {"raw_event_name": raw_name},
    });
    if i.is_multiple_of(2) {
        track["company"] = json!({"groupId": group});
    }
    let identify = json!({
        "keys": {"userId": user},
        "name": format!("User {i}"),
        "traits": {
            "name": format!("User {i}"),
            "company_name": format!("Company {}", i % 3),
            "email": format!("u{i}@example.com"),
            "plan": if i.is_multiple_of(2) { "pro" } else { "free" },
            "seats": i,
        },
        "company": {"keys": {"groupId": group}, "name": format!("Company {}", i % 3)},
    });
    (track, identify)
}

/// The user id of a Schematic event (`user.userId` or `keys.userId`).
fn user_of(event: &Value) -> Option<&str> {
    let body = &event["body"];
    body["user"]["userId"]
        .as_str()
        .or_else(|| body["keys"]["userId"].as_str())
}

fn events_of_run(mock: &MockSchematic, run: &str) -> Vec<Value> {
    let prefix = format!("{run}-u");
    mock.events()
        .into_iter()
        .filter(|e| user_of(e).is_some_and(|u| u.starts_with(&prefix)))
        .collect()
}

/// The client's own account of its requests: every message went out, in
/// requests of at most `BATCH` and at least one full one.
fn check_summary(summary: &Summary, library: &str) {
    let s = &summary.json;
    let messages = 2 * COUNT;
    assert_eq!(s["library"], library, "{s}");
    assert_eq!(s["messages"], messages, "{s}");
    assert_eq!(s["errors"], json!([]), "{s}");
    let sizes: Vec<usize> = s["batch_sizes"]
        .as_array()
        .expect("batch_sizes")
        .iter()
        .map(|n| n.as_u64().expect("a batch size") as usize)
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), messages, "{s}");
    assert_eq!(s["requests"], sizes.len(), "{s}");
    assert!(
        sizes.iter().all(|&n| (1..=BATCH).contains(&n)) && sizes.contains(&BATCH),
        "requests should carry up to {BATCH} messages, at least one full: {sizes:?}"
    );
    assert!(
        sizes.len() >= messages.div_ceil(BATCH) && sizes.len() < messages,
        "{messages} messages in {} requests: {sizes:?}",
        sizes.len()
    );
}

/// Waits for every message of `run` at the mock, then checks each body
/// exactly, its envelope against the daemon's store, and the store itself.
fn check_run(env: &TestEnv, mock: &MockSchematic, daemon: &Daemon, run: &str, summary: &Summary) {
    let messages = 2 * COUNT;
    let arrived = eventually(Duration::from_secs(60), || {
        events_of_run(mock, run).len() >= messages
    });
    assert!(
        arrived,
        "run {run}: {} of {messages} events reached the mock; violations {:?}\nlog:\n{}",
        events_of_run(mock, run).len(),
        mock.violations(),
        daemon.logs()
    );
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let events = events_of_run(mock, run);
    assert_eq!(events.len(), messages, "no event sent twice: {events:#?}");

    let mut by_key: HashMap<(String, String), Value> = HashMap::new();
    for event in events {
        let kind = event["type"].as_str().expect("type").to_owned();
        let user = user_of(&event).expect("user").to_owned();
        let previous = by_key.insert((kind, user), event);
        assert!(
            previous.is_none(),
            "two events for one message: {previous:?}"
        );
    }
    let db = env.db();
    for i in 0..COUNT {
        let user = format!("{run}-u{i}");
        let (track, identify) = expected_bodies(run, i);
        for (kind, body) in [("track", track), ("identify", identify)] {
            let event = by_key
                .get(&(kind.to_owned(), user.clone()))
                .unwrap_or_else(|| panic!("no {kind} for {user}"));
            assert_eq!(event["body"], body, "{kind} {i} of run {run}");
            assert_eq!(event["api_key"], API_KEY);
            // sent_at is the event time the daemon stored (the client's
            // timestamp), and the key is the one of the stored delivery.
            let (timestamp, idempotency_key, state): (String, String, String) = db
                .query_row(
                    "SELECT e.timestamp, d.idempotency_key, d.state FROM events e \
                     JOIN deliveries d ON d.event_id = e.id WHERE e.user_id = ?1 AND e.type = ?2",
                    [&user, kind],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap_or_else(|e| panic!("the {kind} of {user} in the store: {e}"));
            assert_eq!(event["sent_at"], timestamp, "{kind} {i}");
            assert_eq!(event["idempotency_key"], idempotency_key, "{kind} {i}");
            // The answer to the request may come a moment before the row is
            // marked delivered.
            let delivered = state == "delivered"
                || eventually(Duration::from_secs(10), || {
                    env.count(&format!(
                        "SELECT count(*) FROM deliveries d JOIN events e ON e.id = d.event_id \
                         WHERE e.user_id = '{user}' AND e.type = '{kind}' AND d.state = 'delivered'"
                    )) == 1
                });
            assert!(delivered, "{kind} of {user} is {state}, not delivered");
        }
    }

    let library = summary.json["library"].as_str().expect("library");
    let of_run = format!("FROM events WHERE user_id LIKE '{run}-u%'");
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) {of_run} AND status = 'mapped' \
             AND json_extract(raw, '$.context.library.name') = '{library}' \
             AND json_extract(raw, '$.writeKey') IS NULL"
        )),
        messages as i64,
        "every message stored once, mapped, from {library}, without its write key"
    );
    // The raw message keeps what the preset does not forward.
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) {of_run} AND type = 'track' \
             AND json_extract(raw, '$.properties.order_id') = replace(user_id, '-u', '-order-') \
             AND json_extract(raw, '$.properties.currency') = 'USD' \
             AND json_type(raw, '$.properties.products') = 'array'"
        )),
        COUNT as i64,
        "track properties are kept in the stored message"
    );
    // The messages of one request share one received_at: the store saw them
    // arrive in batches, as many as the client made at most (two concurrent
    // requests may share a millisecond), one of them a full batch.
    let requests = summary.json["requests"].as_i64().expect("requests");
    let distinct = env.count(&format!("SELECT count(DISTINCT received_at) {of_run}"));
    assert!(
        distinct <= requests && distinct < messages as i64,
        "{distinct} arrival times for {messages} messages in {requests} requests"
    );
    let largest = env.count(&format!(
        "SELECT max(n) FROM (SELECT count(*) AS n {of_run} GROUP BY received_at)"
    ));
    assert!(
        largest >= BATCH as i64,
        "the largest request stored {largest} messages"
    );
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[test]
fn segment_analytics_python_batches_reach_schematic() {
    let python = python();
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let daemon = start(&env);
    let script = repo()
        .join("tests")
        .join("clients")
        .join("python_client.py");
    // Once as the library comes, once with its gzip setting on.
    for gzip in [false, true] {
        let run = run_id(if gzip { "pyz" } else { "py" });
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(daemon.url(""))
            .arg(WRITE_KEY)
            .arg(&run)
            .arg(COUNT.to_string())
            .args(["--batch-size", &BATCH.to_string()]);
        if gzip {
            cmd.arg("--gzip");
        }
        let summary = run_client(&env, &run, &mut cmd);
        eprintln!(
            "segment-analytics-python {} (gzip {gzip}): {} messages in {} requests, {:.1?}",
            summary.json["version"].as_str().unwrap_or("?"),
            summary.json["messages"],
            summary.json["requests"],
            summary.elapsed
        );
        assert_eq!(summary.json["gzip"], gzip);
        check_summary(&summary, PYTHON_LIBRARY);
        check_run(&env, &mock, &daemon, &run, &summary);
    }
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
}

#[test]
fn segment_analytics_node_batches_reach_schematic() {
    let node_dir = node_dir();
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let daemon = start(&env);
    let run = run_id("js");
    let script = repo().join("tests").join("clients").join("node_client.mjs");
    let summary = run_client(
        &env,
        &run,
        Command::new("node")
            .arg(&script)
            .arg(daemon.url(""))
            .arg(WRITE_KEY)
            .arg(&run)
            .arg(COUNT.to_string())
            .args(["--batch-size", &BATCH.to_string()])
            .env("SEGMENT_NODE_DIR", &node_dir),
    );
    eprintln!(
        "@segment/analytics-node {}: {} messages in {} requests, {:.1?}",
        summary.json["version"].as_str().unwrap_or("?"),
        summary.json["messages"],
        summary.json["requests"],
        summary.elapsed
    );
    check_summary(&summary, NODE_LIBRARY);
    assert!(
        summary.json["statuses"]
            .as_array()
            .is_some_and(|s| s.iter().all(|status| status == 200)),
        "{}",
        summary.json
    );
    check_run(&env, &mock, &daemon, &run, &summary);
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
}
