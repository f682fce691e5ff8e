//! Ingest: the Segment HTTP Tracking API against the real daemon and a real
//! SQLite file (SPEC 2.1), and the `ingest`, `migrate` and `status` commands.

mod support;

use std::io::Write;
use std::time::Duration;

use reqwest::blocking::Client;
use serde_json::{json, Value};
use support::{basic, http, post_json_as, TestEnv};

const KEY: &str = "wk_test";

fn env_with_key() -> TestEnv {
    TestEnv::with_sections("", &format!("write_keys = [{KEY:?}]"), "")
}

fn post_json(client: &Client, url: &str, body: &Value) -> (u16, Value) {
    post_json_as(client, url, KEY, body)
}

fn post_raw(client: &Client, url: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = basic(client.post(url), KEY)
        .body(body)
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn assert_error(answer: &(u16, Value), status: u16, needle: &str) {
    assert_eq!(answer.0, status, "answer: {}", answer.1);
    assert_eq!(answer.1["success"], false, "{}", answer.1);
    let message = answer.1["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
    assert!(
        answer.1["code"].is_string() && answer.1["error"].is_string(),
        "{}",
        answer.1
    );
}

#[test]
fn every_route_and_auth_form_stores_the_message() {
    let env = env_with_key();
    let daemon = env.start();
    let client = http();
    let routes = [
        ("/v1/track", "track"),
        ("/v1/t", "track"),
        ("/v1/identify", "identify"),
        ("/v1/i", "identify"),
        ("/v1/group", "group"),
        ("/v1/g", "group"),
        ("/v1/page", "page"),
        ("/v1/p", "page"),
        ("/v1/screen", "screen"),
        ("/v1/s", "screen"),
        ("/v1/alias", "alias"),
        ("/v1/a", "alias"),
    ];
    for (i, (route, kind)) in routes.iter().enumerate() {
        let msg = json!({"messageId": format!("m-{i}"), "userId": "u1", "event": "Clicked",
                         "groupId": "g1", "previousId": "p1", "type": "ignored"});
        let answer = post_json(&client, &daemon.url(route), &msg);
        assert_eq!(answer, (200, json!({"success": true})), "{route}");
        let stored = env.query_strings(&format!(
            "SELECT type FROM events WHERE message_id = 'm-{i}'"
        ));
        assert_eq!(stored, vec![kind.to_string()], "{route}");
    }

    // writeKey in the body, text/plain as analytics.js sends it; the key is not stored
    let resp = client
        .post(daemon.url("/v1/t"))
        .header("Content-Type", "text/plain")
        .body(json!({"writeKey": KEY, "messageId": "body-key", "anonymousId": "a1", "event": "Viewed"}).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let raw = env.query_strings("SELECT raw FROM events WHERE message_id = 'body-key'");
    let raw: Value = serde_json::from_str(&raw[0]).unwrap();
    assert!(
        raw.get("writeKey").is_none(),
        "write key must not be stored: {raw}"
    );
    assert_eq!(raw["anonymousId"], "a1");

    // gzip body on a batch, with envelope context merged into each item
    let batch = json!({"batch": [
        {"type": "track", "event": "A", "userId": "u1", "messageId": "gz-1"},
        {"type": "identify", "userId": "u2", "messageId": "gz-2", "context": {"ip": "9.9.9.9"}},
    ], "context": {"library": {"name": "analytics-python"}, "ip": "1.1.1.1"}});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.to_string().as_bytes()).unwrap();
    let resp = basic(client.post(daemon.url("/v1/batch")), KEY)
        .header("Content-Encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let raws = env
        .query_strings("SELECT raw FROM events WHERE message_id LIKE 'gz-%' ORDER BY message_id");
    let first: Value = serde_json::from_str(&raws[0]).unwrap();
    let second: Value = serde_json::from_str(&raws[1]).unwrap();
    assert_eq!(
        first["context"],
        json!({"library": {"name": "analytics-python"}, "ip": "1.1.1.1"})
    );
    assert_eq!(
        second["context"]["ip"], "9.9.9.9",
        "the item's own context wins"
    );

    for route in ["/v1/import", "/v1/b"] {
        let id = format!("batch{}", route.replace('/', "-"));
        let answer = post_json(
            &client,
            &daemon.url(route),
            &json!({"batch": [{"type": "page", "userId": "u", "messageId": id}]}),
        );
        assert_eq!(answer.0, 200, "{route}: {}", answer.1);
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM events WHERE message_id = '{id}'"
            )),
            1
        );
    }
    // the batch envelope writeKey also authenticates
    let resp = client
        .post(daemon.url("/v1/batch"))
        .body(json!({"writeKey": KEY, "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "env-key"}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_daemon_keeps_serving() {
    let env = env_with_key();
    let daemon = env.start();
    let client = http();
    let track = daemon.url("/v1/track");

    assert_error(
        &post_raw(&client, &track, b"{\"userId\": ".to_vec()),
        400,
        "not valid JSON",
    );
    assert_error(
        &post_raw(
            &client,
            &track,
            b"{\"userId\": \"\xff\xfe\", \"event\": \"x\"}".to_vec(),
        ),
        400,
        "UTF-8",
    );
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_error(
        &post_raw(&client, &track, deep.clone().into_bytes()),
        400,
        "nested deeper",
    );
    let deep_batch = format!("{{\"batch\": [{{\"type\":\"track\",\"userId\":\"u\",\"event\":\"e\",\"properties\":{}}}]}}", &deep[..]);
    assert_error(
        &post_raw(&client, &daemon.url("/v1/batch"), deep_batch.into_bytes()),
        400,
        "batch item 0",
    );

    let big = "x".repeat(40 * 1024);
    assert_error(
        &post_json(
            &client,
            &track,
            &json!({"userId": "u", "event": "e", "properties": {"blob": big}}),
        ),
        413,
        "max_message_size",
    );
    let items: Vec<Value> = (0..2501)
        .map(|i| json!({"type": "track", "userId": "u", "event": "e", "messageId": i.to_string()}))
        .collect();
    assert_error(
        &post_json(&client, &daemon.url("/v1/batch"), &json!({"batch": items})),
        413,
        "max_batch_messages",
    );
    let items: Vec<Value> = (0..30).map(|_| json!({"type": "track", "userId": "u", "event": "e", "properties": {"blob": "y".repeat(20_000)}})).collect();
    assert_error(
        &post_json(&client, &daemon.url("/v1/batch"), &json!({"batch": items})),
        413,
        "max_request_size",
    );

    assert_error(
        &post_json(&client, &track, &json!({"event": "e"})),
        400,
        "userId or anonymousId is required",
    );
    assert_error(
        &post_json(&client, &track, &json!({"userId": "u"})),
        400,
        "event is required",
    );
    assert_error(
        &post_json(&client, &daemon.url("/v1/group"), &json!({"userId": "u"})),
        400,
        "groupId is required",
    );

    let wrong = basic(client.post(&track), "nope")
        .body(json!({"userId": "u", "event": "e"}).to_string())
        .send()
        .unwrap();
    let wrong = (wrong.status().as_u16(), wrong.json::<Value>().unwrap());
    assert_error(&wrong, 401, "not accepted");
    let none = client
        .post(&track)
        .body(json!({"userId": "u", "event": "e"}).to_string())
        .send()
        .unwrap();
    let none = (none.status().as_u16(), none.json::<Value>().unwrap());
    assert_error(&none, 401, "write key is required");

    let batch = json!({"batch": [
        {"type": "track", "userId": "u", "event": "ok", "messageId": "all-or-nothing-0"},
        {"type": "track", "userId": "u", "event": "ok", "messageId": "all-or-nothing-1"},
        {"type": "track", "userId": "u", "messageId": "all-or-nothing-2"},
    ]});
    assert_error(
        &post_json(&client, &daemon.url("/v1/batch"), &batch),
        400,
        "batch item 2: event is required",
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events"),
        0,
        "nothing from a rejected request is stored"
    );

    // still serving
    let ok = post_json(&client, &track, &json!({"userId": "u", "event": "after"}));
    assert_eq!(ok, (200, json!({"success": true})));
    assert_eq!(env.count("SELECT count(*) FROM events"), 1);
}

#[test]
fn a_repeated_message_id_is_acknowledged_and_stored_once() {
    let env = env_with_key();
    let daemon = env.start();
    let client = http();
    let msg = json!({"messageId": "dup-1", "userId": "u", "event": "Bought"});
    for _ in 0..3 {
        assert_eq!(post_json(&client, &daemon.url("/v1/track"), &msg).0, 200);
    }
    let batch = json!({"batch": [
        {"type": "track", "messageId": "dup-1", "userId": "u", "event": "Bought"},
        {"type": "track", "messageId": "dup-2", "userId": "u", "event": "Bought"},
        {"type": "track", "messageId": "dup-2", "userId": "u", "event": "Bought"},
    ]});
    assert_eq!(post_json(&client, &daemon.url("/v1/batch"), &batch).0, 200);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE message_id = 'dup-1'"),
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE message_id = 'dup-2'"),
        1
    );
    // a message without messageId gets one
    assert_eq!(
        post_json(
            &client,
            &daemon.url("/v1/identify"),
            &json!({"userId": "u"})
        )
        .0,
        200
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM events WHERE type = 'identify' AND length(message_id) = 36"
        ),
        1
    );
}

#[test]
fn event_time_is_corrected_for_client_clock_skew() {
    let env = env_with_key();
    let daemon = env.start();
    let client = http();
    // the client's clock is one hour ahead: the event happened 5 s before it was sent
    let sent = chrono::Utc::now() + chrono::Duration::hours(1);
    let original = sent - chrono::Duration::seconds(5);
    let msg = json!({"messageId": "skew", "userId": "u", "event": "E",
                     "originalTimestamp": original.to_rfc3339(), "sentAt": sent.to_rfc3339()});
    assert_eq!(post_json(&client, &daemon.url("/v1/track"), &msg).0, 200);
    let row = env.db().query_row(
        "SELECT timestamp, received_at, json_extract(raw, '$.timestamp') FROM events WHERE message_id = 'skew'",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
    ).unwrap();
    let ts = chrono::DateTime::parse_from_rfc3339(&row.0).unwrap();
    let received = chrono::DateTime::parse_from_rfc3339(&row.1).unwrap();
    assert_eq!((received - ts).num_milliseconds(), 5_000, "{row:?}");
    assert_eq!(
        row.0, row.2,
        "the event time is written into the stored message"
    );
}

#[test]
fn acknowledged_messages_survive_sigkill() {
    let env = env_with_key();
    let mut daemon = env.start();
    let client = http();
    let mut acknowledged = Vec::new();
    for b in 0..5 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("crash-{b}-{i}")}))
            .collect();
        let answer = post_json(&client, &daemon.url("/v1/batch"), &json!({"batch": items}));
        assert_eq!(answer.0, 200);
        acknowledged.extend((0..100).map(|i| format!("crash-{b}-{i}")));
    }
    daemon.kill(); // SIGKILL right after the last 200
    let restarted = env.start();
    assert_eq!(
        http()
            .get(restarted.url("/healthz"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let stored: std::collections::HashSet<String> = env
        .query_strings("SELECT message_id FROM events")
        .into_iter()
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged {id} lost after SIGKILL");
    }
}

#[test]
fn sigterm_stops_cleanly_with_exit_0_and_healthz_reports_the_store() {
    let env = env_with_key();
    let mut daemon = env.start();
    let health: Value = http()
        .get(daemon.url("/healthz"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], "writable");
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.logs());
}

