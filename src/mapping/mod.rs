//! Mappings (SPEC 4): what each stored Segment message becomes in Schematic.
//!
//! `[[mappings]]` from the config (or the two presets) are compiled once at
//! start, so every config mistake (a trigger that does not parse, an unknown
//! field, a bad path) stops the daemon with the mapping's name. Applying them
//! is pure: a message in, one `MappedDelivery` per matching mapping out, each
//! either a ready Schematic event or the reason the delivery fails. No I/O
//! here; ingest, `preview` and `replay --remap` all go through `map_message`.

pub mod field;
pub mod name;
pub mod trigger;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::schematic::event::{
    format_sent_at, strip_nulls, CompanyBody, IdentifyBody, SchematicEvent, TrackBody,
};
use field::{to_key_map, FieldValue};
use name::{normalize_event_name, trait_name};
use trigger::Trigger;

/// More than this many `[[mappings]]` is a config error (SPEC 4).
pub const MAX_MAPPINGS: usize = 50;

/// One `[[mappings]]` entry of `config.toml`, as written.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub name: String,
    /// Segment subscription syntax, e.g. `type = "track" and event = "Signed Up"`.
    pub trigger: String,
    pub action: Action,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Field name → field value (see `field`); which names are allowed
    /// depends on the action.
    #[serde(default)]
    pub fields: Map<String, Value>,
}

fn yes() -> bool {
    true
}

/// Which Schematic event a mapping produces.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Track,
    Identify,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Track => "track",
            Action::Identify => "identify",
        }
    }

    /// Field names this action reads, required ones first.
    pub fn field_names(self) -> &'static [&'static str] {
        match self {
            Action::Track => &[
                "event_name",
                "timestamp",
                "user_keys",
                "company_keys",
                "traits",
            ],
            Action::Identify => &[
                "user_keys",
                "user_name",
                "user_traits",
                "company_keys",
                "company_name",
                "company_traits",
                "timestamp",
            ],
        }
    }

    /// Fields a mapping of this action must set.
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Action::Track => &["event_name"],
            Action::Identify => &["user_keys"],
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapping ready to apply: trigger parsed, fields parsed and checked.
#[derive(Clone)]
pub struct Mapping {
    pub name: String,
    pub trigger: Trigger,
    pub action: Action,
    pub enabled: bool,
    /// Only names from `action.field_names()`.
    pub fields: BTreeMap<String, FieldValue>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("name", &self.name)
            .field("trigger", &self.trigger.source())
            .field("action", &self.action)
            .field("enabled", &self.enabled)
            .field("fields", &self.fields)
            .finish()
    }
}

/// Checks and compiles `[[mappings]]`; the error names the mapping and what
/// to fix.
pub fn compile(configs: &[MappingConfig]) -> Result<Vec<Mapping>, String> {
    if configs.len() > MAX_MAPPINGS {
        return Err(format!(
            "at most {MAX_MAPPINGS} mappings are allowed, found {}",
            configs.len()
        ));
    }
    let mut mappings: Vec<Mapping> = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let mapping = compile_one(config).map_err(|e| {
            if config.name.trim().is_empty() {
                format!("mapping #{}: {e}", i + 1)
            } else {
                format!("mapping \"{}\": {e}", config.name)
            }
        })?;
        if mappings.iter().any(|m| m.name == mapping.name) {
            return Err(format!(
                "mapping \"{}\" is defined twice; mapping names must be unique",
                mapping.name
            ));
        }
        mappings.push(mapping);
    }
    Ok(mappings)
}

