//! Bytes → JSON → the field mapper:
//! - the value as a Segment message through `map_message` with the presets
//!   and with custom mappings compiled from fixed configs (paths, brackets,
//!   templates, first-of lists, object literals, computed traits), both as
//!   it is (what `replay --remap` reads back) and after `segment::prepare`
//!   (what ingest stores);
//! - the value as a field value (`FieldValue::parse`), and every string in
//!   it as a path or template, resolved against the value and fixed messages;
//! - the value as a `[[mappings]]` entry, compiled and applied.
//!
//! Every event produced must be what Schematic accepts (SPEC 3/4): no `null`
//! anywhere, a `[a-z0-9_-]+` track name, the raw name in the traits, non-empty
//! key maps of non-empty strings, and `sent_at` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#![no_main]

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use schematic_sync::mapping::field::FieldValue;
use schematic_sync::mapping::{self, map_message, Mapping, MappingConfig};
use schematic_sync::schematic::event::{EventBody, SchematicEvent};
use schematic_sync::segment::{self, Envelope};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn custom_configs() -> Value {
    json!([
        {"name": "Orders", "action": "track",
         "trigger": "type = \"track\" and (contains(event, \"Order\") or match(event, \"*Completed\"))",
         "fields": {
            "event_name": ["$.properties.event_name", "$.event", "fallback event"],
            "timestamp": ["$.properties.time", "$.originalTimestamp", "$.timestamp"],
            "user_keys": {"userId": "$.userId", "anon": "$.anonymousId", "email": "$.context.traits.email"},
            "company_keys": {"groupId": ["$.groupId", "$.context.groupId", "$.properties.company.id"]},
            "traits": {"revenue": "$.properties.revenue", "items": "$.properties.products[0]",
                       "plan": "$.properties[\"Plan Name\"]", "label": "{{event}} for {{properties.plan}}",
                       "constant": 7, "flag": true}
         }},
        {"name": "Every Event", "action": "track", "trigger": "userId != null or anonymousId != null",
         "fields": {
            "event_name": "{{type}} {{event}}{{name}}",
            "user_keys": "$.context",
            "company_keys": {"k": "$['context']['groupId']", "n": "$.properties.count"},
            "traits": "$.properties"
         }},
        {"name": "Users", "action": "identify",
         "trigger": "type = \"identify\" or type = \"group\" or traits.email != null",
         "fields": {
            "user_keys": {"userId": ["$.userId", "$.anonymousId"], "email": "$.traits.email",
                          "n": "$.traits.logins"},
            "user_name": ["{{traits.firstName}} {{traits.lastName}}", "$.traits.name"],
            "user_traits": "$.traits",
            "company_keys": {"groupId": ["$.groupId", "$.context.groupId", "$.traits.company.id"]},
            "company_name": "$.traits.company.name",
            "company_traits": ["$.traits.company", {"plan": "$.traits.plan", "source": "segment"}],
            "timestamp": "$.timestamp"
         }},
        {"name": "Whole Message", "action": "identify", "trigger": "properties.x >= 1 or traits.x < \"m\" or event = null",
         "fields": {
            "user_keys": "$",
            "user_traits": "$",
            "company_keys": "$.context",
            "company_traits": "$.context.traits",
            "company_name": "{{context.company}}"
         }}
    ])
}

fn mapping_sets() -> &'static [Vec<Mapping>] {
    static SETS: OnceLock<Vec<Vec<Mapping>>> = OnceLock::new();
    SETS.get_or_init(|| {
        let configs: Vec<MappingConfig> =
            serde_json::from_value(custom_configs()).expect("the fixed configs deserialize");
        let custom = mapping::compile(&configs).expect("the fixed configs compile");
        vec![mapping::presets(), custom]
    })
}

fn fixed_messages() -> &'static [Value] {
    static MESSAGES: OnceLock<Vec<Value>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        vec![
            json!({
                "type": "track", "event": "Order Completed", "userId": "u1", "anonymousId": "a1",
                "properties": {"revenue": 42.5, "plan": "pro", "Plan Name": "Gold", "count": 3,
                               "products": [{"sku": "x"}], "gone": null},
                "context": {"groupId": "g1", "traits": {"email": "u@example.com"}},
                "timestamp": "2024-01-01T00:00:00.000Z"
            }),
            json!({
                "type": "identify", "userId": "u2",
                "traits": {"name": "Ann Lee", "firstName": "Ann", "lastName": "Lee", "email": "a@example.com",
                           "company": {"id": 5, "name": "Initech"}, "lifetimeValue": 100},
                "context": {"personas": {"computation_class": "computed_trait", "computation_key": "lifetimeValue"}},
                "receivedAt": "2024-01-01T00:00:00Z"
            }),
            json!({}),
        ]
    })
}

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(items) => items.iter().any(has_null),
        Value::Object(members) => members.values().any(has_null),
        _ => false,
    }
}

