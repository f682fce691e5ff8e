//! SQL for the `events` table: storing acknowledged messages (deduplicated on
//! `messageId` per write key) and counting them.

use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};

use crate::segment::PreparedMessage;
use crate::store::dedupe::{dedupe_key, Dedupe};
use crate::store::time_text;

/// One row for `events`, built off the writer thread so that JSON
/// serialisation runs in parallel with the commit.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub message_id: String,
    pub write_key: String,
    /// `dedupe::dedupe_key(write_key, message_id)`
    pub dedupe_key: i64,
    pub kind: &'static str,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: Option<String>,
    pub timestamp: String,
    pub received_at: String,
    pub raw: String,
}

impl EventRow {
    pub fn new(message: &PreparedMessage, write_key: &str) -> EventRow {
        EventRow::with_key_hash(message, hash_write_key(write_key))
    }

    /// Like `new`, with the write key already hashed (`hash_write_key`), so a
    /// batch hashes its key once instead of once per message.
    pub fn with_key_hash(message: &PreparedMessage, write_key_hash: String) -> EventRow {
        EventRow {
            message_id: message.message_id.clone(),
            dedupe_key: dedupe_key(&write_key_hash, &message.message_id),
            write_key: write_key_hash,
            kind: message.kind.as_str(),
            user_id: message.user_id.clone(),
            anonymous_id: message.anonymous_id.clone(),
            event: message.event.clone(),
            timestamp: time_text(message.timestamp),
            received_at: time_text(message.received_at),
            // Straight into a byte buffer: `Value::to_string` goes through
            // `fmt::Write` and took twice as long. Serialising a `Value`
            // cannot fail (its map keys are strings, a Vec has no I/O errors).
            raw: serde_json::to_string(&message.raw).unwrap_or_default(),
        }
    }
}

/// The write key is never stored: only the first 16 bytes of its SHA-256, as
/// hex, which is enough to tell sources apart and to scope deduplication.
pub fn hash_write_key(write_key: &str) -> String {
    let digest = Sha256::digest(write_key.as_bytes());
    let mut out = String::with_capacity(32);
    crate::store::push_hex(&mut out, &digest[..16]);
    out
}

/// What happened to the rows of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    pub stored: usize,
    pub duplicates: usize,
}

/// Inserts rows inside the caller's transaction, after `dedupe.begin` on it;
/// a `messageId` already stored for the same write key (in the retention
/// window) is counted as a duplicate and left alone. The caller passes the
/// transaction's fate on to `dedupe` (`commit`, `abort`, `rollback_to`).
pub fn insert(
    conn: &Connection,
    dedupe: &mut Dedupe,
    rows: &[EventRow],
) -> rusqlite::Result<InsertOutcome> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (message_id, write_key, dedupe_key, type, user_id, anonymous_id,
                             event, timestamp, received_at, raw)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut outcome = InsertOutcome::default();
    for r in rows {
        if dedupe.seen(r.dedupe_key) {
            outcome.duplicates += 1;
            continue;
        }
        stmt.execute(params![
            r.message_id,
            r.write_key,
            r.dedupe_key,
            r.kind,
            r.user_id,
            r.anonymous_id,
            r.event,
            r.timestamp,
            r.received_at,
            r.raw
        ])?;
        dedupe.stage(r.dedupe_key, conn.last_insert_rowid());
        outcome.stored += 1;
    }
    Ok(outcome)
}

/// One transaction inserting `rows`, deduplicated; for callers without a
/// group-commit writer of their own (the `ingest` backfill, benchmarks).
pub fn insert_committed(
    conn: &mut Connection,
    dedupe: &mut Dedupe,
    rows: &[EventRow],
) -> rusqlite::Result<InsertOutcome> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now = chrono::Utc::now();
    dedupe.begin(&tx, now)?;
    let outcome = insert(&tx, dedupe, rows);
    match outcome.and_then(|o| tx.commit().map(|()| o)) {
        Ok(o) => {
            dedupe.commit(now);
            Ok(o)
        }
        Err(e) => {
            dedupe.abort();
            Err(e)
        }
    }
}

/// Event counts per status, in a fixed order.
pub fn count_by_status(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare("SELECT status, count(*) FROM events GROUP BY status ORDER BY status")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Rows for unit tests: a message of user `u1` under write key hash `k`,
/// timed and received at `at`, whose raw JSON the default mappings can read.
#[cfg(test)]
impl EventRow {
    pub fn for_test(
        message_id: &str,
        kind: &'static str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> EventRow {
        let at = time_text(at);
        EventRow {
            message_id: message_id.to_string(),
            write_key: "k".to_string(),
            dedupe_key: dedupe_key("k", message_id),
            kind,
            user_id: Some("u1".to_string()),
            anonymous_id: None,
            event: Some("Signed Up".to_string()),
            raw: serde_json::json!({"type": kind, "event": "Signed Up", "userId": "u1",
                                    "messageId": message_id, "timestamp": at})
            .to_string(),
            timestamp: at.clone(),
            received_at: at,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_key_hash_is_the_first_16_bytes_of_sha256_in_hex() {
        // SHA-256 of the empty string starts e3b0c442 98fc1c14 9afbf4c8 996fb924
        assert_eq!(
            super::hash_write_key(""),
            "e3b0c44298fc1c149afbf4c8996fb924"
        );
        assert_eq!(super::hash_write_key("wk_1").len(), 32);
    }
}
