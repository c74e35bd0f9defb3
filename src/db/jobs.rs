//! The export job queue: jobs, their tasks, leases with attempt fencing, output-file numbering.
//!
//! Every statement a worker runs for a task names the attempt it holds; when a statement finds
//! no row, the lease is gone (rescued, cancelled, expired) and the worker stops without having
//! changed anything.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool, postgres::PgQueryResult};
use uuid::Uuid;

/// The NOTIFY channel that wakes idle workers.
pub const CHANNEL: &str = "fhir_export_tasks";

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub level: &'static str,
    pub request_url: String,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub types: Vec<String>,
    pub patient_ids: Option<Vec<String>>,
    pub excluded_groups: Vec<String>,
    pub elements: Vec<String>,
    pub type_filters: Vec<String>,
    pub include_history: bool,
    pub include_deleted: bool,
    /// What a lenient kick-off ignored: the manifest's error file.
    pub notes: Vec<String>,
    /// The client that started it (None without auth).
    pub owner: Option<String>,
    pub container: String,
    pub own_container: bool,
    pub folder: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct Job {
    pub id: Uuid,
    pub status: String,
    pub level: String,
    pub request_url: String,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub types: Vec<String>,
    pub patient_ids: Option<Vec<String>>,
    pub excluded_groups: Vec<String>,
    pub elements: Vec<String>,
    pub type_filters: Vec<String>,
    pub include_history: bool,
    pub include_deleted: bool,
    /// What a lenient kick-off ignored: the manifest's error file.
    pub notes: Vec<String>,
    /// The client that started it (None without auth).
    pub owner: Option<String>,
    pub container: String,
    pub own_container: bool,
    pub folder: String,
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Task {
    pub id: i64,
    pub job_id: Uuid,
    pub kind: String,
    pub resource_type: Option<String>,
    pub range_start: i64,
    pub range_end: i64,
    pub attempt: i32,
    pub checkpoint_seq: i64,
    /// With `checkpoint_seq`, the position of a history task (versions share a seq).
    pub checkpoint_version: i32,
    pub parts_done: i32,
}

/// An export task the planner asks for.
#[derive(Debug, Clone)]
pub struct PlannedTask {
    /// `export` (the resources) or `deleted` (the deletions, for `_since` exports).
    pub kind: &'static str,
    pub resource_type: String,
    pub range_start: i64,
    pub range_end: i64,
    pub estimate: i64,
}

/// Where a job's files live.
#[derive(Debug, Clone, FromRow)]
pub struct JobFiles {
    pub id: Uuid,
    pub container: String,
    pub own_container: bool,
    pub folder: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct Progress {
    pub tasks: i64,
    pub tasks_done: i64,
    pub parts: i64,
    pub resources_done: i64,
    pub estimate: i64,
    /// Types being exported right now.
    pub running_types: Vec<String>,
}

#[derive(Debug, Clone, FromRow)]
pub struct Part {
    pub resource_type: String,
    pub part_no: i32,
    pub resources: i32,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn notify(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// The database clock: the transaction time of a kick-off.
pub async fn now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT date_trunc('microseconds', clock_timestamp())")
        .fetch_one(pool)
        .await
}

/// Jobs queued or running.
pub async fn count_active(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM export_jobs WHERE status IN ('queued', 'running')")
        .fetch_one(pool)
        .await
}

/// Stores a job with its plan task and wakes the workers. Must run after `now()` gave the
/// transaction time: the in-flight transactions recorded here are those of a later snapshot.
pub async fn create(pool: &PgPool, job: &NewJob) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO export_jobs (id, level, request_url, transaction_time, since, types,
            patient_ids, excluded_groups, elements, type_filters, include_history, include_deleted,
            notes, owner, container, own_container, folder, in_flight)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())))",
    )
    .bind(job.id)
    .bind(job.level)
    .bind(&job.request_url)
    .bind(job.transaction_time)
    .bind(job.since)
    .bind(&job.types)
    .bind(&job.patient_ids)
    .bind(&job.excluded_groups)
    .bind(&job.elements)
    .bind(&job.type_filters)
    .bind(job.include_history)
    .bind(job.include_deleted)
    .bind(&job.notes)
    .bind(&job.owner)
    .bind(&job.container)
    .bind(job.own_container)
    .bind(&job.folder)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO export_tasks (job_id, kind) VALUES ($1, 'plan')")
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
    notify(&mut tx).await?;
    tx.commit().await
}

const JOB_COLUMNS: &str = "id, status, level, request_url, transaction_time, since, types, \
    patient_ids, excluded_groups, elements, type_filters, include_history, include_deleted, notes, \
    owner, container, own_container, folder, error, finished_at, expires_at";

