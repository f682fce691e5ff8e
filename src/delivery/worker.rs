//! The delivery worker: one drain pass maps new events, claims due deliveries
//! under a lease, sends them in batches (`schematic.concurrency` requests at
//! once, an optional requests-per-second cap), and records each answer with
//! the retry policy of `retry.rs`. A row becomes `delivered` only after a 2xx;
//! a crash at any point leaves rows `pending` or leased, so they are re-sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::Config;
use crate::delivery::mapper::{self, MapReport};
use crate::delivery::retry::{self, AttemptOutcome, RetryDecision};
use crate::ingest::commit::IngestActivity;
use crate::mapping::Mapping;
use crate::schematic::client::{OutgoingEvent, SchematicClient};
use crate::store::deliveries::{self, AttemptRecord, ClaimedDelivery, Resolution};
use crate::store::Store;

/// `worker_state` keys.
pub const PAUSED: &str = "paused";
pub const NOT_BEFORE: &str = "not_before";

/// The delivery settings of SPEC 6 and 9, resolved.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub batch_size: usize,
    pub concurrency: usize,
    pub lease: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_window: Duration,
    pub max_attempts: Option<u32>,
    pub max_requests_per_second: Option<f64>,
}

impl WorkerSettings {
    pub fn from_config(config: &Config) -> WorkerSettings {
        WorkerSettings {
            batch_size: config.schematic.batch_size,
            concurrency: config.schematic.concurrency,
            lease: config.delivery.lease.0,
            backoff_base: config.delivery.backoff_base.0,
            backoff_max: config.delivery.backoff_max.0,
            retry_window: config.delivery.retry_window.0,
            max_attempts: config.delivery.max_attempts,
            max_requests_per_second: config.schematic.max_requests_per_second,
        }
    }
}

/// What one drain pass did.
#[derive(Debug, Default, Clone)]
pub struct DrainReport {
    pub mapped: MapReport,
    pub requests: usize,
    pub delivered: usize,
    pub retried: usize,
    pub failed: usize,
    pub released: usize,
    /// Why sending is paused, when it is.
    pub paused: Option<String>,
    /// A `Retry-After` deadline that stopped the pass.
    pub throttled_until: Option<DateTime<Utc>>,
}

/// Spaces requests out to at most N per second.
struct RateLimiter {
    interval: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// What the concurrent batch senders share.
struct SendContext {
    client: SchematicClient,
    settings: WorkerSettings,
    limiter: Option<RateLimiter>,
    /// No request may start before this (a `Retry-After`).
    gate: Mutex<Option<DateTime<Utc>>>,
}

pub struct Worker {
    conn: Arc<Mutex<Connection>>,
    mappings: Arc<Vec<Mapping>>,
    context: Option<Arc<SendContext>>,
    settings: WorkerSettings,
    /// The ingest of the same process, which the mapper gives way to.
    yield_to: Option<Arc<IngestActivity>>,
}

/// What the senders of one round found besides per-row results.
#[derive(Debug, Default)]
struct RoundFlags {
    paused: Option<String>,
    throttled_until: Option<DateTime<Utc>>,
    any_success: bool,
    requests: usize,
}

impl Worker {
    /// A worker on its own connection. Without an API key it still maps events
    /// but sends nothing, and says so in `worker_state`.
    pub fn new(store: &Store, config: &Config) -> anyhow::Result<Worker> {
        let conn = store.connect()?;
        let settings = WorkerSettings::from_config(config);
        let context = match config.schematic.resolve_api_key() {
            Some(key) => {
                let client = SchematicClient::new(
                    &config.schematic.capture_url,
                    key,
                    config.schematic.timeout.0,
                )?;
                let limiter = settings.max_requests_per_second.map(|rps| RateLimiter {
                    interval: Duration::from_secs_f64(1.0 / rps),
                    next: tokio::sync::Mutex::new(Instant::now()),
                });
                Some(Arc::new(SendContext {
                    client,
                    settings: settings.clone(),
                    limiter,
                    gate: Mutex::new(None),
                }))
            }
            None => None,
        };
        let paused = context.is_none().then(|| {
            format!(
                "no Schematic API key: set the environment variable {} or schematic.api_key",
                config.schematic.api_key_env
            )
        });
        // A new process starts unpaused when it has a key: the first request
        // tells whether the key works.
        deliveries::set_worker_state(&conn, PAUSED, paused.as_deref())?;
        Ok(Worker {
            conn: Arc::new(Mutex::new(conn)),
            mappings: Arc::new(config.compiled_mappings()?),
            context,
            settings,
            yield_to: None,
        })
    }

