//! `schematic-sync serve`: wires the store, the ingest routes, `/healthz`
//! and graceful shutdown together. Shutdown is explicit: a signal flips a
//! watch channel; the HTTP server stops accepting and drains its requests,
//! then the writer commits what it holds and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::worker::{DrainReport, Worker};
use crate::ingest::commit::Committer;
use crate::ingest::{self, IngestState};
use crate::scheduler::run_on_schedule;
use crate::store::Store;

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.check_listen()?;
    let store = Store::new(&config.store);
    store.open_and_migrate()?;
    let max_size = config.store.max_size.0;
    let (committer, writer) = Committer::start(&store, max_size, config.store.retention.0)?;

    if config.schematic.resolve_api_key().is_none() {
        tracing::warn!(
            env = %config.schematic.api_key_env,
            "no Schematic API key: set the environment variable {} (or schematic.api_key); \
             events are stored, sending is paused until a key is set",
            config.schematic.api_key_env
        );
    }
    let worker = Arc::new(Worker::new(&store, &config)?.yielding_to(committer.activity.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(watch_signals(shutdown_tx));

    let drain_worker = worker.clone();
    let drain_stop = shutdown_rx.clone();
    let drains = tokio::spawn(run_on_schedule(
        "drain",
        config.delivery.schedule.clone(),
        shutdown_rx.clone(),
        move || {
            let worker = drain_worker.clone();
            let stop = drain_stop.clone();
            async move {
                match worker.drain(&stop).await {
                    Ok(report) => log_drain(&report),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "drain pass failed; retried on the next tick")
                    }
                }
            }
        },
    ));

    let sync_store = store.clone();
    let sync_config = Arc::new(config.clone());
    let syncs = tokio::spawn(run_on_schedule(
        "audiences",
        config.audiences.schedule.clone(),
        shutdown_rx.clone(),
        move || {
            let store = sync_store.clone();
            let config = sync_config.clone();
            async move {
                let result = tokio::task::spawn_blocking(move || {
                    let mut conn = store.connect()?;
                    crate::operations::sync_audiences(&mut conn, &config, None, false, false)
                })
                .await;
                match result {
                    Ok(Ok(outcomes)) => {
                        for o in outcomes {
                            tracing::info!(audience = %o.audience, added = o.added, removed = o.removed, enqueued = o.enqueued, "audience sync");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "audience sync failed; see sync_runs")
                    }
                    Err(e) => tracing::error!(error = %e, "audience sync panicked"),
                }
            }
        },
    ));

    tokio::spawn(run_retention(
        store.clone(),
        config.store.retention.0,
        shutdown_rx.clone(),
    ));

    let health = committer.health.clone();
    let path = store.path.clone();
    let mut size_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => health.refresh_size(&path, max_size),
                _ = size_shutdown.changed() => break,
            }
        }
    });

    let monitor = Monitor {
        committer: committer.clone(),
        reader: Arc::new(std::sync::Mutex::new(store.connect()?)),
        metrics: crate::metrics::install()?,
    };
    let state = IngestState {
        committer: committer.clone(),
        limits: Arc::new(config.server.clone()),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_endpoint))
        .with_state(monitor)
        .merge(ingest::routes(state));
    drop(committer);

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(store = %store.path.display(), "listening on http://{addr}");

    let mut stop = shutdown_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|s| *s).await;
        tracing::info!("shutting down: no new requests accepted");
    });
    let mut stop = shutdown_rx.clone();
    let grace = config.server.shutdown_timeout.0;
    tokio::select! {
        result = server => result.context("the HTTP server failed")?,
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("requests still open after server.shutdown_timeout; closing them"),
    }
    // In-flight batches finish (or their leases make them due again later).
    if tokio::time::timeout(grace, syncs).await.is_err() {
        tracing::warn!("an audience sync was still running after server.shutdown_timeout; the next run resumes it");
    }
    if tokio::time::timeout(grace, drains).await.is_err() {
        tracing::warn!("a drain pass was still running after server.shutdown_timeout; its leases will expire and the rows be re-sent");
    }
    // The router (and its committer handles) is gone: the writer commits what
    // it holds and ends.
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .ok()
        .and_then(Result::ok)
        .context("the store writer thread panicked")?;
    tracing::info!("stopped");
    Ok(())
}

