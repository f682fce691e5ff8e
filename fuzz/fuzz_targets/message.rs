//! Bytes → what the ingest routes do with a request body (src/ingest/mod.rs):
//! UTF-8 check, `serde_json` parse, then `segment::prepare` for each
//! single-message route, for the batch form (envelope parsed with a borrowed
//! `RawValue` exactly as `batch_rows` does, items parsed one by one with the
//! envelope merged in) and for NDJSON backfill lines.
//!
//! Beyond "no panic", a prepared message must hold what the rest of the
//! daemon relies on: its stored text parses back, the mapper's
//! `stored_membership` finds the same membership in it (the mapper assumes a
//! stored message cannot fail there), and its times are well formed.
#![no_main]

use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use schematic_sync::segment::{self, Envelope, MessageType, PreparedMessage};
use schematic_sync::store::events::EventRow;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

const ROUTES: [MessageType; 6] = [
    MessageType::Track,
    MessageType::Identify,
    MessageType::Group,
    MessageType::Page,
    MessageType::Screen,
    MessageType::Alias,
];

/// The `/v1/batch` body as `ingest::batch_rows` reads it (that struct is
/// private to the ingest module, so it is mirrored here field for field).
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<&'a RawValue>,
    context: Option<Value>,
    integrations: Option<Value>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    #[serde(rename = "writeKey")]
    #[allow(dead_code)]
    write_key: Option<Value>,
}

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

fn object_member(v: &Option<Value>) -> Result<Option<&Map<String, Value>>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(()),
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

fn batch(text: &str) {
    let Ok(body) = serde_json::from_str::<BatchBody<'_>>(text) else {
        return;
    };
    let Some(batch) = body.batch else { return };
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(batch.get()) else {
        return;
    };
    let (Ok(context), Ok(integrations)) = (
        object_member(&body.context),
        object_member(&body.integrations),
    ) else {
        return;
    };
    let sent_at = match &body.sent_at {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return,
    };
    let env = Envelope {
        context,
        integrations,
        sent_at,
    };
    for item in items {
        let Ok(mut value) = serde_json::from_str::<Value>(item.get()) else {
            continue;
        };
        take_write_key(&mut value);
        if let Ok(p) = segment::prepare(value, None, &env, received_at()) {
            check(&p, None);
        }
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
    batch(text);
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
