//! The Segment HTTP Tracking API (SPEC 2.1): routes, validation and answers.
//! A request is answered `200 {"success":true}` only after every one of its
//! messages is committed by the group-commit writer (`commit.rs`).

pub mod body;
pub mod commit;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::config::ServerConfig;
use crate::segment::{self, Envelope, MessageType};
use crate::store::events::EventRow;
use commit::Committer;

/// What the ingest routes share.
#[derive(Clone)]
pub struct IngestState {
    pub committer: Committer,
    pub limits: Arc<ServerConfig>,
}

/// An ingest failure, answered as SPEC's JSON error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IngestError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        IngestError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::bad_request("invalid_message", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        IngestError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
        }
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        IngestError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        IngestError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "store_unavailable",
            message: message.into(),
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let reason = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({
            "success": false,
            "code": self.code,
            "message": self.message,
            "error": format!("{reason}: {}", self.message),
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        response
    }
}

/// A body declared over `server.max_request_size` but within this many times
/// it is read and dropped before the 413 goes out.
const DRAIN_LIMIT_FACTOR: u64 = 4;

/// The tracking routes, long, short and batch forms.
pub fn routes(state: IngestState) -> Router {
    let single: [(&str, &str, MessageType); 6] = [
        ("/v1/track", "/v1/t", MessageType::Track),
        ("/v1/identify", "/v1/i", MessageType::Identify),
        ("/v1/group", "/v1/g", MessageType::Group),
        ("/v1/page", "/v1/p", MessageType::Page),
        ("/v1/screen", "/v1/s", MessageType::Screen),
        ("/v1/alias", "/v1/a", MessageType::Alias),
    ];
    let mut router = Router::new();
    for (long, short, kind) in single {
        let handler = post(
            move |State(state): State<IngestState>, headers: HeaderMap, body: Body| async move {
                answer(handle(&state, Some(kind), headers, body).await)
            },
        );
        router = router.route(long, handler.clone()).route(short, handler);
    }
    let batch = post(
        |State(state): State<IngestState>, headers: HeaderMap, body: Body| async move {
            answer(handle(&state, None, headers, body).await)
        },
    );
    router
        .route("/v1/batch", batch.clone())
        .route("/v1/import", batch.clone())
        .route("/v1/b", batch)
        .with_state(state)
}

fn answer(result: Result<(), IngestError>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, Json(json!({"success": true}))).into_response(),
        Err(e) => {
            metrics::counter!(crate::metrics::REJECTED, "reason" => e.code).increment(1);
            if e.status.is_server_error() {
                tracing::warn!(status = e.status.as_u16(), reason = %e.message, "ingest unavailable");
            } else {
                tracing::debug!(status = e.status.as_u16(), reason = %e.message, "ingest request rejected");
            }
            e.into_response()
        }
    }
}

/// One request, single message (`route_type` set) or batch.
async fn handle(
    state: &IngestState,
    route_type: Option<MessageType>,
    headers: HeaderMap,
    body: Body,
) -> Result<(), IngestError> {
    if let Some(why) = state.committer.health.refusal() {
        return Err(IngestError::unavailable(why));
    }
    let limits = &state.limits;
    let request_limit = limits.max_request_size.0 as usize;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let over_request = || {
        IngestError::too_large(format!(
            "the request is over the {request_limit}-byte limit (server.max_request_size)"
        ))
    };
    if let Some(n) = declared.filter(|n| *n > request_limit as u64) {
        // Read (and drop) a moderately oversized body before answering, so
        // the client, still uploading, reads the 413 instead of a reset
        // connection; a body far over the limit is cut off unread.
        if n <= DRAIN_LIMIT_FACTOR * request_limit as u64 {
            let _ = axum::body::to_bytes(body, n as usize).await;
        }
        return Err(over_request());
    }
    let raw = axum::body::to_bytes(body, request_limit)
        .await
        .map_err(|_| over_request())?;
    let bytes = body::decode(&headers, raw.to_vec(), request_limit)?;
    let basic_key = body::basic_auth_key(&headers)?;
    let received_at = Utc::now();

    let rows = match route_type {
        Some(kind) => {
            let message_limit = limits.max_message_size.0 as usize;
            if bytes.len() > message_limit {
                return Err(IngestError::too_large(format!(
                    "the message is {} bytes, over the {message_limit}-byte limit (server.max_message_size)",
                    bytes.len()
                )));
            }
            let mut value = parse_json(&bytes)?;
            let body_key = take_write_key(&mut value);
            let write_key = basic_key.or(body_key);
            body::check_write_key(&limits.write_keys, write_key.as_deref())?;
            let message = segment::prepare(value, Some(kind), &Envelope::default(), received_at)
                .map_err(IngestError::invalid)?;
            vec![EventRow::new(
                &message,
                write_key.as_deref().unwrap_or_default(),
            )]
        }
        None => batch_rows(limits, &bytes, basic_key, received_at)?,
    };
    let outcome = state
        .committer
        .commit(rows)
        .await
        .map_err(|e| IngestError::unavailable(format!("the store cannot write: {e}")))?;
    metrics::counter!(crate::metrics::INGESTED).increment(outcome.stored as u64);
    metrics::counter!(crate::metrics::DEDUPLICATED).increment(outcome.duplicates as u64);
    Ok(())
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<&'a RawValue>,
    context: Option<Value>,
    integrations: Option<Value>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    #[serde(rename = "writeKey")]
    write_key: Option<Value>,
}

