//! Retention (SPEC 8): delivered and superseded deliveries, and the events no
//! delivery needs any more, are deleted once older than `store.retention`, a
//! small batch per transaction so ingest never waits long for the write lock.
//! Failed deliveries stay until replayed or purged. Freed pages go back to
//! the file system through incremental vacuum.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use crate::store::time_text;

/// Rows per delete transaction.
pub const BATCH: usize = 1000;

/// Pause between two of retention's transactions, so that a writer waiting
/// for the lock (polling every 100 µs, `store::poll_lock`) gets it between
/// them. While a purge of 2 GB was being given back to the file system,
/// back-to-back runs of back-to-back steps left so little room that a
/// drain pass failed with "database is locked" after 10 s, five times.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

fn let_others_write() {
    std::thread::sleep(PAUSE);
}

/// What one retention run deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub deliveries: usize,
    pub events: usize,
    pub freed_pages: i64,
}

/// Deletes everything past retention, batch by batch.
pub fn sweep(conn: &mut Connection, cutoff: DateTime<Utc>) -> rusqlite::Result<Swept> {
    let cutoff = time_text(cutoff);
    let mut swept = Swept::default();
    loop {
        let n = conn.execute(
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE state = 'delivered' AND delivered_at < ?1
                 ORDER BY delivered_at LIMIT ?2)",
            params![cutoff, BATCH as i64],
        )?;
        swept.deliveries += n;
        if n < BATCH {
            break;
        }
        let_others_write();
    }
    loop {
        let n = conn.execute(
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries INDEXED BY deliveries_superseded
                 WHERE state = 'superseded' AND created_at < ?1 LIMIT ?2)",
            params![cutoff, BATCH as i64],
        )?;
        swept.deliveries += n;
        if n < BATCH {
            break;
        }
        let_others_write();
    }
    // Events arrive in id order, so every event older than the cutoff has an
    // id below the first one that is not; walking from the oldest id stops
    // there instead of scanning the whole table.
    let boundary: i64 = conn
        .query_row(
            "SELECT id FROM events WHERE received_at >= ?1 ORDER BY id LIMIT 1",
            [&cutoff],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(i64::MAX);
    // The newest event is never deleted: `events.id` has no AUTOINCREMENT, so
    // an empty table would hand out ids again from 1, below the last id the
    // ingest writer's deduplication has read (`dedupe::Dedupe::begin`), and
    // rows another process stored with those ids would go unseen.
    let newest: i64 =
        conn.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))?;
    let boundary = boundary.min(newest);
    loop {
        let n = conn.execute(
            "DELETE FROM events WHERE id IN (
                 SELECT e.id FROM events e
                 WHERE e.id < ?1 AND e.received_at < ?2 AND e.status != 'received'
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
                 ORDER BY e.id LIMIT ?3)",
            params![boundary, cutoff, BATCH as i64],
        )?;
        swept.events += n;
        if n < BATCH {
            break;
        }
        let_others_write();
    }
    swept.freed_pages = vacuum_free_pages(conn)?;
    Ok(swept)
}

/// Pages moved per incremental-vacuum step: each step is its own short
/// transaction, so ingest's commits slip in between.
const VACUUM_STEP: i64 = 256;
/// Time one retention run may spend giving pages back. Moving a page costs
/// about 0.4 ms, so a run returns some 40 MB; a large purge shrinks the file
/// over several runs, and freed pages are reused meanwhile.
const VACUUM_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives free pages back to the file system, a step at a time, within
/// `VACUUM_BUDGET`. Returns the pages given back.
pub fn vacuum_free_pages(conn: &Connection) -> rusqlite::Result<i64> {
    let started = std::time::Instant::now();
    let free_before: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let mut free = free_before;
    while free > 0 && started.elapsed() < VACUUM_BUDGET {
        // the pragma moves one page per step of its statement: step it to
        // the end so one short transaction moves the whole step
        let mut stmt = conn.prepare(&format!(
            "PRAGMA incremental_vacuum({})",
            free.min(VACUUM_STEP)
        ))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        // checkpoint as we go, so the moved pages do not pile up in the WAL
        let (busy, log, done): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        tracing::debug!(busy, log, done, "checkpoint after a vacuum step");
        let now: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        if now >= free {
            break;
        }
        free = now;
        let_others_write();
    }
    Ok(free_before - free)
}

