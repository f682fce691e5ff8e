//! Group commit: one writer thread owns the ingest connection. Requests hand it
//! their rows and wait; the thread takes every request that is waiting, writes
//! them all in one transaction (one fsync), then answers each. Throughput thus
//! grows with concurrency instead of collapsing to one fsync per request, and
//! no request is answered before its own rows are durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::store::events::{self, EventRow, InsertOutcome};
use crate::store::{disk_size, Store};

/// Most rows one transaction takes before the waiting requests get answered.
const MAX_ROWS_PER_COMMIT: usize = 20_000;
/// Requests that may wait for the writer; beyond this, handlers wait to enqueue.
const QUEUE_DEPTH: usize = 1024;

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
}

impl Committer {
    /// Starts the writer thread on its own connection.
    pub fn start(store: &Store, max_size: u64) -> anyhow::Result<(Committer, JoinHandle<()>)> {
        let conn = store.connect()?;
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let health = Arc::new(StoreHealth::default());
        let writer = Writer {
            conn,
            path: store.path.clone(),
            max_size,
            health: health.clone(),
        };
        health.refresh_size(&writer.path, max_size);
        let handle = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || writer.run(receiver))?;
        Ok((Committer { sender, health }, handle))
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
    path: PathBuf,
    max_size: u64,
    health: Arc<StoreHealth>,
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
            for (request, result) in group.into_iter().zip(results) {
                // The requester may have gone (client hung up); its rows are
                // committed all the same.
                let _ = request.reply.send(result);
            }
            self.health.refresh_size(&self.path, self.max_size);
        }
    }

    /// Writes every request of a group in one transaction. Each request sits
    /// in a savepoint, so one failing request does not fail the others.
    fn write_group(&mut self, group: &[CommitRequest]) -> Vec<Result<InsertOutcome, String>> {
        let mut attempt = || -> rusqlite::Result<Vec<Result<InsertOutcome, String>>> {
            let mut tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut results = Vec::with_capacity(group.len());
            for request in group {
                let sp = tx.savepoint()?;
                match events::insert(&sp, &request.rows) {
                    Ok(outcome) => {
                        sp.commit()?;
                        results.push(Ok(outcome));
                    }
                    Err(e) => {
                        // dropping the savepoint rolls it back
                        results.push(Err(e.to_string()));
                    }
                }
            }
            tx.commit()?;
            Ok(results)
        };
        match attempt() {
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
}

impl Committer {
    /// Takes the write lock and commits nothing: proves the writer is alive and
    /// the file can be locked for writing. Used by `/healthz`.
    pub async fn probe(&self) -> Result<(), String> {
        self.commit(Vec::new()).await.map(|_| ())
    }
}
