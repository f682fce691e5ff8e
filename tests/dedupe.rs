//! Deduplication of `messageId` (SPEC 2.1): a message already stored for the
//! same write key is answered `200` and not stored again, across restarts of
//! the daemon, across processes (the `ingest` backfill next to `serve`), on a
//! database upgraded from before `dedupe_key` existed, and inside one request.
//! What is checked is what a user sees: HTTP answers, rows in `events`, the
//! output of commands.

mod support;

use reqwest::blocking::Client;
use rusqlite::{params, Connection};
use schematic_sync::store::dedupe::dedupe_key;
use schematic_sync::store::events::hash_write_key;
use schematic_sync::store::migrate::MIGRATIONS;
use serde_json::{json, Value};
use support::{http, post_json_as, Daemon, TestEnv};

const KEY: &str = "wk_dedupe";
const OTHER_KEY: &str = "wk_other_source";

/// A daemon config that accepts both write keys.
fn env_with_keys() -> TestEnv {
    TestEnv::with_sections("", &format!("write_keys = [{KEY:?}, {OTHER_KEY:?}]"), "")
}

/// POSTs `body` to `route` with `key` as HTTP Basic user; returns status and
/// JSON answer.
fn post(client: &Client, daemon: &Daemon, route: &str, key: &str, body: &Value) -> (u16, Value) {
    post_json_as(client, &daemon.url(route), key, body)
}

fn ok() -> (u16, Value) {
    (200, json!({"success": true}))
}

fn track(message_id: &str) -> Value {
    json!({"type": "track", "messageId": message_id, "userId": "u1", "event": "Plan Upgraded"})
}

fn rows_of(env: &TestEnv, message_id: &str) -> i64 {
    env.db()
        .query_row(
            "SELECT count(*) FROM events WHERE message_id = ?1",
            [message_id],
            |r| r.get(0),
        )
        .expect("count rows")
}

/// messageIds stored more than once for the same write key.
fn stored_twice(env: &TestEnv) -> Vec<String> {
    env.query_strings(
        "SELECT message_id FROM events GROUP BY write_key, message_id HAVING count(*) > 1",
    )
}

#[test]
fn a_message_id_stays_deduplicated_after_a_restart_and_is_scoped_by_write_key() {
    let env = env_with_keys();
    let client = http();
    let mut daemon = env.start();
    assert_eq!(
        post(&client, &daemon, "/v1/track", KEY, &track("restart-1")),
        ok()
    );
    assert_eq!(rows_of(&env, "restart-1"), 1);
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.logs());

    // the same file, a new process: its keys come from the database
    let daemon = env.start();
    assert_eq!(
        post(&client, &daemon, "/v1/track", KEY, &track("restart-1")),
        ok(),
        "a repeat is acknowledged"
    );
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/batch",
            KEY,
            &json!({"batch": [track("restart-1")]})
        ),
        ok()
    );
    assert_eq!(
        rows_of(&env, "restart-1"),
        1,
        "stored again after a restart; log:\n{}",
        daemon.logs()
    );

    // another source may use the same messageId: it is a different message
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/track",
            OTHER_KEY,
            &track("restart-1")
        ),
        ok()
    );
    assert_eq!(rows_of(&env, "restart-1"), 2);
    let mut keys = env.query_strings(
        "SELECT write_key FROM events WHERE message_id = 'restart-1' ORDER BY write_key",
    );
    let mut expected = vec![hash_write_key(KEY), hash_write_key(OTHER_KEY)];
    keys.sort();
    expected.sort();
    assert_eq!(keys, expected);
    // and that one is deduplicated in turn
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/track",
            OTHER_KEY,
            &track("restart-1")
        ),
        ok()
    );
    assert_eq!(rows_of(&env, "restart-1"), 2);
    assert!(stored_twice(&env).is_empty());
}

