//! Delivery benchmark (`cargo bench --bench delivery`).
//!
//! Everything runs through the library's own code paths against the strict
//! test mock of Schematic's capture API (`tests/support/mock_schematic.rs`,
//! which answers `200` at once and checks the wire format of every request):
//!
//! 1. A backlog of realistic Segment `track` / `identify` events is written
//!    straight into a new store (`segment::prepare` + `EventRow::new` +
//!    `events::insert`, 10,000 rows a transaction; not timed).
//! 2. Mapping is timed on its own (`Worker::map_new_events`), then the drain
//!    (`Worker::drain`, repeated until no delivery is pending or in flight).
//! 3. The mock's ceiling, in the same run: a plain `reqwest` client sends the
//!    same batches (the stored payloads, built into bodies with
//!    `SchematicClient::batch_body` before the clock starts) with the same
//!    concurrency to the same mock; the best of `BENCH_CEILING_RUNS` runs.
//! 4. Diagnostics: the drain's request arrivals as the mock saw them, and a
//!    drain round replayed with the same library calls (claim, send, record):
//!    once in turn with each step timed, once pipelined (record round k-1
//!    and claim round k+1 while round k is sent, as `Worker::drain` does).
//! 5. Claim throughput on two fresh store files with 10,000 and 1,000,000
//!    pending deliveries: rounds of `deliveries::claim` (400 rows) each
//!    followed by `deliveries::record` marking the rows delivered, as the
//!    worker does; the rounds of the two stores alternate so background load
//!    hits both alike. The claim statement's query plan is printed once.
//!
//! Figures are printed with PASS/FAIL against the targets, never asserted.
//!
//! Environment: `BENCH_EVENTS` (100000), `BENCH_CONCURRENCY` (4),
//! `BENCH_CLAIM_SMALL` (10000), `BENCH_CLAIM_LARGE` (1000000),
//! `BENCH_CLAIM_ROUNDS` (20), `BENCH_CLAIM_LIMIT` (400),
//! `BENCH_CLAIM_WARMUP` (2 rounds per store, not counted),
//! `BENCH_BREAKDOWN_ROUNDS` (25 diagnostic rounds; 0 skips them),
//! `BENCH_CEILING_RUNS` (2; the ceiling is the best run).

#[path = "../tests/support/mock_schematic.rs"]
mod mock_schematic;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde_json::{json, Value};
use tokio::sync::watch;

use mock_schematic::MockSchematic;
use schematic_sync::config::{Config, Synchronous};
use schematic_sync::delivery::worker::{DrainReport, Worker};
use schematic_sync::schematic::client::{OutgoingEvent, SchematicClient};
use schematic_sync::segment::{self, Envelope};
use schematic_sync::store::dedupe::Dedupe;
use schematic_sync::store::deliveries::{self, AttemptRecord, Resolution};
use schematic_sync::store::events::{self, EventRow};
use schematic_sync::store::Store;

const API_KEY: &str = "sch_bench_key_5c2e9a";
const WRITE_KEY: &str = "wk_bench_delivery_81d4";
/// Events per transaction while loading the backlog.
const LOAD_TX: usize = 10_000;
/// Distinct real payloads reused for the claim stores.
const CLAIM_SAMPLES: usize = 1_000;
/// Claimed rows are leased this long, as the default `delivery.lease`.
const LEASE: Duration = Duration::from_secs(60);

const TARGET_DRAIN_EVENTS_PER_SEC: f64 = 20_000.0;
const TARGET_CEILING_RATIO: f64 = 0.5;
/// The two claim rates may differ by at most this share of the larger one.
const TARGET_CLAIM_SPREAD: f64 = 0.20;

/// The store module's source, to show the query plan of the very statement
/// `deliveries::claim` prepares (it is private to the library).
const DELIVERIES_SOURCE: &str = include_str!("../src/store/deliveries.rs");
const CLAIM_SQL_START: &str = "UPDATE deliveries SET state = 'in_flight'";

struct Settings {
    events: usize,
    concurrency: usize,
    claim_small: usize,
    claim_large: usize,
    claim_rounds: usize,
    claim_limit: usize,
    claim_warmup: usize,
    breakdown_rounds: usize,
    ceiling_runs: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        _ => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            events: env_or("BENCH_EVENTS", 100_000usize).max(1),
            concurrency: env_or("BENCH_CONCURRENCY", 4usize).max(1),
            claim_small: env_or("BENCH_CLAIM_SMALL", 10_000usize).max(1),
            claim_large: env_or("BENCH_CLAIM_LARGE", 1_000_000usize).max(1),
            claim_rounds: env_or("BENCH_CLAIM_ROUNDS", 20usize).max(1),
            claim_limit: env_or("BENCH_CLAIM_LIMIT", 400usize).max(1),
            claim_warmup: env_or("BENCH_CLAIM_WARMUP", 2usize),
            breakdown_rounds: env_or("BENCH_BREAKDOWN_ROUNDS", 25usize),
            ceiling_runs: env_or("BENCH_CEILING_RUNS", 2usize).max(1),
        }
    }
}

// ---------------------------------------------------------------------------
// Realistic events
// ---------------------------------------------------------------------------

