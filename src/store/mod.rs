//! The store: the one module that talks SQL. It opens the SQLite file with the
//! pragmas SPEC section 8 asks for (and reads each back, because SQLite ignores
//! a pragma it cannot apply without saying so), runs the migrations, and offers
//! small functions per table in its submodules.

pub mod audiences;
pub mod dedupe;
pub mod deliveries;
pub mod events;
pub mod migrate;
pub mod retention;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::Connection;

use crate::config::{StoreConfig, Synchronous};

/// Size the WAL file is truncated to after a checkpoint (64 MiB).
pub const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// How long a connection waits for another writer before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection retries the write lock while another holds it.
const LOCK_POLL: Duration = Duration::from_micros(100);

/// Every connection's busy handler, in place of `busy_timeout`'s: SQLite's
/// own sleeps 1, 2, 5, 10, 15, 20, 25 ms... between tries, so an ingest
/// group waiting behind a 20 ms mapper transaction lost another 10-30 ms
/// after the lock was free (every request in it waiting as long), and a
/// waiter could sleep through every gap between another writer's short
/// transactions. Polling every 100 µs gives up after the same
/// `BUSY_TIMEOUT` in all.
fn poll_lock(attempt: i32) -> bool {
    std::thread::sleep(LOCK_POLL);
    u128::try_from(attempt).unwrap_or(0) < BUSY_TIMEOUT.as_micros() / LOCK_POLL.as_micros()
}

/// Opens connections to one database file with the same settings every time.
#[derive(Debug, Clone)]
pub struct Store {
    pub path: PathBuf,
    pub synchronous: Synchronous,
}

impl Store {
    pub fn new(config: &StoreConfig) -> Store {
        Store {
            path: config.path.clone(),
            synchronous: config.synchronous,
        }
    }

    /// Opens the database (creating it and its folder on first use), checks
    /// the pragmas and applies pending migrations.
    pub fn open_and_migrate(&self) -> anyhow::Result<Connection> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the folder of store.path {}", dir.display())
            })?;
        }
        let mut conn = self.connect()?;
        let applied = migrate::apply(&mut conn)
            .with_context(|| format!("cannot migrate the database {}", self.path.display()))?;
        for name in applied {
            tracing::info!(migration = name, "applied migration");
        }
        Ok(conn)
    }

    /// A new connection with the pragmas set and verified.
    pub fn connect(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open(&self.path)
            .with_context(|| format!("cannot open the database {}", self.path.display()))?;
        configure(&conn, self.synchronous)
            .with_context(|| format!("cannot configure the database {}", self.path.display()))?;
        Ok(conn)
    }
}

fn configure(conn: &Connection, synchronous: Synchronous) -> anyhow::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let busy: i64 = conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0))?;
    if busy != BUSY_TIMEOUT.as_millis() as i64 {
        anyhow::bail!("busy_timeout did not take: reads back {busy}");
    }
    // Same limit, shorter naps (see `poll_lock`); replaces the handler that
    // busy_timeout installed, once the setting has been checked.
    conn.busy_handler(Some(poll_lock))?;
    // auto_vacuum only takes effect on a database without tables; it lets the
    // retention job give freed pages back to the file system.
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if tables == 0 {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    }
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!(
            "journal_mode WAL did not take: reads back {mode:?} (is the file on a network share?)"
        );
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}",
        synchronous.pragma_value()
    ))?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync != synchronous.pragma_value() {
        anyhow::bail!("synchronous = {synchronous:?} did not take: reads back {sync}");
    }
    // After a checkpoint resets the WAL, truncate its file to this size, so a
    // burst (a big purge, a vacuum) does not leave a huge WAL file behind.
    let limit: i64 = conn.query_row(
        &format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"),
        [],
        |r| r.get(0),
    )?;
    if limit != WAL_SIZE_LIMIT {
        anyhow::bail!("journal_size_limit did not take: reads back {limit}");
    }
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    if fk != 1 {
        anyhow::bail!("foreign_keys did not take");
    }
    Ok(())
}

/// Times are stored as ISO 8601 UTC text with milliseconds, which sorts and
/// compares correctly as text and reads well at the `sqlite3` prompt.
/// Appends `bytes` as lowercase hex digits (keys and hashes; runs for every
/// stored row, so no `format!` per byte).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

pub fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn now_text() -> String {
    time_text(Utc::now())
}

/// Bytes the database occupies on disk: the main file plus its WAL.
pub fn disk_size(path: &Path) -> u64 {
    let main = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut wal_path = path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal = std::fs::metadata(PathBuf::from(wal_path))
        .map(|m| m.len())
        .unwrap_or(0);
    main + wal
}

/// A migrated store in a new temporary folder, for unit tests: the folder
/// lives as long as the returned guard.
#[cfg(test)]
pub fn temp_store() -> (tempfile::TempDir, Store, Connection) {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let store = Store {
        path: dir.path().join("test.db"),
        synchronous: Synchronous::Normal,
    };
    let conn = store
        .open_and_migrate()
        .expect("open and migrate the test store");
    (dir, store, conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_sets_and_verifies_pragmas_and_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            path: dir.path().join("sub/x.db"),
            synchronous: Synchronous::Full,
        };
        let conn = store.open_and_migrate().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let av: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(av, 2, "incremental auto_vacuum");
        let versions: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions as usize, migrate::MIGRATIONS.len());
        drop(conn);
        // a second open applies nothing new
        let mut conn = store.connect().unwrap();
        assert!(migrate::apply(&mut conn).unwrap().is_empty());
    }

    #[test]
    fn time_text_has_millis_and_z() {
        let t = DateTime::parse_from_rfc3339("2023-01-01T01:00:00+01:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time_text(t), "2023-01-01T00:00:00.000Z");
    }
}