    /// Makes the mapper give way to this process's ingest under load.
    pub fn yielding_to(mut self, ingest: Arc<IngestActivity>) -> Worker {
        self.yield_to = Some(ingest);
        self
    }

    /// Runs a blocking store operation off the async threads.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("the worker's connection lock is poisoned"))?;
            f(&mut conn)
        })
        .await
        .context("a store task panicked")?
    }

    /// Maps new events into deliveries (no sending).
    pub async fn map_new_events(&self) -> anyhow::Result<MapReport> {
        self.map_until(None).await
    }

    /// Maps new events until none is left or `stop` turns true (checked
    /// between chunks, so a shutdown does not wait for a long backlog).
    async fn map_until(&self, stop: Option<watch::Receiver<bool>>) -> anyhow::Result<MapReport> {
        let mappings = self.mappings.clone();
        let yield_to = self.yield_to.clone();
        self.db(move |c| {
            let stopped = || stop.as_ref().is_some_and(|s| *s.borrow());
            mapper::map_received(c, &mappings, Utc::now(), yield_to.as_deref(), &stopped)
        })
        .await
    }

    /// Rows claimed per round: one batch while probing, else one per sender.
    fn round_limit(&self, probing: bool) -> usize {
        if probing {
            self.settings.batch_size
        } else {
            self.settings.batch_size * self.settings.concurrency
        }
    }

    async fn claim_due(&self, limit: usize) -> anyhow::Result<Vec<ClaimedDelivery>> {
        let lease = self.settings.lease;
        self.db(move |c| claim_due(c, lease, limit)).await
    }

    /// One drain pass: map, then send every due delivery, until none is due,
    /// sending is paused, a `Retry-After` says wait, or `stop` turns true.
    pub async fn drain(&self, stop: &watch::Receiver<bool>) -> anyhow::Result<DrainReport> {
        let mut report = DrainReport {
            mapped: self.map_until(Some(stop.clone())).await?,
            ..Default::default()
        };
        let Some(context) = self.context.clone() else {
            report.paused = self
                .db(|c| Ok(deliveries::worker_state(c, PAUSED)?))
                .await?;
            return Ok(report);
        };
        let (paused, not_before) = self
            .db(|c| {
                Ok((
                    deliveries::worker_state(c, PAUSED)?,
                    deliveries::worker_state(c, NOT_BEFORE)?,
                ))
            })
            .await?;
        if let Some(until) = not_before.as_deref().and_then(crate::segment::parse_time) {
            if until > Utc::now() {
                report.throttled_until = Some(until);
                return Ok(report);
            }
        }
        // While paused, each pass sends one batch as a probe of the key.
        let mut probing = paused.is_some();
        // Pipelined: while round k's requests are out, the store records round
        // k-1 and claims round k+1 (round k's rows stay in flight meanwhile, so
        // nothing is claimed twice). A probe, and a round whose answers pause
        // or throttle sending, is recorded before anything else happens, and
        // the rows claimed ahead are released unsent.
        let mut claimed = if *stop.borrow() {
            Vec::new()
        } else {
            self.claim_due(self.round_limit(probing)).await?
        };
        let mut unrecorded: Vec<AttemptRecord> = Vec::new();
        while !claimed.is_empty() && !*stop.borrow() {
            let mut senders = JoinSet::new();
            for chunk in claimed.chunks(self.settings.batch_size) {
                senders.spawn(send_with_split(context.clone(), chunk.to_vec()));
            }
            claimed.clear();
            let previous = std::mem::take(&mut unrecorded);
            let ahead = (!probing).then(|| self.round_limit(false));
            let lease = self.settings.lease;
            let store_work = self.db(move |c| {
                if !previous.is_empty() {
                    deliveries::record(c, &previous)?;
                }
                match ahead {
                    Some(limit) => claim_due(c, lease, limit),
                    None => Ok(Vec::new()),
                }
            });
            let (joined, next) = tokio::join!(join_senders(senders), store_work);
            let (mut records, flags) = joined?;
            let next = next?;
            tally(&mut report, &records, flags.requests);
            if !probing && flags.paused.is_none() && flags.throttled_until.is_none() {
                unrecorded = records;
                claimed = next;
                continue;
            }
            records.extend(next.iter().map(|d| release(d.id)));
            let paused_reason = flags.paused.clone();
            let throttled = flags.throttled_until;
            let resumed = probing && flags.any_success;
            self.db(move |c| {
                deliveries::record(c, &records)?;
                if let Some(reason) = &paused_reason {
                    deliveries::set_worker_state(c, PAUSED, Some(reason))?;
                } else if resumed {
                    deliveries::set_worker_state(c, PAUSED, None)?;
                }
                if let Some(until) = throttled {
                    deliveries::set_worker_state(
                        c,
                        NOT_BEFORE,
                        Some(&crate::store::time_text(until)),
                    )?;
                }
                Ok(())
            })
            .await?;
            if let Some(reason) = flags.paused {
                if !probing {
                    tracing::error!(reason = %reason, "sending paused: deliveries stay pending until the API key works");
                }
                report.paused = Some(reason);
                break;
            }
            if resumed {
                tracing::info!("the API key works again: sending resumed");
                probing = false;
            }
            if let Some(until) = throttled {
                tracing::warn!(until = %until, "Schematic asked to wait (Retry-After); no request before then");
                report.throttled_until = Some(until);
                break;
            }
            if !*stop.borrow() {
                claimed = self.claim_due(self.round_limit(probing)).await?;
            }
        }
        // The last round's results, and rows claimed ahead but not sent (stop).
        let mut leftover = unrecorded;
        leftover.extend(claimed.iter().map(|d| release(d.id)));
        if !leftover.is_empty() {
            self.db(move |c| Ok(deliveries::record(c, &leftover)?))
                .await?;
        }
        Ok(report)
    }
}

