//! Segment messages: what a message must contain to be accepted (SPEC 2.1),
//! how its event time is derived, and how an Engage audience change is
//! recognised (SPEC 2.2). Pure functions over `serde_json::Value`; the HTTP
//! layer and the NDJSON backfill both go through `prepare`.

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use crate::store::time_text;

/// The Segment call types the ingest API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Track,
    Identify,
    Group,
    Page,
    Screen,
    Alias,
}

impl MessageType {
    pub fn parse(s: &str) -> Option<MessageType> {
        Some(match s {
            "track" => MessageType::Track,
            "identify" => MessageType::Identify,
            "group" => MessageType::Group,
            "page" => MessageType::Page,
            "screen" => MessageType::Screen,
            "alias" => MessageType::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Track => "track",
            MessageType::Identify => "identify",
            MessageType::Group => "group",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Alias => "alias",
        }
    }
}

/// Fields of a `/v1/batch` envelope that apply to every item.
#[derive(Debug, Default, Clone)]
pub struct Envelope<'a> {
    pub context: Option<&'a Map<String, Value>>,
    pub integrations: Option<&'a Map<String, Value>>,
    pub sent_at: Option<&'a str>,
}

/// A message that passed validation, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedMessage {
    pub message_id: String,
    pub kind: MessageType,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: Option<String>,
    /// The event time, also written into `raw.timestamp`.
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// The message as stored: the original with `type`, `messageId`,
    /// `receivedAt` and `timestamp` filled in and the envelope merged.
    pub raw: Value,
    pub membership: Option<Membership>,
}

/// An Engage audience (or journey step) membership change.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub audience_key: String,
    pub user_id: String,
    pub member: bool,
}

/// Validates one message and fills in what Segment fills in.
///
/// `route_type` is the type fixed by the route (`/v1/track`); `None` means the
/// message carries its own `type` (batch items, NDJSON backfill).
pub fn prepare(
    value: Value,
    route_type: Option<MessageType>,
    envelope: &Envelope<'_>,
    received_at: DateTime<Utc>,
) -> Result<PreparedMessage, String> {
    let Value::Object(mut msg) = value else {
        return Err(format!(
            "a message must be a JSON object, found {}",
            json_kind(&value)
        ));
    };
    let kind = match route_type {
        Some(kind) => kind,
        None => match msg.get("type") {
            Some(Value::String(t)) => MessageType::parse(t).ok_or_else(|| {
                format!(
                    "unknown type {t:?}: expected track, identify, group, page, screen or alias"
                )
            })?,
            Some(other) => {
                return Err(format!("type must be a string, found {}", json_kind(other)))
            }
            None => return Err("type is missing: each batch item needs a type".to_string()),
        },
    };
    msg.insert("type".into(), Value::String(kind.as_str().into()));

    merge_defaults(&mut msg, "context", envelope.context)?;
    merge_defaults(&mut msg, "integrations", envelope.integrations)?;

    let user_id = id_field(&msg, "userId")?;
    let anonymous_id = id_field(&msg, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err("userId or anonymousId is required".to_string());
    }

    let event = match kind {
        MessageType::Track => match msg.get("event") {
            Some(Value::String(e)) if !e.trim().is_empty() => Some(e.clone()),
            Some(Value::String(_)) => return Err("event must not be empty for a track".into()),
            Some(other) => {
                return Err(format!(
                    "event must be a string for a track, found {}",
                    json_kind(other)
                ))
            }
            None => return Err("event is required for a track".to_string()),
        },
        _ => None,
    };
    if kind == MessageType::Group && id_field(&msg, "groupId")?.is_none() {
        return Err("groupId is required for a group".to_string());
    }
    if kind == MessageType::Alias && id_field(&msg, "previousId")?.is_none() {
        return Err("previousId is required for an alias".to_string());
    }
    for field in ["context", "properties", "traits", "integrations"] {
        match msg.get(field) {
            None | Some(Value::Object(_)) | Some(Value::Null) => {}
            Some(other) => {
                return Err(format!(
                    "{field} must be an object, found {}",
                    json_kind(other)
                ))
            }
        }
    }

    let message_id = match msg.get("messageId") {
        None | Some(Value::Null) => {
            let id = uuid::Uuid::new_v4().to_string();
            msg.insert("messageId".into(), Value::String(id.clone()));
            id
        }
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(format!(
                "messageId must be a non-empty string, found {}",
                json_kind(other)
            ))
        }
    };

    let timestamp = event_time(&msg, envelope.sent_at, received_at)?;
    msg.insert("timestamp".into(), Value::String(time_text(timestamp)));
    msg.insert("receivedAt".into(), Value::String(time_text(received_at)));
    if !msg.contains_key("sentAt") {
        if let Some(sent_at) = envelope.sent_at {
            msg.insert("sentAt".into(), Value::String(sent_at.to_string()));
        }
    }

    let membership = membership(kind, &msg, user_id.as_deref().or(anonymous_id.as_deref()))?;

    Ok(PreparedMessage {
        message_id,
        kind,
        user_id,
        anonymous_id,
        event,
        timestamp,
        received_at,
        raw: Value::Object(msg),
        membership,
    })
}

