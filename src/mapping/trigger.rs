//! Mapping triggers: Segment's destination-subscription syntax
//! (`type = "track" and properties.plan != null`).
//!
//! A trigger is parsed once, when the config is loaded, so a typo is a config
//! error that names the column it happened at instead of a mapping that
//! silently never matches. Evaluation is then a pure function of the parsed
//! tree and one Segment message (`serde_json::Value`); there is no I/O here.
//!
//! Grammar (keywords `and`, `or`, `true`, `false`, `null` and the function
//! names are case-insensitive):
//!
//! ```text
//! trigger   := or
//! or        := and ( "or" and )*
//! and       := primary ( "and" primary )*
//! primary   := "(" or ")"
//!            | ( "contains" | "match" ) "(" field "," string ")"
//!            | field op literal
//! field     := ident ( "." ( ident | string ) )*      e.g. properties."Plan Name"
//! ident     := [A-Za-z_$][A-Za-z0-9_$]*
//! op        := "=" | "!=" | "<" | "<=" | ">" | ">="
//! literal   := string | number | "true" | "false" | "null"
//! ```
//!
//! Strings are double-quoted with the escapes `\"`, `\\`, `\/`, `\n`, `\t` and
//! `\r`. Numbers are decimal (`3`, `-2.5`, `1e3`). Parentheses nest at most
//! [`MAX_NESTING`] deep. There is no negation (`not`, `!`), no array indexing
//! and no `?` wildcard in `match`; the field is always on the left.
//!
//! Evaluation rules:
//! - A field path walks JSON objects key by key. A missing key, or anything
//!   that is not an object along the way, makes the field missing.
//! - `f = null` is true when the field is missing or JSON `null`; `f != null`
//!   is true when it is present and not `null`.
//! - `f = v` (for a non-null `v`) is true when the field holds the same JSON
//!   type with the same value; numbers compare as `f64`, so `3` equals `3.0`.
//!   There is no coercion: the string `"3"` does not equal the number `3`.
//! - `f != v` is exactly `not (f = v)`. So a missing field, or a field of
//!   another type, is `!=` every non-null literal. This is what Segment does:
//!   `properties.plan != "free"` also selects events that carry no plan.
//! - `<`, `<=`, `>`, `>=` compare numbers numerically and strings by Unicode
//!   code point; any other pairing (missing field, type mismatch) is false.
//!   Ordering against `true`, `false` or `null` is rejected at parse time.
//! - `contains(f, "s")` is a substring test when `f` is a string, and "some
//!   element equals `s`" when `f` is an array; anything else is false.
//! - `match(f, "pat")` is a case-sensitive glob on a string field where `*`
//!   matches any run of characters (including none), anywhere in the pattern;
//!   a pattern without `*` is plain equality.

use serde_json::Value;
use std::fmt;

/// How deep parentheses may nest before the trigger is rejected. Real triggers
/// use two or three levels; the cap keeps hostile input from exhausting the
/// stack of the recursive-descent parser.
pub const MAX_NESTING: usize = 64;

/// A trigger that did not parse: where, and what was wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerError {
    /// 1-based character column in the trigger text.
    pub position: usize,
    pub message: String,
}

impl fmt::Display for TriggerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at position {}: {}", self.position, self.message)
    }
}

impl std::error::Error for TriggerError {}

/// A parsed trigger, ready to be matched against Segment messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    source: String,
    expr: Expr,
}

impl Trigger {
    /// Parses a trigger, or reports the first place it goes wrong.
    pub fn parse(source: &str) -> Result<Trigger, TriggerError> {
        if source.trim().is_empty() {
            return Err(TriggerError {
                position: 1,
                message: "the trigger is empty".to_string(),
            });
        }
        let mut parser = Parser::new(source);
        let expr = parser.parse_or()?;
        let next = parser.next_token()?;
        if next.kind != TokenKind::End {
            let message = match next.kind {
                TokenKind::RParen => "unexpected \")\" with no matching \"(\"".to_string(),
                other => format!(
                    "unexpected {} after a complete condition; expected \"and\", \"or\" or the end",
                    other.describe()
                ),
            };
            return Err(TriggerError {
                position: next.position,
                message,
            });
        }
        Ok(Trigger {
            source: source.to_string(),
            expr,
        })
    }

    /// Whether the Segment message satisfies the trigger.
    pub fn matches(&self, message: &Value) -> bool {
        self.expr.eval(message)
    }

    /// The trigger text exactly as it was given to [`Trigger::parse`].
    pub fn source(&self) -> &str {
        &self.source
    }
}

// ---------------------------------------------------------------------------
// Syntax tree and evaluation
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare {
        field: Vec<String>,
        op: CompareOp,
        value: Literal,
    },
    Contains {
        field: Vec<String>,
        needle: String,
    },
    Match {
        field: Vec<String>,
        pattern: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CompareOp::Eq | CompareOp::Ne)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    String(String),
    Number(f64),
    Bool(bool),
    Null,
}