/// Makes expired leases due again, then claims up to `limit` due rows.
fn claim_due(
    c: &mut Connection,
    lease: Duration,
    limit: usize,
) -> anyhow::Result<Vec<ClaimedDelivery>> {
    let now = Utc::now();
    let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
    deliveries::release_expired_leases(c, now)?;
    // an unanswered audience request fences its pair for one lease
    Ok(deliveries::claim(c, now, now + lease, now - lease, limit)?)
}

/// Waits for a round's batch senders: their records and merged flags.
async fn join_senders(
    mut senders: JoinSet<(Vec<AttemptRecord>, RoundFlags)>,
) -> anyhow::Result<(Vec<AttemptRecord>, RoundFlags)> {
    let mut records = Vec::new();
    let mut flags = RoundFlags::default();
    while let Some(joined) = senders.join_next().await {
        let (batch_records, batch_flags) = joined.context("a batch sender panicked")?;
        records.extend(batch_records);
        flags.requests += batch_flags.requests;
        flags.any_success |= batch_flags.any_success;
        flags.paused = flags.paused.or(batch_flags.paused);
        flags.throttled_until = flags.throttled_until.max(batch_flags.throttled_until);
    }
    Ok((records, flags))
}

fn tally(report: &mut DrainReport, records: &[AttemptRecord], requests: usize) {
    report.requests += requests;
    let before = (report.delivered, report.retried, report.failed);
    for r in records {
        match r.resolution {
            Resolution::Delivered => report.delivered += 1,
            Resolution::Retry { .. } => report.retried += 1,
            Resolution::Failed => report.failed += 1,
            Resolution::Release => report.released += 1,
            Resolution::Attempted => {}
        }
    }
    let spent = records
        .iter()
        .filter(|r| r.resolution != Resolution::Release)
        .count();
    metrics::counter!(crate::metrics::DELIVERIES_SENT).increment(spent as u64);
    metrics::counter!(crate::metrics::DELIVERIES_DELIVERED)
        .increment((report.delivered - before.0) as u64);
    metrics::counter!(crate::metrics::DELIVERIES_RETRIED)
        .increment((report.retried - before.1) as u64);
    metrics::counter!(crate::metrics::DELIVERIES_FAILED)
        .increment((report.failed - before.2) as u64);
}

