//! Prometheus metrics (`GET /metrics`) through the `metrics` facade. Counters
//! and the request-latency histogram are recorded where things happen (ingest
//! routes, worker, audience sync); queue gauges are read from the store at
//! scrape time, so they are right even when another process (`drain`,
//! `replay`) changed the queue.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rusqlite::Connection;

pub const INGESTED: &str = "schematic_sync_messages_ingested_total";
pub const DEDUPLICATED: &str = "schematic_sync_messages_deduplicated_total";
pub const REJECTED: &str = "schematic_sync_messages_rejected_total";
pub const DELIVERIES_SENT: &str = "schematic_sync_deliveries_sent_total";
pub const DELIVERIES_DELIVERED: &str = "schematic_sync_deliveries_delivered_total";
pub const DELIVERIES_RETRIED: &str = "schematic_sync_deliveries_retried_total";
pub const DELIVERIES_FAILED: &str = "schematic_sync_deliveries_failed_total";
pub const REQUEST_DURATION: &str = "schematic_sync_schematic_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "schematic_sync_queue_depth";
pub const OLDEST_DUE_AGE: &str = "schematic_sync_oldest_due_age_seconds";
pub const PAUSED: &str = "schematic_sync_paused";
pub const DEDUPE_KEYS: &str = "schematic_sync_dedupe_keys";
pub const AUDIENCE_LAST_SYNC: &str = "schematic_sync_audience_last_sync_timestamp_seconds";
pub const AUDIENCE_LAST_SYNC_SIZE: &str = "schematic_sync_audience_last_sync_enqueued";

/// Installs the global recorder once per process; later calls return the
/// same handle.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(INGESTED, "Segment messages stored");
    describe_counter!(
        DEDUPLICATED,
        "Segment messages acknowledged but not stored again (repeated messageId)"
    );
    describe_counter!(REJECTED, "Ingest requests rejected, by reason");
    describe_counter!(
        DELIVERIES_SENT,
        "Deliveries sent to Schematic (one per event per request)"
    );
    describe_counter!(
        DELIVERIES_DELIVERED,
        "Deliveries Schematic answered 2xx for"
    );
    describe_counter!(
        DELIVERIES_RETRIED,
        "Deliveries scheduled for another attempt"
    );
    describe_counter!(DELIVERIES_FAILED, "Deliveries that became failed");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Latency of requests to Schematic"
    );
    describe_gauge!(QUEUE_DEPTH, "Deliveries per state");
    describe_gauge!(
        OLDEST_DUE_AGE,
        Unit::Seconds,
        "Age of the oldest due delivery"
    );
    describe_gauge!(
        PAUSED,
        "1 when sending is paused (API key missing or refused)"
    );
    describe_gauge!(
        DEDUPE_KEYS,
        "messageId keys held in memory for deduplication (those of store.retention)"
    );
    describe_gauge!(
        AUDIENCE_LAST_SYNC,
        Unit::Seconds,
        "Unix time of the last audience sync, per audience"
    );
    describe_gauge!(
        AUDIENCE_LAST_SYNC_SIZE,
        "Deliveries enqueued by the last audience sync, per audience"
    );
}

/// Reads the queue gauges from the store.
pub fn refresh_gauges(conn: &Connection) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    for (state, n) in crate::store::deliveries::count_by_state(conn)? {
        metrics::gauge!(QUEUE_DEPTH, "state" => state).set(n as f64);
    }
    let age = crate::store::deliveries::oldest_due(conn, now)?
        .and_then(|t| crate::segment::parse_time(&t))
        .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
    metrics::gauge!(OLDEST_DUE_AGE).set(age);
    let paused =
        crate::store::deliveries::worker_state(conn, crate::delivery::worker::PAUSED)?.is_some();
    metrics::gauge!(PAUSED).set(if paused { 1.0 } else { 0.0 });
    for run in crate::store::audiences::last_run_per_audience(conn)? {
        if let Some(t) = run
            .finished_at
            .as_deref()
            .and_then(crate::segment::parse_time)
        {
            metrics::gauge!(AUDIENCE_LAST_SYNC, "audience" => run.audience.clone())
                .set(t.timestamp() as f64);
        }
        metrics::gauge!(AUDIENCE_LAST_SYNC_SIZE, "audience" => run.audience)
            .set(run.enqueued as f64);
    }
    Ok(())
}