fn compile_one(config: &MappingConfig) -> Result<Mapping, String> {
    if config.name.trim().is_empty() {
        return Err("name is empty".to_string());
    }
    let trigger = Trigger::parse(&config.trigger).map_err(|e| format!("trigger {e}"))?;
    let allowed = config.action.field_names();
    let mut fields = BTreeMap::new();
    for (field_name, value) in &config.fields {
        if !allowed.contains(&field_name.as_str()) {
            return Err(format!(
                "unknown field \"{field_name}\" for action {}; allowed: {}",
                config.action,
                allowed.join(", ")
            ));
        }
        let parsed =
            FieldValue::parse(value).map_err(|e| format!("field \"{field_name}\": {e}"))?;
        fields.insert(field_name.clone(), parsed);
    }
    for required in config.action.required_fields() {
        if !fields.contains_key(*required) {
            return Err(format!(
                "field \"{required}\" is required for action {}",
                config.action
            ));
        }
    }
    Ok(Mapping {
        name: config.name.clone(),
        trigger,
        action: config.action,
        enabled: config.enabled,
        fields,
    })
}

/// The two default mappings of SPEC 4, as config, with the defaults of
/// Segment's Schematic destination.
pub fn preset_configs() -> Vec<MappingConfig> {
    let fields = |v: Value| match v {
        Value::Object(members) => members,
        _ => Map::new(),
    };
    vec![
        MappingConfig {
            name: "Track Event".to_string(),
            trigger: "type = \"track\"".to_string(),
            action: Action::Track,
            enabled: true,
            fields: fields(json!({
                "event_name": "$.event",
                "timestamp": "$.timestamp",
                "user_keys": {"userId": "$.userId"},
                "company_keys": {"groupId": "$.context.groupId"},
                "traits": {"raw_event_name": "$.event"}
            })),
        },
        MappingConfig {
            name: "Identify User".to_string(),
            trigger: "type = \"identify\"".to_string(),
            action: Action::Identify,
            enabled: true,
            fields: fields(json!({
                "user_keys": {"userId": "$.userId"},
                "user_name": "$.traits.name",
                "user_traits": "$.traits",
                "company_keys": {"groupId": "$.context.groupId"},
                "company_name": "$.traits.company_name",
                "timestamp": "$.timestamp"
            })),
        },
    ]
}

/// The presets, compiled; used when the config has no `[[mappings]]`.
pub fn presets() -> Vec<Mapping> {
    // The presets are constants; `presets_compile` in the tests below proves
    // they compile, so this cannot fail at run time.
    compile(&preset_configs()).expect("preset mappings compile")
}

/// What one matching mapping made of a message: the Schematic event, or why
/// this delivery fails at mapping time.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedDelivery {
    pub mapping: String,
    pub result: Result<SchematicEvent, String>,
}

/// Applies every enabled mapping whose trigger matches. An empty result
/// means no mapping matched: the caller marks the event skipped.
pub fn map_message(mappings: &[Mapping], msg: &Value) -> Vec<MappedDelivery> {
    mappings
        .iter()
        .filter(|m| m.enabled && m.trigger.matches(msg))
        .map(|m| MappedDelivery {
            mapping: m.name.clone(),
            result: m.apply(msg),
        })
        .collect()
}

impl Mapping {
    /// Builds this mapping's event for `msg` without looking at the trigger
    /// (`map_message` does that). Errors end with the mapping's name.
    pub fn apply(&self, msg: &Value) -> Result<SchematicEvent, String> {
        let event = match self.action {
            Action::Track => self.track(msg),
            Action::Identify => self.identify(msg),
        };
        event.map_err(|reason| format!("{reason} (mapping \"{}\")", self.name))
    }

    fn resolve(&self, field_name: &str, msg: &Value) -> Option<Value> {
        self.fields.get(field_name)?.resolve(msg)
    }

    /// Describes a field for "resolved to nothing" errors: `event_name ("$.event")`.
    fn describe(&self, field_name: &str) -> String {
        match self.fields.get(field_name) {
            Some(value) => format!("{field_name} ({value})"),
            None => field_name.to_string(),
        }
    }