#[test]
fn over_max_size_answers_503_and_keeps_health_checks() {
    let env = TestEnv::with_sections("max_size = \"1KiB\"", "", "");
    let daemon = env.start();
    let client = http();
    let resp = client
        .post(daemon.url("/v1/track"))
        .body(json!({"userId": "u", "event": "e"}).to_string())
        .send()
        .unwrap();
    let answer = (resp.status().as_u16(), resp.json::<Value>().unwrap());
    assert_error(&answer, 503, "store.max_size");
    let health = client.get(daemon.url("/healthz")).send().unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let health: Value = health.json().unwrap();
    assert!(
        health["ingest"].as_str().unwrap().starts_with("refusing"),
        "{health}"
    );
}

#[test]
fn an_open_write_key_list_is_refused_off_loopback() {
    let env = TestEnv::new("");
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("127.0.0.1:0", "0.0.0.0:0");
    std::fs::write(&env.config_path, text).unwrap();
    let out = env.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.write_keys") && err.contains("loopback"),
        "{err}"
    );
}

#[test]
fn ingest_command_backfills_ndjson_and_names_bad_lines() {
    let env = TestEnv::new("");
    let file = env.dir.path().join("backfill.ndjson");
    let mut lines = String::new();
    for i in 0..2500 {
        lines.push_str(&json!({"type": "track", "event": "Backfilled", "userId": format!("u{i}"), "messageId": format!("bf-{i}")}).to_string());
        lines.push('\n');
    }
    lines.push_str("{not json}\n");
    lines.push_str(&json!({"type": "track", "userId": "u"}).to_string());
    lines.push('\n');
    std::fs::write(&file, lines).unwrap();
    let out = env.run(&["ingest", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "bad lines make the exit code 1");
    assert!(
        stdout.contains("ingested 2500, duplicates 0, invalid 2"),
        "{stdout}"
    );
    assert!(
        stderr.contains("backfill.ndjson:2501: skipped: not valid JSON"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":2502: skipped: event is required for a track"),
        "{stderr}"
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 2500);
    // running it again stores nothing new
    let out = env.run(&["ingest", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ingested 0, duplicates 2500"));

    let out = env.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["states"].is_object() && status["paused"].is_boolean(),
        "{status}"
    );
}

#[test]
fn migrate_applies_once_and_records_versions() {
    let env = TestEnv::new("");
    let out = env.run(&["migrate"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied 0001_events.sql"));
    let out = env.run(&["migrate"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("schema is up to date"));
    assert!(env.count("SELECT count(*) FROM schema_migrations") >= 1);
    let _ = Duration::from_secs(0);
}