/// `purge --failed --before T`: deletes failed deliveries whose last attempt
/// (or creation) is older than `before`. Returns how many.
pub fn purge_failed(conn: &mut Connection, before: DateTime<Utc>) -> rusqlite::Result<usize> {
    let before = time_text(before);
    let mut total = 0;
    loop {
        let n = conn.execute(
            "DELETE FROM deliveries WHERE id IN (
                 SELECT id FROM deliveries WHERE state = 'failed'
                   AND coalesce(last_attempt_at, created_at) < ?1 LIMIT ?2)",
            params![before, BATCH as i64],
        )?;
        total += n;
        if n < BATCH {
            break;
        }
        let_others_write();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::deliveries::{self, AttemptRecord, NewDelivery, Resolution};
    use crate::store::events::{self, EventRow};

    #[test]
    fn another_writer_gets_in_while_retention_deletes() {
        let (_dir, store, mut conn) = crate::store::temp_store();
        // 200,000 delivered rows past retention: 200 delete transactions
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
             INSERT INTO deliveries (kind, state, next_attempt_at, idempotency_key, payload,
                                     audience_key, user_id, created_at, delivered_at)
             SELECT 'identify', 'delivered', '2020-01-01T00:00:00.000Z', 'k' || i, '{}',
                    'a', 'u' || i, '2020-01-01T00:00:00.000Z', '2020-01-01T00:00:00.000Z'
             FROM n;",
        )
        .unwrap();
        let sweep = std::thread::spawn(move || {
            let swept = sweep(&mut conn, Utc::now()).unwrap();
            (swept, std::time::Instant::now())
        });
        // a writer arriving meanwhile commits before retention is done
        std::thread::sleep(std::time::Duration::from_millis(50));
        let other = store.connect().unwrap();
        other
            .execute(
                "INSERT INTO worker_state (key, value, updated_at) VALUES ('t', 'v', 'now')",
                [],
            )
            .unwrap();
        let written = std::time::Instant::now();
        let (swept, done) = sweep.join().unwrap();
        assert_eq!(swept.deliveries, 200_000);
        assert!(written < done, "the writer waited for the whole sweep");
    }

    #[test]
    fn sweep_keeps_failed_and_recent_rows() {
        let (_dir, _, mut conn) = crate::store::temp_store();
        let old = Utc::now() - chrono::Duration::days(10);
        let row = |id: &str, at: DateTime<Utc>| EventRow::for_test(id, "track", at);
        let mut dedupe = crate::store::dedupe::Dedupe::new(std::time::Duration::from_secs(60));
        events::insert_committed(
            &mut conn,
            &mut dedupe,
            &[
                row("old-ok", old),
                row("old-failed", old),
                row("new", Utc::now()),
            ],
        )
        .unwrap();
        conn.execute("UPDATE events SET status = 'mapped'", [])
            .unwrap();
        let ids: Vec<i64> = (1..=3).collect();
        let news: Vec<NewDelivery> = ids
            .iter()
            .map(|id| NewDelivery {
                kind: "track",
                idempotency_key: format!("k{id}"),
                payload: Some("{}".into()),
                error: None,
                event_id: Some(*id),
                mapping: Some("m".into()),
                audience_key: None,
                user_id: None,
                sync_run_id: None,
            })
            .collect();
        deliveries::insert(&conn, &news, old).unwrap();
        let claimed = deliveries::claim(&conn, Utc::now(), Utc::now(), Utc::now(), 10).unwrap();
        assert_eq!(claimed.len(), 3);
        let rec = |id: i64, resolution: Resolution, at: DateTime<Utc>| AttemptRecord {
            delivery_id: id,
            resolution,
            attempted_at: at,
            status: Some(200),
            error: None,
            response: None,
            duration_ms: 1,
        };
        deliveries::record(
            &mut conn,
            &[
                rec(1, Resolution::Delivered, old),
                rec(2, Resolution::Failed, old),
                rec(3, Resolution::Delivered, Utc::now()),
            ],
        )
        .unwrap();
        let swept = sweep(&mut conn, Utc::now() - chrono::Duration::days(7)).unwrap();
        assert_eq!((swept.deliveries, swept.events), (1, 1));
        let left: Vec<String> = conn
            .prepare("SELECT message_id FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, vec!["old-failed", "new"]);
        assert_eq!(purge_failed(&mut conn, Utc::now()).unwrap(), 1);
        let swept = sweep(&mut conn, Utc::now() - chrono::Duration::days(7)).unwrap();
        assert_eq!(
            swept.events, 1,
            "the failed row's event goes once the row is purged"
        );
        let free: i64 = conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(free, 0, "freed pages are given back to the file system");
    }
}