    fn track(&self, msg: &Value) -> Result<SchematicEvent, String> {
        let raw_name = match self.resolve("event_name", msg) {
            None => {
                return Err(format!(
                    "{} resolved to nothing",
                    self.describe("event_name")
                ))
            }
            Some(Value::String(s)) => s,
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            Some(other) => {
                return Err(format!(
                    "{} resolved to {}, not a name",
                    self.describe("event_name"),
                    json_kind(&other)
                ))
            }
        };
        let event = normalize_event_name(&raw_name).ok_or_else(|| {
            format!("event name {raw_name:?} has no characters Schematic accepts ([a-z0-9_-])")
        })?;
        let mut traits = self.traits("traits", msg).unwrap_or_default();
        traits
            .entry("raw_event_name")
            .or_insert(Value::String(raw_name));
        let body = TrackBody {
            event,
            company: non_empty(to_key_map(self.resolve("company_keys", msg))),
            user: non_empty(to_key_map(self.resolve("user_keys", msg))),
            traits: Some(traits),
        };
        Ok(SchematicEvent::track(self.sent_at(msg)?, body))
    }

    fn identify(&self, msg: &Value) -> Result<SchematicEvent, String> {
        let keys = to_key_map(self.resolve("user_keys", msg));
        if keys.is_empty() {
            return Err(format!(
                "{} resolved to no keys; identify needs at least one user key",
                self.describe("user_keys")
            ));
        }
        let mut traits = self.traits("user_traits", msg);
        if let Some(traits) = traits.as_mut() {
            rename_computed_trait(traits, msg);
        }
        let company_keys = to_key_map(self.resolve("company_keys", msg));
        let company = (!company_keys.is_empty()).then(|| CompanyBody {
            keys: company_keys,
            name: self.name_field("company_name", msg),
            traits: self.traits("company_traits", msg),
        });
        let body = IdentifyBody {
            keys,
            name: self.name_field("user_name", msg),
            traits,
            company,
        };
        Ok(SchematicEvent::identify(self.sent_at(msg)?, body))
    }

    /// A traits field: used only when it resolves to an object; nulls are
    /// stripped and an object left empty counts as no traits.
    fn traits(&self, field_name: &str, msg: &Value) -> Option<Map<String, Value>> {
        let mut value = self.resolve(field_name, msg)?;
        strip_nulls(&mut value);
        match value {
            Value::Object(members) if !members.is_empty() => Some(members),
            _ => None,
        }
    }

