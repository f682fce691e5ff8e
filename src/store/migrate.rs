//! Schema migrations: numbered `.sql` files in `migrations/`, embedded in the
//! binary, applied in order, each in its own transaction together with its row
//! in `schema_migrations`, so a crash mid-migration leaves the previous schema.

use anyhow::Context;
use rusqlite::Connection;

/// Every migration, in order. The number is the file's prefix.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "0001_events.sql",
        include_str!("../../migrations/0001_events.sql"),
    ),
    (
        2,
        "0002_deliveries.sql",
        include_str!("../../migrations/0002_deliveries.sql"),
    ),
    (
        3,
        "0003_audiences.sql",
        include_str!("../../migrations/0003_audiences.sql"),
    ),
    (
        4,
        "0004_dedupe_keys.sql",
        include_str!("../../migrations/0004_dedupe_keys.sql"),
    ),
    (
        5,
        "0005_delivery_indexes.sql",
        include_str!("../../migrations/0005_delivery_indexes.sql"),
    ),
];

/// Applies the migrations the database does not have yet; returns their names.
pub fn apply(conn: &mut Connection) -> anyhow::Result<Vec<&'static str>> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TEXT NOT NULL
         )",
    )?;
    let current: i64 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if let Some(latest) = MIGRATIONS.last() {
        if current > latest.0 {
            anyhow::bail!(
                "the database is at schema version {current}, newer than this binary knows ({}); \
                 upgrade schematic-sync",
                latest.0
            );
        }
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {name} failed"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, name, super::now_text()],
        )?;
        tx.commit()?;
        applied.push(name);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_embedded_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS.iter().map(|m| m.1.to_string()).collect();
        assert_eq!(files, embedded);
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
            assert!(name.starts_with(&format!("{version:04}_")), "{name}");
        }
    }
}
