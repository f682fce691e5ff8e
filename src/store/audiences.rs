//! SQL for `audiences`, `audience_members` and `sync_runs`: the desired
//! membership of each (audience, user) and the state last synced.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use crate::mapping::name::trait_name;
use crate::segment::Membership;
use crate::store::time_text;

/// Creates the audience on first sight.
pub fn ensure_audience(conn: &Connection, key: &str, now: DateTime<Utc>) -> rusqlite::Result<()> {
    let name = trait_name(key).unwrap_or_else(|| key.to_string());
    conn.prepare_cached(
        "INSERT INTO audiences (key, trait_name, first_seen_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO NOTHING",
    )?
    .execute(params![key, name, time_text(now)])?;
    Ok(())
}

/// Records the desired state from an Engage message; the latest message wins.
pub fn record_membership(
    conn: &Connection,
    change: &Membership,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    ensure_audience(conn, &change.audience_key, now)?;
    conn.prepare_cached(
        "INSERT INTO audience_members (audience_key, user_id, desired, desired_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (audience_key, user_id) DO UPDATE SET desired = excluded.desired, desired_at = excluded.desired_at",
    )?
    .execute(params![change.audience_key, change.user_id, change.member as i64, time_text(now)])?;
    Ok(())
}

/// A pair whose desired state differs from the synced one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberChange {
    pub user_id: String,
    pub member: bool,
    /// The value last synced, if any (`None`: never synced).
    pub synced: Option<bool>,
}

/// The next `limit` pairs of an audience to send, walking the partial index
/// `audience_members_changed` (named with `INDEXED BY`: left to itself the
/// planner walks the primary key instead, which visits every pair synced so
/// far on each chunk, quadratic over a sync). With `after` (keyset) for
/// `--full`, every pair that has a state worth sending is returned instead.
pub fn changes(
    conn: &Connection,
    audience: &str,
    full_after: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<MemberChange>> {
    let sql = match full_after {
        None => {
            "SELECT user_id, desired, synced FROM audience_members INDEXED BY audience_members_changed
             WHERE audience_key = ?1 AND ((desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))
             ORDER BY user_id LIMIT ?2"
        }
        Some(_) => {
            "SELECT user_id, desired, synced FROM audience_members
             WHERE audience_key = ?1 AND user_id > ?3 AND (desired = 1 OR synced IS NOT NULL)
             ORDER BY user_id LIMIT ?2"
        }
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let map = |r: &rusqlite::Row<'_>| {
        Ok(MemberChange {
            user_id: r.get(0)?,
            member: r.get::<_, i64>(1)? == 1,
            synced: r.get::<_, Option<i64>>(2)?.map(|s| s == 1),
        })
    };
    let rows = match full_after {
        None => stmt.query_map(params![audience, limit as i64], map)?,
        Some(after) => stmt.query_map(params![audience, limit as i64, after], map)?,
    };
    rows.collect()
}

/// Marks a pair synced at `member`.
pub fn mark_synced(
    conn: &Connection,
    audience: &str,
    user_id: &str,
    member: bool,
    now: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE audience_members SET synced = ?3, synced_at = ?4 WHERE audience_key = ?1 AND user_id = ?2",
    )?
    .execute(params![audience, user_id, member as i64, now])?;
    Ok(())
}

/// Marks a chunk that `changes` returned synced at its desired state. The
/// chunk is a prefix, in `user_id` order, of the pairs matching its filter
/// (the caller read it in the same write transaction), so in its range of
/// user ids exactly its pairs match. A dense range (a first sync, a big
/// change) is updated by one statement walking the primary key; a range that
/// also spans many pairs not in the chunk (a few changes spread over a big
/// audience) is updated pair by pair instead, so the cost stays in proportion
/// to the chunk either way.
pub fn mark_chunk_synced(
    conn: &Connection,
    audience: &str,
    full: bool,
    chunk: &[MemberChange],
    now: &str,
) -> rusqlite::Result<()> {
    let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
        return Ok(());
    };
    let dense_limit = 2 * chunk.len();
    let span: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM (SELECT 1 FROM audience_members
             WHERE audience_key = ?1 AND user_id BETWEEN ?2 AND ?3 LIMIT ?4)",
        )?
        .query_row(
            params![
                audience,
                first.user_id,
                last.user_id,
                dense_limit as i64 + 1
            ],
            |r| r.get(0),
        )?;
    if span as usize > dense_limit {
        for c in chunk {
            mark_synced(conn, audience, &c.user_id, c.member, now)?;
        }
        return Ok(());
    }
    let sql = if full {
        "UPDATE audience_members NOT INDEXED SET synced = desired, synced_at = ?4
         WHERE audience_key = ?1 AND user_id BETWEEN ?2 AND ?3
           AND (desired = 1 OR synced IS NOT NULL)"
    } else {
        "UPDATE audience_members NOT INDEXED SET synced = desired, synced_at = ?4
         WHERE audience_key = ?1 AND user_id BETWEEN ?2 AND ?3
           AND ((desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))"
    };
    let marked =
        conn.prepare_cached(sql)?
            .execute(params![audience, first.user_id, last.user_id, now])?;
    if marked != chunk.len() {
        // not the chunk that was read: roll the transaction back
        return Err(rusqlite::Error::StatementChangedRows(marked));
    }
    Ok(())
}

