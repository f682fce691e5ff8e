//! Audience syncs (SPEC 5): turn the difference between the desired and the
//! synced membership into identify deliveries. The diff runs in SQL over the
//! partial index of changed pairs, a chunk at a time, and each chunk's
//! deliveries and its `synced` updates commit together, so an interrupted
//! sync leaves a consistent state and the next run picks up the rest.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::schematic::event::{format_sent_at, IdentifyBody, SchematicEvent};
use crate::store::audiences::{self, MemberChange};
use crate::store::deliveries::{self, NewDelivery};
use crate::store::time_text;

/// Pairs per transaction.
const CHUNK: usize = 5000;

/// SQLite page cache for the connection while it syncs, KiB. A chunk dirties
/// about a thousand pages (deliveries, audience_members and their indexes);
/// with the default cache (2 MiB) they spill to the WAL before the commit and
/// are read back. The previous size is restored when the sync ends.
const SYNC_CACHE_KIB: i64 = 16 * 1024;

/// The identify that sets one audience trait of one user.
pub fn membership_event(
    user_key: &str,
    user_id: &str,
    trait_name: &str,
    member: bool,
    now: DateTime<Utc>,
) -> SchematicEvent {
    let mut keys = BTreeMap::new();
    keys.insert(user_key.to_string(), user_id.to_string());
    let mut traits = Map::new();
    traits.insert(trait_name.to_string(), Value::Bool(member));
    SchematicEvent::identify(
        format_sent_at(now),
        IdentifyBody {
            keys,
            name: None,
            traits: Some(traits),
            company: None,
        },
    )
}

/// Stable for (audience, user, value, sync run): a retried or replayed
/// delivery keeps it; a later run sending the same value gets a new one.
///
/// `aud_<run>_<user prefix>-<hash>`, at most 95 characters: the run in hex
/// led by its digit count less one (one hex digit), the first 16 bytes of the
/// user id in hex, and 40 hex digits of SHA-256 over audience, user, value
/// and run, which make the key unique. The first two parts put keys in the
/// order a sync enqueues them (runs in id order, each run's pairs in
/// `user_id` order: hex keeps byte order and `-` sorts below every hex
/// digit), so the unique index on `deliveries.idempotency_key` grows at its
/// end. With a random key each of a million inserts lands on a random page
/// of that index, and every chunk's commit rewrites thousands of its pages.
pub fn audience_idempotency_key(audience: &str, user_id: &str, member: bool, run: i64) -> String {
    let mut h = Sha256::new();
    for part in [
        audience.as_bytes(),
        user_id.as_bytes(),
        if member { b"1" } else { b"0" },
    ] {
        h.update(part);
        h.update([0u8]);
    }
    h.update(run.to_be_bytes());
    let run_hex = format!("{run:x}");
    let prefix = &user_id.as_bytes()[..user_id.len().min(KEY_USER_PREFIX)];
    let mut key = String::with_capacity(6 + run_hex.len() + 2 * prefix.len() + 1 + 40);
    key.push_str("aud_");
    key.push(char::from_digit(run_hex.len() as u32 - 1, 16).unwrap_or('f'));
    key.push_str(&run_hex);
    key.push('_');
    crate::store::push_hex(&mut key, prefix);
    key.push('-');
    crate::store::push_hex(&mut key, &h.finalize()[..20]);
    key
}

/// Bytes of the user id that lead an audience idempotency key.
const KEY_USER_PREFIX: usize = 16;

/// What a sync of one audience did (or, dry, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncOutcome {
    pub audience: String,
    pub run_id: Option<i64>,
    pub added: i64,
    pub removed: i64,
    pub enqueued: i64,
    pub sample_added: Vec<String>,
    pub sample_removed: Vec<String>,
}

