//! The rescue of tasks whose worker stopped renewing the lease (it died, froze or was cut
//! off): re-queued after their backoff, or failing their job once out of attempts.

use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use super::{RETRY_AFTER, Retry};
use crate::db::{
    jobs::{self, FailedJob, secs},
    notify,
};

/// A task whose lease ran out: the files its attempt left half-written are its to clean.
#[derive(Debug, Clone, FromRow)]
pub struct RescuedTask {
    pub id: i64,
    /// The attempt that stopped renewing its lease.
    pub attempt: i32,
    pub job_id: Uuid,
    pub container: String,
    pub folder: String,
}

/// What a rescue did.
#[derive(Debug, Default)]
pub struct Rescued {
    pub tasks: Vec<RescuedTask>,
    /// Jobs whose rescued task was out of attempts.
    pub failed: Vec<FailedJob>,
}

/// Re-queues tasks whose lease ran out (their worker died, froze or was cut off), to be claimed
/// after their backoff; a task out of attempts fails its job. The jobs are locked first (in id
/// order), then their tasks, as everywhere else.
pub async fn rescue_expired(
    pool: &PgPool,
    max_attempts: i32,
    retry: Retry,
) -> sqlx::Result<Rescued> {
    let mut tx = pool.begin().await?;
    let jobs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM export_jobs WHERE id IN (
             SELECT job_id FROM export_tasks WHERE status = 'running' AND leased_until < now())
         ORDER BY id FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    if jobs.is_empty() {
        return Ok(Rescued::default());
    }
    let rows: Vec<(i64, i32, Uuid, String, String, bool)> = sqlx::query_as(&format!(
        "UPDATE export_tasks t
         SET failures = failures + 1, leased_until = NULL, updated_at = now(),
             last_error = 'the worker stopped renewing its lease (crashed, frozen or cut off)',
             status = CASE WHEN failures + 1 >= $1 THEN 'failed' ELSE 'queued' END::task_state,
             run_after = {}
         FROM export_jobs j
         WHERE j.id = t.job_id AND t.job_id = ANY($3) AND t.status = 'running'
           AND t.leased_until < now()
         RETURNING t.id, t.attempt, t.job_id, j.container, j.folder, t.status = 'failed'",
        RETRY_AFTER
            .replace("$BACKOFF", "$2")
            .replace("failures", "t.failures")
    ))
    .bind(max_attempts)
    .bind(secs(retry.backoff))
    .bind(&jobs)
    .fetch_all(&mut *tx)
    .await?;
    let mut failed: Vec<Uuid> = rows.iter().filter(|r| r.5).map(|r| r.2).collect();
    failed.dedup();
    let failed = if failed.is_empty() {
        Vec::new()
    } else {
        jobs::fail(&mut tx, &failed, retry.retention).await?
    };
    if !rows.is_empty() {
        notify::send(&mut tx, notify::TASKS, "").await?;
    }
    tx.commit().await?;
    let tasks = rows
        .into_iter()
        .map(|(id, attempt, job_id, container, folder, _)| RescuedTask {
            id,
            attempt,
            job_id,
            container,
            folder,
        })
        .collect();
    Ok(Rescued { tasks, failed })
}
