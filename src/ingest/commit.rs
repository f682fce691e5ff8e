//! Group commit: one writer thread owns the ingest connection. Requests hand it
//! their rows and wait; the thread takes every request that is waiting, writes
//! them all in one transaction (one fsync), then answers each. Throughput thus
//! grows with concurrency instead of collapsing to one fsync per request, and
//! no request is answered before its own rows are durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::dedupe::Dedupe;
use crate::store::events::{self, EventRow, InsertOutcome};
use crate::store::{disk_size, Store};

/// Most rows one transaction takes before the waiting requests get answered.
const MAX_ROWS_PER_COMMIT: usize = 20_000;
/// Requests that may wait for the writer; beyond this, handlers wait to enqueue.
const QUEUE_DEPTH: usize = 1024;
/// Page cache of the writer's connection, in KiB. The writer only appends
/// (to `events` and its id-ordered indexes), so it needs the right-hand
/// edge of each B-tree and the pages of one group: a group of 20,000 rows
/// is about 6,000 pages. (It was 32 MiB while a unique index on random
/// messageIds had inserts landing all over it.)
pub const WRITER_CACHE_KIB: i64 = 8 * 1024;
/// WAL pages after which a commit of the writer checkpoints (SQLite's default
/// is 1,000). A group commit writes a few thousand pages, so the default
/// checkpointed after nearly every group, copying the same hot index pages
/// into the database file (and syncing it) again and again. The checkpointer
/// thread (below) normally has copied all but the last few groups by then,
/// so this is the fallback that keeps the WAL from growing when it lags.
pub const WRITER_WAL_AUTOCHECKPOINT: i64 = 10_000;

/// How often the checkpointer thread copies committed WAL pages into the
/// database file. Done on its own connection (a PASSIVE checkpoint never
/// blocks the writer), copying and syncing the database file no longer
/// stalls a group commit: with it the writer's 40 MB checkpoints (100-200 ms
/// every second or so under load) left the request path; on the bench,
/// p99 latency went from 164-170 ms to 104-121 ms.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Settings of the ingest writer's connection on top of `Store::connect`'s,
/// read back like those. Public so that benchmarks can compare the daemon
/// with a connection set up the same way.
pub fn tune_writer(conn: &Connection) -> anyhow::Result<()> {
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_WAL_AUTOCHECKPOINT)?;
    let cache: i64 = conn.query_row("PRAGMA cache_size", [], |r| r.get(0))?;
    if cache != -WRITER_CACHE_KIB {
        anyhow::bail!("cache_size = -{WRITER_CACHE_KIB} did not take: reads back {cache}");
    }
    let checkpoint: i64 = conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?;
    if checkpoint != WRITER_WAL_AUTOCHECKPOINT {
        anyhow::bail!(
            "wal_autocheckpoint = {WRITER_WAL_AUTOCHECKPOINT} did not take: reads back {checkpoint}"
        );
    }
    Ok(())
}

/// Whether ingest may take writes, shared with the HTTP handlers, `/healthz`
/// and the task that watches the file size.
#[derive(Debug, Default)]
pub struct StoreHealth {
    over_max_size: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl StoreHealth {
    /// Why ingest must answer 503 before even trying, if it must.
    pub fn refusal(&self) -> Option<String> {
        self.over_max_size().then(|| {
            "the database is larger than store.max_size; let deliveries drain or purge \
             failed rows before sending more"
                .to_string()
        })
    }

    pub fn over_max_size(&self) -> bool {
        self.over_max_size.load(Ordering::Relaxed)
    }

    /// The last commit error, cleared by the next successful commit.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn record(&self, result: Result<(), &str>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = result.err().map(str::to_string);
        }
    }

    /// Compares the file size with `store.max_size`; called after commits and
    /// on a timer, so ingest resumes once retention shrinks the file.
    pub fn refresh_size(&self, path: &Path, max_size: u64) {
        let over = disk_size(path) > max_size;
        let was = self.over_max_size.swap(over, Ordering::Relaxed);
        if over && !was {
            tracing::warn!(
                max_size,
                "database is over store.max_size; ingest answers 503 until it shrinks"
            );
        } else if was && !over {
            tracing::info!("database is under store.max_size again; ingest resumes");
        }
    }
}

/// When ingest last committed, so that background work (the mapper) can
/// give way to it under load: acknowledging messages comes first, mapping
/// them can wait a few seconds.
#[derive(Debug)]
pub struct IngestActivity {
    origin: std::time::Instant,
    last_commit_ms: std::sync::atomic::AtomicU64,
    /// Deduplication keys the writer holds in memory, for `/metrics`.
    dedupe_keys: std::sync::atomic::AtomicU64,
}

/// Ingest counts as busy for this long after a commit.
const BUSY_FOR: Duration = Duration::from_millis(250);

