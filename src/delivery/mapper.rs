//! The mapper: turns stored events (`status = 'received'`) into deliveries,
//! one per matching mapping, in the same transaction that marks the event
//! `mapped`, `skipped` or `membership`. Ingest stays a plain insert, and a
//! crash between the two steps loses nothing: the event is still `received`.

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ingest::commit::IngestActivity;
use crate::mapping::{map_message, Mapping};
use crate::store::deliveries::{self, NewDelivery, ReceivedEvent};

/// Events mapped per transaction.
const CHUNK: usize = 1000;

/// The idempotency key of an event mapping: stable for (write key, messageId,
/// mapping), whatever the number of retries and replays.
pub fn event_idempotency_key(write_key_hash: &str, message_id: &str, mapping: &str) -> String {
    let mut h = Sha256::new();
    for part in [write_key_hash, message_id, mapping] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let mut key = String::with_capacity(44);
    key.push_str("evt_");
    crate::store::push_hex(&mut key, &h.finalize()[..20]);
    key
}

/// What one mapping run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapReport {
    pub events: usize,
    pub deliveries: usize,
    pub invalid: usize,
    pub skipped: usize,
    pub memberships: usize,
}

/// What one received event becomes, decided before the write lock is taken.
enum Outcome {
    Membership(crate::segment::Membership),
    Skipped,
    Mapped(Vec<NewDelivery>),
}

/// Maps one stored event with the mappings: pure, no store access.
fn map_event(event: &ReceivedEvent, mappings: &[Mapping]) -> anyhow::Result<Outcome> {
    let raw: Value = serde_json::from_str(&event.raw).unwrap_or(Value::Null);
    // checked at ingest; a stored message whose membership part is somehow
    // invalid is mapped like any other event
    if let Ok(Some(change)) = crate::segment::stored_membership(&raw) {
        return Ok(Outcome::Membership(change));
    }
    let mapped = map_message(mappings, &raw);
    if mapped.is_empty() {
        return Ok(Outcome::Skipped);
    }
    let mut rows = Vec::with_capacity(mapped.len());
    for m in mapped {
        let idempotency_key =
            event_idempotency_key(&event.write_key, &event.message_id, &m.mapping);
        let (kind, payload, error) = match m.result {
            Ok(schematic_event) => (
                schematic_event.kind.as_str(),
                Some(serde_json::to_string(&schematic_event)?),
                None,
            ),
            Err(reason) => {
                let kind = mappings
                    .iter()
                    .find(|x| x.name == m.mapping)
                    .map_or("track", |x| x.action.as_str());
                (kind, None, Some(format!("mapping failed: {reason}")))
            }
        };
        rows.push(NewDelivery {
            kind,
            idempotency_key,
            payload,
            error,
            event_id: Some(event.id),
            mapping: Some(m.mapping),
            audience_key: None,
            user_id: None,
            sync_run_id: None,
        });
    }
    Ok(Outcome::Mapped(rows))
}

/// Maps every received event, oldest first. Events are read and mapped
/// without the write lock; the lock is held only to write the results, so
/// ingest's group commits wait as little as possible. An event another
/// mapper (a `drain` next to `serve`) filed meanwhile is left alone.
///
/// With `yield_to`, each chunk is followed by a pause as long as the chunk
/// took while ingest is busy, so that under a burst the mapper takes at most
/// half of a core from the requests waiting to be acknowledged; it catches
/// up once the burst is over.
pub fn map_received(
    conn: &mut Connection,
    mappings: &[Mapping],
    now: DateTime<Utc>,
    yield_to: Option<&IngestActivity>,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<MapReport> {
    let mut report = MapReport::default();
    let mut after = 0i64;
    // a stop ends the pass between chunks; the rest waits for the next pass
    while !stop() {
        let started = std::time::Instant::now();
        let events = deliveries::received_events(conn, after, CHUNK)?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.id;
        let outcomes = events
            .iter()
            .map(|e| map_event(e, mappings))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut rows = Vec::new();
        for (event, outcome) in events.iter().zip(outcomes) {
            let status = match &outcome {
                Outcome::Membership(_) => "membership",
                Outcome::Skipped => "skipped",
                Outcome::Mapped(_) => "mapped",
            };
            if !deliveries::file_event(&tx, event.id, status)? {
                continue;
            }
            report.events += 1;
            match outcome {
                Outcome::Membership(change) => {
                    crate::store::audiences::record_membership(&tx, &change, now)?;
                    report.memberships += 1;
                }
                Outcome::Skipped => report.skipped += 1,
                Outcome::Mapped(mut deliveries) => {
                    report.invalid += deliveries.iter().filter(|d| d.payload.is_none()).count();
                    rows.append(&mut deliveries);
                }
            }
        }
        report.deliveries += deliveries::insert(&tx, &rows, now)?;
        tx.commit()?;
        if yield_to.is_some_and(IngestActivity::busy) {
            std::thread::sleep(started.elapsed());
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::store::dedupe::Dedupe;
    use crate::store::events::{self, EventRow};

    fn track(i: usize) -> EventRow {
        EventRow::for_test(&format!("m{i}"), "track", Utc::now())
    }

    #[test]
    fn a_stop_ends_the_pass_between_chunks_and_the_next_pass_maps_the_rest() {
        let (_dir, _, mut conn) = crate::store::temp_store();
        let rows: Vec<EventRow> = (0..CHUNK * 5 / 2).map(track).collect();
        let mut dedupe = Dedupe::new(Duration::from_secs(3600));
        events::insert_committed(&mut conn, &mut dedupe, &rows).unwrap();
        let mappings = Config::default().compiled_mappings().unwrap();
        let received = |conn: &Connection| -> i64 {
            conn.query_row(
                "SELECT count(*) FROM events WHERE status = 'received'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };

        // the stop turns true after the first chunk (a shutdown mid-pass)
        let checks = Cell::new(0);
        let stop = || {
            checks.set(checks.get() + 1);
            checks.get() > 1
        };
        let report = map_received(&mut conn, &mappings, Utc::now(), None, &stop).unwrap();
        assert_eq!(report.events, CHUNK);
        assert_eq!(received(&conn), (CHUNK * 3 / 2) as i64);

        let report = map_received(&mut conn, &mappings, Utc::now(), None, &|| false).unwrap();
        assert_eq!(report.events, CHUNK * 3 / 2);
        assert_eq!(received(&conn), 0);
        let deliveries: i64 = conn
            .query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            deliveries,
            (CHUNK * 5 / 2) as i64,
            "one track delivery per event"
        );
    }
}
