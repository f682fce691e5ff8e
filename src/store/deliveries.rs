//! SQL for `deliveries`, `delivery_attempts` and `worker_state`: creating
//! deliveries from mapped events, claiming due ones under a lease, recording
//! what Schematic answered, and the operator's views (status, failed, replay).

use chrono::{DateTime, Utc};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use crate::store::time_text;

/// A delivery to create.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub kind: &'static str,
    pub idempotency_key: String,
    /// `None` when mapping failed; the delivery is then created `failed`.
    pub payload: Option<String>,
    pub error: Option<String>,
    pub event_id: Option<i64>,
    pub mapping: Option<String>,
    pub audience_key: Option<String>,
    pub user_id: Option<String>,
    pub sync_run_id: Option<i64>,
}

/// Inserts deliveries; an audience delivery whose idempotency key is already
/// present is left alone. (An event's deliveries are created once: the
/// mapper files an event only while it is still `received`, in the same
/// transaction.) Returns how many rows were created.
pub fn insert(
    conn: &Connection,
    rows: &[NewDelivery],
    now: DateTime<Utc>,
) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO deliveries (kind, state, next_attempt_at, idempotency_key, payload, last_error,
                                 event_id, mapping, audience_key, user_id, sync_run_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?3)
         ON CONFLICT (idempotency_key) WHERE audience_key IS NOT NULL DO NOTHING",
    )?;
    let now = time_text(now);
    let mut created = 0;
    for d in rows {
        let state = if d.payload.is_some() {
            "pending"
        } else {
            "failed"
        };
        created += stmt.execute(params![
            d.kind,
            state,
            now,
            d.idempotency_key,
            d.payload,
            d.error,
            d.event_id,
            d.mapping,
            d.audience_key,
            d.user_id,
            d.sync_run_id
        ])?;
    }
    Ok(created)
}

/// An event waiting to be mapped.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub id: i64,
    pub message_id: String,
    pub write_key: String,
    pub raw: String,
}

/// The oldest events still in `received` after id `after`, in arrival order.
pub fn received_events(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<ReceivedEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, message_id, write_key, raw FROM events
         WHERE status = 'received' AND id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok(ReceivedEvent {
            id: r.get(0)?,
            message_id: r.get(1)?,
            write_key: r.get(2)?,
            raw: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Moves an event out of `received`; false when another mapper already did.
pub fn file_event(conn: &Connection, event_id: i64, status: &str) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached("UPDATE events SET status = ?2 WHERE id = ?1 AND status = 'received'")?
        .execute(params![event_id, status])?;
    Ok(n == 1)
}

/// A delivery the worker holds under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub idempotency_key: String,
    pub payload: String,
    pub attempts: u32,
    pub first_attempt_at: Option<String>,
    pub audience_key: Option<String>,
    pub user_id: Option<String>,
}

/// Makes deliveries whose lease expired (the worker crashed) due again. An
/// audience value whose pair has a newer delivery is superseded instead, as
/// `record` does when an answer comes back: back in `pending` it would be
/// claimed together with the newer value (the in-flight check of `claim`
/// sees neither in flight) and sent alongside it, so the stale value could
/// land last (SPEC 5, newest wins).
pub fn release_expired_leases(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE deliveries SET lease_until = NULL,
             state = CASE WHEN audience_key IS NOT NULL AND EXISTS (
                              SELECT 1 FROM deliveries AS n
                              WHERE n.audience_key = deliveries.audience_key
                                AND n.user_id = deliveries.user_id AND n.id > deliveries.id)
                          THEN 'superseded' ELSE 'pending' END
         WHERE state = 'in_flight' AND lease_until < ?1",
    )?
    .execute([time_text(now)])
}

