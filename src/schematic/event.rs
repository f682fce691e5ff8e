//! The events Schematic's capture API accepts (SPEC 3), as plain serde types.
//!
//! A `SchematicEvent` is what the mapping step produces and what the store
//! keeps as a delivery's payload; the sender adds `api_key` and
//! `idempotency_key` when it builds the request. Optional fields are skipped
//! when absent because Schematic must never receive `null`.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// The `type` of a Schematic event.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Track,
    Identify,
}

impl EventKind {
    /// The wire name, also used in the `deliveries.kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Track => "track",
            EventKind::Identify => "identify",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of a `track` event: `event` is required, the rest optional.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TrackBody {
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map<String, Value>>,
}

/// Body of an `identify` event: the user's `keys` are required.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct IdentifyBody {
    pub keys: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<CompanyBody>,
}

/// The company an identified user belongs to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CompanyBody {
    pub keys: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map<String, Value>>,
}

/// The `body` of an event; which variant applies is given by the event's
/// `type`, so on the wire it is untagged.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum EventBody {
    Track(TrackBody),
    Identify(IdentifyBody),
}

impl EventBody {
    /// The event type this body belongs to.
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Track(_) => EventKind::Track,
            EventBody::Identify(_) => EventKind::Identify,
        }
    }
}

/// One Schematic event without its `api_key` and `idempotency_key`: the
/// delivery payload as stored.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SchematicEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub sent_at: String,
    pub body: EventBody,
}

impl SchematicEvent {
    pub fn track(sent_at: String, body: TrackBody) -> Self {
        SchematicEvent {
            kind: EventKind::Track,
            sent_at,
            body: EventBody::Track(body),
        }
    }

    pub fn identify(sent_at: String, body: IdentifyBody) -> Self {
        SchematicEvent {
            kind: EventKind::Identify,
            sent_at,
            body: EventBody::Identify(body),
        }
    }
}

/// Deserialization reads `type` first and decodes `body` as that kind, so a
/// stored payload can never come back as the wrong variant and a broken one
/// gets an error that names the kind.
impl<'de> Deserialize<'de> for SchematicEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Stored {
            #[serde(rename = "type")]
            kind: EventKind,
            sent_at: String,
            body: Value,
        }
        let stored = Stored::deserialize(deserializer)?;
        let body = match stored.kind {
            EventKind::Track => serde_json::from_value(stored.body).map(EventBody::Track),
            EventKind::Identify => serde_json::from_value(stored.body).map(EventBody::Identify),
        }
        .map_err(|e| serde::de::Error::custom(format!("{} body: {e}", stored.kind)))?;
        Ok(SchematicEvent {
            kind: stored.kind,
            sent_at: stored.sent_at,
            body,
        })
    }
}

/// `sent_at` as Schematic wants it: UTC, milliseconds, `Z`
/// (`2023-01-01T00:00:00.000Z`).
pub fn format_sent_at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Removes `null` object members and `null` array items, at any depth.
pub fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, member| !member.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => {
            items.retain(|item| !item.is_null());
            items.iter_mut().for_each(strip_nulls);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sent_at_always_has_millis_and_z() {
        let t = Utc.with_ymd_and_hms(2023, 1, 1, 0, 0, 0).single();
        assert_eq!(
            t.map(format_sent_at).as_deref(),
            Some("2023-01-01T00:00:00.000Z")
        );
        let with_nanos = DateTime::parse_from_rfc3339("2023-06-30T23:59:59.123456789+02:00")
            .map(|t| format_sent_at(t.with_timezone(&Utc)));
        assert_eq!(with_nanos.as_deref(), Ok("2023-06-30T21:59:59.123Z"));
    }

    #[test]
    fn optional_fields_are_left_out() {
        let event = SchematicEvent::track(
            "2023-01-01T00:00:00.000Z".into(),
            TrackBody {
                event: "signed_up".into(),
                company: None,
                user: Some(keys(&[("userId", "u1")])),
                traits: None,
            },
        );
        assert_eq!(
            serde_json::to_value(&event).ok(),
            Some(json!({
                "type": "track",
                "sent_at": "2023-01-01T00:00:00.000Z",
                "body": {"event": "signed_up", "user": {"userId": "u1"}}
            }))
        );
        let identify = SchematicEvent::identify(
            "2023-01-01T00:00:00.000Z".into(),
            IdentifyBody {
                keys: keys(&[("userId", "u1")]),
                name: None,
                traits: None,
                company: Some(CompanyBody {
                    keys: keys(&[("groupId", "g1")]),
                    name: None,
                    traits: None,
                }),
            },
        );
        assert_eq!(
            serde_json::to_value(&identify).ok(),
            Some(json!({
                "type": "identify",
                "sent_at": "2023-01-01T00:00:00.000Z",
                "body": {"keys": {"userId": "u1"}, "company": {"keys": {"groupId": "g1"}}}
            }))
        );
    }

    #[test]
    fn stored_payload_round_trips_by_kind() {
        let stored = json!({
            "type": "identify",
            "sent_at": "2023-01-01T00:00:00.000Z",
            "body": {"keys": {"userId": "u1"}, "name": "Ann", "traits": {"plan": "pro"}}
        });
        let event: Result<SchematicEvent, _> = serde_json::from_value(stored.clone());
        let event = match event {
            Ok(e) => e,
            Err(e) => panic!("stored identify did not parse: {e}"),
        };
        assert_eq!(event.kind, EventKind::Identify);
        assert_eq!(event.body.kind(), EventKind::Identify);
        assert_eq!(serde_json::to_value(&event).ok(), Some(stored));

        let track = json!({
            "type": "track",
            "sent_at": "2023-01-01T00:00:00.000Z",
            "body": {"event": "order_completed", "company": {"groupId": "g1"}}
        });
        let event: Result<SchematicEvent, _> = serde_json::from_value(track.clone());
        assert!(matches!(
            event.as_ref().map(|e| &e.body),
            Ok(EventBody::Track(_))
        ));
        assert_eq!(
            event.ok().and_then(|e| serde_json::to_value(e).ok()),
            Some(track)
        );
    }

    #[test]
    fn body_that_does_not_fit_its_type_is_refused() {
        let wrong = json!({
            "type": "track",
            "sent_at": "2023-01-01T00:00:00.000Z",
            "body": {"keys": {"userId": "u1"}}
        });
        let err = serde_json::from_value::<SchematicEvent>(wrong)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.starts_with("track body:")),
            "{err:?}"
        );
    }

    #[test]
    fn kind_names() {
        assert_eq!(EventKind::Track.as_str(), "track");
        assert_eq!(EventKind::Identify.to_string(), "identify");
        assert_eq!(
            serde_json::to_value(EventKind::Identify).ok(),
            Some(json!("identify"))
        );
    }

    #[test]
    fn strip_nulls_is_recursive() {
        let mut v = json!({
            "a": null,
            "b": 1,
            "c": {"d": null, "e": [1, null, {"f": null, "g": false}]},
            "h": [null]
        });
        strip_nulls(&mut v);
        assert_eq!(v, json!({"b": 1, "c": {"e": [1, {"g": false}]}, "h": []}));
    }
}
