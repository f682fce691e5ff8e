//! Field values of a mapping (SPEC 4 "Field values"): how a mapping says where
//! each part of a Schematic event comes from in the Segment message.
//!
//! A value in `[[mappings]].fields` is parsed once at config time into a
//! `FieldValue`, so a typo in a path is a startup error, and resolving it
//! against a message is a pure lookup. "Resolves to nothing" (missing or
//! `null`) is `None` everywhere, which is what lets optional parts of an
//! event be left out instead of being sent as `null`.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

/// One parsed field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `"$.properties.plan"`, `"$.traits[\"Plan Name\"]"`, `"$"`.
    Path(JsonPath),
    /// `"{{traits.first}} {{traits.last}}"`.
    Template(Template),
    /// Any other string, a number or a boolean, used as it is.
    Literal(Value),
    /// An object whose members are field values; members that resolve to
    /// nothing are left out.
    Object(Vec<(String, FieldValue)>),
    /// `["$.groupId", "$.context.groupId"]`: the first that resolves.
    FirstOf(Vec<FieldValue>),
}

impl FieldValue {
    /// Parses a value from the config. Errors say what is wrong and where.
    pub fn parse(v: &Value) -> Result<FieldValue, String> {
        match v {
            Value::String(s) if is_path(s) => JsonPath::parse(s).map(FieldValue::Path),
            Value::String(s) if s.contains("{{") => Template::parse(s).map(FieldValue::Template),
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                Ok(FieldValue::Literal(v.clone()))
            }
            Value::Null => {
                Err("null is not a field value; leave the field out instead".to_string())
            }
            Value::Object(members) => members
                .iter()
                .map(|(key, member)| {
                    FieldValue::parse(member)
                        .map(|parsed| (key.clone(), parsed))
                        .map_err(|e| format!("in member \"{key}\": {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(FieldValue::Object),
            Value::Array(items) if items.is_empty() => {
                Err("an empty list has nothing to choose from".to_string())
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    FieldValue::parse(item).map_err(|e| format!("in list item {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(FieldValue::FirstOf),
        }
    }

    /// The value for this message; `None` when it is missing or `null`.
    pub fn resolve(&self, msg: &Value) -> Option<Value> {
        match self {
            FieldValue::Path(path) => path.get(msg).cloned(),
            FieldValue::Template(template) => template.render(msg).map(Value::String),
            FieldValue::Literal(v) => Some(v.clone()),
            FieldValue::Object(members) => {
                let resolved: Map<String, Value> = members
                    .iter()
                    .filter_map(|(key, member)| member.resolve(msg).map(|v| (key.clone(), v)))
                    .collect();
                (!resolved.is_empty()).then_some(Value::Object(resolved))
            }
            FieldValue::FirstOf(items) => items.iter().find_map(|item| item.resolve(msg)),
        }
    }
}

/// Shows the value as it was written in the config, for error messages.
impl fmt::Display for FieldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::Path(path) => write!(f, "{:?}", path.source),
            FieldValue::Template(template) => write!(f, "{:?}", template.source),
            FieldValue::Literal(v) => write!(f, "{v}"),
            FieldValue::Object(members) => {
                f.write_str("{")?;
                for (i, (key, member)) in members.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{key:?}: {member}")?;
                }
                f.write_str("}")
            }
            FieldValue::FirstOf(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A key map (user or company keys) from a resolved field: strings are kept,
/// numbers and booleans become strings; `null`, empty strings, objects,
/// arrays, and anything that is not an object at all give no keys.
pub fn to_key_map(v: Option<Value>) -> BTreeMap<String, String> {
    let Some(Value::Object(members)) = v else {
        return BTreeMap::new();
    };
    members
        .into_iter()
        .filter_map(|(key, value)| {
            let text = match value {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null | Value::Object(_) | Value::Array(_) => return None,
            };
            (!text.is_empty()).then_some((key, text))
        })
        .collect()
}

fn is_path(s: &str) -> bool {
    s == "$" || s.starts_with("$.") || s.starts_with("$[")
}

/// One step of a path: a member name or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// A JSON path from the message root: `$`, `$.a.b`, `$.a["b c"]`, `$.a[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    source: String,
    segments: Vec<PathSegment>,
}

impl JsonPath {
    /// Parses a path that starts with `$`.
    pub fn parse(src: &str) -> Result<JsonPath, String> {
        let fail =
            |at: usize, what: &str| format!("invalid JSON path {src:?}: {what} at position {at}");
        let chars: Vec<char> = src.chars().collect();
        if chars.first() != Some(&'$') {
            return Err(fail(0, "expected \"$\""));
        }
        let mut segments = Vec::new();
        let mut i = 1;
        while i < chars.len() {
            match chars[i] {
                '.' => {
                    let start = i + 1;
                    let mut end = start;
                    while end < chars.len() && chars[end] != '.' && chars[end] != '[' {
                        end += 1;
                    }
                    if end == start {
                        return Err(fail(start, "expected a member name"));
                    }
                    segments.push(PathSegment::Key(chars[start..end].iter().collect()));
                    i = end;
                }
                '[' => {
                    let (segment, next) =
                        parse_bracket(&chars, i).map_err(|(at, what)| fail(at, what))?;
                    segments.push(segment);
                    i = next;
                }
                _ => return Err(fail(i, "expected \".\" or \"[\"")),
            }
        }
        Ok(JsonPath {
            source: src.to_string(),
            segments,
        })
    }

    /// The path as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The value at this path, `None` when missing or `null`. A member name
    /// made of digits also indexes an array (`$.items.0`).
    pub fn get<'a>(&self, msg: &'a Value) -> Option<&'a Value> {
        let mut at = msg;
        for segment in &self.segments {
            at = match (segment, at) {
                (PathSegment::Key(key), Value::Object(members)) => members.get(key)?,
                (PathSegment::Key(key), Value::Array(items)) => {
                    items.get(key.parse::<usize>().ok()?)?
                }
                (PathSegment::Index(i), Value::Array(items)) => items.get(*i)?,
                (PathSegment::Index(i), Value::Object(members)) => members.get(&i.to_string())?,
                _ => return None,
            };
        }
        (!at.is_null()).then_some(at)
    }
}

/// Parses `["name"]`, `['name']` or `[3]` starting at the `[` at `open`;
/// returns the segment and the index after the `]`.
fn parse_bracket(
    chars: &[char],
    open: usize,
) -> Result<(PathSegment, usize), (usize, &'static str)> {
    let mut i = open + 1;
    match chars.get(i) {
        Some(&quote) if quote == '"' || quote == '\'' => {
            let mut name = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err((i, "unterminated quoted name")),
                    Some('\\') => {
                        let escaped = chars
                            .get(i + 1)
                            .ok_or((i + 1, "unterminated quoted name"))?;
                        name.push(*escaped);
                        i += 2;
                    }
                    Some(&c) if c == quote => break,
                    Some(&c) => {
                        name.push(c);
                        i += 1;
                    }
                }
            }
            i += 1;
            if chars.get(i) != Some(&']') {
                return Err((i, "expected \"]\""));
            }
            Ok((PathSegment::Key(name), i + 1))
        }
        Some(c) if c.is_ascii_digit() => {
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            if chars.get(i) != Some(&']') {
                return Err((i, "expected \"]\""));
            }
            let digits: String = chars[start..i].iter().collect();
            let index = digits
                .parse::<usize>()
                .map_err(|_| (start, "index too large"))?;
            Ok((PathSegment::Index(index), i + 1))
        }
        _ => Err((i, "expected a quoted name or an index")),
    }
}

/// A string with `{{path}}` placeholders; paths are relative to the message
/// root (`{{traits.first}}`, `{{$.traits.first}}` also works).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Path(JsonPath),
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("template {src:?}: \"{{{{\" without a closing \"}}}}\""))?;
            let inner = after[..close].trim();
            if inner.is_empty() {
                return Err(format!("template {src:?}: empty \"{{{{}}}}\""));
            }
            let path = if inner.starts_with('$') {
                inner.to_string()
            } else if inner.starts_with('[') {
                format!("${inner}")
            } else {
                format!("$.{inner}")
            };
            let path = JsonPath::parse(&path).map_err(|e| format!("template {src:?}: {e}"))?;
            parts.push(TemplatePart::Path(path));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_string()));
        }
        Ok(Template {
            source: src.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Missing parts render as empty text; `None` when every part is missing.
    fn render(&self, msg: &Value) -> Option<String> {
        let mut out = String::new();
        let mut found_any = false;
        for part in &self.parts {
            match part {
                TemplatePart::Text(text) => out.push_str(text),
                TemplatePart::Path(path) => match path.get(msg) {
                    Some(Value::String(s)) => {
                        found_any = true;
                        out.push_str(s);
                    }
                    Some(other) => {
                        found_any = true;
                        out.push_str(&other.to_string());
                    }
                    None => {}
                },
            }
        }
        found_any.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(v: Value) -> FieldValue {
        match FieldValue::parse(&v) {
            Ok(f) => f,
            Err(e) => panic!("{v} did not parse: {e}"),
        }
    }

    fn message() -> Value {
        json!({
            "type": "identify",
            "userId": "u1",
            "traits": {
                "first": "Ann",
                "last": "Lee",
                "Plan Name": "pro",
                "seats": 5,
                "gone": null,
                "tags": ["a", "b"]
            },
            "context": {"groupId": "g1"}
        })
    }

    #[test]
    fn paths_resolve_against_the_message() {
        let msg = message();
        assert_eq!(field(json!("$.userId")).resolve(&msg), Some(json!("u1")));
        assert_eq!(
            field(json!("$.context.groupId")).resolve(&msg),
            Some(json!("g1"))
        );
        assert_eq!(
            field(json!("$.traits[\"Plan Name\"]")).resolve(&msg),
            Some(json!("pro"))
        );
        assert_eq!(
            field(json!("$['traits']['seats']")).resolve(&msg),
            Some(json!(5))
        );
        assert_eq!(
            field(json!("$.traits.tags[1]")).resolve(&msg),
            Some(json!("b"))
        );
        assert_eq!(
            field(json!("$.traits.tags.0")).resolve(&msg),
            Some(json!("a"))
        );
        assert_eq!(field(json!("$")).resolve(&msg), Some(msg.clone()));
    }

    #[test]
    fn missing_and_null_resolve_to_nothing() {
        let msg = message();
        for path in [
            "$.nope",
            "$.traits.gone",
            "$.userId.deeper",
            "$.traits.tags[9]",
            "$.groupId",
        ] {
            assert_eq!(field(json!(path)).resolve(&msg), None, "{path}");
        }
    }

    #[test]
    fn bad_paths_are_refused_with_a_position() {
        let cases = [
            ("$.a..b", "position 4"),
            ("$.a[", "position 4"),
            ("$.a[\"b]", "unterminated"),
            ("$.a[x]", "position 4"),
            ("$.a[0", "position 5"),
        ];
        for (path, want) in cases {
            let err = FieldValue::parse(&json!(path)).err().unwrap_or_default();
            assert!(
                err.starts_with("invalid JSON path") && err.contains(want),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn literals_are_used_as_they_are() {
        let msg = message();
        assert_eq!(
            field(json!("plain text")).resolve(&msg),
            Some(json!("plain text"))
        );
        assert_eq!(field(json!("$5 off")).resolve(&msg), Some(json!("$5 off")));
        assert_eq!(field(json!(42)).resolve(&msg), Some(json!(42)));
        assert_eq!(field(json!(false)).resolve(&msg), Some(json!(false)));
        assert!(FieldValue::parse(&Value::Null).is_err());
    }

    #[test]
    fn templates_fill_in_paths() {
        let msg = message();
        let name = field(json!("{{traits.first}} {{ traits.last }}"));
        assert_eq!(name.resolve(&msg), Some(json!("Ann Lee")));
        let partial = field(json!("{{traits.first}} {{traits.middle}}!"));
        assert_eq!(partial.resolve(&msg), Some(json!("Ann !")));
        let mixed = field(json!(
            "{{$.traits.seats}} seats, plan {{traits[\"Plan Name\"]}}"
        ));
        assert_eq!(mixed.resolve(&msg), Some(json!("5 seats, plan pro")));
        let none = field(json!("{{traits.middle}} {{traits.gone}}"));
        assert_eq!(none.resolve(&msg), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for src in ["{{traits.first", "hi {{}}", "{{traits..x}}"] {
            assert!(FieldValue::parse(&json!(src)).is_err(), "{src}");
        }
    }

    #[test]
    fn objects_leave_out_members_that_resolve_to_nothing() {
        let msg = message();
        let keys =
            field(json!({"userId": "$.userId", "email": "$.traits.email", "source": "segment"}));
        assert_eq!(
            keys.resolve(&msg),
            Some(json!({"userId": "u1", "source": "segment"}))
        );
        let empty = field(json!({"email": "$.traits.email"}));
        assert_eq!(empty.resolve(&msg), None);
    }

    #[test]
    fn lists_take_the_first_that_exists() {
        let msg = message();
        let group = field(json!([
            "$.groupId",
            "$.traits.gone",
            "$.context.groupId",
            "fallback"
        ]));
        assert_eq!(group.resolve(&msg), Some(json!("g1")));
        let fallback = field(json!(["$.groupId", "fallback"]));
        assert_eq!(fallback.resolve(&msg), Some(json!("fallback")));
        let nothing = field(json!(["$.groupId", {"x": "$.nope"}]));
        assert_eq!(nothing.resolve(&msg), None);
        assert!(FieldValue::parse(&json!([])).is_err());
    }

    #[test]
    fn nested_errors_say_where() {
        let err = FieldValue::parse(&json!({"ids": ["$.ok", "$.a..b"]}))
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("in member \"ids\": in list item 1: invalid JSON path"),
            "{err}"
        );
    }

    #[test]
    fn display_shows_the_config_form() {
        let v = field(json!({"a": ["$.x", "{{y}}", 3]}));
        assert_eq!(v.to_string(), r#"{"a": ["$.x", "{{y}}", 3]}"#);
    }

    #[test]
    fn key_maps_hold_non_empty_strings() {
        let v = json!({
            "userId": "u1",
            "accountId": 42,
            "ratio": 1.5,
            "active": true,
            "empty": "",
            "none": null,
            "nested": {"x": 1},
            "list": [1]
        });
        let keys = to_key_map(Some(v));
        let want: BTreeMap<String, String> = [
            ("accountId", "42"),
            ("active", "true"),
            ("ratio", "1.5"),
            ("userId", "u1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(keys, want);
        assert!(to_key_map(None).is_empty());
        assert!(to_key_map(Some(json!("u1"))).is_empty());
    }
}
