//! The export worker pool: claims tasks from the Postgres queue, runs them under a lease, and
//! keeps the queue healthy (rescues stale tasks, sweeps expired jobs).
//!
//! A fault that goes away by itself (a dropped database connection, a storage 5xx) is retried
//! with backoff inside the attempt while the lease holds, resuming from the task's checkpoint;
//! only real failures, and panics, spend an attempt.

mod blocks;
mod error;
mod export;
mod lease;
mod maintenance;
mod part;
mod plan;
mod read_source;

pub use error::{Fault, TaskError};

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures::FutureExt;
use sqlx::postgres::PgListener;
use tokio::{
    sync::{Notify, broadcast},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::{
    config::Config,
    db::{
        self, Pools, jobs, notify,
        tasks::{self, Fenced, HeldTask, Resumed, TaskKind},
    },
    liveness::Liveness,
    metrics,
    storage::{self, Storage},
};
use lease::Lease;

/// What the workers of one process share.
pub struct Context {
    pub pools: Pools,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<Config>,
    /// This server's FHIR base: `_typeFilter` references to it are local ones.
    pub base_url: String,
    wake: Notify,
    /// Jobs cancelled anywhere (from NOTIFY): their leases check themselves at once.
    cancelled: broadcast::Sender<Uuid>,
    /// When each worker last showed life, for `/health`.
    pub liveness: Arc<Liveness>,
}

/// How a task run ended.
pub enum Ended {
    Done,
    /// The lease went away (rescued elsewhere, cancelled, expired): nothing more was written.
    LeaseLost,
    /// Shutting down: the task went back to the queue.
    Released,
    /// A real failure (or a panic): the attempt is spent.
    Failed(String),
    /// A resource the job's de-identification rules fail on (`processingErrors: raise`):
    /// the job fails at once, as every retry would fail the same way.
    Unprocessable(String),
}

impl Ended {
    /// The metrics' `outcome`.
    fn outcome(&self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::LeaseLost => "lease_lost",
            Ended::Released => "released",
            Ended::Failed(_) | Ended::Unprocessable(_) => "failed",
        }
    }
}

impl Context {
    pub fn new(
        pools: Pools,
        storage: Arc<dyn Storage>,
        config: Arc<Config>,
        base_url: String,
        liveness: Arc<Liveness>,
    ) -> Arc<Context> {
        Arc::new(Context {
            pools,
            storage,
            liveness,
            config,
            base_url,
            wake: Notify::new(),
            cancelled: broadcast::channel(64).0,
        })
    }

    fn lease_duration(&self) -> Duration {
        self.config.stale_after()
    }

    fn retention(&self) -> Duration {
        Duration::from_secs(self.config.export.retention_secs)
    }

    fn retry(&self) -> tasks::Retry {
        tasks::Retry {
            backoff: Duration::from_secs(self.config.export.retry_backoff_secs),
            retention: self.retention(),
        }
    }

    /// Logs the end of a job (the summary is read after it ended). A cancelled job's last
    /// sweep is not an end: its cancel was.
    async fn log_end(&self, job: uuid::Uuid, outcome: &str) {
        match jobs::summary(&self.pools.primary, job).await {
            Ok(Some(s)) if outcome == "expired" && s.status == jobs::JobState::Cancelled => {}
            Ok(Some(summary)) => crate::telemetry::job_ended(&summary, outcome),
            Ok(None) => {}
            Err(e) => tracing::warn!(%job, error = %e, "reading a finished job's summary failed"),
        }
    }

    fn mark_alive(&self, worker: usize) {
        self.liveness.mark(worker);
    }
}

/// Starts `config.export.workers` workers, the wake-up listener and the maintenance loop.
/// They all stop when `shutdown` is cancelled; a running task is released at its next part.
pub fn spawn(context: Arc<Context>, shutdown: CancellationToken) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    for n in 0..context.config.export.workers {
        let name = format!("{host}:{}:{n}", std::process::id());
        set.spawn(work(context.clone(), n, name, shutdown.clone()));
    }
    set.spawn(listen(context.clone(), shutdown.clone()));
    set.spawn(maintenance::run(context, shutdown));
    set
}