/// A job its owner can still see: not cancelled, not expired. Other callers see nothing.
pub async fn visible(pool: &PgPool, id: Uuid, owner: Option<&str>) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM export_jobs
         WHERE id = $1 AND owner IS NOT DISTINCT FROM $2 AND status <> 'cancelled'
           AND (expires_at IS NULL OR expires_at > now())"
    ))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM export_jobs WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn progress(pool: &PgPool, id: Uuid) -> sqlx::Result<Progress> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind <> 'plan') AS tasks,
                count(*) FILTER (WHERE kind <> 'plan' AND status = 'done') AS tasks_done,
                coalesce(sum(parts_done), 0)::bigint AS parts,
                coalesce(sum(resources_done), 0)::bigint AS resources_done,
                coalesce(sum(estimate), 0)::bigint AS estimate,
                coalesce(array_agg(DISTINCT resource_type)
                    FILTER (WHERE status = 'running' AND resource_type IS NOT NULL), '{}')
                    AS running_types
         FROM export_tasks WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
}

/// The committed output files of a job, by type and number.
pub async fn parts(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<Part>> {
    sqlx::query_as(
        "SELECT resource_type, part_no, resources FROM export_parts
         WHERE job_id = $1 AND resources IS NOT NULL ORDER BY resource_type, part_no",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Is `name` (`{Type}-{n}.ndjson`) a committed file of this job?
pub async fn has_part(
    pool: &PgPool,
    id: Uuid,
    resource_type: &str,
    part_no: i32,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM export_parts WHERE job_id = $1 AND resource_type = $2
                        AND part_no = $3 AND resources IS NOT NULL)",
    )
    .bind(id)
    .bind(resource_type)
    .bind(part_no)
    .fetch_one(pool)
    .await
}

/// Cancels a visible job and fences out its workers. Returns where its files are.
pub async fn cancel(
    pool: &PgPool,
    id: Uuid,
    owner: Option<&str>,
    sweep_after: Duration,
) -> sqlx::Result<Option<JobFiles>> {
    let mut tx = pool.begin().await?;
    let files: Option<JobFiles> = sqlx::query_as(
        "UPDATE export_jobs SET status = 'cancelled', finished_at = now(),
                expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND owner IS NOT DISTINCT FROM $3 AND status <> 'cancelled'
           AND (expires_at IS NULL OR expires_at > now())
         RETURNING id, container, own_container, folder",
    )
    .bind(id)
    .bind(secs(sweep_after))
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    if files.is_none() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE export_tasks SET status = 'cancelled', leased_until = NULL
         WHERE job_id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(files)
}

/// Claims the oldest queued task of a live job, with a lease of `lease`.
pub async fn claim(pool: &PgPool, worker: &str, lease: Duration) -> sqlx::Result<Option<Task>> {
    let task: Option<Task> = sqlx::query_as(
        "WITH next AS (
            SELECT t.id FROM export_tasks t JOIN export_jobs j ON j.id = t.job_id
            WHERE t.status = 'queued' AND j.status IN ('queued', 'running')
            ORDER BY t.id LIMIT 1 FOR UPDATE OF t SKIP LOCKED)
         UPDATE export_tasks t
         SET status = 'running', attempt = t.attempt + 1, worker = $1,
             leased_until = now() + make_interval(secs => $2), updated_at = now()
         FROM next WHERE t.id = next.id
         RETURNING t.id, t.job_id, t.kind, t.resource_type, t.range_start, t.range_end,
                   t.attempt, t.checkpoint_seq, t.checkpoint_version, t.parts_done",
    )
    .bind(worker)
    .bind(secs(lease))
    .fetch_optional(pool)
    .await?;
    if let Some(task) = &task {
        sqlx::query(
            "UPDATE export_jobs SET status = 'running' WHERE id = $1 AND status = 'queued'",
        )
        .bind(task.job_id)
        .execute(pool)
        .await?;
    }
    Ok(task)
}

fn held(result: PgQueryResult) -> bool {
    result.rows_affected() > 0
}

/// Renews the lease. `false`: the lease is lost (rescued elsewhere, cancelled): stop.
pub async fn heartbeat(pool: &PgPool, task: &Task, lease: Duration) -> sqlx::Result<bool> {
    sqlx::query(
        "UPDATE export_tasks SET leased_until = now() + make_interval(secs => $3), updated_at = now()
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()",
    )
    .bind(task.id)
    .bind(task.attempt)
    .bind(secs(lease))
    .execute(pool)
    .await
    .map(held)
}