impl Default for IngestActivity {
    fn default() -> Self {
        IngestActivity {
            origin: std::time::Instant::now(),
            last_commit_ms: std::sync::atomic::AtomicU64::new(0),
            dedupe_keys: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl IngestActivity {
    fn committed(&self) {
        // +1 so that a commit in the first millisecond is not "never"
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.last_commit_ms.store(ms, Ordering::Relaxed);
    }

    /// Deduplication keys held in memory (about 10-21 bytes each).
    pub fn dedupe_keys(&self) -> u64 {
        self.dedupe_keys.load(Ordering::Relaxed)
    }

    fn set_dedupe_keys(&self, n: usize) {
        self.dedupe_keys.store(n as u64, Ordering::Relaxed);
    }

    /// Whether ingest committed rows in the last `BUSY_FOR`.
    pub fn busy(&self) -> bool {
        let last = self.last_commit_ms.load(Ordering::Relaxed);
        last != 0
            && self.origin.elapsed().as_millis() as u64 + 1 - last < BUSY_FOR.as_millis() as u64
    }
}

struct CommitRequest {
    rows: Vec<EventRow>,
    reply: oneshot::Sender<Result<InsertOutcome, String>>,
}

/// The handle handlers use; cloning is cheap. When every handle is dropped the
/// writer finishes what it holds and its thread ends.
#[derive(Clone)]
pub struct Committer {
    sender: mpsc::Sender<CommitRequest>,
    pub health: Arc<StoreHealth>,
    pub activity: Arc<IngestActivity>,
}

impl Committer {
    /// Starts the writer thread on its own connection, after reading the
    /// deduplication keys of the last `dedupe_window` (`store.retention`).
    pub fn start(
        store: &Store,
        max_size: u64,
        dedupe_window: Duration,
    ) -> anyhow::Result<(Committer, JoinHandle<()>)> {
        let conn = store.connect()?;
        tune_writer(&conn).context("cannot configure the ingest writer's connection")?;
        let started = Instant::now();
        let (dedupe, loaded) = Dedupe::load(&conn, dedupe_window, Utc::now())
            .context("cannot read the deduplication keys of stored events")?;
        tracing::info!(
            keys = loaded.keys,
            filled = loaded.backfilled,
            ms = started.elapsed().as_millis() as u64,
            "deduplication keys loaded"
        );
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let health = Arc::new(StoreHealth::default());
        let activity = Arc::new(IngestActivity::default());
        activity.set_dedupe_keys(loaded.keys);
        let writer = Writer {
            conn,
            activity: activity.clone(),
            dedupe,
            path: store.path.clone(),
            max_size,
            health: health.clone(),
            _checkpointer: Some(Checkpointer::start(store)?),
        };
        health.refresh_size(&writer.path, max_size);
        let handle = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || writer.run(receiver))?;
        Ok((
            Committer {
                sender,
                health,
                activity,
            },
            handle,
        ))
    }

    /// Stores the rows and returns once they are committed.
    pub async fn commit(&self, rows: Vec<EventRow>) -> Result<InsertOutcome, String> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(CommitRequest { rows, reply })
            .await
            .map_err(|_| "the store writer has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the store writer stopped before committing".to_string())?
    }
}

struct Writer {
    conn: Connection,
    activity: Arc<IngestActivity>,
    dedupe: Dedupe,
    path: PathBuf,
    max_size: u64,
    health: Arc<StoreHealth>,
    /// Runs as long as the writer does (stopped and joined when it is dropped).
    _checkpointer: Option<Checkpointer>,
}

/// A thread that checkpoints the WAL every `CHECKPOINT_EVERY` on its own
/// connection, so that the writer's commits do not wait for the database file
/// to be written and synced. PASSIVE: it copies what no reader still needs
/// and never takes the write lock; with nothing to copy it costs one read of
/// the WAL index.
struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn start(store: &Store) -> anyhow::Result<Checkpointer> {
        let conn = store
            .connect()
            .context("cannot open the checkpointer's connection")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                let mut failing = false;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::park_timeout(CHECKPOINT_EVERY);
                    let result = conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
                    // logged once per run of failures (the writer reports
                    // what matters: whether commits succeed)
                    match result {
                        Err(e) if !failing => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                            failing = true;
                        }
                        Err(_) => {}
                        Ok(_) => failing = false,
                    }
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<CommitRequest>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut group = vec![first];
            let mut rows = group[0].rows.len();
            while rows < MAX_ROWS_PER_COMMIT {
                match receiver.try_recv() {
                    Ok(next) => {
                        rows += next.rows.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            let results = self.write_group(&group);
            if rows > 0 {
                self.activity.committed();
                self.activity.set_dedupe_keys(self.dedupe.len());
            }
            for (request, result) in group.into_iter().zip(results) {
                // The requester may have gone (client hung up); its rows are
                // committed all the same.
                let _ = request.reply.send(result);
            }
            self.health.refresh_size(&self.path, self.max_size);
        }
    }

    /// Writes every request of a group in one transaction. Usually no request
    /// fails and they are written straight in; if one fails, the transaction
    /// is rolled back and the group written again with each request in its
    /// own savepoint, so one failing request does not fail the others.
    /// (Savepoints on every group are not free: each page already changed in
    /// the transaction is copied to a statement journal when a request first
    /// touches it again, and that journal spills to a temporary file past
    /// 64 KiB.)
    fn write_group(&mut self, group: &[CommitRequest]) -> Vec<Result<InsertOutcome, String>> {
        let outcome = match self.write_straight(group) {
            Ok(Some(results)) => Ok(results),
            Ok(None) => self.write_isolated(group),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(results) => {
                self.health.record(Ok(()));
                results
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "commit failed; requests answered 503");
                self.health.record(Err(&message));
                group.iter().map(|_| Err(message.clone())).collect()
            }
        }
    }