impl Expr {
    fn eval(&self, message: &Value) -> bool {
        match self {
            Expr::And(items) => items.iter().all(|item| item.eval(message)),
            Expr::Or(items) => items.iter().any(|item| item.eval(message)),
            Expr::Compare { field, op, value } => compare(lookup(message, field), *op, value),
            Expr::Contains { field, needle } => match lookup(message, field) {
                Some(Value::String(text)) => text.contains(needle.as_str()),
                Some(Value::Array(items)) => items.iter().any(|item| item.as_str() == Some(needle)),
                _ => false,
            },
            Expr::Match { field, pattern } => lookup(message, field)
                .and_then(Value::as_str)
                .is_some_and(|text| glob_matches(pattern, text)),
        }
    }
}

fn lookup<'v>(message: &'v Value, field: &[String]) -> Option<&'v Value> {
    field
        .iter()
        .try_fold(message, |value, key| value.as_object()?.get(key))
}

fn compare(actual: Option<&Value>, op: CompareOp, expected: &Literal) -> bool {
    let is_null = actual.is_none_or(Value::is_null);
    let equal = || actual.is_some_and(|value| json_equals(value, expected));
    match (op, expected) {
        (CompareOp::Eq, Literal::Null) => is_null,
        (CompareOp::Ne, Literal::Null) => !is_null,
        (CompareOp::Eq, _) => equal(),
        (CompareOp::Ne, _) => !equal(),
        (ordering, _) => actual
            .and_then(|value| order(value, expected))
            .is_some_and(|found| match ordering {
                CompareOp::Lt => found.is_lt(),
                CompareOp::Le => found.is_le(),
                CompareOp::Gt => found.is_gt(),
                CompareOp::Ge => found.is_ge(),
                CompareOp::Eq | CompareOp::Ne => false,
            }),
    }
}

fn json_equals(actual: &Value, expected: &Literal) -> bool {
    match (actual, expected) {
        (Value::String(a), Literal::String(b)) => a == b,
        (Value::Number(a), Literal::Number(b)) => a.as_f64() == Some(*b),
        (Value::Bool(a), Literal::Bool(b)) => a == b,
        (Value::Null, Literal::Null) => true,
        _ => false,
    }
}