#[test]
fn the_ingest_command_and_the_running_daemon_never_store_a_message_id_twice() {
    let env = env_with_keys();
    let client = http();
    let daemon = env.start();
    let served: Vec<Value> = (0..10).map(|i| track(&format!("live-{i}"))).collect();
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/batch",
            KEY,
            &json!({"batch": served})
        ),
        ok()
    );

    // a backfill overlapping what the daemon stored: live-5..9 are repeats
    let file = env.dir.path().join("backfill.ndjson");
    let mut lines = String::new();
    for id in (5..10)
        .map(|i| format!("live-{i}"))
        .chain((0..10).map(|i| format!("backfill-{i}")))
    {
        lines.push_str(&track(&id).to_string());
        lines.push('\n');
    }
    std::fs::write(&file, lines).unwrap();
    let out = env.run(&["ingest", file.to_str().unwrap(), "--write-key", KEY]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ingested 10, duplicates 5, invalid 0"),
        "{stdout}"
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 20);
    assert!(stored_twice(&env).is_empty(), "{:?}", stored_twice(&env));

    // the daemon has never seen backfill-*: it must learn them from the file
    let repeats: Vec<Value> = (0..10).map(|i| track(&format!("backfill-{i}"))).collect();
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/batch",
            KEY,
            &json!({"batch": repeats})
        ),
        ok()
    );
    assert_eq!(
        post(&client, &daemon, "/v1/t", KEY, &track("backfill-3")),
        ok()
    );
    assert!(
        stored_twice(&env).is_empty(),
        "the daemon stored messages the backfill had stored: {:?}",
        stored_twice(&env)
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 20);

    // new messages are still stored, by either process
    assert_eq!(
        post(&client, &daemon, "/v1/track", KEY, &track("after-1")),
        ok()
    );
    assert_eq!(rows_of(&env, "after-1"), 1);
    let out = env.run(&["ingest", file.to_str().unwrap(), "--write-key", KEY]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ingested 0, duplicates 15, invalid 0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(env.count("SELECT count(*) FROM events"), 21);
}

/// Creates `path` as the daemon left it at schema version 3, before
/// `dedupe_key` existed, with the settings a new store gets.
fn create_schema_3(path: &std::path::Path) -> Connection {
    const OLD_MIGRATIONS: [(i64, &str, &str); 3] = [
        (
            1,
            "0001_events.sql",
            include_str!("../migrations/0001_events.sql"),
        ),
        (
            2,
            "0002_deliveries.sql",
            include_str!("../migrations/0002_deliveries.sql"),
        ),
        (
            3,
            "0003_audiences.sql",
            include_str!("../migrations/0003_audiences.sql"),
        ),
    ];
    let mut conn = Connection::open(path).expect("create the old database");
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = WAL;
         CREATE TABLE schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TEXT NOT NULL
         );",
    )
    .expect("schema_migrations");
    for (version, name, sql) in OLD_MIGRATIONS {
        let tx = conn.transaction().unwrap();
        tx.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![version, name, "2025-01-01T00:00:00.000Z"],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    conn
}

#[test]
fn an_upgraded_database_gets_dedupe_keys_for_its_old_rows_and_keeps_deduplicating() {
    let env = env_with_keys();
    let conn = create_schema_3(&env.db_path);
    let now = chrono::Utc::now();
    let at =
        |ago: chrono::Duration| (now - ago).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // oldest first, as events arrive: one older than the retention window,
    // then recent ones, one of them sharing a messageId under another key
    let old_rows = [
        ("old-0", KEY, at(chrono::Duration::days(8))),
        ("old-1", KEY, at(chrono::Duration::minutes(30))),
        ("old-2", KEY, at(chrono::Duration::minutes(20))),
        ("old-2", OTHER_KEY, at(chrono::Duration::minutes(15))),
        ("old-3", KEY, at(chrono::Duration::minutes(10))),
    ];
    for (message_id, key, received_at) in &old_rows {
        let raw = json!({"type": "track", "messageId": message_id, "userId": "u1",
                         "event": "Old", "timestamp": received_at, "receivedAt": received_at});
        conn.execute(
            "INSERT INTO events (message_id, write_key, type, user_id, event, timestamp,
                                 received_at, raw)
             VALUES (?1, ?2, 'track', 'u1', 'Old', ?3, ?3, ?4)",
            params![
                message_id,
                hash_write_key(key),
                received_at,
                raw.to_string()
            ],
        )
        .unwrap();
    }
    drop(conn);

    let client = http();
    let daemon = env.start();
    let versions: Vec<String> =
        env.query_strings("SELECT CAST(version AS TEXT) FROM schema_migrations ORDER BY version");
    let every: Vec<String> = MIGRATIONS.iter().map(|m| m.0.to_string()).collect();
    assert_eq!(versions, every, "the daemon applies the pending migrations");

    let check_keys = |env: &TestEnv| {
        let conn = env.db();
        let mut stmt = conn
            .prepare("SELECT message_id, write_key, dedupe_key FROM events ORDER BY id")
            .unwrap();
        let rows: Vec<(String, String, Option<i64>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (message_id, write_key, key) in &rows {
            assert_eq!(
                *key,
                Some(dedupe_key(write_key, message_id)),
                "dedupe_key of {message_id} ({write_key})"
            );
        }
        rows.len()
    };
    assert_eq!(check_keys(&env), old_rows.len(), "every old row is kept");

    // a message stored before the upgrade is still a repeat
    assert_eq!(
        post(&client, &daemon, "/v1/track", KEY, &track("old-1")),
        ok()
    );
    assert_eq!(
        post(
            &client,
            &daemon,
            "/v1/batch",
            KEY,
            &json!({"batch": [track("old-2"), track("old-3"), track("new-1")]})
        ),
        ok()
    );
    assert_eq!(
        post(&client, &daemon, "/v1/track", OTHER_KEY, &track("old-2")),
        ok()
    );
    assert_eq!(rows_of(&env, "old-1"), 1, "log:\n{}", daemon.logs());
    assert_eq!(rows_of(&env, "old-2"), 2, "one per write key");
    assert_eq!(rows_of(&env, "old-3"), 1);
    assert_eq!(rows_of(&env, "new-1"), 1);
    assert_eq!(check_keys(&env), old_rows.len() + 1);
    assert!(stored_twice(&env).is_empty());
}