/// Sends one claimed batch. A 400/413/422 splits it in halves until the bad
/// event is alone, so one bad event never fails the good ones.
async fn send_with_split(
    ctx: Arc<SendContext>,
    batch: Vec<ClaimedDelivery>,
) -> (Vec<AttemptRecord>, RoundFlags) {
    let mut records = Vec::with_capacity(batch.len());
    let mut flags = RoundFlags::default();
    let mut stack = vec![batch];
    while let Some(batch) = stack.pop() {
        let gate = ctx.gate.lock().ok().and_then(|g| *g);
        if flags.paused.is_some() || gate.is_some_and(|g| g > Utc::now()) {
            records.extend(batch.iter().map(|d| release(d.id)));
            continue;
        }
        if let Some(limiter) = &ctx.limiter {
            limiter.wait().await;
        }
        let events: Vec<OutgoingEvent<'_>> = batch
            .iter()
            .map(|d| OutgoingEvent {
                idempotency_key: &d.idempotency_key,
                payload: &d.payload,
            })
            .collect();
        let result = ctx.client.send(&events).await;
        flags.requests += 1;
        metrics::histogram!(crate::metrics::REQUEST_DURATION).record(result.duration.as_secs_f64());
        let now = Utc::now();
        let status = match &result.outcome {
            AttemptOutcome::Status { code, .. } => Some(*code),
            _ => None,
        };
        let error = match &result.outcome {
            AttemptOutcome::Status { code, .. } if (200..300).contains(code) => None,
            AttemptOutcome::Status { code, .. } => Some(format!("Schematic answered HTTP {code}")),
            AttemptOutcome::Timeout => Some(format!(
                "no answer within {:?} (schematic.timeout)",
                result.duration
            )),
            AttemptOutcome::Connection(e) => Some(format!("connection error: {e}")),
        };
        let record = |id: i64, resolution: Resolution| AttemptRecord {
            delivery_id: id,
            resolution,
            attempted_at: now,
            status,
            error: error.clone(),
            response: result.response.clone(),
            duration_ms: result.duration.as_millis() as u64,
        };
        match retry::decide(&result.outcome, batch.len(), now) {
            RetryDecision::Delivered => {
                flags.any_success = true;
                records.extend(batch.iter().map(|d| record(d.id, Resolution::Delivered)));
            }
            RetryDecision::Retry { not_before } => {
                let mut rng = rand::thread_rng();
                for d in &batch {
                    let attempts = d.attempts + 1;
                    let first = d
                        .first_attempt_at
                        .as_deref()
                        .and_then(crate::segment::parse_time)
                        .unwrap_or(now);
                    let s = &ctx.settings;
                    let resolution = if retry::retry_exhausted(
                        first,
                        now,
                        attempts,
                        s.retry_window,
                        s.max_attempts,
                    ) {
                        log_failure(d, status, error.as_deref(), "retries exhausted");
                        Resolution::Failed
                    } else {
                        let delay = retry::retry_delay(
                            not_before,
                            attempts,
                            s.backoff_base,
                            s.backoff_max,
                            &mut rng,
                        );
                        Resolution::Retry {
                            next_attempt_at: add(now, delay),
                        }
                    };
                    records.push(record(d.id, resolution));
                }
                tracing::info!(events = batch.len(), status = ?status, reason = error.as_deref().unwrap_or(""), "batch will be retried");
                if let Some(wait) = not_before {
                    let until = add(now, wait);
                    flags.throttled_until = flags.throttled_until.max(Some(until));
                    if let Ok(mut g) = ctx.gate.lock() {
                        *g = (*g).max(Some(until));
                    }
                }
            }
            RetryDecision::SplitBatch => {
                records.extend(batch.iter().map(|d| record(d.id, Resolution::Attempted)));
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                stack.push(second);
                stack.push(first);
            }
            RetryDecision::Permanent => {
                for d in &batch {
                    log_failure(d, status, error.as_deref(), "permanent error");
                    records.push(record(d.id, Resolution::Failed));
                }
            }
            RetryDecision::Pause => {
                flags.paused = Some(format!(
                    "Schematic answered HTTP {}: the API key is wrong or lacks access",
                    status.unwrap_or_default()
                ));
                records.extend(batch.iter().map(|d| release(d.id)));
            }
        }
    }
    (records, flags)
}

fn release(id: i64) -> AttemptRecord {
    AttemptRecord {
        delivery_id: id,
        resolution: Resolution::Release,
        attempted_at: Utc::now(),
        status: None,
        error: None,
        response: None,
        duration_ms: 0,
    }
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn log_failure(d: &ClaimedDelivery, status: Option<u16>, error: Option<&str>, why: &str) {
    tracing::warn!(
        delivery_id = d.id,
        status = status.map(|s| s as i64).unwrap_or(-1),
        reason = error.unwrap_or(why),
        "delivery failed ({why}); see `schematic-sync failed`, replay with `schematic-sync replay`"
    );
}
