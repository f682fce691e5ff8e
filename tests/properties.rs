//! Property tests (proptest) for three pure-ish cores of the daemon:
//!
//! - triggers (SPEC 4): random trees of comparisons, `contains`, `match`,
//!   `and`, `or` and parentheses over random messages, rendered to trigger
//!   text, parsed, and matched; `matches` must agree with a small reference
//!   evaluator written here from the documented rules, obey the boolean laws,
//!   and `parse` must never panic;
//! - event-name normalisation (SPEC 4): any string gives `None` or a name of
//!   `[a-z0-9_-]+`, never empty, and normalising it again changes nothing;
//! - the audience diff (SPEC 5) on a real SQLite store: after any sequence
//!   of membership changes, snapshot imports and syncs (with and without
//!   `--full`), applying the deliveries each sync enqueued to a model of
//!   what Schematic has gives exactly the desired membership, and a sync
//!   right after a sync enqueues nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Number, Value};

use schematic_sync::mapping::name::normalize_event_name;
use schematic_sync::mapping::trigger::Trigger;

// ===========================================================================
// Triggers
// ===========================================================================

/// The fields the generated triggers and messages use. `properties` may be
/// replaced by a non-object in a message, which makes every path through it
/// missing.
const PATHS: &[&[&str]] = &[
    &["type"],
    &["event"],
    &["userId"],
    &["properties", "plan"],
    &["properties", "count"],
    &["properties", "Plan Name"],
    &["properties", "tags"],
    &["properties", "nested", "x"],
    &["traits", "email"],
    &["context", "library", "name"],
    &["missing"],
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

/// A trigger as a tree, rendered to text by `render`.
#[derive(Debug, Clone)]
enum Tree {
    Compare {
        path: usize,
        op: Op,
        lit: Lit,
    },
    Contains {
        path: usize,
        needle: String,
    },
    Match {
        path: usize,
        pattern: String,
    },
    And(Vec<Tree>),
    Or(Vec<Tree>),
    /// Redundant parentheses around a subtree.
    Paren(Box<Tree>),
}

/// Short strings over a small alphabet, so equal values, substrings and glob
/// hits are common; includes characters that need escaping in trigger text.
fn small_string() -> impl Strategy<Value = String> {
    "[ab\"\\\\ é/\n*]{0,4}"
}

fn number() -> impl Strategy<Value = f64> {
    (-40i32..40).prop_map(|n| f64::from(n) / 4.0)
}

fn literal() -> impl Strategy<Value = Lit> {
    prop_oneof![
        3 => small_string().prop_map(Lit::Str),
        3 => number().prop_map(Lit::Num),
        1 => any::<bool>().prop_map(Lit::Bool),
        1 => Just(Lit::Null),
    ]
}

fn compare() -> impl Strategy<Value = Tree> {
    let eq = (
        0..PATHS.len(),
        prop_oneof![Just(Op::Eq), Just(Op::Ne)],
        literal(),
    )
        .prop_map(|(path, op, lit)| Tree::Compare { path, op, lit });
    // Ordering against true/false/null is a parse error, so only strings and
    // numbers are ordered.
    let ord = (
        0..PATHS.len(),
        prop_oneof![Just(Op::Lt), Just(Op::Le), Just(Op::Gt), Just(Op::Ge)],
        prop_oneof![
            small_string().prop_map(Lit::Str),
            number().prop_map(Lit::Num)
        ],
    )
        .prop_map(|(path, op, lit)| Tree::Compare { path, op, lit });
    prop_oneof![eq, ord]
}

fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        4 => compare(),
        1 => (0..PATHS.len(), small_string()).prop_map(|(path, needle)| Tree::Contains { path, needle }),
        1 => (0..PATHS.len(), "[ab*é]{0,5}").prop_map(|(path, pattern)| Tree::Match { path, pattern }),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Tree::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Tree::Or),
            inner.prop_map(|t| Tree::Paren(Box::new(t))),
        ]
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(|n| {
            if n.fract() == 0.0 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }),
        small_string().prop_map(Value::String),
        small_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec(small_string().prop_map(Value::String), 0..3)
                .prop_map(Value::Array),
            prop::collection::btree_map("[ax]", inner, 0..2)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A message with each known path absent or set to a random value; now and
