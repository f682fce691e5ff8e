//! Delivery: mappings, the Schematic wire format, retries, poison isolation,
//! pausing on a bad key, crash safety and replay, against the strict mock
//! Schematic (SPEC 3, 4, 6, 7).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::mock_schematic::{Fault, MockSchematic};
use support::{eventually, http, TestEnv};

const API_KEY: &str = "sch_test_key";

/// A test env whose config points at the mock, with fast retries.
fn env_for(mock: &MockSchematic, extra: &str) -> TestEnv {
    TestEnv::new(&format!(
        "[schematic]\ncapture_url = {url:?}\ntimeout = \"1s\"\n\n[delivery]\nschedule = \"* * * * * *\"\nbackoff_base = \"50ms\"\nbackoff_max = \"200ms\"\n{extra}\n",
        url = mock.url()
    ))
}

fn with_key() -> [(&'static str, &'static str); 1] {
    [("SCHEMATIC_API_KEY", API_KEY)]
}

/// Stores messages through the `ingest` command (NDJSON backfill).
fn ingest(env: &TestEnv, messages: &[Value]) {
    let file = env.dir.path().join(format!("in-{}.ndjson", rand_suffix()));
    let text: String = messages.iter().map(|m| format!("{m}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let out = env.run(&["ingest", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn drain(env: &TestEnv) -> (i32, String) {
    let out = env.run_with_env(&["drain"], &with_key());
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn state_counts(env: &TestEnv) -> Value {
    let out = env.run(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v
}

fn track(id: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u1", "event": event, "timestamp": "2023-01-01T00:00:00.000Z"})
}

#[test]
fn track_and_identify_match_segments_destination() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    let daemon = env.start_with_env(&with_key());
    let client = http();
    let post = |route: &str, body: Value| {
        let resp = client
            .post(daemon.url(route))
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    };
    post(
        "/v1/track",
        json!({"event": "Order Completed", "userId": "u1", "context": {"groupId": "g1"}, "timestamp": "2023-01-01T00:00:00.000Z", "messageId": "t1"}),
    );
    post(
        "/v1/identify",
        json!({"userId": "u1", "traits": {"name": "Ann", "company_name": "Acme", "plan": "pro", "gone": null}, "context": {"groupId": "g1"}, "timestamp": "2023-01-02T03:04:05.678Z", "messageId": "i1"}),
    );
    post(
        "/v1/identify",
        json!({"userId": "u2", "traits": {"seats": 3}, "timestamp": "2023-01-02T00:00:00Z", "messageId": "i2"}),
    );
    assert!(
        mock.wait_for_events(3, Duration::from_secs(15)),
        "log:\n{}",
        daemon.logs()
    );
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let events = mock.events();
    let by_type = |t: &str, user: &str| {
        events
            .iter()
            .find(|e| {
                e["type"] == t
                    && (e["body"]["user"]["userId"] == user || e["body"]["keys"]["userId"] == user)
            })
            .cloned()
            .unwrap()
    };
    let t = by_type("track", "u1");
    assert_eq!(t["sent_at"], "2023-01-01T00:00:00.000Z");
    assert_eq!(t["api_key"], API_KEY);
    assert_eq!(
        t["body"],
        json!({"event": "order_completed", "user": {"userId": "u1"}, "company": {"groupId": "g1"}, "traits": {"raw_event_name": "Order Completed"}})
    );
    let i = by_type("identify", "u1");
    assert_eq!(i["sent_at"], "2023-01-02T03:04:05.678Z");
    assert_eq!(
        i["body"],
        json!({"keys": {"userId": "u1"}, "name": "Ann", "traits": {"name": "Ann", "company_name": "Acme", "plan": "pro"}, "company": {"keys": {"groupId": "g1"}, "name": "Acme"}})
    );
    let i2 = by_type("identify", "u2");
    assert_eq!(
        i2["body"],
        json!({"keys": {"userId": "u2"}, "traits": {"seats": 3}}),
        "no company when its keys resolve to nothing"
    );
    let keys: Vec<&str> = events
        .iter()
        .map(|e| e["idempotency_key"].as_str().unwrap())
        .collect();
    assert!(keys.iter().all(|k| !k.is_empty() && k.len() <= 255));
    // the mock counts an event before its answer reaches the daemon
    assert!(eventually(Duration::from_secs(10), || env.count(
        "SELECT count(*) FROM deliveries WHERE state = 'delivered'"
    ) == 3));
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE status = 'mapped'"),
        3
    );
    assert!(
        !daemon.logs().contains(API_KEY),
        "the API key must never be logged"
    );
}

#[test]
fn event_names_are_normalised_and_unmatched_events_skipped() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    let names = [
        ("orderCompleted", "order_completed"),
        ("Signed Up!!", "signed_up"),
        ("Item #5 Viewed", "item_5_viewed"),
        ("Order-Completed", "order_completed"),
    ];
    let mut msgs: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, (raw, _))| track(&format!("n{i}"), raw))
        .collect();
    msgs.push(json!({"type": "page", "userId": "u1", "messageId": "p1"}));
    msgs.push(track("bad-name", "!!!"));
    ingest(&env, &msgs);
    let (code, out) = drain(&env);
    assert_eq!(code, 0, "{out}");
    let got: Vec<(String, String)> = mock
        .events()
        .iter()
        .map(|e| {
            (
                e["body"]["traits"]["raw_event_name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["body"]["event"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (raw, want) in names {
        assert!(
            got.contains(&(raw.to_string(), want.to_string())),
            "{raw} → {want}: {got:?}"
        );
    }
    assert_eq!(
        env.query_strings("SELECT status FROM events WHERE message_id = 'p1'"),
        vec!["skipped"]
    );
    let reason = env.query_strings("SELECT d.last_error FROM deliveries d JOIN events e ON e.id = d.event_id WHERE e.message_id = 'bad-name' AND d.state = 'failed'");
    assert_eq!(reason.len(), 1);
    assert!(
        reason[0].contains("no characters Schematic accepts"),
        "{reason:?}"
    );
}

#[test]
fn custom_mappings_replace_presets_and_bad_ones_stop_the_start() {
    let mock = MockSchematic::start(API_KEY);
    let mappings = r#"
[[mappings]]
name = "Plans"
trigger = 'type = "track" and (event = "Plan Changed" or contains(event, "Upgrade")) and properties.plan != null'
action = "track"
[mappings.fields]
event_name = "plan_changed"
user_keys = { id = ["$.userId", "$.anonymousId"] }
traits = { plan = "$.properties.plan", seats = "$.properties.seats" }

[[mappings]]
name = "Profiles"
trigger = 'type = "identify" and match(userId, "acct_*")'
action = "identify"
[mappings.fields]
user_keys = { account = "$.userId" }
user_name = "{{traits.first}} {{traits.last}}"
"#;
    let env = env_for(&mock, mappings);
    ingest(
        &env,
        &[
            json!({"type": "track", "messageId": "c1", "anonymousId": "anon", "event": "Plan Changed", "properties": {"plan": "pro", "seats": 5}}),
            json!({"type": "track", "messageId": "c2", "userId": "u", "event": "Plan Changed"}),
            json!({"type": "identify", "messageId": "c3", "userId": "acct_7", "traits": {"first": "Ada", "last": "L"}}),
            json!({"type": "identify", "messageId": "c4", "userId": "other"}),
        ],
    );
    let (code, out) = drain(&env);
    assert_eq!(code, 0, "{out}");
    let events = mock.events();
    assert_eq!(events.len(), 2, "{events:?}");
    let t = events.iter().find(|e| e["type"] == "track").unwrap();
    assert_eq!(
        t["body"],
        json!({"event": "plan_changed", "user": {"id": "anon"}, "traits": {"plan": "pro", "seats": 5, "raw_event_name": "plan_changed"}})
    );
    let i = events.iter().find(|e| e["type"] == "identify").unwrap();
    assert_eq!(
        i["body"],
        json!({"keys": {"account": "acct_7"}, "name": "Ada L"})
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE status = 'skipped'"),
        2
    );

    // a bad trigger stops the start, naming the mapping and the position
    let bad = env_for(&mock, "[[mappings]]\nname = \"Broken\"\ntrigger = 'type = = \"track\"'\naction = \"track\"\n[mappings.fields]\nevent_name = \"$.event\"\n");
    let out = bad.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Broken") && err.contains("position"), "{err}");

    // a 51st mapping is refused
    let many: String = (0..51).map(|i| format!("[[mappings]]\nname = \"m{i}\"\ntrigger = 'type = \"track\"'\naction = \"track\"\n[mappings.fields]\nevent_name = \"$.event\"\n\n")).collect();
    let out = env_for(&mock, &many).run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 50 mappings"));
}

#[test]
fn transient_errors_are_retried_until_delivered() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    ingest(&env, &[track("r1", "Retried")]);
    mock.push_faults([
        Fault::Status(500),
        Fault::Status(502),
        Fault::Drop,
        Fault::Delay(Duration::from_secs(3)),
        Fault::Status(408),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.events().is_empty() && Instant::now() < deadline {
        drain(&env);
        std::thread::sleep(Duration::from_millis(250));
    }
    let unique = mock.unique_events();
    assert_eq!(unique.len(), 1, "delivered once per idempotency key");
    assert_eq!(
        env.query_strings("SELECT state FROM deliveries"),
        vec!["delivered"]
    );
    let attempts = env.count("SELECT count(*) FROM delivery_attempts");
    assert_eq!(attempts, 6, "five failed attempts and the one that worked");
    assert_eq!(env.count("SELECT attempts FROM deliveries"), 6);
    let errors = env.query_strings(
        "SELECT coalesce(CAST(status AS TEXT), error) FROM delivery_attempts ORDER BY id",
    );
    assert_eq!(&errors[..2], &["500", "502"]);
    assert!(errors[2].contains("connection"), "{errors:?}");
    assert!(errors[3].contains("no answer"), "{errors:?}");
    assert_eq!(errors[4], "408");
    // the idempotency key is the same on every attempt
    let keys: std::collections::HashSet<String> = mock
        .requests()
        .iter()
        .flat_map(|r| r.events())
        .map(|e| e["idempotency_key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 1);
}

#[test]
fn retry_after_is_obeyed_before_any_new_request() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    ingest(&env, &[track("ra1", "Throttled")]);
    mock.push_faults([Fault::StatusWithRetryAfter(429, "2".into())]);
    let (_, out) = drain(&env);
    assert!(out.contains("asked to wait"), "{out}");
    let first = mock.requests()[0].at;
    // immediate drains make no request before the deadline
    for _ in 0..3 {
        drain(&env);
    }
    assert_eq!(mock.requests().len(), 1, "no request before Retry-After");
    let status = state_counts(&env);
    assert!(status["not_before"].is_string(), "{status}");
    assert!(eventually(Duration::from_secs(10), || {
        drain(&env);
        !mock.events().is_empty()
    }));
    let second = mock.requests()[1].at;
    assert!(
        second.duration_since(first) >= Duration::from_millis(1900),
        "{:?}",
        second.duration_since(first)
    );
}

#[test]
fn permanent_errors_fail_with_the_response_and_exhausted_retries_fail() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "max_attempts = 2");
    ingest(&env, &[track("p1", "Five Oh One")]);
    mock.push_faults([Fault::Status(501)]);
    let (code, out) = drain(&env);
    assert_eq!(code, 1, "a failure makes drain exit 1: {out}");
    assert_eq!(
        env.query_strings("SELECT state FROM deliveries"),
        vec!["failed"]
    );
    assert_eq!(env.count("SELECT last_status FROM deliveries"), 501);

    ingest(&env, &[track("p2", "Always Down")]);
    mock.push_faults([Fault::Status(503), Fault::Status(503)]);
    assert!(eventually(Duration::from_secs(10), || {
        drain(&env);
        env.count("SELECT count(*) FROM deliveries WHERE state = 'failed'") == 2
    }));
    assert_eq!(env.count("SELECT attempts FROM deliveries d JOIN events e ON e.id = d.event_id WHERE e.message_id = 'p2'"), 2);
    let out = env.run(&["failed", "--json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert!(rows
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["last_status"] == 503 && r["attempts"] == 2));
}

#[test]
fn one_poison_event_fails_alone_and_replays_after_the_fix() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    let msgs: Vec<Value> = (0..50)
        .map(|i| {
            track(
                &format!("poison-{i}"),
                if i == 17 { "Bad Apple" } else { "Good Apple" },
            )
        })
        .collect();
    ingest(&env, &msgs);
    mock.reject_event(Some("bad_apple"));
    let (code, out) = drain(&env);
    assert_eq!(code, 1, "{out}");
    assert_eq!(mock.unique_events().len(), 49);
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 'delivered'"),
        49
    );
    let failed = env.query_strings("SELECT e.message_id || ' ' || d.last_status || ' ' || d.last_response FROM failed_deliveries d JOIN events e ON e.message_id = d.message_id");
    assert_eq!(failed.len(), 1);
    assert!(failed[0].starts_with("poison-17 400 "), "{failed:?}");
    let table = env.run(&["failed"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("message poison-17"));

    mock.reject_event(None);
    let dry = env.run(&["replay", "--all", "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would replay 1"));
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 'failed'"),
        1,
        "dry run changes nothing"
    );
    let out = env.run(&["replay", "--all"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(drain(&env).0, 0);
    assert_eq!(mock.unique_events().len(), 50);
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 'delivered'"),
        50
    );
}

#[test]
fn replay_filters_and_remap() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    ingest(&env, &[track("f1", "One"), track("f2", "Two")]);
    mock.push_faults([Fault::Status(404)]);
    mock.reject_event(Some("two"));
    env.run_with_env(&["drain"], &with_key());
    mock.reject_event(None);
    // one failed with 404 (batch), the split is not applied to 404 so both failed
    let failed = env.count("SELECT count(*) FROM deliveries WHERE state = 'failed'");
    assert_eq!(failed, 2);
    let out = env.run(&["replay", "--status", "404", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replayed"], 2);
    assert_eq!(drain(&env).0, 0);
    assert_eq!(mock.unique_events().len(), 2);
    let out = env.run(&["replay"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "replay without a filter is refused"
    );
}

#[test]
fn a_wrong_api_key_pauses_without_failing_anything() {
    let mock = MockSchematic::start("the-right-key");
    let env = env_for(&mock, "");
    ingest(
        &env,
        &(0..10)
            .map(|i| track(&format!("k{i}"), "Keyed"))
            .collect::<Vec<_>>(),
    );
    let (code, out) = drain(&env);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("paused"), "{out}");
    let status = state_counts(&env);
    assert_eq!(status["paused"], true, "{status}");
    assert_eq!(status["states"]["failed"], 0);
    assert_eq!(status["states"]["pending"], 10);
    assert_eq!(
        env.count("SELECT sum(attempts) FROM deliveries"),
        0,
        "no attempt spent while paused"
    );
    let human = String::from_utf8_lossy(&env.run(&["status"]).stdout).to_string();
    assert!(human.contains("PAUSED"), "{human}");

    mock.set_api_key(API_KEY);
    assert_eq!(drain(&env).0, 0);
    assert_eq!(mock.unique_events().len(), 10);
    assert_eq!(state_counts(&env)["paused"], false);
}

#[test]
fn without_any_key_the_daemon_ingests_and_says_sending_is_paused() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    let daemon = env.start();
    let resp = http()
        .post(daemon.url("/v1/track"))
        .body(track("nk", "No Key").to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(daemon.wait_for_log("no Schematic API key", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(mock.requests().is_empty());
    let status = state_counts(&env);
    assert_eq!(status["paused"], true);
    assert!(status["paused_reason"]
        .as_str()
        .unwrap()
        .contains("SCHEMATIC_API_KEY"));
}

#[test]
fn sigkill_with_batches_in_flight_loses_nothing() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "lease = \"2s\"");
    let mut daemon = env.start_with_env(&with_key());
    let client = http();
    let mut acknowledged = Vec::new();
    for b in 0..3 {
        let items: Vec<Value> = (0..100).map(|i| json!({"type": "track", "userId": "u", "event": "Crashy", "messageId": format!("sk-{b}-{i}")})).collect();
        let resp = client
            .post(daemon.url("/v1/batch"))
            .body(json!({"batch": items}).to_string())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        acknowledged.extend((0..100).map(|i| format!("sk-{b}-{i}")));
    }
    // every request is answered slowly, so batches are in flight when we kill
    mock.push_faults((0..4).map(|_| Fault::Delay(Duration::from_millis(800))));
    assert!(mock.wait_for_requests(1, Duration::from_secs(10)));
    daemon.kill();
    let _restarted = env.start_with_env(&with_key());
    assert!(eventually(Duration::from_secs(30), || env.count(
        "SELECT count(*) FROM deliveries WHERE state = 'delivered'"
    ) == 300));
    let seen: std::collections::HashSet<String> = mock
        .events()
        .iter()
        .map(|e| e["idempotency_key"].as_str().unwrap().to_string())
        .collect();
    let keys = env.query_strings("SELECT idempotency_key FROM deliveries");
    assert_eq!(keys.len(), 300);
    for k in keys {
        assert!(seen.contains(&k), "delivery {k} never reached Schematic");
    }
}

#[test]
fn preview_prints_the_events_and_stores_nothing() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "");
    let file = env.dir.path().join("one.json");
    std::fs::write(&file, json!({"type": "track", "event": "Order Completed", "userId": "u1", "context": {"groupId": "g1"}, "timestamp": "2023-01-01T00:00:00.000Z"}).to_string()).unwrap();
    let out = env.run(&["preview", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deliveries"][0]["mapping"], "Track Event");
    assert_eq!(
        v["deliveries"][0]["event"]["body"]["event"],
        "order_completed"
    );
    assert_eq!(
        v["deliveries"][0]["event"]["sent_at"],
        "2023-01-01T00:00:00.000Z"
    );
    assert!(!env.db_path.exists() || env.count("SELECT count(*) FROM events") == 0);
}
