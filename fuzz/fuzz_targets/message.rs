//! Bytes → what the ingest routes do with a request body (src/ingest/mod.rs):
//! UTF-8 check, `serde_json` parse, then `segment::prepare` for each
//! single-message route, for the batch form (through ingest's own
//! `batch_rows`) and for NDJSON backfill lines.
//!
//! Beyond "no panic", a prepared message must hold what the rest of the
//! daemon relies on: its stored text parses back, the mapper's
//! `stored_membership` finds the same membership in it (the mapper assumes a
//! stored message cannot fail there), and its times are well formed.
#![no_main]

use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use schematic_sync::config::ServerConfig;
use schematic_sync::ingest;
use schematic_sync::segment::{self, Envelope, MessageType, PreparedMessage};
use schematic_sync::store::events::EventRow;
use serde_json::Value;

const ROUTES: [MessageType; 6] = [
    MessageType::Track,
    MessageType::Identify,
    MessageType::Group,
    MessageType::Page,
    MessageType::Screen,
    MessageType::Alias,
];

fn received_at() -> DateTime<Utc> {
    // A fixed server clock keeps every input reproducible.
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("a valid fixed time")
}

/// The stored message never keeps the write key (`ingest::take_write_key`).
fn take_write_key(value: &mut Value) {
    if let Some(members) = value.as_object_mut() {
        members.remove("writeKey");
    }
}

/// What every accepted message must satisfy.
fn check(prepared: &PreparedMessage, route: Option<MessageType>) {
    if let Some(kind) = route {
        assert_eq!(prepared.kind, kind, "the route fixes the type");
    }
    assert!(
        prepared.user_id.is_some() || prepared.anonymous_id.is_some(),
        "accepted without userId or anonymousId"
    );
    assert!(!prepared.message_id.is_empty(), "empty messageId");
    if prepared.kind == MessageType::Track {
        assert!(
            prepared
                .event
                .as_deref()
                .is_some_and(|e| !e.trim().is_empty()),
            "a track accepted without an event name"
        );
    }
    let raw = prepared
        .raw
        .as_object()
        .expect("the stored message is an object");
    assert_eq!(
        raw.get("type").and_then(Value::as_str),
        Some(prepared.kind.as_str())
    );
    // What `mapping::sent_at` reads back must be an RFC 3339 time.
    let stamp = raw
        .get("timestamp")
        .and_then(Value::as_str)
        .expect("timestamp is filled in");
    assert!(
        DateTime::parse_from_rfc3339(stamp).is_ok(),
        "stored timestamp {stamp:?} is not RFC 3339"
    );

    // The row the store writes, and what the mapper later reads from it.
    let row = EventRow::new(prepared, "fuzz-key");
    let reparsed: Value = serde_json::from_str(&row.raw).expect("the stored raw text parses back");
    let stored = segment::stored_membership(&reparsed);
    assert_eq!(
        stored.as_ref().ok(),
        Some(&prepared.membership),
        "the mapper reads a different membership from the stored message: {stored:?}"
    );
    if let Some(m) = &prepared.membership {
        assert!(!m.audience_key.trim().is_empty());
        assert!(!m.user_id.is_empty());
    }
}

fn single(value: &Value) {
    let at = received_at();
    for kind in ROUTES {
        let mut v = value.clone();
        take_write_key(&mut v);
        if let Ok(p) = segment::prepare(v, Some(kind), &Envelope::default(), at) {
            check(&p, Some(kind));
        }
    }
    // NDJSON backfill (`ingest FILE`) and `preview`: the type comes from the
    // message itself.
    if let Ok(p) = segment::prepare(value.clone(), None, &Envelope::default(), at) {
        check(&p, None);
    }
}

/// The batch form through ingest's own `batch_rows` (envelope, limits,
/// merge, per-item validation): every row it accepts must be what the store
/// and the mapper rely on.
fn batch(data: &[u8]) {
    let limits = ServerConfig::default();
    let Ok(rows) = ingest::batch_rows(&limits, data, Some("fuzz-key".into()), received_at()) else {
        return;
    };
    for row in rows {
        assert!(!row.message_id.is_empty(), "empty messageId");
        assert!(
            row.user_id.is_some() || row.anonymous_id.is_some(),
            "accepted without userId or anonymousId"
        );
        if row.kind == "track" {
            assert!(
                row.event.as_deref().is_some_and(|e| !e.trim().is_empty()),
                "a track accepted without an event name"
            );
        }
        assert!(
            DateTime::parse_from_rfc3339(&row.timestamp).is_ok(),
            "stored timestamp {:?} is not RFC 3339",
            row.timestamp
        );
        let raw: Value = serde_json::from_str(&row.raw).expect("the stored raw text parses back");
        assert_eq!(raw.get("type").and_then(Value::as_str), Some(row.kind));
        assert!(raw.get("writeKey").is_none(), "the write key is stored");
        assert!(
            segment::stored_membership(&raw).is_ok(),
            "the mapper cannot read the membership of a stored batch item"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // `ingest::check_utf8`: anything else is a 400 before JSON parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        single(&value);
    }
    batch(data);
    if text.contains('\n') {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Ok(value) = serde_json::from_str::<Value>(line) {
                if let Ok(p) = segment::prepare(value, None, &Envelope::default(), received_at()) {
                    check(&p, None);
                }
            }
        }
    }
});
