//! The export worker pool: claims tasks from the Postgres queue, runs them under a lease, and
//! keeps the queue healthy (rescues stale tasks, sweeps expired jobs).

mod export;
mod lease;
mod maintenance;
mod part;
mod plan;

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{config::Config, db::jobs, storage::Storage};
use lease::Lease;

/// What the workers of one process share.
pub struct Context {
    pub pool: PgPool,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<Config>,
    /// This server's FHIR base: `_typeFilter` references to it are local ones.
    pub base_url: String,
    wake: Notify,
}

/// How a task run ended, when it did not fail.
pub enum Ended {
    Done,
    /// The lease went away (rescued elsewhere, cancelled, expired): nothing more was written.
    LeaseLost,
    /// Shutting down: the task went back to the queue.
    Released,
}

impl Context {
    pub fn new(
        pool: PgPool,
        storage: Arc<dyn Storage>,
        config: Arc<Config>,
        base_url: String,
    ) -> Arc<Context> {
        Arc::new(Context {
            pool,
            storage,
            config,
            base_url,
            wake: Notify::new(),
        })
    }

    fn lease_duration(&self) -> Duration {
        self.config.stale_after()
    }

    fn retention(&self) -> Duration {
        Duration::from_secs(self.config.export.retention_secs)
    }
}

/// Starts `config.export.workers` workers, the wake-up listener and the maintenance loop.
/// They all stop when `shutdown` is cancelled; a running task is released at its next part.
pub fn spawn(context: Arc<Context>, shutdown: CancellationToken) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    for n in 0..context.config.export.workers {
        let name = format!("{host}:{}:{n}", std::process::id());
        set.spawn(work(context.clone(), name, shutdown.clone()));
    }
    set.spawn(listen(context.clone(), shutdown.clone()));
    set.spawn(maintenance::run(context, shutdown));
    set
}

async fn work(context: Arc<Context>, name: String, shutdown: CancellationToken) {
    let poll = Duration::from_millis(context.config.export.poll_interval_ms);
    while !shutdown.is_cancelled() {
        match jobs::claim(&context.pool, &name, context.lease_duration()).await {
            Ok(Some(task)) => run_task(&context, task, &shutdown).await,
            Ok(None) => {
                tokio::select! {
                    _ = context.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "claiming a task failed");
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
}

async fn run_task(context: &Arc<Context>, task: jobs::Task, shutdown: &CancellationToken) {
    let span = tracing::info_span!("task", id = task.id, job = %task.job_id, kind = %task.kind,
        resource_type = task.resource_type.as_deref().unwrap_or(""), attempt = task.attempt);
    let lease = Lease::start(context, &task);
    let result = async {
        let job = jobs::get(&context.pool, task.job_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("job {} vanished", task.job_id))?;
        match task.kind.as_str() {
            "plan" => plan::run(context, &job, &task, &lease).await,
            _ => export::run(context, &job, &task, &lease, shutdown).await,
        }
    }
    .instrument(span)
    .await;
    match result {
        Ok(Ended::Done) => tracing::debug!(task = task.id, "task done"),
        Ok(Ended::LeaseLost) => {
            tracing::info!(task = task.id, "lease lost; stopped without writing more")
        }
        Ok(Ended::Released) => tracing::info!(task = task.id, "released for shutdown"),
        Err(e) => {
            let message = format!("{e:#}");
            tracing::warn!(task = task.id, job = %task.job_id, error = %message, "task attempt failed");
            let max = context.config.export.max_attempts;
            if let Err(e) =
                jobs::record_failure(&context.pool, &task, &message, max, context.retention()).await
            {
                tracing::error!(task = task.id, error = %e, "recording a task failure failed");
            }
        }
    }
}

/// LISTEN for new tasks and wake idle workers at once; polling covers the gaps.
async fn listen(context: Arc<Context>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&context.pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(jobs::CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed");
            continue;
        }
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(_) => context.wake.notify_waiters(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost");
                        break;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
