//! str → `Trigger::parse`; when it parses, `matches` against a few fixed
//! Segment messages and against a message built from the trigger's own words
//! (so that fields the fuzzer names exist, with values it wrote, and the
//! comparison and glob code actually runs). Errors must point inside the
//! text, and parsing must be deterministic and keep the source.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schematic_sync::mapping::trigger::Trigger;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

fn fixed_messages() -> &'static [Value] {
    static MESSAGES: OnceLock<Vec<Value>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        vec![
            json!({
                "type": "track",
                "event": "Order Completed",
                "userId": "user-1",
                "anonymousId": "anon-1",
                "properties": {
                    "revenue": 42.5, "count": 3, "plan": "pro", "vip": true,
                    "coupon": null, "tags": ["a", "b"], "Plan Name": "Gold",
                    "nested": {"deeper": {"x": "y"}}
                },
                "context": {"groupId": "g1", "library": {"name": "analytics.js", "version": "2.11.1"},
                            "page": {"path": "/checkout", "url": "https://example.com/checkout"}},
                "timestamp": "2024-01-01T00:00:00.000Z"
            }),
            json!({
                "type": "identify",
                "userId": "97980cfea0067",
                "traits": {"name": "Peter Gibbons", "email": "peter@example.com", "plan": "premium",
                           "logins": 5, "high_value_users": true},
                "context": {"personas": {"computation_class": "audience",
                                         "computation_key": "high_value_users"}}
            }),
            json!({"type": "page", "name": "Home", "anonymousId": "a", "properties": {"title": "Welcome"}}),
            json!({}),
            json!(null),
            json!("track"),
            json!([1, 2, 3]),
        ]
    })
}

/// Puts `value` at `path` (creating objects on the way), so the fuzzer's
/// field names resolve.
fn insert(message: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = message;
    for key in parents {
        let slot = at
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        match slot {
            Value::Object(members) => at = members,
            _ => return,
        }
    }
    at.insert(last.clone(), value);
}

/// A message whose fields are the dotted words of the input and whose values
/// are its quoted strings and numbers, in order, cycling.
fn derived_message(text: &str) -> Value {
    let mut paths: Vec<Vec<String>> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut word = String::new();
    let mut path: Vec<String> = Vec::new();
    let flush = |word: &mut String, path: &mut Vec<String>, paths: &mut Vec<Vec<String>>| {
        if !word.is_empty() {
            path.push(std::mem::take(word));
        }
        if !path.is_empty() {
            paths.push(std::mem::take(path));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            c if c.is_ascii_alphanumeric() || c == '_' || c == '$' => word.push(c),
            '.' if !word.is_empty() => path.push(std::mem::take(&mut word)),
            '"' => {
                flush(&mut word, &mut path, &mut paths);
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                s.push(e)
                            }
                        }
                        c => s.push(c),
                    }
                }
                values.push(Value::String(s));
            }
            _ => flush(&mut word, &mut path, &mut paths),
        }
    }
    flush(&mut word, &mut path, &mut paths);
    for p in &paths {
        if let Some(Ok(n)) = p.first().map(|w| w.parse::<f64>()) {
            if let Some(n) = serde_json::Number::from_f64(n) {
                values.push(Value::Number(n));
            }
        }
    }
    values.push(Value::Bool(true));
    values.push(Value::Null);
    values.push(json!(["a", "b"]));
    let mut message = Map::new();
    for (i, p) in paths.iter().take(64).enumerate() {
        insert(&mut message, p, values[i % values.len()].clone());
    }
    Value::Object(message)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Trigger::parse(text) {
        Ok(trigger) => {
            assert_eq!(trigger.source(), text);
            for message in fixed_messages() {
                let _ = trigger.matches(message);
            }
            let derived = derived_message(text);
            let first = trigger.matches(&derived);
            assert_eq!(first, trigger.matches(&derived), "matches is not pure");
            let again = Trigger::parse(text).expect("parsing is deterministic");
            assert_eq!(again, trigger);
        }
        Err(e) => {
            let columns = text.chars().count() + 1;
            assert!(
                (1..=columns).contains(&e.position),
                "error position {} outside 1..={columns}: {e}",
                e.position
            );
            assert!(!e.message.is_empty());
        }
    }
});