/// Counts and samples of what a sync would send; changes nothing.
pub fn dry_run(conn: &Connection, audience: &str, full: bool) -> anyhow::Result<SyncOutcome> {
    let (added, removed) = if full {
        conn.query_row(
            "SELECT coalesce(sum(desired = 1), 0), coalesce(sum(desired = 0 AND synced IS NOT NULL), 0)
             FROM audience_members WHERE audience_key = ?1",
            [audience],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
    } else {
        audiences::diff_counts(conn, audience)?
    };
    Ok(SyncOutcome {
        audience: audience.to_string(),
        run_id: None,
        added,
        removed,
        enqueued: 0,
        sample_added: audiences::diff_sample(conn, audience, true, 5)?,
        sample_removed: audiences::diff_sample(conn, audience, false, 5)?,
    })
}

/// Runs one sync of one audience: enqueues an identify per changed pair
/// (every pair with a state with `full`), newest value superseding older
/// undelivered ones, and records the run in `sync_runs`.
pub fn sync(
    conn: &mut Connection,
    audience: &str,
    user_key: &str,
    full: bool,
) -> anyhow::Result<SyncOutcome> {
    let started = Utc::now();
    let trait_name = audiences::trait_name_of(conn, audience)?.ok_or_else(|| {
        anyhow::anyhow!("unknown audience {audience:?}: see `schematic-sync audiences list`")
    })?;
    let run = audiences::start_run(conn, audience, full, started)?;
    let mut outcome = SyncOutcome {
        audience: audience.to_string(),
        run_id: Some(run),
        ..Default::default()
    };
    let cache_before: i64 = conn.query_row("PRAGMA cache_size", [], |r| r.get(0))?;
    conn.execute_batch(&format!("PRAGMA cache_size = -{SYNC_CACHE_KIB}"))?;
    let result = (|| -> anyhow::Result<()> {
        let mut after: Option<String> = None;
        loop {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let key = full.then(|| after.clone().unwrap_or_default());
            let chunk = audiences::changes(&tx, audience, key.as_deref(), CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            let now = Utc::now();
            let now_text = time_text(now);
            let (mut added, mut removed) = (0i64, 0i64);
            let mut rows = Vec::with_capacity(chunk.len());
            for MemberChange {
                user_id,
                member,
                synced,
            } in &chunk
            {
                if *member {
                    added += 1
                } else {
                    removed += 1
                }
                // A pair never synced has no earlier delivery to supersede.
                if synced.is_some() {
                    audiences::supersede_pair(&tx, audience, user_id)?;
                }
                let event = membership_event(user_key, user_id, &trait_name, *member, now);
                rows.push(NewDelivery {
                    kind: "identify",
                    idempotency_key: audience_idempotency_key(audience, user_id, *member, run),
                    payload: Some(serde_json::to_string(&event)?),
                    error: None,
                    event_id: None,
                    mapping: None,
                    audience_key: Some(audience.to_string()),
                    user_id: Some(user_id.clone()),
                    sync_run_id: Some(run),
                });
            }
            audiences::mark_chunk_synced(&tx, audience, full, &chunk, &now_text)?;
            let enqueued = deliveries::insert(&tx, &rows, now)? as i64;
            audiences::add_to_run(&tx, run, added, removed, enqueued)?;
            tx.commit()?;
            outcome.added += added;
            outcome.removed += removed;
            outcome.enqueued += enqueued;
            if outcome.sample_added.len() < 5 || outcome.sample_removed.len() < 5 {
                for c in &chunk {
                    let sample = if c.member {
                        &mut outcome.sample_added
                    } else {
                        &mut outcome.sample_removed
                    };
                    if sample.len() < 5 {
                        sample.push(c.user_id.clone());
                    }
                }
            }
            after = chunk.last().map(|c| c.user_id.clone());
        }
        Ok(())
    })();
    let restored = conn.execute_batch(&format!("PRAGMA cache_size = {cache_before}"));
    let error = result.as_ref().err().map(|e| format!("{e:#}"));
    audiences::finish_run(conn, run, audience, error.as_deref(), Utc::now())?;
    result?;
    restored?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_event_is_an_identify_with_one_boolean_trait() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = membership_event("userId", "u1", "high_value_users", false, now);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type": "identify", "sent_at": "2024-05-01T10:00:00.000Z",
                               "body": {"keys": {"userId": "u1"}, "traits": {"high_value_users": false}}})
        );
    }

    #[test]
    fn idempotency_keys_differ_by_value_and_run_only() {
        let a = audience_idempotency_key("aud", "u", true, 1);
        assert_eq!(a, audience_idempotency_key("aud", "u", true, 1));
        assert_ne!(a, audience_idempotency_key("aud", "u", false, 1));
        assert_ne!(a, audience_idempotency_key("aud", "u", true, 2));
        assert!(a.len() <= 255);
        let long = "x".repeat(300);
        assert_eq!(audience_idempotency_key("aud", &long, true, 1).len(), 80);
        assert_eq!(
            audience_idempotency_key("aud", &long, true, i64::MAX).len(),
            95
        );
        assert_ne!(
            audience_idempotency_key("aud", &long, true, 1),
            audience_idempotency_key("aud", &format!("{long}y"), true, 1),
            "the hash covers the whole user id"
        );
    }

    #[test]
    fn idempotency_keys_sort_in_enqueue_order() {
        // a sync enqueues in (run, user_id) order: the keys follow it, so
        // the unique index on them is appended to
        let users = [
            "a",
            "ab",
            "abc",
            "b",
            "user-0000001",
            "user-0000002",
            "\u{e9}",
        ];
        let mut keys: Vec<String> = [1, 2, 15, 16, 300, 1 << 40]
            .iter()
            .flat_map(|&run| {
                users
                    .iter()
                    .map(move |u| audience_idempotency_key("aud", u, run % 2 == 0, run))
            })
            .collect();
        let enqueued = keys.clone();
        keys.sort();
        assert_eq!(keys, enqueued);
        assert!(enqueued[0].starts_with("aud_01_61-"), "{}", enqueued[0]);
        assert!(enqueued[enqueued.len() - 1].starts_with("aud_a10000000000_"));
    }

    fn store() -> (tempfile::TempDir, Connection) {
        let (dir, _, conn) = crate::store::temp_store();
        (dir, conn)
    }

    fn set(conn: &Connection, user: &str, member: bool) {
        let change = crate::segment::Membership {
            audience_key: "Power Users".into(),
            user_id: user.into(),
            member,
        };
        audiences::record_membership(conn, &change, Utc::now()).unwrap();
    }

    #[test]
    fn sparse_and_dense_chunks_are_marked_alike() {
        let (_dir, mut conn) = store();
        let user = |n: usize| format!("u{n:03}");
        for n in 0..100 {
            set(&conn, &user(n), true);
        }
        // dense: every pair of the range is in the chunk
        let first = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!((first.added, first.removed), (100, 0));
        // sparse: three changes spread over the range of a hundred pairs
        set(&conn, &user(10), false);
        set(&conn, &user(50), false);
        set(&conn, &user(500), true);
        let second = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!((second.added, second.removed), (1, 2));
        assert_eq!(second.sample_removed, vec![user(10), user(50)]);
        let third = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!(third.enqueued, 0, "every pair was marked synced");
        let full = sync(&mut conn, "Power Users", "userId", true).unwrap();
        assert_eq!((full.added, full.removed), (99, 2));
        let synced: Vec<(String, i64)> = conn
            .prepare("SELECT user_id, synced FROM audience_members WHERE desired != synced OR synced IS NULL")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(synced.is_empty(), "{synced:?}");
    }

    #[test]
    fn first_sync_sends_members_later_syncs_only_changes() {
        let (_dir, mut conn) = store();
        set(&conn, "a", true);
        set(&conn, "b", true);
        set(&conn, "c", false); // never a member: nothing to send
        let first = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!((first.added, first.removed, first.enqueued), (2, 0, 2));
        let trait_name: String = conn
            .query_row(
                "SELECT json_extract(payload, '$.body.traits') FROM deliveries LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(trait_name, r#"{"power_users":true}"#);
        let again = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!(again.enqueued, 0, "no change, nothing sent");
        set(&conn, "a", false);
        let dry = dry_run(&conn, "Power Users", false).unwrap();
        assert_eq!(
            (dry.added, dry.removed, dry.sample_removed.clone()),
            (0, 1, vec!["a".to_string()])
        );
        let third = sync(&mut conn, "Power Users", "userId", false).unwrap();
        assert_eq!((third.added, third.removed), (0, 1));
        let full = sync(&mut conn, "Power Users", "userId", true).unwrap();
        assert_eq!(
            (full.added, full.removed),
            (1, 1),
            "full resends b=true and a=false"
        );
        // the undelivered earlier values of a and b were superseded
        let pending: i64 = conn
            .query_row(
                "SELECT count(*) FROM deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(pending, 2);
        let runs = audiences::recent_runs(&conn, 10).unwrap();
        assert_eq!(runs.len(), 4);
        assert!(runs
            .iter()
            .all(|r| r.finished_at.is_some() && r.error.is_none()));
    }
}