#[test]
fn the_same_message_id_twice_in_one_batch_is_stored_once() {
    let env = env_with_keys();
    let client = http();
    let daemon = env.start();
    let mut second = track("twice");
    second["event"] = json!("Second Copy");
    let batch = json!({"batch": [track("twice"), track("once"), second]});
    assert_eq!(post(&client, &daemon, "/v1/batch", KEY, &batch), ok());
    assert_eq!(rows_of(&env, "twice"), 1);
    assert_eq!(rows_of(&env, "once"), 1);
    assert_eq!(
        env.query_strings("SELECT event FROM events WHERE message_id = 'twice'"),
        ["Plan Upgraded"],
        "the first copy is the one kept"
    );
}

#[test]
fn concurrent_requests_with_the_same_message_id_store_one_row() {
    let env = env_with_keys();
    let daemon = env.start();
    // requests that arrive together are committed in one transaction
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let daemon = &daemon;
                s.spawn(move || {
                    let client = http();
                    let body = json!({"batch": [track("racing"), track(&format!("solo-{i}"))]});
                    post(&client, daemon, "/v1/batch", KEY, &body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for answer in answers {
        assert_eq!(answer, ok());
    }
    assert_eq!(rows_of(&env, "racing"), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE message_id LIKE 'solo-%'"),
        16
    );
}

/// Retention never deletes the newest event, so ids keep growing: rows an
/// `ingest` backfill stores after a sweep emptied the table otherwise got
/// ids the daemon's deduplication had already read past, and a client
/// re-sending one of them had it stored twice.
#[test]
fn a_backfill_after_retention_swept_every_event_is_still_deduplicated() {
    let env = TestEnv::with_sections(
        "retention = \"3s\"",
        &format!("write_keys = [{KEY:?}]"),
        "[delivery]\nschedule = \"* * * * * *\"\n",
    );
    let client = http();
    let daemon = env.start();
    let pages: Vec<Value> = (0..3)
        .map(|i| json!({"type": "page", "messageId": format!("p-{i}"), "userId": "u1"}))
        .collect();
    assert_eq!(
        post(&client, &daemon, "/v1/batch", KEY, &json!({"batch": pages})),
        ok()
    );
    assert!(
        support::eventually(std::time::Duration::from_secs(20), || env
            .count("SELECT count(*) FROM events")
            == 1),
        "retention did not sweep down to the newest event; statuses {:?}\n{}",
        env.query_strings("SELECT status FROM events"),
        daemon.logs()
    );
    assert_eq!(
        env.count("SELECT max(id) FROM events"),
        3,
        "the newest event is kept"
    );
    let file = env.dir.path().join("one.ndjson");
    std::fs::write(&file, format!("{}\n", track("reused-1"))).unwrap();
    let out = env.run(&["ingest", file.to_str().unwrap(), "--write-key", KEY]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.count("SELECT max(id) FROM events"),
        4,
        "ids keep growing"
    );
    assert_eq!(
        post(&client, &daemon, "/v1/track", KEY, &track("reused-1")),
        ok()
    );
    assert_eq!(rows_of(&env, "reused-1"), 1, "stored twice");
}