    /// The whole group in one transaction without savepoints; `Ok(None)` when
    /// a request failed (its transaction is then rolled back, nothing stored).
    fn write_straight(
        &mut self,
        group: &[CommitRequest],
    ) -> rusqlite::Result<Option<Vec<Result<InsertOutcome, String>>>> {
        let now = Utc::now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.dedupe.begin(&tx, now)?;
        let mut results = Vec::with_capacity(group.len());
        for request in group {
            match events::insert(&tx, &mut self.dedupe, &request.rows) {
                Ok(outcome) => results.push(Ok(outcome)),
                // dropping the transaction rolls it back (and the next
                // `begin` forgets what it staged)
                Err(_) => return Ok(None),
            }
        }
        tx.commit()?;
        self.dedupe.commit(now);
        Ok(Some(results))
    }

    /// The group again, each request in a savepoint: a failing request is
    /// answered with its error and the others are committed.
    fn write_isolated(
        &mut self,
        group: &[CommitRequest],
    ) -> rusqlite::Result<Vec<Result<InsertOutcome, String>>> {
        let now = Utc::now();
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.dedupe.begin(&tx, now)?;
        let mut results = Vec::with_capacity(group.len());
        for request in group {
            let mark = self.dedupe.mark();
            let sp = tx.savepoint()?;
            match events::insert(&sp, &mut self.dedupe, &request.rows) {
                Ok(outcome) => {
                    sp.commit()?;
                    results.push(Ok(outcome));
                }
                Err(e) => {
                    // dropping the savepoint rolls it back
                    self.dedupe.rollback_to(mark);
                    results.push(Err(e.to_string()));
                }
            }
        }
        tx.commit()?;
        self.dedupe.commit(now);
        Ok(results)
    }
}

impl Committer {
    /// Takes the write lock and commits nothing: proves the writer is alive and
    /// the file can be locked for writing. Used by `/healthz`.
    pub async fn probe(&self) -> Result<(), String> {
        self.commit(Vec::new()).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(message_id: &str, kind: &'static str) -> EventRow {
        EventRow::for_test(message_id, kind, Utc::now())
    }

    fn request(rows: Vec<EventRow>) -> CommitRequest {
        CommitRequest {
            rows,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn ingest_is_busy_only_shortly_after_a_commit() {
        let activity = IngestActivity::default();
        assert!(!activity.busy(), "no commit yet");
        activity.committed();
        assert!(activity.busy());
        std::thread::sleep(BUSY_FOR + Duration::from_millis(20));
        assert!(!activity.busy());
    }

    #[test]
    fn a_failing_request_fails_alone_and_the_rest_of_its_group_is_stored() {
        let (_dir, store, _) = crate::store::temp_store();
        let conn = store.connect().unwrap();
        tune_writer(&conn).unwrap();
        let mut writer = Writer {
            conn,
            activity: Arc::new(IngestActivity::default()),
            dedupe: Dedupe::new(Duration::from_secs(3600)),
            path: store.path.clone(),
            max_size: u64::MAX,
            health: Arc::new(StoreHealth::default()),
            _checkpointer: None,
        };
        let group = [
            request(vec![row("a", "track"), row("b", "track")]),
            // the CHECK on events.type fails on the second row
            request(vec![row("c", "track"), row("d", "bogus")]),
            request(vec![row("a", "track"), row("e", "identify")]),
        ];
        let results = writer.write_group(&group);
        let stored = |stored, duplicates| Ok(InsertOutcome { stored, duplicates });
        assert_eq!(results[0], stored(2, 0));
        assert!(results[1].is_err(), "{:?}", results[1]);
        assert_eq!(results[2], stored(1, 1));
        let ids = |writer: &Writer| -> Vec<String> {
            let mut stmt = writer
                .conn
                .prepare("SELECT message_id FROM events ORDER BY id")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(ids(&writer), ["a", "b", "e"]);

        // a group without failures is written straight, in order
        let results = writer.write_group(&[
            request(vec![row("f", "track")]),
            request(vec![row("g", "group"), row("f", "track")]),
        ]);
        assert_eq!(results, [stored(1, 0), stored(1, 1)]);
        assert_eq!(ids(&writer), ["a", "b", "e", "f", "g"]);
        assert!(writer.health.last_error().is_none());
    }
}
