//! `schematic-sync serve`: wires the store, the ingest routes, `/healthz`
//! and graceful shutdown together. Shutdown is explicit: a signal flips a
//! watch channel; the HTTP server stops accepting and drains its requests,
//! then the writer commits what it holds and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;
use crate::delivery::worker::{DrainReport, Worker};
use crate::ingest::commit::Committer;
use crate::ingest::{self, IngestState, IngestStats};
use crate::scheduler::run_on_schedule;
use crate::store::Store;

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.check_listen()?;
    let store = Store::new(&config.store);
    store.open_and_migrate()?;
    let max_size = config.store.max_size.0;
    let (committer, writer) = Committer::start(&store, max_size)?;

    if config.schematic.resolve_api_key().is_none() {
        tracing::warn!(
            env = %config.schematic.api_key_env,
            "no Schematic API key: set the environment variable {} (or schematic.api_key); \
             events are stored, sending is paused until a key is set",
            config.schematic.api_key_env
        );
    }
    let worker = Arc::new(Worker::new(&store, &config)?);

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

    let state = IngestState {
        committer: committer.clone(),
        limits: Arc::new(config.server.clone()),
        stats: Arc::new(IngestStats::default()),
    };
    let app = Router::new()
        .route("/healthz", get(healthz).with_state(committer.clone()))
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

/// `GET /healthz`: 200 when the store takes a write lock, 503 otherwise.
async fn healthz(State(committer): State<Committer>) -> impl IntoResponse {
    let probe = tokio::time::timeout(Duration::from_secs(5), committer.probe()).await;
    let store = match probe {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the store writer did not answer within 5 s".to_string()),
    };
    let ingest = match committer.health.refusal() {
        Some(why) => format!("refusing: {why}"),
        None => "accepting".to_string(),
    };
    match store {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "ok", "store": "writable", "ingest": ingest})),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "unavailable", "store": format!("not writable: {e}"), "ingest": ingest}),
            ),
        ),
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
