//! Runs a job on a cron schedule (with a seconds field) until shutdown. Runs
//! never overlap: a run that takes longer than the interval delays the next.

use std::future::Future;

use chrono::Utc;
use tokio::sync::watch;

use crate::config::Schedule;

pub async fn run_on_schedule<F, Fut>(
    name: &'static str,
    schedule: Schedule,
    mut stop: watch::Receiver<bool>,
    mut job: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    tracing::debug!(job = name, schedule = %schedule.source, "scheduled");
    loop {
        if *stop.borrow() {
            break;
        }
        let now = Utc::now();
        let Some(next) = schedule.next_after(now) else {
            tracing::warn!(job = name, "the schedule has no future run; job stopped");
            break;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => job().await,
            _ = stop.changed() => {}
        }
    }
}
