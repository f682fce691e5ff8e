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