/// A small deterministic generator (splitmix64) so runs are comparable.
struct Rng(u64);

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A UUID-shaped text; unique per `n` because splitmix64 is a bijection.
fn uuid(n: u64) -> String {
    let h = format!("{:016x}{:016x}", splitmix64(n), splitmix64(n ^ 0x5bd1_e995));
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

const PAGES: &[&str] = &[
    "/dashboard",
    "/settings/billing",
    "/reports/weekly-active-users",
    "/checkout/complete",
    "/integrations/salesforce",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:126.0) Gecko/20100101 Firefox/126.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
];
const LOCALES: &[&str] = &["en-US", "de-DE", "fr-FR", "en-GB", "ja-JP"];
const PLANS: &[&str] = &["free", "starter", "growth", "enterprise"];
const FEATURES: &[&str] = &[
    "csv-export",
    "sso",
    "custom-dashboards",
    "audit-log",
    "api-access",
];

fn context(rng: &mut Rng, company: u64) -> Value {
    let path = rng.pick(PAGES);
    json!({
        "library": {"name": "analytics.js", "version": "next-1.70.0"},
        "page": {
            "path": path,
            "referrer": "https://www.google.com/",
            "title": "Acme Analytics",
            "url": format!("https://app.acme-analytics.io{path}"),
        },
        "userAgent": rng.pick(AGENTS),
        "ip": format!("203.0.{}.{}", rng.below(255), 1 + rng.below(254)),
        "locale": rng.pick(LOCALES),
        "groupId": format!("company_{company:05}"),
    })
}

fn timestamp(rng: &mut Rng) -> String {
    format!(
        "2025-06-02T09:{:02}:{:02}.{:03}Z",
        rng.below(60),
        rng.below(60),
        rng.below(1000)
    )
}

/// Message `n` of the backlog: 70% `track`, 30% `identify`.
fn message(rng: &mut Rng, n: u64) -> Value {
    let user = rng.below(200_000);
    let company = user / 40;
    let ctx = context(rng, company);
    if rng.below(10) < 7 {
        let (event, properties) = match rng.below(4) {
            0 => (
                "Order Completed",
                json!({
                    "order_id": format!("ord_{:010}", rng.below(10_000_000_000)),
                    "total": (rng.below(20_000) as f64) / 100.0,
                    "currency": "USD",
                    "products": [{"product_id": format!("sku-{:05}", rng.below(50_000)), "quantity": 1 + rng.below(5)}],
                }),
            ),
            1 => (
                "Feature Used",
                json!({"feature": rng.pick(FEATURES), "duration_ms": rng.below(90_000), "source": "web"}),
            ),
            2 => (
                "Report Exported",
                json!({"report_id": format!("rep_{:08}", rng.below(100_000_000)), "format": "csv", "rows": rng.below(250_000)}),
            ),
            _ => (
                "Seat Added",
                json!({"seats": 1 + rng.below(50), "plan": rng.pick(PLANS)}),
            ),
        };
        json!({
            "type": "track",
            "event": event,
            "userId": format!("user_{user:07}"),
            "anonymousId": uuid(n ^ (1 << 62)),
            "messageId": uuid(n),
            "timestamp": timestamp(rng),
            "properties": properties,
            "context": ctx,
            "integrations": {"All": true},
        })
    } else {
        json!({
            "type": "identify",
            "userId": format!("user_{user:07}"),
            "anonymousId": uuid(n ^ (1 << 62)),
            "messageId": uuid(n),
            "timestamp": timestamp(rng),
            "traits": {
                "email": format!("person.{user}@example-{company}.com"),
                "name": format!("Person {user}"),
                "plan": rng.pick(PLANS),
                "title": "Head of Growth",
                "logins": rng.below(2_000),
                "created_at": "2023-11-14T08:30:00.000Z",
                "company_name": format!("Company {company}"),
            },
            "context": ctx,
            "integrations": {"All": true},
        })
    }
}

