//! Turning an HTTP request into JSON: the write key (Basic auth or body),
//! gzip, size limits. Content-Type is ignored on purpose: analytics.js posts
//! JSON as `text/plain`.

use std::io::Read;

use axum::http::{header, HeaderMap};
use base64::Engine;
use subtle::ConstantTimeEq;

use super::IngestError;

/// The write key from `Authorization: Basic base64(key:)`, if present.
pub fn basic_auth_key(headers: &HeaderMap) -> Result<Option<String>, IngestError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || IngestError::unauthorized("the Authorization header is not valid HTTP Basic auth");
    let text = value.to_str().map_err(|_| bad())?;
    let Some(encoded) = text
        .strip_prefix("Basic ")
        .or_else(|| text.strip_prefix("basic "))
    else {
        return Err(bad());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let key = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(user, _)| user);
    Ok((!key.is_empty()).then(|| key.to_string()))
}

/// Checks a write key against the accepted list in constant time per key.
/// An empty list accepts any key (config checks that this is loopback only).
pub fn check_write_key(accepted: &[String], key: Option<&str>) -> Result<(), IngestError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let Some(key) = key else {
        return Err(IngestError::unauthorized(
            "a write key is required: send it as the HTTP Basic auth user or as writeKey in the body",
        ));
    };
    let mut ok = subtle::Choice::from(0);
    for candidate in accepted {
        ok |= candidate.as_bytes().ct_eq(key.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(IngestError::unauthorized(
            "the write key is not accepted by this server",
        ))
    }
}

/// Undoes `Content-Encoding: gzip`, refusing output beyond `limit` bytes so a
/// small compressed bomb cannot exhaust memory.
pub fn decode(headers: &HeaderMap, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, IngestError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(body),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity(body.len() * 4);
            flate2::read::MultiGzDecoder::new(body.as_slice())
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    IngestError::bad_request(
                        "invalid_gzip",
                        format!("the gzip body cannot be decoded: {e}"),
                    )
                })?;
            if out.len() > limit {
                return Err(IngestError::too_large(format!(
                    "the decompressed request is over the {limit}-byte limit (server.max_request_size)"
                )));
            }
            Ok(out)
        }
        Some(other) => Err(IngestError::bad_request(
            "unsupported_encoding",
            format!("Content-Encoding {other:?} is not supported; send identity or gzip"),
        )),
    }
}