/// Supersedes every undelivered delivery of a pair (pending or failed); one
/// in flight is superseded when its answer comes back (see `deliveries::record`).
pub fn supersede_pair(conn: &Connection, audience: &str, user_id: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE deliveries SET state = 'superseded', lease_until = NULL
         WHERE audience_key = ?1 AND user_id = ?2 AND state IN ('pending', 'failed')",
    )?
    .execute(params![audience, user_id])
}

/// Counts of what a sync would send: (added, removed).
pub fn diff_counts(conn: &Connection, audience: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(
        "SELECT coalesce(sum(desired = 1), 0), coalesce(sum(desired = 0), 0)
         FROM audience_members INDEXED BY audience_members_changed
         WHERE audience_key = ?1 AND ((desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))",
        [audience],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// A few users of each side of the diff, for `--dry-run`.
pub fn diff_sample(
    conn: &Connection,
    audience: &str,
    member: bool,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM audience_members INDEXED BY audience_members_changed
         WHERE audience_key = ?1 AND desired = ?2
           AND ((desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))
         ORDER BY user_id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![audience, member as i64, limit as i64], |r| r.get(0))?;
    rows.collect()
}

/// An audience as `audiences list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AudienceSummary {
    pub key: String,
    pub trait_name: String,
    pub members: i64,
    pub pending_additions: i64,
    pub pending_removals: i64,
    pub first_seen_at: String,
    pub last_synced_at: Option<String>,
}

pub fn list(conn: &Connection) -> rusqlite::Result<Vec<AudienceSummary>> {
    let mut stmt = conn.prepare(
        "SELECT a.key, a.trait_name, a.first_seen_at, a.last_synced_at,
                (SELECT count(*) FROM audience_members m WHERE m.audience_key = a.key AND m.desired = 1)
         FROM audiences a ORDER BY a.key",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AudienceSummary {
            key: r.get(0)?,
            trait_name: r.get(1)?,
            first_seen_at: r.get(2)?,
            last_synced_at: r.get(3)?,
            members: r.get(4)?,
            pending_additions: 0,
            pending_removals: 0,
        })
    })?;
    let mut out: Vec<AudienceSummary> = rows.collect::<rusqlite::Result<_>>()?;
    for a in &mut out {
        let (added, removed) = diff_counts(conn, &a.key)?;
        a.pending_additions = added;
        a.pending_removals = removed;
    }
    Ok(out)
}

pub fn audience_keys(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT key FROM audiences ORDER BY key")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

pub fn trait_name_of(conn: &Connection, audience: &str) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT trait_name FROM audiences WHERE key = ?1",
        [audience],
        |r| r.get(0),
    )
    .optional()
}

/// Starts a `sync_runs` row; returns its id.
pub fn start_run(
    conn: &Connection,
    audience: &str,
    full: bool,
    now: DateTime<Utc>,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO sync_runs (audience, started_at, full) VALUES (?1, ?2, ?3)",
        params![audience, time_text(now), full as i64],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Adds a chunk's counts to a run.
pub fn add_to_run(
    conn: &Connection,
    run: i64,
    added: i64,
    removed: i64,
    enqueued: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE sync_runs SET added = added + ?2, removed = removed + ?3, enqueued = enqueued + ?4 WHERE id = ?1",
    )?
    .execute(params![run, added, removed, enqueued])?;
    Ok(())
}