    /// A name field: used only when it resolves to a non-empty string.
    fn name_field(&self, field_name: &str, msg: &Value) -> Option<String> {
        match self.resolve(field_name, msg)? {
            Value::String(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// The event time: the `timestamp` field, else the message's
    /// `timestamp`, else its `receivedAt`; the first that parses as RFC 3339.
    fn sent_at(&self, msg: &Value) -> Result<String, String> {
        self.resolve("timestamp", msg)
            .as_ref()
            .and_then(parse_time)
            .or_else(|| msg.get("timestamp").and_then(parse_time))
            .or_else(|| msg.get("receivedAt").and_then(parse_time))
            .map(format_sent_at)
            .ok_or_else(|| {
                "no event time: neither the timestamp field, $.timestamp nor $.receivedAt is an RFC 3339 time"
                    .to_string()
            })
    }
}

fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    let text = v.as_str()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn non_empty(keys: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!keys.is_empty()).then_some(keys)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// SPEC 4: a computed trait (`context.personas.computation_class` `trait` or
/// `computed_trait`) reaches Schematic under its snake_cased key, like
/// audiences do.
fn rename_computed_trait(traits: &mut Map<String, Value>, msg: &Value) {
    let personas = msg.pointer("/context/personas");
    let class = personas
        .and_then(|p| p.get("computation_class"))
        .and_then(Value::as_str);
    if !matches!(class, Some("trait" | "computed_trait")) {
        return;
    }
    let Some(key) = personas
        .and_then(|p| p.get("computation_key"))
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
    else {
        return;
    };
    let Some(renamed) = trait_name(key).filter(|renamed| renamed != key) else {
        return;
    };
    if let Some(value) = traits.remove(key) {
        traits.insert(renamed, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn config(name: &str, trigger: &str, action: Action, fields: Value) -> MappingConfig {
        MappingConfig {
            name: name.to_string(),
            trigger: trigger.to_string(),
            action,
            enabled: true,
            fields: match fields {
                Value::Object(members) => members,
                _ => Map::new(),
            },
        }
    }

    fn track_config(name: &str) -> MappingConfig {
        config(
            name,
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.event"}),
        )
    }

    /// The single delivery `msg` maps to, serialized.
    fn only_event(mappings: &[Mapping], msg: &Value) -> Result<Value, String> {
        let mut deliveries = map_message(mappings, msg);
        if deliveries.len() != 1 {
            return Err(format!("expected one delivery, got {deliveries:?}"));
        }
        let event = deliveries.remove(0).result?;
        serde_json::to_value(event).map_err(|e| e.to_string())
    }

    fn assert_no_null(v: &Value) {
        match v {
            Value::Null => panic!("null in output"),
            Value::Array(items) => items.iter().for_each(assert_no_null),
            Value::Object(members) => members.values().for_each(assert_no_null),
            _ => {}
        }
    }

    #[test]
    fn presets_compile() {
        let presets = presets();
        let names: Vec<&str> = presets.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["Track Event", "Identify User"]);
        assert_eq!(presets[0].action, Action::Track);
        assert_eq!(presets[1].action, Action::Identify);
        assert!(presets.iter().all(|m| m.enabled));
    }

    #[test]
    fn track_parity_with_segment_destination() -> TestResult {
        let msg = json!({
            "type": "track",
            "event": "Order Completed",
            "userId": "u1",
            "context": {"groupId": "g1"},
            "timestamp": "2023-01-01T00:00:00.000Z"
        });
        let event = only_event(&presets(), &msg)?;
        assert_eq!(
            event,
            json!({
                "type": "track",
                "sent_at": "2023-01-01T00:00:00.000Z",
                "body": {
                    "event": "order_completed",
                    "company": {"groupId": "g1"},
                    "user": {"userId": "u1"},
                    "traits": {"raw_event_name": "Order Completed"}
                }
            })
        );
        Ok(())
    }

    #[test]
    fn identify_parity_with_company() -> TestResult {
        let msg = json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"name": "Ann Lee", "company_name": "Acme", "plan": "pro", "gone": null},
            "context": {"groupId": "g1"},
            "timestamp": "2023-01-01T10:00:00+02:00"
        });
        let event = only_event(&presets(), &msg)?;
        assert_eq!(
            event,
            json!({
                "type": "identify",
                "sent_at": "2023-01-01T08:00:00.000Z",
                "body": {
                    "keys": {"userId": "u1"},
                    "name": "Ann Lee",
                    "traits": {"name": "Ann Lee", "company_name": "Acme", "plan": "pro"},
                    "company": {"keys": {"groupId": "g1"}, "name": "Acme"}
                }
            })
        );
        Ok(())
    }

    #[test]
    fn identify_without_company_keys_has_no_company() -> TestResult {
        let msg = json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"company_name": "Acme"},
            "timestamp": "2023-01-01T00:00:00Z"
        });
        let event = only_event(&presets(), &msg)?;
        assert_eq!(event["body"].get("company"), None);
        assert_eq!(event["body"].get("name"), None);
        assert_eq!(event["body"]["keys"], json!({"userId": "u1"}));
        Ok(())
    }

    #[test]
    fn identify_without_user_keys_fails_with_a_reason() {
        let msg =
            json!({"type": "identify", "anonymousId": "a1", "timestamp": "2023-01-01T00:00:00Z"});
        let deliveries = map_message(&presets(), &msg);
        assert_eq!(deliveries.len(), 1);
        let err = deliveries[0].result.clone().err().unwrap_or_default();
        assert!(
            err.contains("user_keys") && err.contains("no keys"),
            "{err}"
        );
        assert!(err.ends_with("(mapping \"Identify User\")"), "{err}");
    }

    #[test]
    fn numbers_in_key_maps_become_strings() -> TestResult {
        let msg = json!({
            "type": "track",
            "event": "Seat Added",
            "userId": 1234,
            "context": {"groupId": true},
            "timestamp": "2023-01-01T00:00:00Z"
        });
        let event = only_event(&presets(), &msg)?;
        assert_eq!(event["body"]["user"], json!({"userId": "1234"}));
        assert_eq!(event["body"]["company"], json!({"groupId": "true"}));
        Ok(())
    }

    #[test]
    fn track_without_keys_leaves_user_and_company_out() -> TestResult {
        let msg = json!({"type": "track", "event": "Ping", "anonymousId": "a1", "timestamp": "2023-01-01T00:00:00Z"});
        let event = only_event(&presets(), &msg)?;
        assert_eq!(
            event["body"],
            json!({"event": "ping", "traits": {"raw_event_name": "Ping"}})
        );
        Ok(())
    }

    #[test]
    fn unacceptable_event_name_fails_the_delivery() {
        let msg = json!({"type": "track", "event": "!!!", "userId": "u1", "timestamp": "2023-01-01T00:00:00Z"});
        let deliveries = map_message(&presets(), &msg);
        let err = deliveries[0].result.clone().err().unwrap_or_default();
        assert!(
            err.starts_with("event name \"!!!\" has no characters Schematic accepts ([a-z0-9_-])"),
            "{err}"
        );
    }

    #[test]
    fn missing_event_name_names_the_field() -> TestResult {
        let mappings = compile(&[config(
            "By Property",
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.properties.kind"}),
        )])?;
        let msg = json!({"type": "track", "event": "X", "timestamp": "2023-01-01T00:00:00Z"});
        let err = map_message(&mappings, &msg)[0]
            .result
            .clone()
            .err()
            .unwrap_or_default();
        assert_eq!(
            err,
            "event_name (\"$.properties.kind\") resolved to nothing (mapping \"By Property\")"
        );
        Ok(())
    }

    #[test]
    fn mapping_traits_can_set_raw_event_name_themselves() -> TestResult {
        let mappings = compile(&[config(
            "Custom Raw",
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.event", "traits": {"raw_event_name": "$.properties.original", "plan": "$.properties.plan"}}),
        )])?;
        let msg = json!({
            "type": "track",
            "event": "Upgraded",
            "properties": {"original": "Plan Upgraded v2", "plan": null},
            "timestamp": "2023-01-01T00:00:00Z"
        });
        let event = only_event(&mappings, &msg)?;
        assert_eq!(
            event["body"]["traits"],
            json!({"raw_event_name": "Plan Upgraded v2"})
        );
        Ok(())
    }

    #[test]
    fn custom_mapping_with_first_that_exists_and_template() -> TestResult {
        let mappings = compile(&[config(
            "Custom Identify",
            "type = \"identify\"",
            Action::Identify,
            json!({
                "user_keys": {"userId": "$.userId", "email": ["$.traits.email", "$.context.traits.email"]},
                "user_name": "{{traits.first}} {{traits.last}}",
                "company_keys": {"groupId": ["$.groupId", "$.context.groupId", "$.traits.company.id"]},
                "company_name": "$.traits.company.name",
                "company_traits": {"plan": "$.traits.company.plan", "source": "segment"}
            }),
        )])?;
        let msg = json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"first": "Ann", "last": "Lee", "company": {"id": 77, "name": "Acme", "plan": null}},
            "context": {"traits": {"email": "ann@example.com"}},
            "receivedAt": "2023-01-02T03:04:05.678901Z"
        });
        let event = only_event(&mappings, &msg)?;
        assert_eq!(
            event,
            json!({
                "type": "identify",
                "sent_at": "2023-01-02T03:04:05.678Z",
                "body": {
                    "keys": {"userId": "u1", "email": "ann@example.com"},
                    "name": "Ann Lee",
                    "company": {"keys": {"groupId": "77"}, "name": "Acme", "traits": {"source": "segment"}}
                }
            })
        );
        Ok(())
    }

    #[test]
    fn every_matching_enabled_mapping_delivers() -> TestResult {
        let mut disabled = track_config("Disabled");
        disabled.enabled = false;
        let mappings = compile(&[
            track_config("First"),
            config(
                "Only Signups",
                "event = \"Signed Up\"",
                Action::Track,
                json!({"event_name": "signup"}),
            ),
            disabled,
        ])?;
        let signup = json!({"type": "track", "event": "Signed Up", "userId": "u1", "timestamp": "2023-01-01T00:00:00Z"});
        let names: Vec<String> = map_message(&mappings, &signup)
            .into_iter()
            .map(|d| d.mapping)
            .collect();
        assert_eq!(names, ["First", "Only Signups"]);
        let page = json!({"type": "page", "userId": "u1"});
        assert!(map_message(&mappings, &page).is_empty());
        Ok(())
    }

    #[test]
    fn sent_at_falls_back_to_message_times() -> TestResult {
        let mappings = compile(&[config(
            "Timed",
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.event", "timestamp": "$.properties.when"}),
        )])?;
        let cases = [
            (
                json!({"when": "2024-05-05T05:05:05-01:00"}),
                "2024-05-05T06:05:05.000Z",
            ),
            (json!({"when": "yesterday"}), "2023-01-01T00:00:00.000Z"),
            (json!({}), "2023-01-01T00:00:00.000Z"),
        ];
        for (properties, want) in cases {
            let msg = json!({"type": "track", "event": "E", "properties": properties,
                             "timestamp": "2023-01-01T00:00:00Z", "receivedAt": "2023-02-02T00:00:00Z"});
            assert_eq!(only_event(&mappings, &msg)?["sent_at"], json!(want));
        }
        let received_only =
            json!({"type": "track", "event": "E", "receivedAt": "2023-02-02T00:00:00Z"});
        assert_eq!(
            only_event(&mappings, &received_only)?["sent_at"],
            json!("2023-02-02T00:00:00.000Z")
        );
        let no_time = json!({"type": "track", "event": "E"});
        let err = map_message(&mappings, &no_time)[0]
            .result
            .clone()
            .err()
            .unwrap_or_default();
        assert!(err.starts_with("no event time"), "{err}");
        Ok(())
    }

    #[test]
    fn computed_trait_is_renamed_to_its_trait_name() -> TestResult {
        let msg = json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"Lifetime Value": 420, "email": "a@b.c"},
            "context": {"personas": {"computation_class": "trait", "computation_key": "Lifetime Value"}},
            "timestamp": "2023-01-01T00:00:00Z"
        });
        let event = only_event(&presets(), &msg)?;
        assert_eq!(
            event["body"]["traits"],
            json!({"lifetime_value": 420, "email": "a@b.c"})
        );

        let mut not_computed = msg.clone();
        not_computed["context"]["personas"]["computation_class"] = json!("audience");
        let event = only_event(&presets(), &not_computed)?;
        assert_eq!(
            event["body"]["traits"],
            json!({"Lifetime Value": 420, "email": "a@b.c"})
        );
        Ok(())
    }

    #[test]
    fn output_never_contains_null() -> TestResult {
        let msg = json!({
            "type": "identify",
            "userId": "u1",
            "traits": {"name": null, "a": {"b": null, "c": [null, 1]}, "company_name": null},
            "context": {"groupId": null},
            "timestamp": "2023-01-01T00:00:00Z"
        });
        let event = only_event(&presets(), &msg)?;
        assert_no_null(&event);
        assert_eq!(event["body"]["traits"], json!({"a": {"c": [1]}}));
        Ok(())
    }

    #[test]
    fn fifty_one_mappings_are_refused() {
        let configs: Vec<MappingConfig> = (0..51).map(|i| track_config(&format!("m{i}"))).collect();
        assert!(compile(&configs[..50]).is_ok());
        let err = compile(&configs).err().unwrap_or_default();
        assert_eq!(err, "at most 50 mappings are allowed, found 51");
    }

    #[test]
    fn bad_trigger_is_refused_with_its_position() {
        let bad = config(
            "Bad",
            "type = = \"track\"",
            Action::Track,
            json!({"event_name": "$.event"}),
        );
        let err = compile(&[bad]).err().unwrap_or_default();
        assert!(
            err.starts_with("mapping \"Bad\": trigger at position "),
            "{err}"
        );
    }

    #[test]
    fn names_must_be_unique_and_non_empty() {
        let err = compile(&[track_config("Same"), track_config("Same")])
            .err()
            .unwrap_or_default();
        assert_eq!(
            err,
            "mapping \"Same\" is defined twice; mapping names must be unique"
        );
        let err = compile(&[track_config("ok"), track_config("  ")])
            .err()
            .unwrap_or_default();
        assert_eq!(err, "mapping #2: name is empty");
    }

    #[test]
    fn field_names_are_checked_per_action() {
        let unknown = config(
            "Typo",
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.event", "user_name": "$.traits.name"}),
        );
        let err = compile(&[unknown]).err().unwrap_or_default();
        assert_eq!(
            err,
            "mapping \"Typo\": unknown field \"user_name\" for action track; \
             allowed: event_name, timestamp, user_keys, company_keys, traits"
        );
        let missing = config(
            "No Keys",
            "type = \"identify\"",
            Action::Identify,
            json!({"user_name": "$.traits.name"}),
        );
        let err = compile(&[missing]).err().unwrap_or_default();
        assert_eq!(
            err,
            "mapping \"No Keys\": field \"user_keys\" is required for action identify"
        );
        let bad_path = config(
            "Bad Path",
            "type = \"track\"",
            Action::Track,
            json!({"event_name": "$.a..b"}),
        );
        let err = compile(&[bad_path]).err().unwrap_or_default();
        assert!(
            err.starts_with("mapping \"Bad Path\": field \"event_name\": invalid JSON path"),
            "{err}"
        );
    }

    #[test]
    fn mappings_deserialize_from_toml() -> TestResult {
        #[derive(Deserialize)]
        struct File {
            mappings: Vec<MappingConfig>,
        }
        let file: File = toml::from_str(
            r#"
            [[mappings]]
            name = "Signups"
            trigger = 'type = "track"'
            action = "track"
            fields = { event_name = "$.event", user_keys = { userId = "$.userId", tenant = 7 } }

            [[mappings]]
            name = "People"
            trigger = 'type = "identify"'
            action = "identify"
            enabled = false
            [mappings.fields]
            user_keys = { userId = ["$.userId", "$.anonymousId"] }
            "#,
        )?;
        assert_eq!(file.mappings[0].action, Action::Track);
        assert!(file.mappings[0].enabled);
        assert_eq!(
            file.mappings[0].fields["user_keys"],
            json!({"userId": "$.userId", "tenant": 7})
        );
        assert!(!file.mappings[1].enabled);
        let mappings = compile(&file.mappings)?;
        let msg = json!({"type": "track", "event": "Signed Up", "userId": "u1", "timestamp": "2023-01-01T00:00:00Z"});
        let event = only_event(&mappings, &msg)?;
        assert_eq!(
            event["body"]["user"],
            json!({"userId": "u1", "tenant": "7"})
        );

        let unknown_key = toml::from_str::<File>(
            "[[mappings]]\nname = \"x\"\ntrigger = 'type = \"track\"'\naction = \"track\"\nenable = true\n",
        );
        assert!(unknown_key.is_err());
        Ok(())
    }
}
