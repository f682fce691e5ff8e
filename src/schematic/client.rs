//! The HTTP side of Schematic's capture API (SPEC 3): one `POST
//! {capture_url}/batch` per batch, with the API key in the header and in each
//! event. Stored payloads never hold the key; it is spliced in here.

use std::time::{Duration, Instant};

use crate::delivery::retry::AttemptOutcome;

/// What one request produced, with what the retry policy and the attempt
/// history need.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub outcome: AttemptOutcome,
    /// Response body (truncated), kept on failed rows for the operator.
    pub response: Option<String>,
    pub duration: Duration,
}

/// Longest response body kept on a delivery row.
const MAX_RESPONSE_KEPT: usize = 2048;

#[derive(Clone)]
pub struct SchematicClient {
    http: reqwest::Client,
    batch_url: String,
    api_key: String,
}

/// One event to send: its idempotency key and stored payload
/// (`{"type","sent_at","body"}`).
pub struct OutgoingEvent<'a> {
    pub idempotency_key: &'a str,
    pub payload: &'a str,
}

impl SchematicClient {
    pub fn new(capture_url: &str, api_key: String, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("schematic-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(SchematicClient {
            http,
            batch_url: format!("{}/batch", capture_url.trim_end_matches('/')),
            api_key,
        })
    }

    /// The request body for a batch: `{"events":[...]}` with `api_key` and
    /// `idempotency_key` added to each stored payload.
    pub fn batch_body(&self, events: &[OutgoingEvent<'_>]) -> String {
        let key = serde_json::Value::String(self.api_key.clone()).to_string();
        let mut body =
            String::with_capacity(events.iter().map(|e| e.payload.len() + 128).sum::<usize>() + 16);
        body.push_str("{\"events\":[");
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let idem = serde_json::Value::String(event.idempotency_key.to_string()).to_string();
            let rest = event.payload.trim_start().strip_prefix('{').unwrap_or("}");
            body.push_str("{\"api_key\":");
            body.push_str(&key);
            body.push_str(",\"idempotency_key\":");
            body.push_str(&idem);
            if rest.trim_start() != "}" {
                body.push(',');
            }
            body.push_str(rest);
        }
        body.push_str("]}");
        body
    }

    pub async fn send(&self, events: &[OutgoingEvent<'_>]) -> SendResult {
        let body = self.batch_body(events);
        let started = Instant::now();
        let result = self
            .http
            .post(&self.batch_url)
            .header("Content-Type", "application/json")
            .header("X-Schematic-Api-Key", &self.api_key)
            .body(body)
            .send()
            .await;
        let outcome_and_body = match result {
            Ok(response) => {
                let code = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = response.text().await.unwrap_or_default();
                (
                    AttemptOutcome::Status { code, retry_after },
                    Some(truncate(text)),
                )
            }
            Err(e) if e.is_timeout() => (AttemptOutcome::Timeout, None),
            Err(e) => (AttemptOutcome::Connection(error_chain(&e)), None),
        };
        SendResult {
            outcome: outcome_and_body.0,
            response: outcome_and_body.1.filter(|t| !t.is_empty()),
            duration: started.elapsed(),
        }
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_RESPONSE_KEPT {
        let mut cut = MAX_RESPONSE_KEPT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The error with its causes, without the URL's query (none here) or the key
/// (never part of an error message).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_body_splices_the_key_and_idempotency_key_into_each_payload() {
        let client =
            SchematicClient::new("http://x/", "k\"1".into(), Duration::from_secs(1)).unwrap();
        assert_eq!(client.batch_url, "http://x/batch");
        let body = client.batch_body(&[
            OutgoingEvent {
                idempotency_key: "a",
                payload: r#"{"type":"track","sent_at":"t","body":{"event":"e"}}"#,
            },
            OutgoingEvent {
                idempotency_key: "b",
                payload: r#"{"type":"identify","sent_at":"t","body":{"keys":{"u":"1"}}}"#,
            },
        ]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["events"][0]["api_key"], "k\"1");
        assert_eq!(v["events"][0]["idempotency_key"], "a");
        assert_eq!(v["events"][0]["body"]["event"], "e");
        assert_eq!(v["events"][1]["type"], "identify");
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
    }
}