async fn work(context: Arc<Context>, slot: usize, name: String, shutdown: CancellationToken) {
    let poll = Duration::from_millis(context.config.export.poll_interval_ms);
    let mut backoff = Backoff::new(poll);
    while !shutdown.is_cancelled() {
        context.mark_alive(slot);
        match tasks::claim(&context.pools.primary, &name, context.lease_duration()).await {
            Ok(Some(task)) => {
                backoff.reset();
                run_task(&context, slot, task, &shutdown).await;
            }
            Ok(None) => {
                backoff.reset();
                tokio::select! {
                    _ = context.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "claiming a task failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.pause()) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
}

async fn run_task(
    context: &Arc<Context>,
    slot: usize,
    mut held: HeldTask,
    shutdown: &CancellationToken,
) {
    let task = held.task.clone();
    let kind = task.kind.as_str();
    metrics::task_claimed(kind);
    let span = tracing::info_span!("task", job = %task.job_id, task = task.id, kind = ?task.kind,
        resource_type = task.resource_type.as_deref().unwrap_or(""), attempt = task.attempt);
    async {
        let lease = Lease::start(context, &held, slot);
        let ended = run_with_retries(context, &mut held, &lease, shutdown).await;
        metrics::task_ended(kind, ended.outcome());
        match ended {
            Ended::Done => tracing::debug!("task done"),
            Ended::LeaseLost => tracing::info!("lease lost; stopped without writing more"),
            Ended::Released => tracing::info!("released for shutdown"),
            Ended::Failed(message) => {
                tracing::warn!(error = %message, "task attempt failed");
                let max = context.config.export.max_attempts;
                record_failure(context, &held, &message, max, &lease).await;
            }
            Ended::Unprocessable(message) => {
                tracing::warn!(error = %message, "a resource could not be de-identified");
                record_failure(context, &held, &message, 1, &lease).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Transient faults are retried inside an attempt for at most this many stale periods in a
/// row; a fault that lasts longer spends the attempt, so no task retries without bound.
const TRANSIENT_RETRY_STALE_PERIODS: u32 = 10;

/// Runs the task; a transient fault resumes it from its checkpoint after a pause, as long as
/// the lease holds and the faults have not lasted `TRANSIENT_RETRY_STALE_PERIODS`.
async fn run_with_retries(
    context: &Arc<Context>,
    held: &mut HeldTask,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> Ended {
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let give_up_after = context.lease_duration() * TRANSIENT_RETRY_STALE_PERIODS;
    // When faults began at the current checkpoint: a part written since starts the count anew.
    let mut faulty_since: Option<((i32, i64), tokio::time::Instant)> = None;
    loop {
        let error = match caught(run_kind(context, held, lease, shutdown)).await {
            Ok(Ok(ended)) => return ended,
            Ok(Err(error)) => error,
            Err(panic) => return Ended::Failed(format!("the task panicked: {panic}")),
        };
        if lease.is_lost() {
            return Ended::LeaseLost;
        }
        let (fault, message) = match error {
            TaskError::LeaseLost => return Ended::LeaseLost,
            TaskError::Unprocessable(e) => return Ended::Unprocessable(e.to_string()),
            TaskError::Failed(e) => return Ended::Failed(format!("{e:#}")),
            TaskError::Transient { fault, message } => (fault, message),
        };
        let checkpoint = (held.task.parts_done, held.task.checkpoint_seq);
        let since = match faulty_since {
            Some((at, since)) if at == checkpoint => since,
            _ => {
                faulty_since
                    .insert((checkpoint, tokio::time::Instant::now()))
                    .1
            }
        };
        if since.elapsed() > give_up_after {
            return Ended::Failed(format!(
                "transient faults lasted longer than {TRANSIENT_RETRY_STALE_PERIODS} stale \
                 periods; the last: {fault} fault: {message}"
            ));
        }
        metrics::transient_retry(fault.as_str());
        tracing::warn!(%fault, error = %message, "transient fault; resuming from the checkpoint");
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.pause()) => {}
                _ = lease.lost() => return Ended::LeaseLost,
            }
            match held.resume().await {
                Ok(Resumed::Held) => break,
                Ok(Resumed::Finished) => return Ended::Done,
                Err(Fenced::LeaseLost) => return Ended::LeaseLost,
                Err(Fenced::Database(e)) if db::is_transient(&e) => {
                    tracing::warn!(error = %e, "database still unavailable");
                }
                Err(Fenced::Database(e)) => return Ended::Failed(format!("{e:#}")),
            }
        }
    }
}

async fn run_kind(
    context: &Arc<Context>,
    held: &mut HeldTask,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> Result<Ended, TaskError> {
    // A job that is gone (expired, deleted) took its tasks with it.
    let job = jobs::get(&context.pools.primary, held.task.job_id)
        .await?
        .ok_or(TaskError::LeaseLost)?;
    match held.task.kind {
        TaskKind::Plan => plan::run(context, &job, held, lease).await,
        TaskKind::Blocks => blocks::run(context, &job, held, lease, shutdown).await,
        TaskKind::Export | TaskKind::Deleted | TaskKind::History | TaskKind::SoftDeleted => {
            export::run(context, &job, held, lease, shutdown).await
        }
    }
}

/// Spends the attempt (failing the job once `max` are spent); retried through a database blip
/// while the lease holds (after that the rescuer counts it). Any other database error gives
/// the task up to the rescuer at once: its lease runs out and the rescue spends the attempt.
async fn record_failure(
    context: &Context,
    held: &HeldTask,
    message: &str,
    max: i32,
    lease: &Lease,
) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    while !lease.is_lost() {
        match held.fail(message, max, context.retry()).await {
            Ok(Some(job)) => return report_failed(context, &job).await,
            Ok(None) | Err(Fenced::LeaseLost) => return,
            Err(Fenced::Database(e)) if db::is_transient(&e) => {
                tracing::warn!(error = %e, "recording a task failure failed; retrying");
                tokio::time::sleep(backoff.pause()).await;
            }
            Err(Fenced::Database(e)) => {
                tracing::error!(error = %e, "recording a task failure failed; the rescuer will count it");
                return;
            }
        }
    }
}

/// A job that failed for good: the one log line of its cause, under the correlation id its
/// status shows, then its files are deleted (a full disk does not stay full until the job
/// expires) and its end is logged. Files that a deletion misses go at its expiry.
async fn report_failed(context: &Context, job: &jobs::FailedJob) {
    tracing::error!(job = %job.id, correlation_id = %job.error_id, cause = %job.error, "export failed");
    let files = &job.files;
    if let Err(e) = storage::delete_export(
        &*context.storage,
        &files.container,
        &files.folder,
        files.own_container,
    )
    .await
    {
        tracing::warn!(job = %job.id, error = %format!("{e:#}"), "deleting a failed export's files failed");
    }
    context.log_end(job.id, "failed").await;
}

/// Runs `task`, turning a panic into its message: one task's bug must not end the worker.
async fn caught<T>(task: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(task)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into())
        })
}

/// LISTEN for new tasks (wake idle workers at once) and cancelled jobs (their leases check
/// themselves at once); polling and heartbeats cover the gaps while the connection is down.
async fn listen(context: Arc<Context>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_secs(30));
    while !shutdown.is_cancelled() {
        match listen_once(&context, &shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.pause()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One LISTEN connection, until it fails (`Err`) or shutdown (`Ok`).
async fn listen_once(
    context: &Context,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(&context.pools.primary).await?;
    // A lost connection comes back as `None`: start over through the backoff above.
    listener.eager_reconnect(false);
    listener
        .listen_all([notify::TASKS, notify::CANCELLED])
        .await?;
    backoff.reset();
    // Tasks queued while the connection was down would otherwise wait for a poll.
    context.wake.notify_waiters();
    loop {
        tokio::select! {
            n = listener.try_recv() => match n? {
                Some(n) if n.channel() == notify::CANCELLED => {
                    if let Ok(job) = n.payload().parse() {
                        let _ = context.cancelled.send(job);
                    }
                }
                Some(_) => context.wake.notify_waiters(),
                None => return Err(sqlx::Error::Protocol("the LISTEN connection was lost".into())),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_becomes_its_message() {
        let id = 7;
        let failed = caught(async move {
            if id == 7 {
                panic!("task {id} broke");
            }
        })
        .await;
        assert_eq!(failed, Err("task 7 broke".to_string()));
        assert_eq!(caught(async { 5 }).await, Ok(5));
    }
}