/// Does this attempt still hold the task? Checked right before a file becomes visible.
pub async fn holds_lease(pool: &PgPool, task_id: i64, attempt: i32) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM export_tasks
                        WHERE id = $1 AND attempt = $2 AND status = 'running'
                          AND leased_until > now())",
    )
    .bind(task_id)
    .bind(attempt)
    .fetch_one(pool)
    .await
}

/// Write transactions that were in flight at kick-off and still are.
pub async fn in_flight_remaining(pool: &PgPool, job_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM export_jobs j, unnest(j.in_flight) AS x
         WHERE j.id = $1 AND pg_xact_status(x) = 'in progress'",
    )
    .bind(job_id)
    .fetch_one(pool)
    .await
}

/// Marks a task done, adds the tasks it hands on (a plan task's export tasks), and completes
/// the job when nothing is left. `false`: lease lost, nothing changed.
pub async fn finish_task(
    pool: &PgPool,
    task: &Task,
    follow_ups: &[PlannedTask],
    retention: Duration,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    lock_job(&mut tx, task.job_id).await?;
    let done = sqlx::query(
        "UPDATE export_tasks SET status = 'done', leased_until = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()",
    )
    .bind(task.id)
    .bind(task.attempt)
    .execute(&mut *tx)
    .await?;
    if !held(done) {
        return Ok(false);
    }
    if !follow_ups.is_empty() {
        let (mut kinds, mut types, mut starts, mut ends, mut estimates) =
            (vec![], vec![], vec![], vec![], vec![]);
        for p in follow_ups {
            kinds.push(p.kind);
            types.push(p.resource_type.as_str());
            starts.push(p.range_start);
            ends.push(p.range_end);
            estimates.push(p.estimate);
        }
        sqlx::query(
            "INSERT INTO export_tasks (job_id, kind, resource_type, range_start, range_end, estimate)
             SELECT $1, k, t, s, e, n
             FROM unnest($6::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
                 AS p(k, t, s, e, n)",
        )
        .bind(task.job_id)
        .bind(&types)
        .bind(&starts)
        .bind(&ends)
        .bind(&estimates)
        .bind(&kinds)
        .execute(&mut *tx)
        .await?;
        notify(&mut tx).await?;
    }
    complete_if_all_done(&mut tx, task.job_id, retention).await?;
    tx.commit().await?;
    Ok(true)
}

async fn lock_job(conn: &mut PgConnection, job_id: Uuid) -> sqlx::Result<()> {
    // Serializes the "was this the last task?" check of tasks finishing at the same moment.
    sqlx::query("SELECT 1 FROM export_jobs WHERE id = $1 FOR UPDATE")
        .bind(job_id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn complete_if_all_done(
    conn: &mut PgConnection,
    job_id: Uuid,
    retention: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE export_jobs SET status = 'completed', finished_at = now(),
                expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND status = 'running'
           AND NOT EXISTS (SELECT 1 FROM export_tasks WHERE job_id = $1 AND status <> 'done')",
    )
    .bind(job_id)
    .bind(secs(retention))
    .execute(conn)
    .await?;
    Ok(())
}

/// Reserves the file number for part `seq` of a task; a retried task gets the number it had
/// reserved before. `None`: lease lost.
pub async fn reserve_part(
    pool: &PgPool,
    task: &Task,
    resource_type: &str,
    seq: i32,
) -> sqlx::Result<Option<i32>> {
    let mut tx = pool.begin().await?;
    let fenced = sqlx::query(
        "SELECT 1 FROM export_tasks WHERE id = $1 AND attempt = $2 AND status = 'running'
           AND leased_until > now() FOR UPDATE",
    )
    .bind(task.id)
    .bind(task.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    if fenced.is_none() {
        return Ok(None);
    }
    let existing: Option<i32> =
        sqlx::query_scalar("SELECT part_no FROM export_parts WHERE task_id = $1 AND task_seq = $2")
            .bind(task.id)
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(part_no) = existing {
        return Ok(Some(part_no));
    }
    // One numbering per (job, type): take its lock for the max+1 below.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2, 0))")
        .bind(task.job_id)
        .bind(resource_type)
        .execute(&mut *tx)
        .await?;
    let part_no: i32 = sqlx::query_scalar(
        "INSERT INTO export_parts (job_id, resource_type, part_no, task_id, task_seq)
         SELECT $1, $2, coalesce(max(part_no), 0) + 1, $3, $4
         FROM export_parts WHERE job_id = $1 AND resource_type = $2
         RETURNING part_no",
    )
    .bind(task.job_id)
    .bind(resource_type)
    .bind(task.id)
    .bind(seq)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(part_no))
}

/// Records a committed part and moves the task's checkpoint past it. `false`: lease lost.
pub async fn checkpoint(
    pool: &PgPool,
    task: &Task,
    seq: i32,
    last: (i64, i32),
    resources: i32,
    bytes: i64,
) -> sqlx::Result<bool> {
    sqlx::query(
        "WITH t AS (
            UPDATE export_tasks SET checkpoint_seq = $4, checkpoint_version = $7,
                   parts_done = $3 + 1,
                   resources_done = resources_done + $5, updated_at = now()
            WHERE id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()
              AND parts_done = $3
            RETURNING id)
         UPDATE export_parts p SET resources = $5, bytes = $6
         FROM t WHERE p.task_id = t.id AND p.task_seq = $3",
    )
    .bind(task.id)
    .bind(task.attempt)
    .bind(seq)
    .bind(last.0)
    .bind(resources)
    .bind(bytes)
    .bind(last.1)
    .execute(pool)
    .await
    .map(held)
}

/// Gives a task back to the queue without counting a failure (graceful shutdown).
pub async fn release(pool: &PgPool, task: &Task) -> sqlx::Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query(
        "UPDATE export_tasks SET status = 'queued', leased_until = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()",
    )
    .bind(task.id)
    .bind(task.attempt)
    .execute(&mut *conn)
    .await?;
    notify(&mut conn).await
}