fn check_keys(keys: &BTreeMap<String, String>) {
    assert!(!keys.is_empty(), "an empty key map was sent");
    assert!(
        keys.values().all(|v| !v.is_empty()),
        "an empty key value: {keys:?}"
    );
}

/// What Schematic accepts.
fn check_event(event: &SchematicEvent) {
    let s = &event.sent_at;
    assert!(
        s.len() == 24
            && s.ends_with('Z')
            && chrono::DateTime::parse_from_rfc3339(s).is_ok()
            && s.as_bytes()[19] == b'.',
        "sent_at {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
    );
    let json = serde_json::to_value(event).expect("an event serializes");
    assert!(!has_null(&json), "null in a payload: {json}");
    match &event.body {
        EventBody::Track(body) => {
            assert!(
                !body.event.is_empty()
                    && body.event.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'_'
                        || b == b'-'),
                "track name {:?} is not [a-z0-9_-]+",
                body.event
            );
            let traits = body.traits.as_ref().expect("a track has traits");
            assert!(traits.contains_key("raw_event_name"));
            body.user.iter().for_each(check_keys);
            body.company.iter().for_each(check_keys);
        }
        EventBody::Identify(body) => {
            check_keys(&body.keys);
            if let Some(company) = &body.company {
                check_keys(&company.keys);
            }
            assert!(body.name.as_deref() != Some(""));
        }
    }
    // The stored payload reads back (the worker deserializes it).
    let text = serde_json::to_string(event).expect("an event serializes");
    let _: Value = serde_json::from_str(&text).expect("the payload parses back");
}

fn map_all(mappings: &[Mapping], msg: &Value) {
    let out = map_message(mappings, msg);
    assert!(out.len() <= mappings.len());
    for delivery in &out {
        assert!(mappings.iter().any(|m| m.name == delivery.mapping));
        match &delivery.result {
            Ok(event) => check_event(event),
            Err(reason) => {
                assert!(reason.ends_with(&format!("(mapping \"{}\")", delivery.mapping)))
            }
        }
    }
}

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Object(members) => {
            for (k, m) in members {
                out.push(k);
                strings(m, out);
            }
        }
        _ => {}
    }
}

fn resolve_everywhere(field: &FieldValue, own: &Value) {
    let _ = field.resolve(own);
    for message in fixed_messages() {
        let _ = field.resolve(message);
    }
    let _ = field.to_string();
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = serde_json::from_slice::<Value>(data) else {
        return;
    };

    // As a message, as stored or read back by `replay --remap`.
    for mappings in mapping_sets() {
        map_all(mappings, &msg);
    }
    // As ingest would store it.
    let at = Utc
        .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("a valid fixed time");
    if let Ok(prepared) = segment::prepare(msg.clone(), None, &Envelope::default(), at) {
        for mappings in mapping_sets() {
            map_all(mappings, &prepared.raw);
        }
    }

    // As a field value, and each string in it as a path or template.
    if let Ok(field) = FieldValue::parse(&msg) {
        resolve_everywhere(&field, &msg);
    }
    let mut texts = Vec::new();
    strings(&msg, &mut texts);
    for text in texts.into_iter().take(32) {
        if let Ok(field) = FieldValue::parse(&Value::String(text.to_string())) {
            resolve_everywhere(&field, &msg);
        }
    }

    // As a `[[mappings]]` entry (or a list of them).
    let configs: Option<Vec<MappingConfig>> = match &msg {
        Value::Array(_) => serde_json::from_value(msg.clone()).ok(),
        Value::Object(_) => serde_json::from_value(msg.clone()).ok().map(|c| vec![c]),
        _ => None,
    };
    if let Some(Ok(compiled)) = configs.map(|c| mapping::compile(&c)) {
        for message in fixed_messages() {
            map_all(&compiled, message);
        }
        map_all(&compiled, &msg);
    }
});