/// Envelope members fill in what the item lacks; the item's own values win.
fn merge_defaults(
    msg: &mut Map<String, Value>,
    field: &str,
    defaults: Option<&Map<String, Value>>,
) -> Result<(), String> {
    let Some(defaults) = defaults.filter(|d| !d.is_empty()) else {
        return Ok(());
    };
    let target = msg
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if target.is_null() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return Err(format!(
            "{field} must be an object, found {}",
            json_kind(target)
        ));
    };
    for (k, v) in defaults {
        target.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Ok(())
}

/// An identifier field: a non-empty string or a number (kept as text).
fn id_field(msg: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "{field} must be a string or a number, found {}",
            json_kind(other)
        )),
    }
}

/// The event time as Segment computes it: `timestamp` if given; else
/// `originalTimestamp` corrected for the client's clock skew
/// (`receivedAt - (sentAt - originalTimestamp)`); else `originalTimestamp`
/// when there is no `sentAt`; else `receivedAt`.
fn event_time(
    msg: &Map<String, Value>,
    envelope_sent_at: Option<&str>,
    received_at: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    if let Some(t) = time_field(msg, "timestamp")? {
        return Ok(t);
    }
    let sent_at = match time_field(msg, "sentAt")? {
        Some(t) => Some(t),
        None => envelope_sent_at
            .map(|s| parse_time(s).ok_or_else(|| format!("sentAt {s:?} is not an ISO 8601 date")))
            .transpose()?,
    };
    match (time_field(msg, "originalTimestamp")?, sent_at) {
        (Some(original), Some(sent)) => received_at
            .checked_sub_signed(sent - original)
            .filter(in_iso_range)
            .ok_or_else(|| {
                format!(
                    "the event time corrected for clock skew (receivedAt - (sentAt - originalTimestamp)) is out of range: sentAt {} and originalTimestamp {} are too far apart",
                    time_text(sent),
                    time_text(original)
                )
            }),
        (Some(original), None) => Ok(original),
        (None, _) => Ok(received_at),
    }
}

fn time_field(msg: &Map<String, Value>, field: &str) -> Result<Option<DateTime<Utc>>, String> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s)
            .map(Some)
            .ok_or_else(|| format!("{field} {s:?} is not an ISO 8601 date")),
        Some(other) => Err(format!(
            "{field} must be an ISO 8601 date string, found {}",
            json_kind(other)
        )),
    }
}

/// RFC 3339 with any offset, or a date-time without offset taken as UTC;
/// in UTC, the year must be 0000 to 9999 (see `in_iso_range`).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Some(t.with_timezone(&Utc)).filter(in_iso_range);
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s.trim(), f).ok())
        .map(|t| t.and_utc())
        .filter(in_iso_range)
}

/// Years 0000 to 9999: what a four-digit ISO 8601 / RFC 3339 year holds, so
/// the stored `timestamp` reads back (`%Y` alone also accepts signed,
/// expanded years such as `+262142`, whose skew correction overflows).
fn in_iso_range(t: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&t.year())
}

/// The membership change a stored message carries, if any (the mapper reads
/// stored messages, whose type and user were checked at ingest).
pub fn stored_membership(raw: &Value) -> Result<Option<Membership>, String> {
    let Some(msg) = raw.as_object() else {
        return Ok(None);
    };
    let Some(kind) = msg
        .get("type")
        .and_then(Value::as_str)
        .and_then(MessageType::parse)
    else {
        return Ok(None);
    };
    let user = id_field(msg, "userId")?.or(id_field(msg, "anonymousId")?);
    membership(kind, msg, user.as_deref())
}

