//! Engage audiences: membership from messages and snapshots, scheduled diff
//! syncs, newest-wins, and an interrupted sync (SPEC 2.2 and 5).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::mock_schematic::{Fault, MockSchematic};
use support::{eventually, http, TestEnv};

const API_KEY: &str = "sch_aud_key";
const AUDIENCE: &str = "high_value_users";

fn env_for(mock: &MockSchematic) -> TestEnv {
    TestEnv::new(&format!(
        "[schematic]\ncapture_url = {url:?}\ntimeout = \"1s\"\n\n[delivery]\nschedule = \"* * * * * *\"\nbackoff_base = \"50ms\"\nbackoff_max = \"100ms\"\n",
        url = mock.url()
    ))
}

fn key_env() -> [(&'static str, &'static str); 1] {
    [("SCHEMATIC_API_KEY", API_KEY)]
}

fn personas() -> Value {
    json!({"personas": {"computation_class": "audience", "computation_key": AUDIENCE}})
}

fn enter(user: &str) -> Value {
    json!({"type": "identify", "userId": user, "traits": {AUDIENCE: true}, "context": personas()})
}

fn stdout(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Audience trait values the mock received, per user, in arrival order.
fn trait_values(mock: &MockSchematic, trait_name: &str) -> HashMap<String, Vec<bool>> {
    let mut out: HashMap<String, Vec<bool>> = HashMap::new();
    for e in mock.events() {
        if let (Some(user), Some(v)) = (
            e["body"]["keys"]["userId"].as_str(),
            e["body"]["traits"][trait_name].as_bool(),
        ) {
            out.entry(user.to_string()).or_default().push(v);
        }
    }
    out
}

#[test]
fn engage_membership_is_sent_by_syncs_only_as_changes() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let daemon = env.start_with_env(&key_env());
    let client = http();
    let post = |route: &str, body: Value| {
        let resp = client
            .post(daemon.url(route))
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().unwrap_or_default()
        );
    };
    for u in ["u1", "u2", "u3"] {
        post("/v1/identify", enter(u));
    }
    // a membership message without a boolean is bad input
    let bad = client
        .post(daemon.url("/v1/identify"))
        .body(
            json!({"userId": "u9", "traits": {AUDIENCE: "yes"}, "context": personas()}).to_string(),
        )
        .send()
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        mock.events().is_empty(),
        "membership waits for the sync: {:?}",
        mock.events()
    );

    let out = env.run(&["audiences", "sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("high_value_users: added 3, removed 0, enqueued 3"),
        "{}",
        stdout(&out)
    );
    assert!(mock.wait_for_events(3, Duration::from_secs(10)));
    let values = trait_values(&mock, AUDIENCE);
    assert_eq!(values.len(), 3);
    assert!(values.values().all(|v| v == &vec![true]));
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());

    post(
        "/v1/identify",
        json!({"userId": "u1", "traits": {AUDIENCE: false}, "context": personas()}),
    );
    post(
        "/v1/track",
        json!({"userId": "u2", "event": "Audience Exited", "properties": {AUDIENCE: false}, "context": personas()}),
    );
    let dry = env.run(&["audiences", "sync", "--dry-run"]);
    assert!(
        stdout(&dry).contains("would add 0, would remove 2"),
        "{}",
        stdout(&dry)
    );
    let out = env.run(&["audiences", "sync", AUDIENCE]);
    assert!(
        stdout(&out).contains("added 0, removed 2, enqueued 2"),
        "{}",
        stdout(&out)
    );
    assert!(mock.wait_for_events(5, Duration::from_secs(10)));
    let values = trait_values(&mock, AUDIENCE);
    assert_eq!(values["u1"], vec![true, false]);
    assert_eq!(values["u2"], vec![true, false]);
    assert_eq!(values["u3"], vec![true]);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE status = 'membership'"),
        5,
        "not mapped as events"
    );

    let out = env.run(&["audiences", "sync"]);
    assert!(stdout(&out).contains("added 0, removed 0, enqueued 0"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        mock.events().len(),
        5,
        "a sync with no change sends nothing"
    );

    let list = env.run(&["audiences", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["key"], AUDIENCE);
    assert_eq!(list[0]["members"], 1);
    assert!(list[0]["last_synced_at"].is_string());
    assert_eq!(
        env.count("SELECT count(*) FROM sync_runs WHERE finished_at IS NOT NULL AND error IS NULL"),
        3
    );
}

#[test]
fn snapshots_replace_membership_and_syncs_send_the_difference() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let file = env.dir.path().join("snap.txt");
    let first: String = (0..1000).map(|i| format!("user-{i}\n")).collect();
    std::fs::write(&file, first).unwrap();
    let out = env.run(&["audiences", "import", "Trial Users", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("imported 1000 users into Trial Users: 1000 became members"),
        "{}",
        stdout(&out)
    );
    assert_eq!(env.run(&["audiences", "sync"]).status.code(), Some(0));
    assert_eq!(
        env.run_with_env(&["drain"], &key_env()).status.code(),
        Some(0)
    );
    let values = trait_values(&mock, "trial_users");
    assert_eq!(values.len(), 1000);
    assert!(values.values().all(|v| v == &vec![true]));

    // 900 of them plus 50 new ones, as NDJSON
    let second: String = (100..1050)
        .map(|i| format!("{}\n", json!({"userId": format!("user-{i}")})))
        .collect();
    std::fs::write(&file, second).unwrap();
    assert_eq!(
        env.run(&["audiences", "import", "Trial Users", file.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let dry = env.run(&["audiences", "sync", "--dry-run", "--json"]);
    let dry: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["audiences"][0]["added"], 50);
    assert_eq!(dry["audiences"][0]["removed"], 100);
    assert_eq!(
        env.run_with_env(&["drain"], &key_env()).status.code(),
        Some(0)
    );
    assert_eq!(mock.events().len(), 1000, "the dry run sent nothing");
    assert_eq!(env.run(&["audiences", "sync"]).status.code(), Some(0));
    assert_eq!(
        env.run_with_env(&["drain"], &key_env()).status.code(),
        Some(0)
    );
    let new_events = &mock.events()[1000..];
    assert_eq!(new_events.len(), 150);
    let falses = new_events
        .iter()
        .filter(|e| e["body"]["traits"]["trial_users"] == false)
        .count();
    assert_eq!(falses, 100);

    // an empty snapshot is refused and changes nothing
    std::fs::write(&file, "").unwrap();
    let out = env.run(&["audiences", "import", "Trial Users", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("--allow-empty"), "{}", stdout(&out));
    assert_eq!(
        env.count("SELECT count(*) FROM audience_members WHERE desired = 1"),
        950
    );
    let out = env.run(&[
        "audiences",
        "import",
        "Trial Users",
        file.to_str().unwrap(),
        "--allow-empty",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        env.count("SELECT count(*) FROM audience_members WHERE desired = 1"),
        0
    );
}

#[test]
fn a_newer_value_supersedes_a_stale_one_that_is_being_retried() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let file = env.dir.path().join("in.ndjson");
    std::fs::write(&file, format!("{}\n", enter("flip"))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    mock.push_faults([Fault::Status(500)]);
    env.run_with_env(&["drain"], &key_env());
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(
        env.query_strings("SELECT state FROM deliveries"),
        vec!["pending"],
        "the true waits for a retry"
    );

    std::fs::write(&file, format!("{}\n", json!({"type": "identify", "userId": "flip", "traits": {AUDIENCE: false}, "context": personas()}))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    assert!(eventually(Duration::from_secs(10), || {
        env.run_with_env(&["drain"], &key_env());
        env.count("SELECT count(*) FROM deliveries WHERE state = 'pending'") == 0
    }));
    assert_eq!(
        trait_values(&mock, AUDIENCE)["flip"],
        vec![false],
        "the stale true never lands"
    );
    let states = env.query_strings("SELECT state FROM deliveries ORDER BY id");
    assert_eq!(states, vec!["superseded", "delivered"]);
}

#[test]
fn a_stale_value_in_flight_is_never_sent_after_the_newer_one() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let file = env.dir.path().join("in.ndjson");
    std::fs::write(&file, format!("{}\n", enter("racer"))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    // the true stays in flight for 900 ms (within the 1 s timeout) while the
    // false is enqueued: the false must wait for it
    mock.push_faults([Fault::Delay(Duration::from_millis(900))]);
    let daemon = env.start_with_env(&key_env());
    assert!(mock.wait_for_requests(1, Duration::from_secs(10)));
    std::fs::write(&file, format!("{}\n", json!({"type": "identify", "userId": "racer", "traits": {AUDIENCE: false}, "context": personas()}))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    assert!(
        eventually(Duration::from_secs(15), || env.count(
            "SELECT count(*) FROM deliveries WHERE state IN ('pending','in_flight')"
        ) == 0),
        "{}",
        daemon.logs()
    );
    let values = trait_values(&mock, AUDIENCE);
    assert_eq!(
        values["racer"],
        vec![true, false],
        "in order, never both at once"
    );
    assert_eq!(mock.max_in_flight(), 1);
}

#[test]
fn an_interrupted_sync_resumes_and_leaves_the_state_consistent() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock);
    let file = env.dir.path().join("big.txt");
    let ids: String = (0..60_000).map(|i| format!("member-{i:06}\n")).collect();
    std::fs::write(&file, ids).unwrap();
    assert_eq!(
        env.run(&["audiences", "import", "Big", file.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let mut child = std::process::Command::new(support::bin())
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "audiences",
            "sync",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // kill it after its first chunks committed, before it is done
    let started = eventually(Duration::from_secs(20), || {
        env.count("SELECT count(*) FROM deliveries") > 0
    });
    child.kill().unwrap();
    let _ = child.wait();
    assert!(started);
    // whatever was committed is consistent: each synced pair has its delivery
    assert_eq!(
        env.count("SELECT count(*) FROM audience_members WHERE synced IS NOT NULL"),
        env.count("SELECT count(*) FROM deliveries"),
    );
    assert_eq!(env.run(&["audiences", "sync"]).status.code(), Some(0));
    assert_eq!(
        env.count("SELECT count(*) FROM audience_members WHERE synced IS NOT desired"),
        0
    );
    assert_eq!(
        env.run_with_env(&["drain"], &key_env()).status.code(),
        Some(0)
    );
    let values = trait_values(&mock, "big");
    assert_eq!(
        values.len(),
        60_000,
        "every member reached Schematic at least once"
    );
    let runs =
        env.query_strings("SELECT coalesce(finished_at, 'unfinished') FROM sync_runs ORDER BY id");
    assert_eq!(runs.len(), 2);
}

#[test]
fn a_newer_value_waits_a_lease_after_a_stale_request_went_unanswered() {
    let mock = MockSchematic::start(API_KEY);
    // lease 4 s: a request the daemon gave up on (timeout 1 s) fences its pair for 4 s
    let env = TestEnv::new(&format!(
        "[schematic]\ncapture_url = {url:?}\ntimeout = \"1s\"\n\n[delivery]\nschedule = \"* * * * * *\"\nbackoff_base = \"50ms\"\nbackoff_max = \"100ms\"\nlease = \"4s\"\n",
        url = mock.url()
    ));
    let file = env.dir.path().join("in.ndjson");
    std::fs::write(&file, format!("{}\n", enter("slow"))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    // Schematic takes 3 s over the true; the daemon stops waiting after 1 s,
    // but the true still lands, 2 s after the daemon gave up on it
    mock.push_faults([Fault::Delay(Duration::from_secs(3))]);
    let _daemon = env.start_with_env(&key_env());
    assert!(mock.wait_for_requests(1, Duration::from_secs(10)));
    std::fs::write(&file, format!("{}\n", json!({"type": "identify", "userId": "slow", "traits": {AUDIENCE: false}, "context": personas()}))).unwrap();
    env.run(&["ingest", file.to_str().unwrap()]);
    env.run(&["audiences", "sync"]);
    assert!(eventually(Duration::from_secs(20), || {
        trait_values(&mock, AUDIENCE)
            .get("slow")
            .is_some_and(|v| v.last() == Some(&false))
            && env.count("SELECT count(*) FROM deliveries WHERE state IN ('pending','in_flight')")
                == 0
    }));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        trait_values(&mock, AUDIENCE)["slow"],
        vec![true, false],
        "the late true landed before the false"
    );
}