/// Claims up to `limit` due deliveries in `next_attempt_at` order, in one
/// statement that walks the `deliveries_due` index. An audience pair with a
/// delivery already in flight is skipped, so two values for one (audience,
/// user) are never in flight together. So is a pair whose older value's last
/// request got no answer (timeout, dropped connection) after `fence_since`:
/// Schematic may still be processing that request, and the newer value must
/// not land before it.
pub fn claim(
    conn: &Connection,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    fence_since: DateTime<Utc>,
    limit: usize,
) -> rusqlite::Result<Vec<ClaimedDelivery>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE deliveries SET state = 'in_flight', lease_until = ?2
         WHERE id IN (
             SELECT id FROM deliveries AS d
             WHERE d.state = 'pending' AND d.next_attempt_at <= ?1
               AND (d.audience_key IS NULL OR NOT EXISTS (
                     SELECT 1 FROM deliveries AS f
                     WHERE f.audience_key = d.audience_key AND f.user_id = d.user_id
                       AND (f.state = 'in_flight'
                            OR (f.id < d.id AND f.last_status IS NULL
                                AND f.last_error IS NOT NULL AND f.last_attempt_at > ?4))))
             ORDER BY d.next_attempt_at, d.id
             LIMIT ?3)
         RETURNING id, idempotency_key, payload, attempts, first_attempt_at, audience_key, user_id",
    )?;
    let rows = stmt.query_map(
        params![
            time_text(now),
            time_text(lease_until),
            limit as i64,
            time_text(fence_since)
        ],
        |r| {
            Ok(ClaimedDelivery {
                id: r.get(0)?,
                idempotency_key: r.get(1)?,
                payload: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                attempts: r.get(3)?,
                first_attempt_at: r.get(4)?,
                audience_key: r.get(5)?,
                user_id: r.get(6)?,
            })
        },
    )?;
    let mut claimed: Vec<ClaimedDelivery> = rows.collect::<rusqlite::Result<_>>()?;
    claimed.sort_by_key(|d| d.id);
    Ok(claimed)
}

/// What became of one delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Delivered,
    /// Due again at this time.
    Retry {
        next_attempt_at: DateTime<Utc>,
    },
    Failed,
    /// Back to pending without spending an attempt (paused, or shutting down).
    Release,
    /// An attempt that decided nothing yet (a batch rejected before it was
    /// split): recorded in the history, the row stays in flight.
    Attempted,
}

/// One delivery's result, recorded with its attempt row.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub resolution: Resolution,
    pub attempted_at: DateTime<Utc>,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub response: Option<String>,
    pub duration_ms: u64,
}

/// Records results in one transaction: the state change only applies to rows
/// still `in_flight`, so a row replayed or superseded meanwhile is left alone.
pub fn record(conn: &mut Connection, records: &[AttemptRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut attempt = tx.prepare_cached(
            "INSERT INTO delivery_attempts (delivery_id, attempted_at, status, error, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut update = tx.prepare_cached(
            "UPDATE deliveries SET
                 state = ?2,
                 lease_until = CASE WHEN ?2 = 'in_flight' THEN lease_until END,
                 attempts = attempts + ?3,
                 first_attempt_at = CASE WHEN ?3 = 1 THEN coalesce(first_attempt_at, ?4) ELSE first_attempt_at END,
                 last_attempt_at = CASE WHEN ?3 = 1 THEN ?4 ELSE last_attempt_at END,
                 last_status = CASE WHEN ?3 = 1 THEN ?5 ELSE last_status END,
                 last_error = CASE WHEN ?3 = 1 THEN ?6 ELSE last_error END,
                 last_response = CASE WHEN ?3 = 1 THEN ?7 ELSE last_response END,
                 next_attempt_at = coalesce(?8, next_attempt_at),
                 delivered_at = CASE WHEN ?2 = 'delivered' THEN ?4 ELSE delivered_at END
             WHERE id = ?1 AND state = 'in_flight'",
        )?;
        for r in records {
            let at = time_text(r.attempted_at);
            let (state, spent, next) = match &r.resolution {
                Resolution::Delivered => ("delivered", 1, None),
                Resolution::Retry { next_attempt_at } => {
                    ("pending", 1, Some(time_text(*next_attempt_at)))
                }
                Resolution::Failed => ("failed", 1, None),
                Resolution::Release => ("pending", 0, None),
                Resolution::Attempted => ("in_flight", 1, None),
            };
            update.execute(params![
                r.delivery_id,
                state,
                spent,
                at,
                r.status,
                r.error,
                r.response,
                next
            ])?;
            if spent == 1 {
                attempt.execute(params![
                    r.delivery_id,
                    at,
                    r.status,
                    r.error,
                    r.duration_ms as i64
                ])?;
            }
            if matches!(
                r.resolution,
                Resolution::Retry { .. } | Resolution::Release | Resolution::Failed
            ) {
                // newest wins: a stale audience value that comes back unsent
                // gives way to the newer value of its pair
                supersede_if_stale(&tx, r.delivery_id)?;
            }
        }
    }
    tx.commit()
}