/// Writes `count` events straight into the store, `LOAD_TX` a transaction.
fn load_events(store: &Store, count: usize) -> anyhow::Result<()> {
    let mut conn = store.open_and_migrate()?;
    let mut dedupe = Dedupe::new(std::time::Duration::from_secs(7 * 86_400));
    let mut rng = Rng(0x00de_11ce);
    let received_at = Utc::now();
    let envelope = Envelope::default();
    let mut n = 0u64;
    while (n as usize) < count {
        let take = LOAD_TX.min(count - n as usize);
        let mut rows = Vec::with_capacity(take);
        for _ in 0..take {
            let prepared = segment::prepare(message(&mut rng, n), None, &envelope, received_at)
                .map_err(|e| anyhow::anyhow!("bench message {n} is invalid: {e}"))?;
            rows.push(EventRow::new(&prepared, WRITE_KEY));
            n += 1;
        }
        let outcome = events::insert_committed(&mut conn, &mut dedupe, &rows)?;
        anyhow::ensure!(outcome.duplicates == 0, "duplicate bench messageIds");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------

struct DrainFigures {
    events: usize,
    mapped_deliveries: usize,
    map_secs: f64,
    drain_secs: f64,
    passes: usize,
    report: DrainReport,
    delivered_rows: i64,
    left_pending: i64,
    left_in_flight: i64,
    mock_requests: usize,
    mock_unique_events: usize,
    mock_max_in_flight: usize,
    /// Arrival times at the mock of the drain's requests, in order.
    arrivals: Vec<Instant>,
    stopped_because: Option<String>,
    cpu_map: (Cpu, Cpu),
    cpu_drain: (Cpu, Cpu),
}

fn state_count(counts: &[(&'static str, i64)], state: &str) -> i64 {
    counts
        .iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| *n)
}

async fn run_drain(
    store: &Store,
    config: &Config,
    mock: &MockSchematic,
    events: usize,
) -> anyhow::Result<DrainFigures> {
    let worker = Worker::new(store, config)?;
    let cpu_map_before = cpu_now();
    let started = Instant::now();
    let mapped = worker.map_new_events().await?;
    let map_secs = started.elapsed().as_secs_f64();
    let cpu_drain_before = cpu_now();

    let (_stop_tx, stop_rx) = watch::channel(false);
    let counter = store.connect()?;
    let mut total = DrainReport::default();
    let mut drain_time = Duration::ZERO;
    let mut passes = 0;
    let mut stopped_because = None;
    let counts = loop {
        let started = Instant::now();
        let report = worker.drain(&stop_rx).await?;
        drain_time += started.elapsed();
        passes += 1;
        total.requests += report.requests;
        total.delivered += report.delivered;
        total.retried += report.retried;
        total.failed += report.failed;
        total.released += report.released;
        let counts = deliveries::count_by_state(&counter)?;
        let open = state_count(&counts, "pending") + state_count(&counts, "in_flight");
        if let Some(reason) = report.paused {
            stopped_because = Some(format!("sending paused: {reason}"));
            break counts;
        }
        if let Some(until) = report.throttled_until {
            stopped_because = Some(format!("throttled until {until}"));
            break counts;
        }
        if open == 0 {
            break counts;
        }
        if passes >= 50 {
            stopped_because = Some(format!("{open} deliveries still open after 50 passes"));
            break counts;
        }
    };
    let cpu_drain_after = cpu_now();
    // one copy of the mock's logs at a time: they hold every event
    let mock_unique_events = mock.unique_events().len();
    let requests = mock.requests();
    Ok(DrainFigures {
        cpu_map: (cpu_map_before, cpu_drain_before),
        cpu_drain: (cpu_drain_before, cpu_drain_after),
        events,
        mapped_deliveries: mapped.deliveries,
        map_secs,
        drain_secs: drain_time.as_secs_f64(),
        passes,
        report: total,
        delivered_rows: state_count(&counts, "delivered"),
        left_pending: state_count(&counts, "pending"),
        left_in_flight: state_count(&counts, "in_flight"),
        mock_requests: requests.len(),
        mock_unique_events,
        mock_max_in_flight: mock.max_in_flight(),
        arrivals: requests.iter().map(|r| r.at).collect(),
        stopped_because,
    })
}

// ---------------------------------------------------------------------------
// The mock's ceiling
// ---------------------------------------------------------------------------

struct CeilingFigures {
    requests: usize,
    events: usize,
    failed_requests: usize,
    secs: f64,
    build_secs: f64,
}

async fn run_ceiling(
    store: &Store,
    config: &Config,
    concurrency: usize,
) -> anyhow::Result<CeilingFigures> {
    let conn = store.connect()?;
    let rows: Vec<(String, String)> = conn
        .prepare(
            "SELECT idempotency_key, payload FROM deliveries WHERE payload IS NOT NULL ORDER BY id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    drop(conn);
    let started = Instant::now();
    let client = SchematicClient::new(
        &config.schematic.capture_url,
        API_KEY.to_string(),
        config.schematic.timeout.0,
    )?;
    let bodies: Arc<Vec<(String, usize)>> = Arc::new(
        rows.chunks(config.schematic.batch_size)
            .map(|chunk| {
                let events: Vec<OutgoingEvent<'_>> = chunk
                    .iter()
                    .map(|(key, payload)| OutgoingEvent {
                        idempotency_key: key,
                        payload,
                    })
                    .collect();
                (client.batch_body(&events), events.len())
            })
            .collect(),
    );
    let build_secs = started.elapsed().as_secs_f64();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!(
        "{}/batch",
        config.schematic.capture_url.trim_end_matches('/')
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, next, bodies) = (http.clone(), url.clone(), next.clone(), bodies.clone());
        senders.spawn(async move {
            let (mut requests, mut events, mut failed) = (0, 0, 0);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, count)) = bodies.get(i) else {
                    break;
                };
                let response = http
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .header("X-Schematic-Api-Key", API_KEY)
                    .body(body.clone())
                    .send()
                    .await;
                requests += 1;
                match response {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        events += count;
                    }
                    Ok(r) => {
                        let _ = r.bytes().await;
                        failed += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
            (requests, events, failed)
        });
    }
    let mut figures = CeilingFigures {
        requests: 0,
        events: 0,
        failed_requests: 0,
        secs: 0.0,
        build_secs,
    };
    while let Some(joined) = senders.join_next().await {
        let (requests, events, failed) = joined?;
        figures.requests += requests;
        figures.events += events;
        figures.failed_requests += failed;
    }
    figures.secs = started.elapsed().as_secs_f64();
    Ok(figures)
}

// ---------------------------------------------------------------------------
// Where a drain round's time goes
// ---------------------------------------------------------------------------

/// A drain round, step by step with the same library calls
/// (`release_expired_leases` + `claim`, `SchematicClient::send` per batch
/// with `concurrency` at once, `record`), each step timed. Diagnostic only:
/// the drain figures come from `Worker::drain` itself.
struct Breakdown {
    rounds: usize,
    events: usize,
    claim: Vec<Duration>,
    send: Vec<Duration>,
    record: Vec<Duration>,
    total: Vec<Duration>,
}

type SharedConn = Arc<std::sync::Mutex<Connection>>;

/// `release_expired_leases` + `claim` off the async threads, as the worker does.
async fn db_claim(
    conn: &SharedConn,
    limit: usize,
) -> anyhow::Result<Vec<deliveries::ClaimedDelivery>> {
    let c = conn.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let c = c.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        claim_now(&c, limit)
    })
    .await?
}