/// then `properties` is not an object at all.
fn message() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(prop::option::weighted(0.7, json_value()), PATHS.len()),
        prop::option::weighted(0.1, json_value()),
    )
        .prop_map(|(values, properties_override)| {
            let mut root = Map::new();
            for (path, value) in PATHS.iter().zip(values) {
                if let Some(value) = value {
                    insert(&mut root, path, value);
                }
            }
            if let Some(v) = properties_override {
                root.insert("properties".into(), v);
            }
            Value::Object(root)
        })
}

fn insert(root: &mut Map<String, Value>, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = root;
    for key in parents {
        let slot = at
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(members) = slot else { return };
        at = members;
    }
    at.insert(last.to_string(), value);
}

// -- rendering --------------------------------------------------------------

/// How a tree is written: keyword case and spacing vary, meaning must not.
#[derive(Debug, Clone, Copy)]
struct Style {
    upper_keywords: bool,
    tight_operators: bool,
    newlines: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(a, b, c)| Style {
        upper_keywords: a,
        tight_operators: b,
        newlines: c,
    })
}

impl Style {
    fn keyword(&self, word: &str) -> String {
        let word = if self.upper_keywords {
            word.to_uppercase()
        } else {
            word.to_string()
        };
        if self.newlines {
            format!("\n\t{word}\n\t")
        } else {
            format!(" {word} ")
        }
    }

