//! The mapper: turns stored events (`status = 'received'`) into deliveries,
//! one per matching mapping, in the same transaction that marks the event
//! `mapped`, `skipped` or `membership`. Ingest stays a plain insert, and a
//! crash between the two steps loses nothing: the event is still `received`.

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::mapping::{map_message, Mapping};
use crate::store::deliveries::{self, NewDelivery};

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
    format!("evt_{}", hex(&h.finalize()[..20]))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// Maps every received event, oldest first.
pub fn map_received(
    conn: &mut Connection,
    mappings: &[Mapping],
    now: DateTime<Utc>,
) -> anyhow::Result<MapReport> {
    let mut report = MapReport::default();
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let events = deliveries::received_events(&tx, CHUNK)?;
        if events.is_empty() {
            break;
        }
        let mut rows = Vec::new();
        for event in &events {
            report.events += 1;
            let raw: Value = serde_json::from_str(&event.raw).unwrap_or(Value::Null);
            match crate::segment::stored_membership(&raw) {
                Ok(Some(change)) => {
                    crate::store::audiences::record_membership(&tx, &change, now)?;
                    deliveries::set_event_status(&tx, event.id, "membership")?;
                    report.memberships += 1;
                    continue;
                }
                Ok(None) => {}
                // checked at ingest; a stored message cannot fail here, but if
                // it does it is mapped like any other event
                Err(_) => {}
            }
            let mapped = map_message(mappings, &raw);
            if mapped.is_empty() {
                deliveries::set_event_status(&tx, event.id, "skipped")?;
                report.skipped += 1;
                continue;
            }
            for m in mapped {
                let key = event_idempotency_key(&event.write_key, &event.message_id, &m.mapping);
                let row = match m.result {
                    Ok(schematic_event) => NewDelivery {
                        kind: schematic_event.kind.as_str(),
                        idempotency_key: key,
                        payload: Some(serde_json::to_string(&schematic_event)?),
                        error: None,
                        event_id: Some(event.id),
                        mapping: Some(m.mapping),
                        audience_key: None,
                        user_id: None,
                        sync_run_id: None,
                    },
                    Err(reason) => {
                        report.invalid += 1;
                        let kind = mappings
                            .iter()
                            .find(|x| x.name == m.mapping)
                            .map_or("track", |x| x.action.as_str());
                        NewDelivery {
                            kind,
                            idempotency_key: key,
                            payload: None,
                            error: Some(format!("mapping failed: {reason}")),
                            event_id: Some(event.id),
                            mapping: Some(m.mapping),
                            audience_key: None,
                            user_id: None,
                            sync_run_id: None,
                        }
                    }
                };
                rows.push(row);
            }
            deliveries::set_event_status(&tx, event.id, "mapped")?;
        }
        report.deliveries += deliveries::insert(&tx, &rows, now)?;
        tx.commit()?;
    }
    Ok(report)
}