/// Newest wins: an unsent (pending or failed) audience value gives way to
/// any newer delivery of its (audience, user). Returns whether it did. Used
/// when an answer comes back and when a failed row is replayed.
pub fn supersede_if_stale(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'superseded', lease_until = NULL
             WHERE id = ?1 AND state IN ('pending', 'failed') AND audience_key IS NOT NULL
               AND EXISTS (SELECT 1 FROM deliveries AS n
                           WHERE n.audience_key = deliveries.audience_key
                             AND n.user_id = deliveries.user_id AND n.id > deliveries.id)",
        )?
        .execute([id])?;
    Ok(n == 1)
}

/// Counts per state, every state listed even when zero.
pub fn count_by_state(conn: &Connection) -> rusqlite::Result<Vec<(&'static str, i64)>> {
    let mut counts: Vec<(&'static str, i64)> = STATES.iter().map(|s| (*s, 0)).collect();
    let mut stmt = conn.prepare("SELECT state, count(*) FROM deliveries GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (state, n) = row?;
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
            slot.1 = n;
        }
    }
    Ok(counts)
}

pub const STATES: [&str; 5] = ["pending", "in_flight", "delivered", "failed", "superseded"];

/// The `next_attempt_at` of the oldest due delivery, if any is due.
pub fn oldest_due(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT next_attempt_at FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?1
         ORDER BY next_attempt_at, id LIMIT 1",
        [time_text(now)],
        |r| r.get(0),
    )
    .optional()
}

/// The earliest pending `next_attempt_at`, due or not.
pub fn next_due(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT next_attempt_at FROM deliveries WHERE state = 'pending' ORDER BY next_attempt_at, id LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// A row of `failed_deliveries`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedDelivery {
    pub id: i64,
    pub kind: String,
    pub mapping: Option<String>,
    pub message_id: Option<String>,
    pub audience_key: Option<String>,
    pub user_id: Option<String>,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
    pub last_attempt_at: Option<String>,
    pub created_at: String,
}

pub fn failed(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<FailedDelivery>> {
    let mut stmt = conn.prepare(
        "SELECT id, kind, mapping, message_id, audience_key, user_id, attempts, last_status,
                last_error, last_response, last_attempt_at, created_at
         FROM failed_deliveries ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(FailedDelivery {
            id: r.get(0)?,
            kind: r.get(1)?,
            mapping: r.get(2)?,
            message_id: r.get(3)?,
            audience_key: r.get(4)?,
            user_id: r.get(5)?,
            attempts: r.get(6)?,
            last_status: r.get(7)?,
            last_error: r.get(8)?,
            last_response: r.get(9)?,
            last_attempt_at: r.get(10)?,
            created_at: r.get(11)?,
        })
    })?;
    rows.collect()
}

/// Which failed deliveries a replay takes.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub ids: Vec<i64>,
    pub all: bool,
    /// Failed at or after (time of the last attempt, else creation).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub status: Option<u16>,
}

impl ReplayFilter {
    fn where_clause(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value as V;
        let mut clauses = vec!["state = 'failed'".to_string()];
        let mut args: Vec<V> = Vec::new();
        if !self.ids.is_empty() {
            let marks = vec!["?"; self.ids.len()].join(", ");
            clauses.push(format!("id IN ({marks})"));
            args.extend(self.ids.iter().map(|id| V::Integer(*id)));
        }
        if let Some(since) = self.since {
            clauses.push("coalesce(last_attempt_at, created_at) >= ?".into());
            args.push(V::Text(time_text(since)));
        }
        if let Some(until) = self.until {
            clauses.push("coalesce(last_attempt_at, created_at) < ?".into());
            args.push(V::Text(time_text(until)));
        }
        if let Some(status) = self.status {
            clauses.push("last_status = ?".into());
            args.push(V::Integer(status as i64));
        }
        (clauses.join(" AND "), args)
    }
}