pub fn finish_run(
    conn: &Connection,
    run: i64,
    audience: &str,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    let now = time_text(now);
    conn.execute(
        "UPDATE sync_runs SET finished_at = ?2, error = ?3 WHERE id = ?1",
        params![run, now, error],
    )?;
    if error.is_none() {
        conn.execute(
            "UPDATE audiences SET last_synced_at = ?2 WHERE key = ?1",
            params![audience, now],
        )?;
    }
    Ok(())
}

/// A row of `sync_runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncRun {
    pub id: i64,
    pub audience: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub added: i64,
    pub removed: i64,
    pub enqueued: i64,
    pub full: bool,
    pub error: Option<String>,
}

const SYNC_RUN_COLUMNS: &str =
    "id, audience, started_at, finished_at, added, removed, enqueued, full, error";

fn sync_run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SyncRun> {
    Ok(SyncRun {
        id: r.get(0)?,
        audience: r.get(1)?,
        started_at: r.get(2)?,
        finished_at: r.get(3)?,
        added: r.get(4)?,
        removed: r.get(5)?,
        enqueued: r.get(6)?,
        full: r.get::<_, i64>(7)? == 1,
        error: r.get(8)?,
    })
}

pub fn recent_runs(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<SyncRun>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {SYNC_RUN_COLUMNS} FROM sync_runs ORDER BY id DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit as i64], sync_run_row)?;
    rows.collect()
}

/// The latest finished run of each audience.
pub fn last_run_per_audience(conn: &Connection) -> rusqlite::Result<Vec<SyncRun>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {SYNC_RUN_COLUMNS} FROM sync_runs
         WHERE id IN (SELECT max(id) FROM sync_runs WHERE finished_at IS NOT NULL GROUP BY audience)"
    ))?;
    let rows = stmt.query_map([], sync_run_row)?;
    rows.collect()
}

/// Snapshot import, step 1: a temporary table of the snapshot's users. It is
/// filled in file order with no index (each line an append) and indexed once,
/// by a sort, when complete (`snapshot_size`, `apply_snapshot`): a unique
/// index kept while filling costs a random B-tree insert per line whenever
/// the export is not sorted by user id, which spills the temporary page cache
/// to disk long before a million users.
pub fn begin_snapshot(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "DROP TABLE IF EXISTS temp.snapshot;
         CREATE TEMP TABLE snapshot (user_id TEXT NOT NULL);",
    )
}

pub fn add_to_snapshot(conn: &Connection, user_ids: &[String]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("INSERT INTO temp.snapshot (user_id) VALUES (?1)")?;
    for id in user_ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// Indexes the complete snapshot (once; a line listed twice counts once).
fn index_snapshot(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("CREATE INDEX IF NOT EXISTS temp.snapshot_user ON snapshot (user_id)")
}

/// Distinct users in the snapshot.
pub fn snapshot_size(conn: &Connection) -> rusqlite::Result<i64> {
    index_snapshot(conn)?;
    conn.query_row(
        "SELECT count(*) FROM (SELECT DISTINCT user_id FROM temp.snapshot)",
        [],
        |r| r.get(0),
    )
}

/// Snapshot import, step 2: the snapshot becomes the desired membership of
/// the audience; users absent from it become non-members. Returns (users
/// who became members, users who stopped being members).
pub fn apply_snapshot(
    conn: &Connection,
    audience: &str,
    now: DateTime<Utc>,
) -> rusqlite::Result<(usize, usize)> {
    ensure_audience(conn, audience, now)?;
    index_snapshot(conn)?;
    let now = time_text(now);
    // in user id order (the index), so members are inserted in key order; a
    // user listed twice finds itself already a member the second time
    let joined = conn.execute(
        "INSERT INTO audience_members (audience_key, user_id, desired, desired_at)
         SELECT ?1, user_id, 1, ?2 FROM temp.snapshot WHERE true ORDER BY user_id
         ON CONFLICT (audience_key, user_id) DO UPDATE SET desired = 1, desired_at = excluded.desired_at
         WHERE desired = 0",
        params![audience, now],
    )?;
    let left = conn.execute(
        "UPDATE audience_members SET desired = 0, desired_at = ?2
         WHERE audience_key = ?1 AND desired = 1
           AND NOT EXISTS (SELECT 1 FROM temp.snapshot s WHERE s.user_id = audience_members.user_id)",
        params![audience, now],
    )?;
    conn.execute_batch("DROP TABLE IF EXISTS temp.snapshot")?;
    Ok((joined, left))
}