async fn watch_signals(shutdown: watch::Sender<bool>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    let _ = shutdown.send(true);
}

/// What `/healthz` and `/metrics` read: the writer (to probe it) and a
/// read connection for the queue.
#[derive(Clone)]
struct Monitor {
    committer: Committer,
    reader: Arc<std::sync::Mutex<rusqlite::Connection>>,
    metrics: PrometheusHandle,
}

impl Monitor {
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| anyhow::anyhow!("the monitor connection lock is poisoned"))?;
            f(&conn)
        })
        .await?
    }
}

/// `GET /healthz`: 200 when the store takes a write lock, 503 otherwise; the
/// body also says whether ingest is accepting and sending is paused.
async fn healthz(State(monitor): State<Monitor>) -> impl IntoResponse {
    let probe = tokio::time::timeout(Duration::from_secs(5), monitor.committer.probe()).await;
    let store = match probe {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the store writer did not answer within 5 s".to_string()),
    };
    let ingest = match monitor.committer.health.refusal() {
        Some(why) => format!("refusing: {why}"),
        None => "accepting".to_string(),
    };
    let paused = monitor
        .read(|c| {
            Ok(crate::store::deliveries::worker_state(
                c,
                crate::delivery::worker::PAUSED,
            )?)
        })
        .await
        .ok()
        .flatten();
    let sending = match &paused {
        Some(reason) => format!("paused: {reason}"),
        None => "active".to_string(),
    };
    let (code, status, store) = match store {
        Ok(()) => (StatusCode::OK, "ok", "writable".to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("not writable: {e}"),
        ),
    };
    (
        code,
        Json(
            json!({"status": status, "store": store, "ingest": ingest, "sending": sending, "paused": paused.is_some()}),
        ),
    )
}

/// `GET /metrics`: Prometheus text format.
async fn metrics_endpoint(State(monitor): State<Monitor>) -> impl IntoResponse {
    if let Err(e) = monitor.read(crate::metrics::refresh_gauges).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot read queue gauges for /metrics");
    }
    metrics::gauge!(crate::metrics::DEDUPE_KEYS)
        .set(monitor.committer.activity.dedupe_keys() as f64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        monitor.metrics.render(),
    )
}

/// Deletes rows past `store.retention` in small batches, once a minute (more
/// often for a retention of a few minutes or less).
async fn run_retention(store: Store, retention: Duration, mut stop: watch::Receiver<bool>) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    // A run that takes longer than `every` (a large purge being given back)
    // is followed by a full `every` of rest, not by the ticks it missed.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut conn = store.connect()?;
            let cutoff =
                chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
            Ok(crate::store::retention::sweep(&mut conn, cutoff)?)
        })
        .await;
        match result {
            Ok(Ok(swept)) if swept.deliveries + swept.events > 0 || swept.freed_pages > 0 => {
                tracing::info!(
                    deliveries = swept.deliveries,
                    events = swept.events,
                    freed_pages = swept.freed_pages,
                    "retention"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "retention run failed; retried in a minute")
            }
            Err(e) => tracing::warn!(error = %e, "retention run panicked"),
        }
    }
}

fn log_drain(report: &DrainReport) {
    let m = &report.mapped;
    if m.events > 0 || report.requests > 0 {
        tracing::info!(
            mapped = m.events,
            deliveries = m.deliveries,
            skipped = m.skipped,
            memberships = m.memberships,
            requests = report.requests,
            delivered = report.delivered,
            retried = report.retried,
            failed = report.failed,
            "drain pass"
        );
    }
}