/// A failed delivery selected for replay.
#[derive(Debug, Clone)]
pub struct ReplayCandidate {
    pub id: i64,
    pub mapping: Option<String>,
    pub event_raw: Option<String>,
}

pub fn replay_candidates(
    conn: &Connection,
    filter: &ReplayFilter,
) -> rusqlite::Result<Vec<ReplayCandidate>> {
    let (clause, args) = filter.where_clause();
    let sql = format!(
        "SELECT d.id, d.mapping, e.raw
         FROM deliveries d LEFT JOIN events e ON e.id = d.event_id
         WHERE d.id IN (SELECT id FROM deliveries WHERE {clause}) ORDER BY d.id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |r| {
        Ok(ReplayCandidate {
            id: r.get(0)?,
            mapping: r.get(1)?,
            event_raw: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Puts a failed delivery back in the queue with a fresh retry window;
/// `payload` replaces the stored one when given (`--remap`).
pub fn requeue(
    conn: &Connection,
    id: i64,
    payload: Option<&str>,
    now: DateTime<Utc>,
) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'pending', attempts = 0, first_attempt_at = NULL,
                    next_attempt_at = ?2, lease_until = NULL, payload = coalesce(?3, payload)
             WHERE id = ?1 AND state = 'failed' AND coalesce(?3, payload) IS NOT NULL",
        )?
        .execute(params![id, time_text(now), payload])?;
    Ok(n == 1)
}

/// Reads a `worker_state` value.
pub fn worker_state(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM worker_state WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Sets (or with `None` clears) a `worker_state` value.
pub fn set_worker_state(conn: &Connection, key: &str, value: Option<&str>) -> rusqlite::Result<()> {
    match value {
        Some(v) => conn.execute(
            "INSERT INTO worker_state (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            params![key, v, crate::store::now_text()],
        )?,
        None => conn.execute("DELETE FROM worker_state WHERE key = ?1", [key])?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audience_delivery(user: &str, key: &str) -> NewDelivery {
        NewDelivery {
            kind: "identify",
            idempotency_key: key.to_string(),
            payload: Some("{}".to_string()),
            error: None,
            event_id: None,
            mapping: None,
            audience_key: Some("aud".to_string()),
            user_id: Some(user.to_string()),
            sync_run_id: None,
        }
    }

    #[test]
    fn an_expired_stale_audience_value_is_superseded_not_sent_with_the_newer_one() {
        let (_dir, _, conn) = crate::store::temp_store();
        let t0 = Utc::now();
        let later = |s: i64| t0 + chrono::Duration::seconds(s);
        insert(
            &conn,
            &[
                audience_delivery("u", "old"),
                audience_delivery("v", "only"),
            ],
            t0,
        )
        .unwrap();
        // a worker claims both and dies; meanwhile a sync enqueues u's newer value
        assert_eq!(claim(&conn, later(1), later(2), t0, 10).unwrap().len(), 2);
        insert(&conn, &[audience_delivery("u", "new")], later(1)).unwrap();
        assert!(claim(&conn, later(1), later(2), t0, 10).unwrap().is_empty());
        // the leases expire: u's old value gives way, v's only value is due again
        assert_eq!(release_expired_leases(&conn, later(3)).unwrap(), 2);
        let claimed: Vec<String> = claim(&conn, later(3), later(4), t0, 10)
            .unwrap()
            .into_iter()
            .map(|d| d.idempotency_key)
            .collect();
        assert_eq!(claimed, vec!["only".to_string(), "new".to_string()]);
        let old: String = conn
            .query_row(
                "SELECT state FROM deliveries WHERE idempotency_key = 'old'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, "superseded");
    }
}