fn order(actual: &Value, expected: &Literal) -> Option<std::cmp::Ordering> {
    match (actual, expected) {
        (Value::Number(a), Literal::Number(b)) => a.as_f64()?.partial_cmp(b),
        (Value::String(a), Literal::String(b)) => Some(a.as_str().cmp(b.as_str())),
        _ => None,
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    match parts.as_slice() {
        [] => text.is_empty(),
        [exact] => *exact == text,
        [first, middle @ .., last] => {
            let Some(mut rest) = text.strip_prefix(first) else {
                return false;
            };
            // Taking each middle piece at its leftmost occurrence leaves the
            // most room for the rest, so greedy search is exact for `*` globs.
            for piece in middle {
                match rest.find(piece) {
                    // `find` returns a char boundary with the piece after it.
                    Some(at) => rest = &rest[at + piece.len()..],
                    None => return false,
                }
            }
            rest.ends_with(last)
        }
    }
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Ident(String),
    Str(String),
    Number(f64),
    Op(CompareOp),
    Dot,
    Comma,
    LParen,
    RParen,
    End,
}

impl TokenKind {
    /// How the token is named in error messages.
    fn describe(&self) -> String {
        match self {
            TokenKind::Ident(name) => format!("\"{name}\""),
            TokenKind::Str(_) => "a string".to_string(),
            TokenKind::Number(n) => format!("the number {n}"),
            TokenKind::Op(op) => format!("\"{}\"", op.symbol()),
            TokenKind::Dot => "\".\"".to_string(),
            TokenKind::Comma => "\",\"".to_string(),
            TokenKind::LParen => "\"(\"".to_string(),
            TokenKind::RParen => "\")\"".to_string(),
            TokenKind::End => "the end of the trigger".to_string(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self, TokenKind::Ident(name) if name.eq_ignore_ascii_case(keyword))
    }

    fn is_reserved(&self) -> bool {
        ["and", "or", "true", "false", "null"]
            .iter()
            .any(|keyword| self.is_keyword(keyword))
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    kind: TokenKind,
    /// 1-based character column of the token's first character.
    position: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '<' | '>' | '&' | '|')
}

// ---------------------------------------------------------------------------
// Parser (recursive descent over a lazily lexed token stream, so the error
// reported is always the leftmost one)
// ---------------------------------------------------------------------------

struct Parser {
    chars: Vec<char>,
    /// 0-based index of the next unlexed character.
    cursor: usize,
    peeked: Option<Token>,
    depth: usize,
}

fn error<T>(position: usize, message: impl Into<String>) -> Result<T, TriggerError> {
    Err(TriggerError {
        position,
        message: message.into(),
    })
}

impl Parser {
    fn new(source: &str) -> Parser {
        Parser {
            chars: source.chars().collect(),
            cursor: 0,
            peeked: None,
            depth: 0,
        }
    }

    fn peek(&mut self) -> Result<&Token, TriggerError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        match &self.peeked {
            Some(token) => Ok(token),
            // Filled just above.
            None => error(self.cursor + 1, "internal error: no token"),
        }
    }

    fn next_token(&mut self) -> Result<Token, TriggerError> {
        match self.peeked.take() {
            Some(token) => Ok(token),
            None => self.lex(),
        }
    }

    fn at_keyword(&mut self, keyword: &str) -> Result<bool, TriggerError> {
        Ok(self.peek()?.kind.is_keyword(keyword))
    }

    fn parse_or(&mut self) -> Result<Expr, TriggerError> {
        let first = self.parse_and()?;
        if !self.at_keyword("or")? {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.at_keyword("or")? {
            self.next_token()?;
            items.push(self.parse_and()?);
        }
        Ok(Expr::Or(items))
    }

    fn parse_and(&mut self) -> Result<Expr, TriggerError> {
        let first = self.parse_primary()?;
        if !self.at_keyword("and")? {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.at_keyword("and")? {
            self.next_token()?;
            items.push(self.parse_primary()?);
        }
        Ok(Expr::And(items))
    }

    fn parse_primary(&mut self) -> Result<Expr, TriggerError> {
        let token = self.next_token()?;
        match token.kind {
            TokenKind::LParen => self.parse_group(token.position),
            TokenKind::Ident(ref name) if !token.kind.is_reserved() => {
                if self.peek()?.kind == TokenKind::LParen {
                    self.parse_function(name, token.position)
                } else {
                    self.parse_comparison(name.clone())
                }
            }
            TokenKind::Str(_) | TokenKind::Number(_) => error(
                token.position,
                format!(
                    "expected a field name, found {}; the field goes on the left, as in event = \"Signed Up\"",
                    token.kind.describe()
                ),
            ),
            TokenKind::Op(op) => error(
                token.position,
                format!("expected a field name before \"{}\"", op.symbol()),
            ),
            other => error(
                token.position,
                format!("expected a condition, found {}", other.describe()),
            ),
        }
    }

    fn parse_group(&mut self, open_position: usize) -> Result<Expr, TriggerError> {
        if self.depth >= MAX_NESTING {
            return error(
                open_position,
                format!("parentheses are nested more than {MAX_NESTING} deep"),
            );
        }
        self.depth += 1;
        let inner = self.parse_or()?;
        self.depth -= 1;
        let close = self.next_token()?;
        if close.kind != TokenKind::RParen {
            return error(
                close.position,
                format!(
                    "expected \")\" to close the \"(\" at position {open_position}, found {}",
                    close.kind.describe()
                ),
            );
        }
        Ok(inner)
    }

    fn parse_function(&mut self, name: &str, position: usize) -> Result<Expr, TriggerError> {
        let function = name.to_ascii_lowercase();
        if function != "contains" && function != "match" {
            return error(
                position,
                format!("unknown function \"{name}\"; the functions are contains and match"),
            );
        }
        self.next_token()?; // the "(" that made this a call
        let first = self.next_token()?;
        let field = match first.kind {
            TokenKind::Ident(ref segment) if !first.kind.is_reserved() => {
                self.parse_field_rest(segment.clone())?
            }
            other => {
                return error(
                    first.position,
                    format!(
                        "expected a field name as the first argument of {function}(), found {}",
                        other.describe()
                    ),
                )
            }
        };
        let comma = self.next_token()?;
        if comma.kind != TokenKind::Comma {
            return error(
                comma.position,
                format!(
                    "expected \",\" after the field in {function}(), found {}",
                    comma.kind.describe()
                ),
            );
        }
        let argument = self.next_token()?;
        let TokenKind::Str(text) = argument.kind else {
            return error(
                argument.position,
                format!(
                    "expected a string as the second argument of {function}(), found {}",
                    argument.kind.describe()
                ),
            );
        };
        let close = self.next_token()?;
        if close.kind != TokenKind::RParen {
            return error(
                close.position,
                format!(
                    "expected \")\" to close {function}( at position {position}, found {}",
                    close.kind.describe()
                ),
            );
        }
        Ok(if function == "contains" {
            Expr::Contains {
                field,
                needle: text,
            }
        } else {
            Expr::Match {
                field,
                pattern: text,
            }
        })
    }

    /// Continues a field path after its first segment: `.ident` or `."quoted"`.
    fn parse_field_rest(&mut self, first: String) -> Result<Vec<String>, TriggerError> {
        let mut field = vec![first];
        while self.peek()?.kind == TokenKind::Dot {
            self.next_token()?;
            let segment = self.next_token()?;
            match segment.kind {
                TokenKind::Ident(name) | TokenKind::Str(name) => field.push(name),
                other => {
                    return error(
                        segment.position,
                        format!(
                            "expected a field name after \".\", found {}",
                            other.describe()
                        ),
                    )
                }
            }
        }
        Ok(field)
    }

    fn parse_comparison(&mut self, first: String) -> Result<Expr, TriggerError> {
        let field = self.parse_field_rest(first)?;
        let op_token = self.next_token()?;
        let TokenKind::Op(op) = op_token.kind else {
            return error(
                op_token.position,
                format!(
                    "expected an operator (=, !=, <, <=, >, >=) after {}, found {}",
                    field.join("."),
                    op_token.kind.describe()
                ),
            );
        };
        let value_token = self.next_token()?;
        let value = match value_token.kind {
            TokenKind::Str(text) => Literal::String(text),
            TokenKind::Number(n) => Literal::Number(n),
            ref kind if kind.is_keyword("true") => Literal::Bool(true),
            ref kind if kind.is_keyword("false") => Literal::Bool(false),
            ref kind if kind.is_keyword("null") => Literal::Null,
            TokenKind::Ident(word) => {
                return error(
                    value_token.position,
                    format!(
                        "expected a value after \"{}\", found {word}; strings need double quotes, as in \"{word}\"",
                        op.symbol()
                    ),
                )
            }
            TokenKind::End => {
                return error(
                    value_token.position,
                    format!("expected a value after \"{}\"", op.symbol()),
                )
            }
            other => {
                return error(
                    value_token.position,
                    format!(
                        "expected a value after \"{}\", found {}",
                        op.symbol(),
                        other.describe()
                    ),
                )
            }
        };
        if op.is_ordering() {
            let word = match value {
                Literal::Bool(true) => "true",
                Literal::Bool(false) => "false",
                Literal::Null => "null",
                Literal::String(_) | Literal::Number(_) => "",
            };
            if !word.is_empty() {
                return error(
                    value_token.position,
                    format!(
                        "\"{}\" compares numbers or strings, not {word}",
                        op.symbol()
                    ),
                );
            }
        }
        Ok(Expr::Compare { field, op, value })
    }

    // -- lexer --------------------------------------------------------------

    fn lex(&mut self) -> Result<Token, TriggerError> {
        while self
            .chars
            .get(self.cursor)
            .is_some_and(|c| c.is_whitespace())
        {
            self.cursor += 1;
        }
        let start = self.cursor;
        let position = start + 1;
        let Some(&c) = self.chars.get(start) else {
            return Ok(Token {
                kind: TokenKind::End,
                position,
            });
        };
        let single = |kind| Token { kind, position };
        let kind = match c {
            '(' => single(TokenKind::LParen),
            ')' => single(TokenKind::RParen),
            ',' => single(TokenKind::Comma),
            '.' => single(TokenKind::Dot),
            '"' => return self.lex_string(),
            '\'' => {
                return error(
                    position,
                    "strings use double quotes (\"...\"), not single quotes",
                )
            }
            c if is_operator_char(c) => return self.lex_operator(),
            c if c == '-' || c.is_ascii_digit() => return self.lex_number(),
            c if is_ident_start(c) => {
                let name = self.take_while(is_ident_char);
                return Ok(Token {
                    kind: TokenKind::Ident(name),
                    position,
                });
            }
            other => return error(position, format!("unexpected character {other:?}")),
        };
        self.cursor += 1;
        Ok(kind)
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let start = self.cursor;
        while self.chars.get(self.cursor).is_some_and(|&c| keep(c)) {
            self.cursor += 1;
        }
        // start <= cursor <= chars.len(): the cursor only moves over chars it saw.
        self.chars[start..self.cursor].iter().collect()
    }

    fn lex_string(&mut self) -> Result<Token, TriggerError> {
        let position = self.cursor + 1;
        self.cursor += 1; // opening quote
        let mut text = String::new();
        loop {
            let Some(&c) = self.chars.get(self.cursor) else {
                return error(position, "unterminated string: missing the closing \"");
            };
            self.cursor += 1;
            match c {
                '"' => break,
                '\\' => {
                    let Some(&escaped) = self.chars.get(self.cursor) else {
                        return error(position, "unterminated string: missing the closing \"");
                    };
                    text.push(match escaped {
                        '"' => '"',
                        '\\' => '\\',
                        '/' => '/',
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => {
                            return error(
                                self.cursor,
                                format!(
                                    "unknown escape \"\\{other}\" in string; use \\\" for a quote and \\\\ for a backslash"
                                ),
                            )
                        }
                    });
                    self.cursor += 1;
                }
                other => text.push(other),
            }
        }
        Ok(Token {
            kind: TokenKind::Str(text),
            position,
        })
    }

    fn lex_operator(&mut self) -> Result<Token, TriggerError> {
        let position = self.cursor + 1;
        let text = self.take_while(is_operator_char);
        let op = match text.as_str() {
            "=" => CompareOp::Eq,
            "!=" => CompareOp::Ne,
            "<" => CompareOp::Lt,
            "<=" => CompareOp::Le,
            ">" => CompareOp::Gt,
            ">=" => CompareOp::Ge,
            other => {
                let hint = match other {
                    "==" | "===" => "; use = to compare",
                    "!==" | "<>" => "; use != to compare",
                    "=>" => "; did you mean >=?",
                    "=<" => "; did you mean <=?",
                    "&&" | "&" => "; use and",
                    "||" | "|" => "; use or",
                    "!" => "; negation is not supported, use != or = null",
                    _ => "",
                };
                return error(position, format!("unknown operator \"{other}\"{hint}"));
            }
        };
        Ok(Token {
            kind: TokenKind::Op(op),
            position,
        })
    }

    fn lex_number(&mut self) -> Result<Token, TriggerError> {
        let position = self.cursor + 1;
        let start = self.cursor;
        if self.chars.get(start) == Some(&'-') {
            self.cursor += 1;
            if !self
                .chars
                .get(self.cursor)
                .is_some_and(char::is_ascii_digit)
            {
                return error(position, "expected a digit after \"-\"");
            }
        }
        // Take the whole run of word characters so `1.2.3` or `12abc` is one
        // bad number rather than a confusing sequence of tokens; a sign is
        // part of the run only right after an exponent marker.
        while let Some(&c) = self.chars.get(self.cursor) {
            let previous = self.cursor.checked_sub(1).and_then(|i| self.chars.get(i));
            let after_exponent = self.cursor > start && matches!(previous, Some('e' | 'E'));
            if c.is_ascii_alphanumeric()
                || c == '_'
                || c == '.'
                || (after_exponent && (c == '+' || c == '-'))
            {
                self.cursor += 1;
            } else {
                break;
            }
        }
        let text: String = self.chars[start..self.cursor].iter().collect();
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Token {
                kind: TokenKind::Number(n),
                position,
            }),
            Ok(_) => error(position, format!("number {text} is out of range")),
            Err(_) => error(position, format!("invalid number \"{text}\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message() -> Value {
        json!({
            "type": "track",
            "event": "Order Completed",
            "userId": "u-1",
            "anonymousId": null,
            "properties": {
                "plan": "pro",
                "revenue": 42.5,
                "count": 3,
                "big": 10000000000u64,
                "negative": -7,
                "vip": true,
                "trial": false,
                "coupon": null,
                "empty": "",
                "tags": ["alpha", "beta", 5],
                "Plan Name": "Gold",
                "and": "keyword-named",
                "nested": { "deep": "x", "level": 2 },
                "numeric_string": "3",
                "quote": "say \"hi\"",
                "path": "C:\\tmp",
                "unicode": "héllo wörld ✓"
            },
            "context": {
                "groupId": "g-1",
                "personas": { "computation_class": "audience" }
            },
            "traits": { "email": "a@example.com" }
        })
    }

    fn eval(trigger: &str, message: &Value) -> bool {
        match Trigger::parse(trigger) {
            Ok(parsed) => parsed.matches(message),
            Err(e) => panic!("{trigger:?} should parse but failed {e}"),
        }
    }

    #[test]
    fn evaluates_against_a_track_message() {
        let msg = message();
        let cases: &[(&str, bool)] = &[
            // top-level fields
            (r#"type = "track""#, true),
            (r#"type = "identify""#, false),
            (r#"type != "identify""#, true),
            (r#"type != "track""#, false),
            (r#"event = "Order Completed""#, true),
            (r#"event = "order completed""#, false),
            (r#"userId = "u-1""#, true),
            (r#"name = null"#, true),
            (r#"name != null"#, false),
            (r#"anonymousId = null"#, true),
            (r#"anonymousId != null"#, false),
            (r#"userId != null"#, true),
            (r#"userId = null"#, false),
            // dotted paths
            (r#"properties.plan = "pro""#, true),
            (r#"properties.nested.deep = "x""#, true),
            (r#"properties.nested.level = 2"#, true),
            (r#"context.groupId = "g-1""#, true),
            (r#"context.personas.computation_class = "audience""#, true),
            (r#"traits.email != null"#, true),
            (r#"properties."Plan Name" = "Gold""#, true),
            (r#"properties.and = "keyword-named""#, true),
            (r#"properties.plan.sub = null"#, true),
            (r#"properties.tags.alpha = null"#, true),
            // null / present
            (r#"properties.coupon = null"#, true),
            (r#"properties.coupon != null"#, false),
            (r#"properties.missing = null"#, true),
            (r#"properties.missing != null"#, false),
            (r#"properties.empty != null"#, true),
            (r#"properties.empty = """#, true),
            (r#"properties.vip != null"#, true),
            (r#"properties.trial != null"#, true),
            // booleans
            (r#"properties.vip = true"#, true),
            (r#"properties.vip = false"#, false),
            (r#"properties.trial = false"#, true),
            (r#"properties.trial = true"#, false),
            (r#"properties.vip != false"#, true),
            (r#"properties.plan = true"#, false),
            // numbers
            (r#"properties.count = 3"#, true),
            (r#"properties.count = 3.0"#, true),
            (r#"properties.count = 4"#, false),
            (r#"properties.revenue = 42.5"#, true),
            (r#"properties.negative = -7"#, true),
            (r#"properties.big = 1e10"#, true),
            (r#"properties.revenue > 40"#, true),
            (r#"properties.revenue >= 42.5"#, true),
            (r#"properties.revenue > 42.5"#, false),
            (r#"properties.revenue < 42.5"#, false),
            (r#"properties.revenue <= 42.5"#, true),
            (r#"properties.revenue < 100"#, true),
            (r#"properties.negative < 0"#, true),
            (r#"properties.negative > -7.5"#, true),
            // no coercion between types
            (r#"properties.numeric_string = 3"#, false),
            (r#"properties.numeric_string != 3"#, true),
            (r#"properties.count = "3""#, false),
            (r#"properties.numeric_string > 1"#, false),
            (r#"properties.count > "1""#, false),
            // strings order by code point
            (r#"properties.plan > "free""#, true),
            (r#"properties.plan < "zeta""#, true),
            (r#"properties.plan >= "pro""#, true),
            (r#"properties.plan < "Pro""#, false),
            // missing fields
            (r#"properties.missing = "pro""#, false),
            (r#"properties.missing != "pro""#, true),
            (r#"properties.missing != 3"#, true),
            (r#"properties.missing != true"#, true),
            (r#"properties.missing > 0"#, false),
            (r#"properties.missing < 0"#, false),
            (r#"properties.coupon > 0"#, false),
            // objects and arrays never equal a scalar
            (r#"properties.nested = "x""#, false),
            (r#"properties.nested != "x""#, true),
            (r#"properties.tags = "alpha""#, false),
            // string escapes
            (r#"properties.quote = "say \"hi\"""#, true),
            (r#"properties.path = "C:\\tmp""#, true),
            (r#"properties.unicode = "héllo wörld ✓""#, true),
        ];
        for (trigger, expected) in cases {
            assert_eq!(eval(trigger, &msg), *expected, "trigger: {trigger}");
        }
    }

    #[test]
    fn evaluates_contains_and_match() {
        let msg = message();
        let cases: &[(&str, bool)] = &[
            (r#"contains(event, "Order")"#, true),
            (r#"contains(event, "order")"#, false),
            (r#"contains(event, "")"#, true),
            (r#"contains(event, "Completed")"#, true),
            (r#"contains(properties.unicode, "wörld")"#, true),
            (r#"contains(properties.tags, "beta")"#, true),
            (r#"contains(properties.tags, "bet")"#, false),
            (r#"contains(properties.tags, "5")"#, false),
            (r#"contains(properties.count, "3")"#, false),
            (r#"contains(properties.missing, "x")"#, false),
            (r#"contains(properties.nested, "deep")"#, false),
            (r#"match(event, "Order*")"#, true),
            (r#"match(event, "*Completed")"#, true),
            (r#"match(event, "*der Comp*")"#, true),
            (r#"match(event, "O*C*d")"#, true),
            (r#"match(event, "*")"#, true),
            (r#"match(event, "order*")"#, false),
            (r#"match(event, "*Started")"#, false),
            (r#"match(event, "Order Completed")"#, true),
            (r#"match(event, "Order")"#, false),
            (r#"match(properties.unicode, "h*✓")"#, true),
            (r#"match(properties.count, "*")"#, false),
            (r#"match(properties.missing, "*")"#, false),
            (r#"MATCH(event, "Order*")"#, true),
            (r#"Contains(event, "Order")"#, true),
        ];
        for (trigger, expected) in cases {
            assert_eq!(eval(trigger, &msg), *expected, "trigger: {trigger}");
        }
    }

    #[test]
    fn combines_with_and_or_and_parentheses() {
        let msg = message();
        let cases: &[(&str, bool)] = &[
            (r#"type = "track" and event = "Order Completed""#, true),
            (r#"type = "track" and event = "Signed Up""#, false),
            (r#"type = "identify" or event = "Order Completed""#, true),
            (r#"type = "identify" or type = "group""#, false),
            // and binds tighter than or: true or (false and false)
            (r#"type = "track" or type = "x" and type = "y""#, true),
            // (false and false) or true
            (r#"type = "x" and type = "y" or type = "track""#, true),
            // parentheses override it: false and (false or true)
            (r#"type = "x" and (type = "y" or type = "track")"#, false),
            // (true or false) and false
            (r#"(type = "track" or type = "x") and type = "y""#, false),
            (r#"((type = "track"))"#, true),
            (
                r#"(((type = "track") and ((properties.vip = true))))"#,
                true,
            ),
            (
                r#"type = "track" AND properties.plan = "pro" OR type = "x""#,
                true,
            ),
            (
                r#"type = "track" And (properties.plan = "free" Or properties.count >= 3)"#,
                true,
            ),
            (r#"type="track"and(properties.count>2)"#, true),
            ("type = \"track\"\n\tand\n\tproperties.vip = TRUE", true),
            (
                r#"properties.coupon = NULL and properties.trial = False"#,
                true,
            ),
            (
                r#"type = "track" and (contains(event, "Order") or match(event, "Signed*")) and properties.revenue > 10"#,
                true,
            ),
            (r#"a = 1 or b = 2 or c = 3 or type = "track""#, true),
            (r#"type = "track" and a = 1 and type = "track""#, false),
        ];
        for (trigger, expected) in cases {
            assert_eq!(eval(trigger, &msg), *expected, "trigger: {trigger}");
        }
    }

    #[test]
    fn presets_match_their_message_types() {
        let track = Trigger::parse(r#"type = "track""#);
        let identify = Trigger::parse(r#"type = "identify""#);
        let (Ok(track), Ok(identify)) = (track, identify) else {
            panic!("the preset triggers must parse");
        };
        let identify_message = json!({"type": "identify", "userId": "u", "traits": {"name": "A"}});
        assert!(track.matches(&message()));
        assert!(!track.matches(&identify_message));
        assert!(identify.matches(&identify_message));
        assert!(!identify.matches(&message()));
        // Not an object at all: every field is missing.
        assert!(!track.matches(&json!("track")));
        assert!(!track.matches(&Value::Null));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let parse = |text: &str| Trigger::parse(text).map(|t| t.expr);
        assert_eq!(
            parse(r#"a = TRUE AND b = Null OR c = false"#),
            parse(r#"a = true and b = null or c = false"#)
        );
    }

    #[test]
    fn keeps_the_source_text() {
        let text = "  type = \"track\"  ";
        match Trigger::parse(text) {
            Ok(trigger) => assert_eq!(trigger.source(), text),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn parses_literals() {
        let cases: &[(&str, Literal)] = &[
            ("a = 0", Literal::Number(0.0)),
            ("a = -0.25", Literal::Number(-0.25)),
            ("a = 1e3", Literal::Number(1000.0)),
            ("a = 2.5E-1", Literal::Number(0.25)),
            ("a = 12", Literal::Number(12.0)),
            ("a = true", Literal::Bool(true)),
            ("a = FALSE", Literal::Bool(false)),
            ("a = null", Literal::Null),
            (r#"a = """#, Literal::String(String::new())),
            (r#"a = "x\ny""#, Literal::String("x\ny".into())),
            (r#"a = "\t\r\/""#, Literal::String("\t\r/".into())),
            (r#"a = "é ✓ 日本""#, Literal::String("é ✓ 日本".into())),
        ];
        for (text, expected) in cases {
            match Trigger::parse(text).map(|t| t.expr) {
                Ok(Expr::Compare { value, .. }) => assert_eq!(&value, expected, "{text}"),
                other => panic!("{text}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn reports_errors_with_positions() {
        // (trigger, position, a fragment of the message)
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "the trigger is empty"),
            ("   \t\n", 1, "the trigger is empty"),
            (r#"type = "track"#, 8, "unterminated string"),
            (r#"type = "track\"#, 8, "unterminated string"),
            (r#"type = "a\qb""#, 10, "unknown escape \"\\q\""),
            (r#"type == "track""#, 6, "unknown operator \"==\"; use ="),
            (r#"type <> "track""#, 6, "unknown operator \"<>\"; use !="),
            (r#"count => 3"#, 7, "did you mean >="),
            (r#"a = 1 && b = 2"#, 7, "unknown operator \"&&\"; use and"),
            (r#"a = 1 || b = 2"#, 7, "unknown operator \"||\"; use or"),
            (r#"!(a = 1)"#, 1, "unknown operator \"!\""),
            (r#"type ~ "x""#, 6, "unexpected character '~'"),
            (r#"type = 'track'"#, 8, "double quotes"),
            (
                r#"type = track"#,
                8,
                "strings need double quotes, as in \"track\"",
            ),
            ("properties.x =", 15, "expected a value after \"=\""),
            (
                "type = \"a\" and properties.x =",
                30,
                "expected a value after \"=\"",
            ),
            ("type = )", 8, "expected a value after \"=\", found \")\""),
            ("type", 5, "expected an operator"),
            (
                "type \"track\"",
                6,
                "expected an operator (=, !=, <, <=, >, >=) after type",
            ),
            ("properties.vip", 15, "after properties.vip"),
            (
                r#"type = "track" and"#,
                19,
                "expected a condition, found the end",
            ),
            (r#"type = "track" or"#, 18, "expected a condition"),
            (
                r#"type = "track" and or b = 1"#,
                20,
                "expected a condition, found \"or\"",
            ),
            (r#"and = 1"#, 1, "expected a condition, found \"and\""),
            (r#"true = type"#, 1, "expected a condition"),
            (r#""track" = type"#, 1, "the field goes on the left"),
            (r#"5 < properties.count"#, 1, "expected a field name"),
            (r#"= "track""#, 1, "expected a field name before \"=\""),
            (
                r#"(type = "track""#,
                16,
                "expected \")\" to close the \"(\" at position 1",
            ),
            (r#"(type = "track" b"#, 17, "expected \")\""),
            (
                r#"type = "track")"#,
                15,
                "unexpected \")\" with no matching \"(\"",
            ),
            (
                r#"type = "track" event = "x""#,
                16,
                "after a complete condition",
            ),
            (r#"type = "track" 5"#, 16, "unexpected the number 5"),
            (r#"()"#, 2, "expected a condition, found \")\""),
            (r#"lower(event, "x")"#, 1, "unknown function \"lower\""),
            (
                r#"contains(event)"#,
                15,
                "expected \",\" after the field in contains()",
            ),
            (
                r#"contains("x", event)"#,
                10,
                "first argument of contains()",
            ),
            (r#"contains(event, 5)"#, 17, "second argument of contains()"),
            (r#"match(event, other)"#, 14, "second argument of match()"),
            (
                r#"match(event, "x""#,
                17,
                "expected \")\" to close match( at position 1",
            ),
            (
                r#"contains(event, "x") = true"#,
                22,
                "after a complete condition",
            ),
            (
                r#"properties. = 1"#,
                13,
                "expected a field name after \".\"",
            ),
            (
                r#"properties.5 = 1"#,
                12,
                "expected a field name after \".\"",
            ),
            (
                r#"properties..x = 1"#,
                12,
                "expected a field name after \".\"",
            ),
            (r#"a = 1.2.3"#, 5, "invalid number \"1.2.3\""),
            (r#"a = 12abc"#, 5, "invalid number \"12abc\""),
            (r#"a = 1e999"#, 5, "out of range"),
            (r#"a = -"#, 5, "expected a digit after \"-\""),
            (r#"a = - 1"#, 5, "expected a digit after \"-\""),
            (
                r#"a < TRUE"#,
                5,
                "\"<\" compares numbers or strings, not true",
            ),
            (r#"a >= null"#, 6, "compares numbers or strings"),
            (r#"prénom = "x""#, 3, "unexpected character 'é'"),
            (r#"é"#, 1, "unexpected character 'é'"),
            // Columns count characters, not bytes.
            (r#"a = "é" and b = 1 and"#, 22, "expected a condition"),
            (r#"a = "日本" #"#, 10, "unexpected character '#'"),
        ];
        for (trigger, position, fragment) in cases {
            match Trigger::parse(trigger) {
                Ok(parsed) => panic!("{trigger:?} should fail but parsed as {parsed:?}"),
                Err(e) => {
                    assert_eq!(e.position, *position, "position for {trigger:?}: {e}");
                    assert!(
                        e.message.contains(fragment),
                        "message for {trigger:?}: {e} (wanted {fragment:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn error_display_names_the_position() {
        let error = TriggerError {
            position: 14,
            message: "expected a value after \"=\"".to_string(),
        };
        assert_eq!(
            error.to_string(),
            "at position 14: expected a value after \"=\""
        );
        let boxed: Box<dyn std::error::Error> = Box::new(error);
        assert!(boxed.to_string().starts_with("at position 14"));
    }

    #[test]
    fn caps_parenthesis_nesting() {
        let nested =
            |depth: usize| format!("{}type = \"track\"{}", "(".repeat(depth), ")".repeat(depth));
        assert!(Trigger::parse(&nested(MAX_NESTING)).is_ok_and(|t| t.matches(&message())));
        match Trigger::parse(&nested(MAX_NESTING + 1)) {
            Err(e) => {
                assert_eq!(e.position, MAX_NESTING + 1);
                assert!(e.message.contains("nested more than 64"), "{e}");
            }
            Ok(_) => panic!("nesting past the cap must be rejected"),
        }
        // Hostile input: far past the cap, unbalanced, must fail fast.
        let hostile = "(".repeat(200_000);
        assert_eq!(
            Trigger::parse(&hostile).map_err(|e| e.position),
            Err(MAX_NESTING + 1)
        );
    }

    #[test]
    fn long_flat_chains_are_fine() {
        let clause = r#"properties.count = 3"#;
        let text = vec![clause; 5_000].join(" and ");
        assert!(eval(&text, &message()));
        let text = vec![r#"type = "x""#; 5_000].join(" or ") + r#" or type = "track""#;
        assert!(eval(&text, &message()));
    }

    #[test]
    fn glob_matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("**", "abc", true),
            ("a*", "a", true),
            ("*a", "a", true),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("*ab", "abab", true),
            ("ab*ab", "abab", true),
            ("ab*ab", "aba", false),
            ("*.com", "user@example.com", true),
            ("*.com", "user@example.org", false),
            ("Signed*Up", "Signed Up", true),
            ("?", "x", false),
            ("?", "?", true),
            ("é*✓", "école ✓", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_matches(pattern, text),
                *expected,
                "glob {pattern:?} on {text:?}"
            );
        }
    }

    /// A tiny deterministic generator, so the "never panics" check covers the
    /// same thousands of odd inputs on every run without a fuzzing dependency.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        let pieces = [
            "type",
            "properties",
            ".",
            "\"",
            "\"x\"",
            "\\",
            "(",
            ")",
            ",",
            "=",
            "!",
            "<",
            ">",
            "-",
            "1",
            "2.5",
            "e",
            "and",
            "OR",
            "null",
            "true",
            "contains",
            "match",
            " ",
            "*",
            "é",
            "日",
            "\u{0}",
            "\u{200b}",
            "🦀",
            "'",
            "$",
            "_",
            "&",
            "|",
            "\n",
        ];
        let msg = message();
        let mut rng = Lcg(7);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let len = rng.below(12);
            let text: String = (0..len).map(|_| pieces[rng.below(pieces.len())]).collect();
            match Trigger::parse(&text) {
                Ok(trigger) => {
                    parsed += 1;
                    let _ = trigger.matches(&msg);
                }
                Err(e) => {
                    let columns = text.chars().count() + 1;
                    assert!(
                        (1..=columns).contains(&e.position),
                        "{text:?}: position {} outside 1..={columns}",
                        e.position
                    );
                }
            }
        }
        assert!(
            parsed > 0,
            "the generator should produce some valid triggers"
        );

        // Every prefix of a valid trigger is handled without panicking.
        let full = r#"(type = "track" and contains(properties."Plan Name", "G\"o")) or match(event, "*é*") or properties.n >= -1.5e2"#;
        for (end, _) in full.char_indices() {
            let _ = Trigger::parse(&full[..end]);
        }
        assert!(Trigger::parse(full).is_ok());
    }
}