/// Records a failed attempt: the task goes back to the queue, or, at `max_attempts` failures,
/// the task and its job fail.
pub async fn record_failure(
    pool: &PgPool,
    task: &Task,
    error: &str,
    max_attempts: i32,
    retention: Duration,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let failed: Option<bool> = sqlx::query_scalar(
        "UPDATE export_tasks
         SET failures = failures + 1, last_error = $3, leased_until = NULL, updated_at = now(),
             status = CASE WHEN failures + 1 >= $4 THEN 'failed' ELSE 'queued' END
         WHERE id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()
         RETURNING status = 'failed'",
    )
    .bind(task.id)
    .bind(task.attempt)
    .bind(error)
    .bind(max_attempts)
    .fetch_optional(&mut *tx)
    .await?;
    if failed == Some(true) {
        fail_jobs(&mut tx, &[task.job_id], retention).await?;
    }
    notify(&mut tx).await?;
    tx.commit().await
}

async fn fail_jobs(
    conn: &mut PgConnection,
    job_ids: &[Uuid],
    retention: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE export_jobs j
         SET status = 'failed', finished_at = now(),
             expires_at = now() + make_interval(secs => $2),
             error = (SELECT 'export of ' || coalesce(t.resource_type, 'the plan') || ' failed after '
                             || t.failures || ' attempts: ' || coalesce(t.last_error, 'unknown error')
                      FROM export_tasks t WHERE t.job_id = j.id AND t.status = 'failed'
                      ORDER BY t.id LIMIT 1)
         WHERE j.id = ANY($1) AND j.status IN ('queued', 'running')",
    )
    .bind(job_ids)
    .bind(secs(retention))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE export_tasks SET status = 'cancelled'
         WHERE job_id = ANY($1) AND status IN ('queued', 'running')",
    )
    .bind(job_ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Re-queues tasks whose lease ran out (their worker died or froze); a task out of attempts
/// fails its job. Returns how many tasks were rescued.
pub async fn rescue_expired(
    pool: &PgPool,
    max_attempts: i32,
    retention: Duration,
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(
        "UPDATE export_tasks
         SET failures = failures + 1, leased_until = NULL, updated_at = now(),
             last_error = 'the worker stopped renewing its lease (crashed, frozen or cut off)',
             status = CASE WHEN failures + 1 >= $1 THEN 'failed' ELSE 'queued' END
         WHERE id IN (SELECT id FROM export_tasks WHERE status = 'running' AND leased_until < now()
                      FOR UPDATE SKIP LOCKED)
         RETURNING job_id, status = 'failed'",
    )
    .bind(max_attempts)
    .fetch_all(&mut *tx)
    .await?;
    let failed: Vec<Uuid> = rows.iter().filter(|(_, f)| *f).map(|(j, _)| *j).collect();
    if !failed.is_empty() {
        fail_jobs(&mut tx, &failed, retention).await?;
    }
    if !rows.is_empty() {
        notify(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Jobs whose time is up (expired results, cancelled jobs due for their last sweep).
pub async fn expired(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<JobFiles>> {
    sqlx::query_as(
        "SELECT id, container, own_container, folder FROM export_jobs
         WHERE expires_at < now() ORDER BY expires_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Forgets a job (its tasks and parts go with it).
pub async fn delete(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM export_jobs WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}