/// `release_expired_leases` + `claim` on the calling thread, with the
/// worker's lease and fence.
fn claim_now(c: &Connection, limit: usize) -> anyhow::Result<Vec<deliveries::ClaimedDelivery>> {
    let now = Utc::now();
    let lease = chrono::Duration::from_std(LEASE)?;
    deliveries::release_expired_leases(c, now)?;
    Ok(deliveries::claim(c, now, now + lease, now - lease, limit)?)
}

async fn db_record(conn: &SharedConn, records: Vec<AttemptRecord>) -> anyhow::Result<()> {
    let c = conn.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut c = c.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(deliveries::record(&mut c, &records)?)
    })
    .await?
}

/// Sends the claimed rows in batches, all at once; the records of a 2xx.
fn spawn_sends(
    client: &SchematicClient,
    claimed: &[deliveries::ClaimedDelivery],
    batch: usize,
) -> tokio::task::JoinSet<Vec<AttemptRecord>> {
    let mut senders = tokio::task::JoinSet::new();
    for chunk in claimed.chunks(batch) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        senders.spawn(async move {
            let events: Vec<OutgoingEvent<'_>> = chunk
                .iter()
                .map(|d| OutgoingEvent {
                    idempotency_key: &d.idempotency_key,
                    payload: &d.payload,
                })
                .collect();
            let result = client.send(&events).await;
            let now = Utc::now();
            chunk
                .iter()
                .map(|d| AttemptRecord {
                    delivery_id: d.id,
                    resolution: Resolution::Delivered,
                    attempted_at: now,
                    status: Some(200),
                    error: None,
                    response: result.response.clone(),
                    duration_ms: result.duration.as_millis() as u64,
                })
                .collect::<Vec<_>>()
        });
    }
    senders
}

async fn join_sends(
    mut senders: tokio::task::JoinSet<Vec<AttemptRecord>>,
) -> anyhow::Result<Vec<AttemptRecord>> {
    let mut records = Vec::new();
    while let Some(joined) = senders.join_next().await {
        records.extend(joined?);
    }
    Ok(records)
}

/// Puts `count` delivered rows back in the queue (the mock sees repeats,
/// which Schematic drops by idempotency key).
fn requeue(store: &Store, count: usize) -> anyhow::Result<SharedConn> {
    let conn = store.connect()?;
    conn.execute(
        "UPDATE deliveries SET state = 'pending', lease_until = NULL, next_attempt_at = ?1
         WHERE id IN (SELECT id FROM deliveries WHERE state = 'delivered' ORDER BY id LIMIT ?2)",
        params![
            schematic_sync::store::time_text(Utc::now() - chrono::Duration::seconds(1)),
            count as i64
        ],
    )?;
    Ok(Arc::new(std::sync::Mutex::new(conn)))
}

fn bench_client(config: &Config) -> anyhow::Result<SchematicClient> {
    SchematicClient::new(
        &config.schematic.capture_url,
        API_KEY.to_string(),
        config.schematic.timeout.0,
    )
}

/// The steps in turn: claim, send (all batches at once), record.
async fn run_breakdown(store: &Store, config: &Config, rounds: usize) -> anyhow::Result<Breakdown> {
    let batch = config.schematic.batch_size;
    let limit = batch * config.schematic.concurrency;
    let conn = requeue(store, rounds * limit)?;
    let client = bench_client(config)?;
    let mut out = Breakdown {
        rounds: 0,
        events: 0,
        claim: Vec::new(),
        send: Vec::new(),
        record: Vec::new(),
        total: Vec::new(),
    };
    for _ in 0..rounds {
        let t0 = Instant::now();
        let claimed = db_claim(&conn, limit).await?;
        if claimed.is_empty() {
            break;
        }
        let t1 = Instant::now();
        let records = join_sends(spawn_sends(&client, &claimed, batch)).await?;
        let t2 = Instant::now();
        db_record(&conn, records).await?;
        let t3 = Instant::now();
        out.rounds += 1;
        out.events += claimed.len();
        out.claim.push(t1 - t0);
        out.send.push(t2 - t1);
        out.record.push(t3 - t2);
        out.total.push(t3 - t0);
    }
    Ok(out)
}