/// Recognises an Engage membership change (SPEC 2.2). A message that claims to
/// be one but carries no boolean value is invalid input.
fn membership(
    kind: MessageType,
    msg: &Map<String, Value>,
    user: Option<&str>,
) -> Result<Option<Membership>, String> {
    let Some(personas) = msg
        .get("context")
        .and_then(|c| c.get("personas"))
        .and_then(Value::as_object)
    else {
        return Ok(None);
    };
    let class = personas.get("computation_class").and_then(Value::as_str);
    if !matches!(class, Some("audience") | Some("journey_step")) {
        return Ok(None);
    }
    let key = match personas.get("computation_key").and_then(Value::as_str) {
        Some(k) if !k.trim().is_empty() => k,
        _ => return Ok(None),
    };
    let holder = match kind {
        MessageType::Identify => "traits",
        MessageType::Track => "properties",
        _ => {
            return Err(format!(
                "an audience membership message must be an identify or a track, found a {}",
                kind.as_str()
            ))
        }
    };
    match msg.get(holder).and_then(|h| h.get(key)) {
        Some(Value::Bool(member)) => Ok(Some(Membership {
            audience_key: key.to_string(),
            user_id: user.unwrap_or_default().to_string(),
            member: *member,
        })),
        other => Err(format!(
            "audience membership message for {key:?} needs a boolean at {holder}.{key}, found {}",
            other.map(json_kind).unwrap_or("nothing")
        )),
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn ok(v: Value, route: Option<MessageType>) -> PreparedMessage {
        prepare(v, route, &Envelope::default(), at("2024-01-01T00:00:10Z")).unwrap()
    }

    fn err(v: Value, route: Option<MessageType>) -> String {
        prepare(v, route, &Envelope::default(), at("2024-01-01T00:00:10Z")).unwrap_err()
    }

    #[test]
    fn route_type_overrides_body_type_and_fills_in_ids_and_times() {
        let p = ok(
            json!({"type": "identify", "event": "X", "userId": "u1", "custom": [1]}),
            Some(MessageType::Track),
        );
        assert_eq!(p.kind, MessageType::Track);
        assert_eq!(p.raw["type"], "track");
        assert_eq!(p.raw["custom"], json!([1]), "unknown fields are kept");
        assert_eq!(p.raw["receivedAt"], "2024-01-01T00:00:10.000Z");
        assert_eq!(p.raw["timestamp"], "2024-01-01T00:00:10.000Z");
        assert_eq!(p.raw["messageId"].as_str().unwrap(), p.message_id);
        assert_eq!(p.message_id.len(), 36);
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            err(json!({"event": "X"}), Some(MessageType::Track)),
            "userId or anonymousId is required"
        );
        assert_eq!(
            err(json!({"userId": "u"}), Some(MessageType::Track)),
            "event is required for a track"
        );
        assert!(
            err(json!({"userId": "u", "event": 5}), Some(MessageType::Track))
                .contains("event must be a string")
        );
        assert_eq!(
            err(json!({"userId": "u"}), Some(MessageType::Group)),
            "groupId is required for a group"
        );
        assert_eq!(
            err(json!({"userId": "u"}), Some(MessageType::Alias)),
            "previousId is required for an alias"
        );
        assert!(err(json!({"userId": "u"}), None).contains("type is missing"));
        assert!(err(json!({"userId": "u", "type": "boom"}), None).contains("unknown type"));
        assert!(err(json!([1]), None).contains("must be a JSON object"));
        assert!(err(
            json!({"userId": "u", "timestamp": "yesterday"}),
            Some(MessageType::Identify)
        )
        .contains("timestamp"));
        assert!(
            err(json!({"userId": {"a": 1}}), Some(MessageType::Identify))
                .contains("userId must be")
        );
    }

    #[test]
    fn timestamp_wins_then_skew_corrected_original() {
        let p = ok(
            json!({"userId": "u", "timestamp": "2023-01-01T00:00:00Z", "originalTimestamp": "2020-01-01T00:00:00Z"}),
            Some(MessageType::Identify),
        );
        assert_eq!(p.timestamp, at("2023-01-01T00:00:00Z"));
        // client clock 1 h ahead: sent 01:00:05, happened 01:00:00, received 00:00:10 → 00:00:05
        let p = ok(
            json!({"userId": "u", "originalTimestamp": "2024-01-01T01:00:00Z", "sentAt": "2024-01-01T01:00:05Z"}),
            Some(MessageType::Identify),
        );
        assert_eq!(p.raw["timestamp"], "2024-01-01T00:00:05.000Z");
        let p = ok(
            json!({"userId": "u", "originalTimestamp": "2024-01-01T01:00:00+01:00"}),
            Some(MessageType::Identify),
        );
        assert_eq!(p.raw["timestamp"], "2024-01-01T00:00:00.000Z");
    }

    #[test]
    fn envelope_fills_in_but_item_wins() {
        let ctx = json!({"library": {"name": "batch"}, "ip": "1.2.3.4"});
        let env = Envelope {
            context: ctx.as_object(),
            integrations: None,
            sent_at: Some("2024-01-01T00:00:20Z"),
        };
        let p = prepare(
            json!({"type": "track", "event": "E", "userId": "u", "context": {"ip": "5.6.7.8"}, "originalTimestamp": "2024-01-01T00:00:15Z"}),
            None,
            &env,
            at("2024-01-01T00:00:10Z"),
        )
        .unwrap();
        assert_eq!(
            p.raw["context"],
            json!({"ip": "5.6.7.8", "library": {"name": "batch"}})
        );
        assert_eq!(p.raw["timestamp"], "2024-01-01T00:00:05.000Z");
    }

    #[test]
    fn membership_is_recognised_from_identify_and_track_whatever_the_event_name() {
        let ctx = json!({"personas": {"computation_class": "audience", "computation_key": "high_value_users"}});
        let p = ok(
            json!({"userId": "u1", "traits": {"high_value_users": true}, "context": ctx}),
            Some(MessageType::Identify),
        );
        assert_eq!(
            p.membership,
            Some(Membership {
                audience_key: "high_value_users".into(),
                user_id: "u1".into(),
                member: true
            })
        );
        let p = ok(
            json!({"userId": "u1", "event": "Left It", "properties": {"high_value_users": false}, "context": ctx}),
            Some(MessageType::Track),
        );
        assert!(!p.membership.unwrap().member);
        let e = err(
            json!({"userId": "u1", "traits": {"high_value_users": "yes"}, "context": ctx}),
            Some(MessageType::Identify),
        );
        assert!(
            e.contains("needs a boolean at traits.high_value_users"),
            "{e}"
        );
        let trait_ctx =
            json!({"personas": {"computation_class": "trait", "computation_key": "ltv"}});
        assert!(ok(
            json!({"userId": "u1", "traits": {"ltv": 5}, "context": trait_ctx}),
            Some(MessageType::Identify)
        )
        .membership
        .is_none());
    }

    /// Found by `fuzz/fuzz_targets/message.rs`: a batch whose `sentAt` is
    /// far from its items' `originalTimestamp` was accepted with a
    /// skew-corrected event time before year 0, stored as
    /// "-0042-01-01T11:59:58.000Z", which is not RFC 3339, so the mappings
    /// silently fell back to `receivedAt`.
    #[test]
    fn skew_correction_out_of_range_is_refused_regression() {
        let body = br#"{"batch":[{"type":"identify","userId":"019mr8mf4r","trait":"019mr8mf4r","event":"Song Played","properties":{"name":"Fallin for You","artist":"Dieoss Bentle{"},"timestamp":"2012-12-02T00:30:12.984Z"},{"type":"page","anonymousId":"a5b1","name":"Docs","properties":{"path":"/docs"},"originalTimestamp":"2012-12-02T00:30:11.000Z"}],"context":{"library":{"name":"analytics-python","version":"2.2.2"}},"integrations":{"All":true},"sentAt":"4080-12-02T00:30:13.000Z","writeKey":"YOUR_WRITE_KEY"}"#;
        let envelope: Value = serde_json::from_slice(body).unwrap();
        let env = Envelope {
            context: envelope["context"].as_object(),
            integrations: envelope["integrations"].as_object(),
            sent_at: envelope["sentAt"].as_str(),
        };
        let received = at("2026-01-01T12:00:00Z");
        let items = envelope["batch"].as_array().unwrap();
        // The item with its own `timestamp` needs no correction.
        let first = prepare(items[0].clone(), None, &env, received).unwrap();
        assert_eq!(first.raw["timestamp"], "2012-12-02T00:30:12.984Z");
        let e = prepare(items[1].clone(), None, &env, received).unwrap_err();
        assert!(
            e.contains("clock skew") && e.contains("out of range"),
            "{e}"
        );
        // Accepted skew still works up to the edge of the range.
        let p = ok(
            json!({"userId": "u", "originalTimestamp": "2000-01-01T00:00:00Z", "sentAt": "2024-01-01T00:00:10Z"}),
            Some(MessageType::Identify),
        );
        assert_eq!(p.raw["timestamp"], "2000-01-01T00:00:00.000Z");
    }

    /// Found by reading the same fuzz crash: `%Y` also parses signed,
    /// expanded years, and skew correction between two such times overflowed
    /// chrono's range and panicked (`DateTime - TimeDelta overflowed`) inside
    /// the ingest handler.
    #[test]
    fn expanded_years_are_refused_not_panicking_regression() {
        let huge = json!({"userId": "u", "originalTimestamp": "-262143-01-01T00:00:00", "sentAt": "+262142-01-01T00:00:00"});
        assert!(err(huge, Some(MessageType::Identify)).contains("not an ISO 8601 date"));
        for stamp in [
            "+12345-01-01T00:00:00",
            "-0001-12-31T00:00:00",
            "10000-01-01 00:00:00",
        ] {
            let e = err(
                json!({"userId": "u", "timestamp": stamp}),
                Some(MessageType::Identify),
            );
            assert!(e.contains("not an ISO 8601 date"), "{stamp}: {e}");
        }
        assert_eq!(
            parse_time("9999-12-31T23:59:59.999Z"),
            Some(at("9999-12-31T23:59:59.999Z"))
        );
        assert!(parse_time("0000-01-01T00:00:00").is_some());
    }
}