/// Validates a whole batch; any bad item fails the whole request, naming it.
pub fn batch_rows(
    limits: &ServerConfig,
    bytes: &[u8],
    basic_key: Option<String>,
    received_at: chrono::DateTime<Utc>,
) -> Result<Vec<EventRow>, IngestError> {
    check_utf8(bytes)?;
    let envelope: BatchBody<'_> = serde_json::from_slice(bytes).map_err(json_error)?;
    let body_key = envelope
        .write_key
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_string);
    let write_key = basic_key.or(body_key);
    body::check_write_key(&limits.write_keys, write_key.as_deref())?;
    let Some(batch) = envelope.batch else {
        return Err(IngestError::invalid(
            "the batch body needs a \"batch\" array of messages",
        ));
    };
    let items: Vec<&RawValue> = serde_json::from_str(batch.get())
        .map_err(|_| IngestError::invalid("\"batch\" must be an array of messages"))?;
    if items.len() > limits.max_batch_messages {
        return Err(IngestError::too_large(format!(
            "the batch has {} messages, over the {}-message limit (server.max_batch_messages)",
            items.len(),
            limits.max_batch_messages
        )));
    }
    let context = object_member(&envelope.context, "context")?;
    let integrations = object_member(&envelope.integrations, "integrations")?;
    let sent_at = match &envelope.sent_at {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(IngestError::invalid(
                "sentAt must be an ISO 8601 date string",
            ))
        }
    };
    let env = Envelope {
        context,
        integrations,
        sent_at,
    };
    let message_limit = limits.max_message_size.0 as usize;
    let key_hash = crate::store::events::hash_write_key(&write_key.unwrap_or_default());
    let mut rows = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let size = item.get().len();
        if size > message_limit {
            return Err(IngestError::too_large(format!(
                "batch item {index} is {size} bytes, over the {message_limit}-byte limit (server.max_message_size)"
            )));
        }
        let mut value: Value = serde_json::from_str(item.get())
            .map_err(|e| IngestError::invalid(format!("batch item {index}: {e}")))?;
        take_write_key(&mut value);
        let message = segment::prepare(value, None, &env, received_at)
            .map_err(|e| IngestError::invalid(format!("batch item {index}: {e}")))?;
        rows.push(EventRow::with_key_hash(&message, key_hash.clone()));
    }
    Ok(rows)
}

fn object_member<'a>(
    v: &'a Option<Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, IngestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(IngestError::invalid(format!(
            "the batch {name} must be an object"
        ))),
    }
}

/// The stored message never keeps the write key.
fn take_write_key(value: &mut Value) -> Option<String> {
    value
        .as_object_mut()
        .and_then(|m| m.remove("writeKey"))
        .and_then(|k| k.as_str().map(str::to_string))
}

fn check_utf8(bytes: &[u8]) -> Result<(), IngestError> {
    std::str::from_utf8(bytes).map(|_| ()).map_err(|e| {
        IngestError::bad_request(
            "invalid_json",
            format!(
                "the body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, IngestError> {
    check_utf8(bytes)?;
    serde_json::from_slice(bytes).map_err(json_error)
}

fn json_error(e: serde_json::Error) -> IngestError {
    let text = e.to_string();
    let message = if text.contains("recursion limit") {
        format!("the body is not valid JSON: it is nested deeper than 128 levels ({text})")
    } else {
        format!("the body is not valid JSON: {text}")
    };
    IngestError::bad_request("invalid_json", message)
}