/// The same steps overlapped, as `Worker::drain` schedules them: while round
/// k is being sent, the store records round k-1 and claims round k+1.
/// Returns (events, seconds).
async fn run_pipelined(
    store: &Store,
    config: &Config,
    rounds: usize,
) -> anyhow::Result<(usize, f64)> {
    let batch = config.schematic.batch_size;
    let limit = batch * config.schematic.concurrency;
    let conn = requeue(store, rounds * limit)?;
    let client = bench_client(config)?;
    let started = Instant::now();
    let mut events = 0;
    let mut claimed = db_claim(&conn, limit).await?;
    let mut previous: Option<Vec<AttemptRecord>> = None;
    while !claimed.is_empty() {
        let senders = spawn_sends(&client, &claimed, batch);
        let c = conn.clone();
        let store_work = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut c = c.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            if let Some(records) = previous {
                deliveries::record(&mut c, &records)?;
            }
            claim_now(&c, limit)
        });
        let records = join_sends(senders).await?;
        events += records.len();
        previous = Some(records);
        claimed = store_work.await??;
    }
    if let Some(records) = previous {
        db_record(&conn, records).await?;
    }
    Ok((events, started.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------
// Claim throughput
// ---------------------------------------------------------------------------

/// A real delivery to copy into the claim stores.
struct Sample {
    kind: String,
    payload: String,
    mapping: Option<String>,
}

fn samples(store: &Store) -> anyhow::Result<Vec<Sample>> {
    let conn = store.connect()?;
    let rows = conn
        .prepare(
            "SELECT kind, payload, mapping FROM deliveries WHERE payload IS NOT NULL
             ORDER BY id LIMIT ?1",
        )?
        .query_map([CLAIM_SAMPLES as i64], |r| {
            Ok(Sample {
                kind: r.get(0)?,
                payload: r.get(1)?,
                mapping: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    anyhow::ensure!(
        !rows.is_empty(),
        "no payloads to copy into the claim stores"
    );
    Ok(rows)
}

/// A new store file with `rows` pending deliveries (and their events), all
/// due, in `next_attempt_at` order one millisecond apart. Returns the store
/// and how long the setup took.
fn claim_store(
    dir: &Path,
    name: &str,
    rows: usize,
    samples: &[Sample],
) -> anyhow::Result<(Store, f64)> {
    let started = Instant::now();
    let store = Store {
        path: dir.join(name),
        synchronous: Synchronous::Full,
    };
    drop(store.open_and_migrate()?);
    // Bulk load without the WAL (each page written once, no fsync), then
    // back to WAL, which the store's connections check for.
    let mut conn = Connection::open(&store.path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144",
    )?;
    let tx = conn.transaction()?;
    tx.execute_batch(
        "CREATE TEMP TABLE samples (k INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                                    payload TEXT NOT NULL, mapping TEXT)",
    )?;
    {
        let mut insert =
            tx.prepare("INSERT INTO samples (k, kind, payload, mapping) VALUES (?1, ?2, ?3, ?4)")?;
        for (k, s) in samples.iter().enumerate() {
            insert.execute(params![k as i64, s.kind, s.payload, s.mapping])?;
        }
    }
    let now = Utc::now();
    let now_text = schematic_sync::store::time_text(now);
    // a day ago, so that every row is due
    let base_ms = (now - chrono::Duration::days(1)).timestamp_millis();
    tx.execute(
        "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?1)
         INSERT INTO events (id, message_id, write_key, type, timestamp, received_at, status, raw)
         SELECT n, printf('bench-%010d', n), 'bench', s.kind, ?2, ?2, 'mapped', '{}'
         FROM seq JOIN temp.samples s ON s.k = n % ?3",
        params![rows as i64, now_text, samples.len() as i64],
    )?;
    tx.execute(
        "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?1)
         INSERT INTO deliveries (id, kind, state, next_attempt_at, idempotency_key, payload,
                                 event_id, mapping, created_at)
         SELECT n, s.kind, 'pending',
                strftime('%Y-%m-%dT%H:%M:%fZ', (?2 + n) / 1000.0, 'unixepoch'),
                'evt_' || lower(hex(randomblob(20))), s.payload, n, s.mapping, ?3
         FROM seq JOIN temp.samples s ON s.k = n % ?4",
        params![rows as i64, base_ms, now_text, samples.len() as i64],
    )?;
    tx.commit()?;
    conn.execute_batch("DROP TABLE temp.samples")?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "claim store {name}: journal_mode {mode}"
    );
    let pending: i64 = conn.query_row(
        "SELECT count(*) FROM deliveries WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    anyhow::ensure!(
        pending as usize == rows,
        "claim store {name}: {pending} pending, expected {rows}"
    );
    drop(conn);
    // written without fsync: flush it now, not during the measured rounds
    std::fs::File::open(&store.path)?.sync_all()?;
    Ok((store, started.elapsed().as_secs_f64()))
}

/// Per-round timings on one claim store.
#[derive(Default)]
struct ClaimTimes {
    rows: usize,
    setup_secs: f64,
    claimed: Vec<usize>,
    release: Vec<Duration>,
    claim: Vec<Duration>,
    record: Vec<Duration>,
}

/// One worker round without the sending: release expired leases, claim,
/// record every claimed row as delivered.
fn claim_round(
    conn: &mut Connection,
    limit: usize,
    times: Option<&mut ClaimTimes>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let now = Utc::now();
    deliveries::release_expired_leases(conn, now)?;
    let t1 = Instant::now();
    let lease_until = now + chrono::Duration::from_std(LEASE)?;
    let fence_since = now - chrono::Duration::from_std(LEASE)?;
    let claimed = deliveries::claim(conn, now, lease_until, fence_since, limit)?;
    let t2 = Instant::now();
    let attempted_at = Utc::now();
    let records: Vec<AttemptRecord> = claimed
        .iter()
        .map(|d| AttemptRecord {
            delivery_id: d.id,
            resolution: Resolution::Delivered,
            attempted_at,
            status: Some(200),
            error: None,
            response: Some("{\"ok\":true}".to_string()),
            duration_ms: 1,
        })
        .collect();
    deliveries::record(conn, &records)?;
    let t3 = Instant::now();
    if let Some(times) = times {
        times.claimed.push(claimed.len());
        times.release.push(t1 - t0);
        times.claim.push(t2 - t1);
        times.record.push(t3 - t2);
    }
    Ok(())
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn mean(values: &[Duration]) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.iter().sum::<Duration>() / values.len() as u32
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The SQL text `deliveries::claim` prepares, taken from the library source.
fn claim_sql() -> Option<&'static str> {
    let start = DELIVERIES_SOURCE.find(CLAIM_SQL_START)?;
    let len = DELIVERIES_SOURCE[start..].find('"')?;
    Some(&DELIVERIES_SOURCE[start..start + len])
}

/// `EXPLAIN QUERY PLAN` of the claim statement, one line per plan row.
fn claim_plan(conn: &Connection, limit: usize) -> anyhow::Result<Vec<String>> {
    let Some(sql) = claim_sql() else {
        anyhow::bail!("cannot find the claim statement in src/store/deliveries.rs");
    };
    let now: DateTime<Utc> = Utc::now();
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
    let mut depth: Vec<(i64, usize)> = Vec::new();
    let rows = stmt
        .query_map(
            params![
                schematic_sync::store::time_text(now),
                schematic_sync::store::time_text(now + chrono::Duration::seconds(60)),
                limit as i64,
                schematic_sync::store::time_text(now - chrono::Duration::seconds(60))
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(3)?,
                ))
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut lines = Vec::new();
    for (id, parent, detail) in rows {
        let level = depth
            .iter()
            .find(|(i, _)| *i == parent)
            .map_or(0, |(_, l)| l + 1);
        depth.push((id, level));
        lines.push(format!("{}{}", "  ".repeat(level), detail));
    }
    Ok(lines)
}

struct ClaimFigures {
    small: ClaimTimes,
    large: ClaimTimes,
    plan: Vec<String>,
}

fn run_claims(dir: &Path, samples: &[Sample], s: &Settings) -> anyhow::Result<ClaimFigures> {
    let (small_store, small_setup) = claim_store(dir, "claim-small.db", s.claim_small, samples)?;
    println!(
        "  setup: {} pending deliveries in {small_setup:.1} s",
        s.claim_small
    );
    let (large_store, large_setup) = claim_store(dir, "claim-large.db", s.claim_large, samples)?;
    println!(
        "  setup: {} pending deliveries in {large_setup:.1} s",
        s.claim_large
    );
    // fresh connections, as a worker would have them
    let mut small_conn = small_store.connect()?;
    let mut large_conn = large_store.connect()?;
    let plan = claim_plan(&large_conn, s.claim_limit)?;
    for _ in 0..s.claim_warmup {
        claim_round(&mut small_conn, s.claim_limit, None)?;
        claim_round(&mut large_conn, s.claim_limit, None)?;
    }
    let mut small = ClaimTimes {
        rows: s.claim_small,
        setup_secs: small_setup,
        ..Default::default()
    };
    let mut large = ClaimTimes {
        rows: s.claim_large,
        setup_secs: large_setup,
        ..Default::default()
    };
    for round in 0..s.claim_rounds {
        // alternate which store goes first, so neither always follows the other
        if round % 2 == 0 {
            claim_round(&mut small_conn, s.claim_limit, Some(&mut small))?;
            claim_round(&mut large_conn, s.claim_limit, Some(&mut large))?;
        } else {
            claim_round(&mut large_conn, s.claim_limit, Some(&mut large))?;
            claim_round(&mut small_conn, s.claim_limit, Some(&mut small))?;
        }
    }
    Ok(ClaimFigures { small, large, plan })
}

// ---------------------------------------------------------------------------
// CPU accounting (Linux /proc), so figures can be read against the load
// ---------------------------------------------------------------------------

/// Clock ticks per second of /proc's utime/stime (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime in ticks from a /proc stat line.
fn stat_ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU seconds used so far by the whole process and by the mock's thread.
#[derive(Clone, Copy, Default)]
struct Cpu {
    process: f64,
    mock: f64,
}

fn cpu_now() -> Cpu {
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_ticks(&s))
        .map_or(0, |(_, t)| t);
    let mut mock = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Some((comm, t)) = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| stat_ticks(&s))
            {
                if comm == "mock-schematic" {
                    mock += t;
                }
            }
        }
    }
    Cpu {
        process: process as f64 / TICKS_PER_SEC,
        mock: mock as f64 / TICKS_PER_SEC,
    }
}

/// "daemon side X µs/event, mock Y µs/event" between two snapshots.
fn cpu_line(before: Cpu, after: Cpu, events: usize, secs: f64) -> String {
    let mock = after.mock - before.mock;
    let rest = (after.process - before.process) - mock;
    let per = |cpu: f64| cpu * 1e6 / events.max(1) as f64;
    format!(
        "CPU: client side {rest:.2} s ({:.0} us/event), mock {mock:.2} s ({:.0} us/event); \
         process used {:.2} of the {:.0} cores over the wall time",
        per(rest),
        per(mock),
        (rest + mock) / secs.max(1e-9),
        std::thread::available_parallelism().map_or(0, |n| n.get()) as f64
    )
}

/// Peak resident memory of the process (the mock keeps every request).
fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// Resident memory now.
fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn print_claim_line(t: &ClaimTimes, limit: usize) -> (f64, f64) {
    let claimed: usize = t.claimed.iter().sum();
    let total_claim: Duration = t.claim.iter().sum();
    let med = median(&t.claim);
    let per_claim_rows = claimed as f64 / t.claimed.len().max(1) as f64;
    let claims_per_sec = 1.0 / med.as_secs_f64().max(1e-9);
    let rows_per_sec = per_claim_rows / med.as_secs_f64().max(1e-9);
    let mean_rows_per_sec = claimed as f64 / total_claim.as_secs_f64().max(1e-9);
    println!(
        "  {:>9} pending: claim({limit}) median {:.2} ms (mean {:.2}, min {:.2}, max {:.2}) \
         = {claims_per_sec:.0} claims/s, {rows_per_sec:.0} rows/s (mean-based {mean_rows_per_sec:.0} rows/s); \
         rows per claim {per_claim_rows:.0}",
        t.rows,
        ms(med),
        ms(mean(&t.claim)),
        ms(t.claim.iter().min().copied().unwrap_or_default()),
        ms(t.claim.iter().max().copied().unwrap_or_default()),
    );
    println!(
        "  {:>9}          release_expired_leases median {:.3} ms; record({limit} delivered) median {:.2} ms (mean {:.2})",
        "",
        ms(median(&t.release)),
        ms(median(&t.record)),
        ms(mean(&t.record)),
    );
    (rows_per_sec, mean_rows_per_sec)
}

fn main() -> anyhow::Result<()> {
    let s = Settings::from_env();
    // Before any thread exists (the mock's, the runtime's): the worker reads
    // the key from the environment, as the daemon does.
    std::env::set_var("SCHEMATIC_API_KEY", API_KEY);
    let mock = MockSchematic::start(API_KEY);
    let dir = tempfile::tempdir()?;
    let db_path = dir.path().join("delivery.db");
    let config = Config::parse(&format!(
        "[store]\npath = {db:?}\n\n[schematic]\ncapture_url = {url:?}\nbatch_size = 100\nconcurrency = {c}\n",
        db = db_path.display().to_string(),
        url = mock.url(),
        c = s.concurrency,
    ))?;
    let store = Store::new(&config.store);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!("delivery benchmark");
    println!(
        "  {} events, batch_size {}, concurrency {}, store.synchronous {:?}, {cores} cores, mock at {}",
        s.events,
        config.schematic.batch_size,
        config.schematic.concurrency,
        config.store.synchronous,
        mock.url()
    );

    println!("  load average at start: {}", loadavg());
    let started = Instant::now();
    load_events(&store, s.events)?;
    println!(
        "  load (untimed setup): {} events in {:.1} s",
        s.events,
        started.elapsed().as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    println!("\n[map + drain] Worker::map_new_events, then Worker::drain until nothing is open");
    let drain = runtime.block_on(run_drain(&store, &config, &mock, s.events))?;
    let map_rate = drain.events as f64 / drain.map_secs;
    let drain_rate = drain.report.delivered as f64 / drain.drain_secs;
    println!(
        "  map:   {} events -> {} deliveries in {:.2} s = {map_rate:.0} events mapped/s",
        drain.events, drain.mapped_deliveries, drain.map_secs
    );
    println!(
        "  drain: {} delivered in {:.2} s = {drain_rate:.0} events/s; {} requests ({:.1} events/request), {} pass(es)",
        drain.report.delivered,
        drain.drain_secs,
        drain.report.requests,
        drain.report.delivered as f64 / drain.report.requests.max(1) as f64,
        drain.passes
    );
    println!(
        "         retried {}, failed {}, released {}; left pending {}, in flight {}{}",
        drain.report.retried,
        drain.report.failed,
        drain.report.released,
        drain.left_pending,
        drain.left_in_flight,
        drain
            .stopped_because
            .as_deref()
            .map(|r| format!("; stopped: {r}"))
            .unwrap_or_default()
    );
    println!(
        "  map   {}",
        cpu_line(
            drain.cpu_map.0,
            drain.cpu_map.1,
            drain.events,
            drain.map_secs
        )
    );
    println!(
        "  drain {}",
        cpu_line(
            drain.cpu_drain.0,
            drain.cpu_drain.1,
            drain.report.delivered,
            drain.drain_secs
        )
    );
    println!(
        "  mock:  {} requests, {} unique events, at most {} requests at once; store: {} delivered rows",
        drain.mock_requests, drain.mock_unique_events, drain.mock_max_in_flight, drain.delivered_rows
    );
    println!("  RSS after the drain: {:.0} MB", rss_mb());
    let unique_ok = drain.mock_unique_events as i64 == drain.delivered_rows
        && drain.delivered_rows as usize == drain.mapped_deliveries;
    println!(
        "  check: mock unique events == delivered rows == deliveries mapped: {}",
        verdict(unique_ok)
    );
    let per_round = s.concurrency;
    let groups: Vec<&[Instant]> = drain.arrivals.chunks(per_round).collect();
    if groups.len() > 1 {
        let spans: Vec<Duration> = groups.iter().map(|g| g[g.len() - 1] - g[0]).collect();
        let gaps: Vec<Duration> = groups
            .windows(2)
            .map(|w| w[1][0] - w[0][w[0].len() - 1])
            .collect();
        let periods: Vec<Duration> = groups.windows(2).map(|w| w[1][0] - w[0][0]).collect();
        println!(
            "  mock view, rounds of {per_round} requests: period median {:.2} ms; first->last arrival in a round median {:.2} ms; \
             last arrival -> next round's first median {:.2} ms (mean {:.2})",
            ms(median(&periods)),
            ms(median(&spans)),
            ms(median(&gaps)),
            ms(mean(&gaps)),
        );
    }

    println!(
        "\n[ceiling] plain reqwest client, same batches, concurrency {}",
        s.concurrency
    );
    // The ceiling is a maximum: the best of a few runs, so that a moment of
    // load from other processes does not lower it (and flatter the ratio).
    let mut ceiling_rate: f64 = 0.0;
    for run in 1..=s.ceiling_runs {
        let cpu2 = cpu_now();
        let ceiling = runtime.block_on(run_ceiling(&store, &config, s.concurrency))?;
        let cpu3 = cpu_now();
        let rate = ceiling.events as f64 / ceiling.secs;
        ceiling_rate = ceiling_rate.max(rate);
        println!(
            "  run {run}: {} events in {} requests in {:.2} s = {rate:.0} events/s ({} failed requests; bodies built beforehand in {:.2} s)",
            ceiling.events, ceiling.requests, ceiling.secs, ceiling.failed_requests, ceiling.build_secs
        );
        println!(
            "         {}",
            cpu_line(cpu2, cpu3, ceiling.events, ceiling.secs)
        );
    }
    let ratio = drain_rate / ceiling_rate;
    println!(
        "  ceiling (best run) {ceiling_rate:.0} events/s; RSS now {:.0} MB (the mock keeps every request)",
        rss_mb()
    );
    println!("  drain / ceiling = {ratio:.2}");
    if s.breakdown_rounds > 0 {
        println!(
            "\n[breakdown] drain rounds replayed with the same library calls, {} rounds of {} events, steps in turn:",
            s.breakdown_rounds,
            config.schematic.batch_size * s.concurrency
        );
        let b = runtime.block_on(run_breakdown(&store, &config, s.breakdown_rounds))?;
        let total: Duration = b.total.iter().sum();
        let sum = |v: &[Duration]| v.iter().sum::<Duration>();
        println!(
            "  claim  median {:.2} ms (mean {:.2}, {:.0}% of the time)",
            ms(median(&b.claim)),
            ms(mean(&b.claim)),
            100.0 * sum(&b.claim).as_secs_f64() / total.as_secs_f64()
        );
        println!(
            "  send   median {:.2} ms (mean {:.2}, {:.0}% of the time)",
            ms(median(&b.send)),
            ms(mean(&b.send)),
            100.0 * sum(&b.send).as_secs_f64() / total.as_secs_f64()
        );
        println!(
            "  record median {:.2} ms (mean {:.2}, {:.0}% of the time)",
            ms(median(&b.record)),
            ms(mean(&b.record)),
            100.0 * sum(&b.record).as_secs_f64() / total.as_secs_f64()
        );
        println!(
            "  round  median {:.2} ms; {} events in {:.2} s = {:.0} events/s (the send step alone: {:.0} events/s)",
            ms(median(&b.total)),
            b.events,
            total.as_secs_f64(),
            b.events as f64 / total.as_secs_f64(),
            b.events as f64 / sum(&b.send).as_secs_f64()
        );
        let (events, secs) =
            runtime.block_on(run_pipelined(&store, &config, s.breakdown_rounds))?;
        println!(
            "  the same calls pipelined as Worker::drain does (record round k-1 and claim round k+1 while round k is sent): \
             {events} events in {secs:.2} s = {:.0} events/s",
            events as f64 / secs
        );
    }
    drop(runtime);

    let violations = mock.violations();
    println!("\n[mock] wire-format violations: {}", violations.len());
    for v in violations.iter().take(10) {
        println!("  {v}");
    }

    println!(
        "\n[claim] deliveries::claim({}) + record as delivered, {} rounds per store ({} warm-up)",
        s.claim_limit, s.claim_rounds, s.claim_warmup
    );
    let samples = samples(&store)?;
    let claims = run_claims(dir.path(), &samples, &s)?;
    println!("  query plan of the claim statement (1M store):");
    for line in &claims.plan {
        println!("    {line}");
    }
    let uses_index = claims.plan.iter().any(|l| l.contains("deliveries_due"));
    println!(
        "  uses deliveries_due: {}",
        if uses_index { "yes" } else { "NO" }
    );
    let (small_rate, small_mean) = print_claim_line(&claims.small, s.claim_limit);
    let (large_rate, large_mean) = print_claim_line(&claims.large, s.claim_limit);
    let spread = (small_rate - large_rate).abs() / small_rate.max(large_rate);
    let spread_mean = (small_mean - large_mean).abs() / small_mean.max(large_mean);
    println!(
        "  {} / {} rows/s = {:.2} (median-based; mean-based {:.2}); spread {:.0}% (mean-based {:.0}%)",
        claims.large.rows,
        claims.small.rows,
        large_rate / small_rate,
        large_mean / small_mean,
        spread * 100.0,
        spread_mean * 100.0
    );
    let short_claims = claims
        .small
        .claimed
        .iter()
        .chain(&claims.large.claimed)
        .filter(|&&n| n != s.claim_limit)
        .count();
    if short_claims > 0 {
        println!(
            "  note: {short_claims} claims returned fewer than {} rows",
            s.claim_limit
        );
    }

    println!("\n[report]");
    println!(
        "  load average now: {} (1, 5, 15 min); peak RSS {:.0} MB",
        loadavg(),
        peak_rss_mb()
    );
    println!(
        "  {} drain {drain_rate:.0} events/s (target >= {TARGET_DRAIN_EVENTS_PER_SEC:.0})",
        verdict(drain_rate >= TARGET_DRAIN_EVENTS_PER_SEC)
    );
    println!(
        "  {} drain / mock ceiling {ratio:.2} ({drain_rate:.0} / {ceiling_rate:.0}; target >= {TARGET_CEILING_RATIO})",
        verdict(ratio >= TARGET_CEILING_RATIO)
    );
    println!(
        "  {} claim rows/s at {} vs {} pending: {large_rate:.0} vs {small_rate:.0}, spread {:.0}% (target <= {:.0}%)",
        verdict(spread <= TARGET_CLAIM_SPREAD),
        claims.large.rows,
        claims.small.rows,
        spread * 100.0,
        TARGET_CLAIM_SPREAD * 100.0
    );
    println!(
        "  {} every delivery reached the mock once per key ({} unique events, {} delivered rows)",
        verdict(unique_ok),
        drain.mock_unique_events,
        drain.delivered_rows
    );
    println!(
        "  {} mock wire-format violations: {}",
        verdict(violations.is_empty()),
        violations.len()
    );
    println!(
        "  {} claim uses the deliveries_due index",
        verdict(uses_index)
    );
    println!(
        "  (claim setup: {:.1} s for {} rows, {:.1} s for {} rows)",
        claims.small.setup_secs, claims.small.rows, claims.large.setup_secs, claims.large.rows
    );
    Ok(())
}