    fn op(&self, symbol: &str) -> String {
        if self.tight_operators {
            symbol.to_string()
        } else {
            format!(" {symbol} ")
        }
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '/' => out.push_str("\\/"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_field(path: usize) -> String {
    PATHS[path]
        .iter()
        .enumerate()
        .map(|(i, segment)| {
            let bare = segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if i == 0 || bare {
                segment.to_string()
            } else {
                quote(segment)
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn render_literal(lit: &Lit, style: Style) -> String {
    let word = |w: &str| {
        if style.upper_keywords {
            w.to_uppercase()
        } else {
            w.to_string()
        }
    };
    match lit {
        Lit::Str(s) => quote(s),
        Lit::Num(n) => format!("{n}"),
        Lit::Bool(b) => word(if *b { "true" } else { "false" }),
        Lit::Null => word("null"),
    }
}

/// Renders with the fewest parentheses precedence allows (`and` binds
/// tighter than `or`), plus those of `Paren` nodes.
fn render(tree: &Tree, style: Style) -> String {
    match tree {
        Tree::Compare { path, op, lit } => format!(
            "{}{}{}",
            render_field(*path),
            style.op(op.symbol()),
            render_literal(lit, style)
        ),
        Tree::Contains { path, needle } => {
            format!("contains({}, {})", render_field(*path), quote(needle))
        }
        Tree::Match { path, pattern } => {
            format!("match({},{})", render_field(*path), quote(pattern))
        }
        Tree::And(items) => items
            .iter()
            .map(|item| match item {
                Tree::Or(_) => format!("({})", render(item, style)),
                _ => render(item, style),
            })
            .collect::<Vec<_>>()
            .join(&style.keyword("and")),
        Tree::Or(items) => items
            .iter()
            .map(|item| render(item, style))
            .collect::<Vec<_>>()
            .join(&style.keyword("or")),
        Tree::Paren(inner) => format!("({})", render(inner, style)),
    }
}

// -- reference evaluator ----------------------------------------------------

fn lookup<'v>(message: &'v Value, path: &[&str]) -> Option<&'v Value> {
    let mut at = message;
    for key in path {
        match at {
            Value::Object(members) => at = members.get(*key)?,
            _ => return None,
        }
    }
    Some(at)
}

/// `*` matches any run of characters, by plain backtracking over chars.
fn glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|skip| glob(rest, &text[skip..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

fn reference(tree: &Tree, message: &Value) -> bool {
    match tree {
        Tree::And(items) => items.iter().all(|t| reference(t, message)),
        Tree::Or(items) => items.iter().any(|t| reference(t, message)),
        Tree::Paren(inner) => reference(inner, message),
        Tree::Contains { path, needle } => match lookup(message, PATHS[*path]) {
            Some(Value::String(s)) => s.contains(needle.as_str()),
            Some(Value::Array(items)) => items.iter().any(|i| i == &Value::String(needle.clone())),
            _ => false,
        },
        Tree::Match { path, pattern } => match lookup(message, PATHS[*path]) {
            Some(Value::String(s)) => {
                let p: Vec<char> = pattern.chars().collect();
                let t: Vec<char> = s.chars().collect();
                glob(&p, &t)
            }
            _ => false,
        },
        Tree::Compare { path, op, lit } => {
            let actual = lookup(message, PATHS[*path]);
            let equal = match (actual, lit) {
                (None | Some(Value::Null), Lit::Null) => true,
                (Some(Value::String(a)), Lit::Str(b)) => a == b,
                (Some(Value::Number(a)), Lit::Num(b)) => a.as_f64() == Some(*b),
                (Some(Value::Bool(a)), Lit::Bool(b)) => a == b,
                _ => false,
            };
            let ordering = match (actual, lit) {
                (Some(Value::Number(a)), Lit::Num(b)) => a.as_f64().and_then(|a| a.partial_cmp(b)),
                (Some(Value::String(a)), Lit::Str(b)) => Some(a.as_str().cmp(b.as_str())),
                _ => None,
            };
            match op {
                Op::Eq => equal,
                Op::Ne => !equal,
                Op::Lt => ordering.is_some_and(|o| o.is_lt()),
                Op::Le => ordering.is_some_and(|o| o.is_le()),
                Op::Gt => ordering.is_some_and(|o| o.is_gt()),
                Op::Ge => ordering.is_some_and(|o| o.is_ge()),
            }
        }
    }
}

fn parse(text: &str) -> Result<Trigger, TestCaseError> {
    Trigger::parse(text).map_err(|e| TestCaseError::fail(format!("{text:?} did not parse: {e}")))
}

fn eval(text: &str, message: &Value) -> Result<bool, TestCaseError> {
    Ok(parse(text)?.matches(message))
}

/// Checks the error position of a trigger that did not parse.
fn check_parse_total(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = Trigger::parse(text) {
        let columns = text.chars().count() + 1;
        prop_assert!(
            (1..=columns).contains(&e.position),
            "{text:?}: position {} outside 1..={columns}",
            e.position
        );
        prop_assert!(!e.message.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Rendering a tree and parsing it gives a trigger that matches exactly
    /// when the reference evaluator says the tree holds.
    #[test]
    fn trigger_matches_reference_evaluator(t in tree(), msg in message(), s in style()) {
        let text = render(&t, s);
        let trigger = parse(&text)?;
        prop_assert_eq!(trigger.matches(&msg), reference(&t, &msg), "trigger {:?} on {}", text, msg);
        prop_assert_eq!(trigger.source(), text.as_str());
    }

    /// `and` and `or` behave as boolean algebra.
    #[test]
    fn trigger_and_or_laws(a in tree(), b in tree(), c in tree(), msg in message(), s in style()) {
        let (a, b, c) = (render(&a, s), render(&b, s), render(&c, s));
        let va = eval(&a, &msg)?;
        let vb = eval(&b, &msg)?;
        let vc = eval(&c, &msg)?;
        let m = |text: String| eval(&text, &msg);
        // commutativity
        prop_assert_eq!(m(format!("({a}) and ({b})"))?, m(format!("({b}) and ({a})"))?);
        prop_assert_eq!(m(format!("({a}) or ({b})"))?, m(format!("({b}) or ({a})"))?);
        // the truth tables
        prop_assert_eq!(m(format!("({a}) and ({b})"))?, va && vb);
        prop_assert_eq!(m(format!("({a}) or ({b})"))?, va || vb);
        // idempotence
        prop_assert_eq!(m(format!("({a}) and ({a})"))?, va);
        prop_assert_eq!(m(format!("({a}) or ({a})"))?, va);
        // associativity, with and without the parentheses
        prop_assert_eq!(m(format!("({a}) and (({b}) and ({c}))"))?, m(format!("(({a}) and ({b})) and ({c})"))?);
        prop_assert_eq!(m(format!("({a}) and ({b}) and ({c})"))?, va && vb && vc);
        prop_assert_eq!(m(format!("({a}) or (({b}) or ({c}))"))?, m(format!("(({a}) or ({b})) or ({c})"))?);
        prop_assert_eq!(m(format!("({a}) or ({b}) or ({c})"))?, va || vb || vc);
        // distributivity and absorption
        prop_assert_eq!(
            m(format!("({a}) and (({b}) or ({c}))"))?,
            m(format!("(({a}) and ({b})) or (({a}) and ({c}))"))?
        );
        prop_assert_eq!(
            m(format!("({a}) or (({b}) and ({c}))"))?,
            m(format!("(({a}) or ({b})) and (({a}) or ({c}))"))?
        );
        prop_assert_eq!(m(format!("({a}) or (({a}) and ({b}))"))?, va);
        prop_assert_eq!(m(format!("({a}) and (({a}) or ({b}))"))?, va);
        // `and` binds tighter than `or`, on both sides
        prop_assert_eq!(m(format!("({a}) or ({b}) and ({c})"))?, va || (vb && vc));
        prop_assert_eq!(m(format!("({a}) and ({b}) or ({c})"))?, (va && vb) || vc);
    }

    /// `f != v` is exactly `not (f = v)`, for missing fields, nulls and
    /// mismatched types too.
    #[test]
    fn trigger_not_equal_is_negated_equal(path in 0..PATHS.len(), lit in literal(), msg in message()) {
        let field = render_field(path);
        let value = render_literal(&lit, Style { upper_keywords: false, tight_operators: false, newlines: false });
        let eq = eval(&format!("{field} = {value}"), &msg)?;
        let ne = eval(&format!("{field} != {value}"), &msg)?;
        prop_assert_eq!(ne, !eq);
    }

    /// Parsing never panics, and a refusal points inside the text.
    #[test]
    fn trigger_parse_is_total_on_any_string(text in any::<String>()) {
        check_parse_total(&text)?;
    }

    #[test]
    fn trigger_parse_is_total_on_trigger_like_text(
        text in "([a-z.\"() =!<>,*\\\\-]|and|or|null|true|contains\\(|match\\(|properties|é|[0-9]){0,24}",
        msg in message(),
    ) {
        check_parse_total(&text)?;
        if let Ok(trigger) = Trigger::parse(&text) {
            let _ = trigger.matches(&msg);
        }
    }
}

// ===========================================================================
// Event-name normalisation
// ===========================================================================

fn is_schematic_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_name(raw: &str) -> Result<(), TestCaseError> {
    if let Some(name) = normalize_event_name(raw) {
        prop_assert!(
            is_schematic_name(&name),
            "{:?} gave {:?}, not ^[a-z0-9_-]+$",
            raw,
            name
        );
        let again = normalize_event_name(&name);
        prop_assert_eq!(
            again.as_deref(),
            Some(name.as_str()),
            "not idempotent for {:?}",
            raw
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn event_names_are_schematic_names_or_refused(raw in any::<String>()) {
        check_name(&raw)?;
    }

    /// Names shaped like real ones: words, case changes, digits, separators,
    /// punctuation and a few non-ASCII letters.
    #[test]
    fn event_names_like_real_ones_are_schematic_names_or_refused(
        raw in "([A-Z]?[a-z]{0,6}|[A-Z]{1,4}|[0-9]{1,3}|[ _.#!-]|é|ß|K|İ|💰){0,8}"
    ) {
        check_name(&raw)?;
    }
}

// ===========================================================================
// Audience diff
// ===========================================================================

const AUDIENCES: [&str; 2] = ["Power Users", "trial-ended"];
/// A small pool, so the same users come back across operations; ordering
/// matters for the keyset walk of `--full`, hence the odd ones.
const USERS: [&str; 7] = ["u1", "u2", "u10", "U3", "user 4", "é5", "6"];

#[derive(Debug, Clone)]
enum AudienceOp {
    /// An Engage membership message.
    Set {
        audience: usize,
        user: usize,
        member: bool,
    },
    /// `audiences import KEY FILE` with these users.
    Snapshot {
        audience: usize,
        users: BTreeSet<usize>,
    },
    /// `audiences sync KEY [--full]`.
    Sync { audience: usize, full: bool },
}

fn audience_op() -> impl Strategy<Value = AudienceOp> {
    prop_oneof![
        5 => (0..AUDIENCES.len(), 0..USERS.len(), any::<bool>())
            .prop_map(|(audience, user, member)| AudienceOp::Set { audience, user, member }),
        1 => (0..AUDIENCES.len(), prop::collection::btree_set(0..USERS.len(), 0..USERS.len()))
            .prop_map(|(audience, users)| AudienceOp::Snapshot { audience, users }),
        3 => (0..AUDIENCES.len(), any::<bool>())
            .prop_map(|(audience, full)| AudienceOp::Sync { audience, full }),
    ]
}

/// The values one sync run enqueued: user → trait value, read back from the
/// stored payloads.
fn enqueued_by_run(
    conn: &rusqlite::Connection,
    run: i64,
    audience: &str,
    trait_name: &str,
) -> Result<BTreeMap<String, bool>, TestCaseError> {
    let fail = |e: rusqlite::Error| TestCaseError::fail(e.to_string());
    let mut stmt = conn
        .prepare(
            "SELECT user_id, audience_key, kind, payload FROM deliveries WHERE sync_run_id = ?1 ORDER BY id",
        )
        .map_err(fail)?;
    let rows: Vec<(String, String, String, String)> = stmt
        .query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(fail)?
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let mut out = BTreeMap::new();
    for (user, audience_key, kind, payload) in rows {
        prop_assert_eq!(audience_key.as_str(), audience);
        prop_assert_eq!(kind.as_str(), "identify");
        let payload: Value = serde_json::from_str(&payload)
            .map_err(|e| TestCaseError::fail(format!("payload is not JSON: {e}")))?;
        prop_assert_eq!(
            payload.pointer("/body/keys/userId").and_then(Value::as_str),
            Some(user.as_str())
        );
        let value = payload
            .pointer("/body/traits")
            .and_then(|t| t.get(trait_name))
            .and_then(Value::as_bool);
        let Some(value) = value else {
            return Err(TestCaseError::fail(format!(
                "payload has no boolean at $.body.traits.{trait_name}: {payload}"
            )));
        };
        prop_assert!(
            out.insert(user.clone(), value).is_none(),
            "run {} enqueued {:?} twice",
            run,
            user
        );
    }
    Ok(out)
}

/// The values of the pending deliveries of an audience, per user, oldest
/// first.
fn pending_by_user(
    conn: &rusqlite::Connection,
    audience: &str,
    trait_name: &str,
) -> Result<BTreeMap<String, Vec<bool>>, TestCaseError> {
    let fail = |e: rusqlite::Error| TestCaseError::fail(e.to_string());
    let mut stmt = conn
        .prepare(
            "SELECT user_id, payload FROM deliveries
             WHERE audience_key = ?1 AND state = 'pending' ORDER BY id",
        )
        .map_err(fail)?;
    let rows: Vec<(String, String)> = stmt
        .query_map([audience], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(fail)?
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let mut out: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (user, payload) in rows {
        let payload: Value = serde_json::from_str(&payload)
            .map_err(|e| TestCaseError::fail(format!("payload is not JSON: {e}")))?;
        let value = payload
            .pointer("/body/traits")
            .and_then(|t| t.get(trait_name))
            .and_then(Value::as_bool)
            .ok_or_else(|| TestCaseError::fail(format!("no boolean trait in {payload}")))?;
        out.entry(user).or_default().push(value);
    }
    Ok(out)
}

fn run_audience_ops(ops: &[AudienceOp]) -> Result<(), TestCaseError> {
    use schematic_sync::audience::sync;
    use schematic_sync::config::Synchronous;
    use schematic_sync::segment::Membership;
    use schematic_sync::store::audiences as store;
    use schematic_sync::store::Store;

    let any_err = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| any_err(&e))?;
    let mut conn = Store {
        path: dir.path().join("properties.db"),
        synchronous: Synchronous::Normal,
    }
    .open_and_migrate()
    .map_err(|e| any_err(&e))?;

    // The desired membership (audience → members) and what Schematic has
    // (audience → user → last value sent), kept by the test.
    let mut desired: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); AUDIENCES.len()];
    let mut known: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); AUDIENCES.len()];
    let mut exists = [false; AUDIENCES.len()];
    let mut schematic: Vec<BTreeMap<String, bool>> = vec![BTreeMap::new(); AUDIENCES.len()];
    let mut ever_sent_true: Vec<BTreeSet<String>> = vec![BTreeSet::new(); AUDIENCES.len()];

    for op in ops {
        match op {
            AudienceOp::Set {
                audience,
                user,
                member,
            } => {
                let change = Membership {
                    audience_key: AUDIENCES[*audience].to_string(),
                    user_id: USERS[*user].to_string(),
                    member: *member,
                };
                store::record_membership(&conn, &change, Utc::now()).map_err(|e| any_err(&e))?;
                known[*audience].insert(USERS[*user]);
                exists[*audience] = true;
                if *member {
                    desired[*audience].insert(USERS[*user]);
                } else {
                    desired[*audience].remove(USERS[*user]);
                }
            }
            AudienceOp::Snapshot { audience, users } => {
                let ids: Vec<String> = users.iter().map(|u| USERS[*u].to_string()).collect();
                store::begin_snapshot(&conn).map_err(|e| any_err(&e))?;
                store::add_to_snapshot(&conn, &ids).map_err(|e| any_err(&e))?;
                store::apply_snapshot(&conn, AUDIENCES[*audience], Utc::now())
                    .map_err(|e| any_err(&e))?;
                desired[*audience] = users.iter().map(|u| USERS[*u]).collect();
                known[*audience].extend(users.iter().map(|u| USERS[*u]));
                exists[*audience] = true;
            }
            AudienceOp::Sync { audience, full } => {
                let a = *audience;
                let key = AUDIENCES[a];
                if !exists[a] {
                    // Never seen: the sync refuses an unknown audience.
                    prop_assert!(sync(&mut conn, key, "userId", *full).is_err());
                    continue;
                }
                let trait_name = schematic_sync::mapping::name::trait_name(key)
                    .ok_or_else(|| TestCaseError::fail("audience without a trait name"))?;
                let outcome = sync(&mut conn, key, "userId", *full).map_err(|e| any_err(&e))?;
                let run = outcome
                    .run_id
                    .ok_or_else(|| TestCaseError::fail("a sync without a run id"))?;
                let sent = enqueued_by_run(&conn, run, key, &trait_name)?;
                prop_assert_eq!(outcome.enqueued as usize, sent.len());
                prop_assert_eq!(
                    outcome.added as usize,
                    sent.values().filter(|v| **v).count()
                );
                prop_assert_eq!(
                    outcome.removed as usize,
                    sent.values().filter(|v| !**v).count()
                );
                for (user, value) in sent {
                    if value {
                        ever_sent_true[a].insert(user.clone());
                    } else {
                        prop_assert!(
                            ever_sent_true[a].contains(&user),
                            "{:?} was sent false without ever being sent true",
                            user
                        );
                    }
                    schematic[a].insert(user, value);
                }

                // What Schematic has is exactly the desired membership.
                let want: BTreeMap<String, bool> = known[a]
                    .iter()
                    .filter_map(|u| {
                        if desired[a].contains(u) {
                            Some((u.to_string(), true))
                        } else if ever_sent_true[a].contains(*u) {
                            Some((u.to_string(), false))
                        } else {
                            None
                        }
                    })
                    .collect();
                prop_assert_eq!(&schematic[a], &want, "after {:?}", op);

                // Newest wins: each pair has at most one pending delivery,
                // and it carries what Schematic should end up with.
                for (user, values) in pending_by_user(&conn, key, &trait_name)? {
                    prop_assert_eq!(
                        values.len(),
                        1,
                        "{:?} has {} pending deliveries",
                        user,
                        values.len()
                    );
                    prop_assert_eq!(schematic[a].get(&user), values.first());
                }

                // A sync right after a sync enqueues nothing.
                let again = sync(&mut conn, key, "userId", false).map_err(|e| any_err(&e))?;
                let again_run = again
                    .run_id
                    .ok_or_else(|| TestCaseError::fail("a sync without a run id"))?;
                prop_assert_eq!(
                    (again.added, again.removed, again.enqueued),
                    (0, 0, 0),
                    "a sync right after {:?} enqueued something",
                    op
                );
                prop_assert!(enqueued_by_run(&conn, again_run, key, &trait_name)?.is_empty());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn audience_sync_brings_schematic_to_the_desired_membership(
        ops in prop::collection::vec(audience_op(), 1..28)
    ) {
        run_audience_ops(&ops)?;
    }
}

/// A fixed sequence through the same checker, so the interesting paths
/// (removal, re-entry, snapshot, `--full`) run on every build whatever
/// proptest draws.
#[test]
fn audience_sync_fixed_sequence() {
    use AudienceOp::*;
    let ops = vec![
        Set {
            audience: 0,
            user: 0,
            member: true,
        },
        Set {
            audience: 0,
            user: 1,
            member: true,
        },
        Set {
            audience: 0,
            user: 2,
            member: false,
        },
        Sync {
            audience: 0,
            full: false,
        },
        Set {
            audience: 0,
            user: 0,
            member: false,
        },
        Sync {
            audience: 0,
            full: false,
        },
        Snapshot {
            audience: 0,
            users: [0, 3, 4].into_iter().collect(),
        },
        Sync {
            audience: 0,
            full: true,
        },
        Sync {
            audience: 1,
            full: false,
        },
        Snapshot {
            audience: 1,
            users: BTreeSet::new(),
        },
        Sync {
            audience: 1,
            full: true,
        },
        Set {
            audience: 0,
            user: 4,
            member: false,
        },
        Sync {
            audience: 0,
            full: false,
        },
    ];
    if let Err(e) = run_audience_ops(&ops) {
        panic!("{e}");
    }
}
