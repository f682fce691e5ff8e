//! Operations: metrics, health, logs, config errors, retention and purge
//! (SPEC 8, 9, 10).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::mock_schematic::MockSchematic;
use support::{eventually, http, TestEnv};

const API_KEY: &str = "sch_secret_never_logged_42";

fn env_for(mock: &MockSchematic, store: &str, extra: &str) -> TestEnv {
    TestEnv::with_sections(
        store,
        "",
        &format!(
            "[schematic]\ncapture_url = {url:?}\ntimeout = \"1s\"\n\n[delivery]\nschedule = \"* * * * * *\"\nbackoff_base = \"50ms\"\nbackoff_max = \"100ms\"\n{extra}\n",
            url = mock.url()
        ),
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
}

#[test]
fn metrics_health_and_logs_tell_what_happens_without_leaking_the_key() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "", "\n[log]\nformat = \"json\"\n");
    let daemon = env.start_with_env(&[("SCHEMATIC_API_KEY", API_KEY), ("RUST_LOG", "debug")]);
    let client = http();
    for i in 0..3 {
        let resp = client
            .post(daemon.url("/v1/track"))
            .body(
                json!({"userId": "u", "event": "Metered", "messageId": format!("m{i}")})
                    .to_string(),
            )
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    client
        .post(daemon.url("/v1/track"))
        .body(json!({"userId": "u", "event": "Metered", "messageId": "m0"}).to_string())
        .send()
        .unwrap();
    client
        .post(daemon.url("/v1/track"))
        .body("{oops")
        .send()
        .unwrap();
    mock.reject_event(Some("poison"));
    client
        .post(daemon.url("/v1/track"))
        .body(json!({"userId": "u", "event": "Poison", "messageId": "bad"}).to_string())
        .send()
        .unwrap();
    assert!(mock.wait_for_events(3, Duration::from_secs(10)));
    assert!(eventually(Duration::from_secs(10), || env.count(
        "SELECT count(*) FROM deliveries WHERE state = 'failed'"
    ) == 1
        && env.count(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'"
        ) == 3));

    let text = client
        .get(daemon.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(metric(&text, "schematic_sync_messages_ingested_total"), 4.0);
    assert_eq!(
        metric(&text, "schematic_sync_messages_deduplicated_total"),
        1.0
    );
    // one key per stored message
    assert_eq!(metric(&text, "schematic_sync_dedupe_keys"), 4.0);
    assert_eq!(
        metric(
            &text,
            "schematic_sync_messages_rejected_total{reason=\"invalid_json\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "schematic_sync_queue_depth{state=\"delivered\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "schematic_sync_queue_depth{state=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "schematic_sync_deliveries_delivered_total"),
        3.0
    );
    assert_eq!(metric(&text, "schematic_sync_deliveries_failed_total"), 1.0);
    assert_eq!(metric(&text, "schematic_sync_paused"), 0.0);
    assert!(
        metric(
            &text,
            "schematic_sync_schematic_request_duration_seconds_count"
        ) >= 2.0
    );
    assert!(
        text.contains("schematic_sync_schematic_request_duration_seconds_bucket{le=\"0.005\"}"),
        "a histogram"
    );
    assert!(text.contains("schematic_sync_oldest_due_age_seconds"));

    let health: Value = client
        .get(daemon.url("/healthz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sending"], "active");

    let logs = daemon.logs();
    assert!(!logs.contains(API_KEY), "the API key appears in the log");
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.len() >= 3 && lines.len() == logs.lines().count(),
        "every log line is JSON:\n{logs}"
    );
    let failures: Vec<&Value> = lines
        .iter()
        .filter(|l| l["delivery_id"].is_number())
        .collect();
    assert_eq!(
        failures.len(),
        1,
        "one line per failed delivery: {failures:?}"
    );
    assert_eq!(failures[0]["status"], 400);
}

#[test]
fn healthz_and_metrics_show_sending_paused_without_a_key() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "", "");
    let daemon = env.start();
    let client = http();
    let health: Value = client
        .get(daemon.url("/healthz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["paused"], true, "{health}");
    assert!(health["sending"]
        .as_str()
        .unwrap()
        .contains("no Schematic API key"));
    let text = client
        .get(daemon.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(metric(&text, "schematic_sync_paused"), 1.0);
}

#[test]
fn config_errors_name_the_key_line_and_reason() {
    let cases = [
        ("[delivery]\nretry_windw = \"4h\"\n", "retry_windw"),
        (
            "[delivery]\nbackoff_max = \"five minutes\"\n",
            "invalid duration",
        ),
        (
            "[audiences]\nschedule = \"every hour\"\n",
            "invalid schedule",
        ),
        ("[store]\nmax_size = \"10 parsecs\"\n", "invalid size"),
    ];
    for (text, needle) in cases {
        let env = TestEnv::new("");
        std::fs::write(&env.config_path, text).unwrap();
        let out = env.run(&["config", "check"]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("line 2"),
            "{text}: {err}"
        );
    }
    let env = TestEnv::new("[[mappings]]\nname = \"Signups\"\ntrigger = 'event = \"Signed Up\"'\naction = \"track\"\n[mappings.fields]\nevent_name = \"$.event\"\n");
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"Signups\": track when event = \"Signed Up\""),
        "{text}"
    );
    assert!(text.contains("event_name = \"$.event\""), "{text}");
    let presets = TestEnv::new("");
    let text = String::from_utf8_lossy(&presets.run(&["config", "check"]).stdout).to_string();
    assert!(
        text.contains("\"Track Event\"") && text.contains("\"Identify User\""),
        "{text}"
    );
}

#[test]
fn the_bundled_config_is_valid_and_lists_every_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config.toml")).unwrap();
    for key in [
        "path",
        "synchronous",
        "max_size",
        "retention",
        "listen",
        "write_keys",
        "max_message_size",
        "max_request_size",
        "max_batch_messages",
        "shutdown_timeout",
        "capture_url",
        "api_key_env",
        "api_key",
        "batch_size",
        "concurrency",
        "max_requests_per_second",
        "timeout",
        "schedule",
        "backoff_base",
        "backoff_max",
        "retry_window",
        "max_attempts",
        "lease",
        "user_key",
        "format",
        "level",
    ] {
        assert!(
            text.contains(&format!("{key} =")),
            "config.toml lacks {key}"
        );
    }
    let out = std::process::Command::new(support::bin())
        .args([
            "--config",
            &format!("{root}/config.toml"),
            "config",
            "check",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn retention_deletes_delivered_rows_and_keeps_failed_ones_until_purged() {
    let mock = MockSchematic::start(API_KEY);
    let env = env_for(&mock, "retention = \"2s\"", "");
    let daemon = env.start_with_env(&[("SCHEMATIC_API_KEY", API_KEY)]);
    let client = http();
    mock.reject_event(Some("kept"));
    for (id, event) in [("a", "Gone"), ("b", "Gone"), ("c", "Kept")] {
        client
            .post(daemon.url("/v1/track"))
            .body(json!({"userId": "u", "event": event, "messageId": id}).to_string())
            .send()
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || env.count(
        "SELECT count(*) FROM deliveries WHERE state IN ('delivered','failed')"
    ) == 3));
    assert!(
        eventually(Duration::from_secs(15), || env
            .count("SELECT count(*) FROM deliveries")
            == 1),
        "delivered rows deleted"
    );
    assert!(eventually(Duration::from_secs(10), || env
        .count("SELECT count(*) FROM events")
        == 1));
    assert_eq!(
        env.query_strings("SELECT message_id FROM events"),
        vec!["c"]
    );
    assert_eq!(env.count("SELECT count(*) FROM delivery_attempts WHERE delivery_id NOT IN (SELECT id FROM deliveries)"), 0);

    let out = env.run(&["purge", "--failed", "--before", "0s"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 1 failed"));
    // the event of the purged delivery goes at the next sweep; the newest
    // event always stays, so that ids are never handed out twice
    client
        .post(daemon.url("/v1/track"))
        .body(json!({"userId": "u", "event": "Gone", "messageId": "d"}).to_string())
        .send()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || env
            .query_strings("SELECT message_id FROM events")
            == ["d"]),
        "{:?}",
        env.query_strings("SELECT message_id FROM events")
    );
}
