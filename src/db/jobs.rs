//! Export jobs: one row per `$export` request, holding what it exports (its spec, fixed at
//! kick-off), its state, and where its files are. The tasks workers claim are in `db::tasks`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use super::notify;

/// The level of an export (`/$export`, `/Patient/$export`, `/Group/{id}/$export`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "export_level", rename_all = "lowercase")]
pub enum Level {
    System,
    Patient,
    Group,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::System => "system",
            Level::Patient => "patient",
            Level::Group => "group",
        }
    }
}

/// queued → running → completed | failed; cancelled when the client deletes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "job_state", rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    /// As stored (`job_state`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What a job exports and how its files are cut: everything fixed at kick-off, so that every
/// replica and every retry produces the same files.
#[derive(Debug, Clone, FromRow)]
pub struct JobSpec {
    pub level: Level,
    /// The kick-off URL, echoed as the manifest's `request`.
    pub request_url: String,
    /// The snapshot instant: the kick-off time, or `_till`.
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    /// `_until`: only versions last updated before it (see `snapshot_time`).
    pub until: Option<DateTime<Utc>>,
    /// Types to export; empty means every type that has data.
    pub types: Vec<String>,
    /// The job reads only the patients stored with it (Group members, narrowed by `patient`);
    /// otherwise every patient.
    pub named_patients: bool,
    /// Group export: the Groups walked, which are not exported themselves.
    pub excluded_groups: Vec<String>,
    /// `_elements` entries: `element` or `Type.element`.
    pub elements: Vec<String>,
    /// `_typeFilter` entries (`Type?query`), validated at kick-off.
    pub type_filters: Vec<String>,
    /// `includeAssociatedData`: older versions, and the last state of deleted resources.
    pub include_history: bool,
    pub include_deleted: bool,
    /// What a lenient kick-off ignored: the manifest's error file.
    pub notes: Vec<String>,
    /// The client that started it (None without auth).
    pub owner: Option<String>,
    pub container: String,
    /// The container was made for this export alone (deleted with it).
    pub own_container: bool,
    pub folder: String,
    pub part_size: i32,
    pub part_max_bytes: i64,
    /// Resources per export task: larger types are split into seq ranges.
    pub range_size: i64,
    /// The kick-off instant (database clock); also the "now" of `ap` date filters.
    pub created_at: DateTime<Utc>,
    /// `_anonymizationConfig`: the configuration's name, its text as read at kick-off, and
    /// the job's secret seed.
    pub anonymization_name: Option<String>,
    pub anonymization_config: Option<String>,
    pub anonymization_seed: Option<Vec<u8>>,
    /// `Prefer: separate-export-status`: status answers are 200, the job's status in
    /// `X-Export-Status`.
    pub separate_status: bool,
    /// `organizeOutputBy`: the type whose instances organize the output in blocks (`Patient`).
    pub organize_by: Option<String>,
    /// `allowPartialManifests=true`: the manifest comes in pages, the first while it runs.
    pub allow_partial_manifests: bool,
}

impl JobSpec {
    /// The instant the export reads the store as of: the transaction time, or just before
    /// `_until` when that is earlier (versions last updated *before* `_until`; the store keeps
    /// microseconds). `transactionTime` in the manifest stays the transaction time.
    pub fn snapshot_time(&self) -> DateTime<Utc> {
        match self.until {
            Some(until) => (until - chrono::TimeDelta::microseconds(1)).min(self.transaction_time),
            None => self.transaction_time,
        }
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct Job {
    pub id: Uuid,
    pub status: JobState,
    #[sqlx(flatten)]
    pub spec: JobSpec,
    /// Why it failed (for operators; clients see `error_id` only).
    pub error: Option<String>,
    pub error_id: Option<Uuid>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The primary's WAL position once the snapshot was complete (with a standby configured).
    pub read_lsn: Option<String>,
}

const SPEC_COLUMNS: &str = "level, request_url, transaction_time, since, types, named_patients, \
    excluded_groups, elements, type_filters, include_history, include_deleted, notes, owner, \
    container, own_container, folder, part_size, part_max_bytes, range_size, created_at, \
    anonymization_name, anonymization_config, anonymization_seed, separate_status, until, \
    organize_by, allow_partial_manifests";

/// Where a job's files live.
#[derive(Debug, Clone, FromRow)]
pub struct JobFiles {
    pub id: Uuid,
    pub container: String,
    pub own_container: bool,
    pub folder: String,
}

/// A running job's tasks, summed up for its status.
#[derive(Debug, Clone, FromRow)]
pub struct Progress {
    pub tasks: i64,
    pub tasks_done: i64,
    pub parts: i64,
    pub resources_done: i64,
    pub estimate: i64,
    /// Types being exported right now.
    pub running_types: Vec<String>,
    /// Write transactions open since kick-off that the plan still waits for.
    pub waiting_writers: i32,
    /// How far behind the job's snapshot the standby is while the plan waits for it.
    pub standby_behind_bytes: Option<i64>,
    /// Export tasks that read from the primary because the standby was behind or down.
    pub primary_fallbacks: i64,
}

pub(super) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The write transactions of this database that hold a write lock on `resources` (every writer
/// takes one before it reads the clock; see `resources::begin_write`), by virtual transaction
/// id. Locks of other databases and of this connection are not theirs.
const WRITERS: &str = "SELECT DISTINCT virtualtransaction FROM pg_locks
    WHERE locktype = 'relation' AND relation = 'resources'::regclass
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                   'AccessExclusiveLock')
      AND pid IS DISTINCT FROM pg_backend_pid()";

/// The database clock: the transaction time of a kick-off.
pub async fn now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT date_trunc('microseconds', clock_timestamp())")
        .fetch_one(pool)
        .await
}

/// Jobs queued or running: all of them, and those of `owner`.
pub async fn active_counts<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    owner: Option<&str>,
) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE owner IS NOT DISTINCT FROM $1)
         FROM export_jobs WHERE status IN ('queued', 'running')",
    )
    .bind(owner)
    .fetch_one(conn)
    .await
}

/// How many jobs may be queued or running at once.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub total: i64,
    pub per_client: i64,
}

/// Whether a kick-off got a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// `Quota::total` jobs are active.
    Busy,
    /// The client has `Quota::per_client` jobs active.
    ClientBusy,
}

/// Stores a job with its plan task (and the patients it reads, if named) and wakes the
/// workers, if the quota admits it. Admission is atomic: kick-offs take turns at the count, so
/// no burst gets past either limit. Must run after `now()` gave the transaction time: the
/// writers recorded here are those still open after it, which include every writer that could
/// stamp a version at or before it.
pub async fn create(
    pool: &PgPool,
    id: Uuid,
    spec: &JobSpec,
    patients: &[String],
    quota: Quota,
) -> sqlx::Result<Admission> {
    let mut tx = pool.begin().await?;
    // The patients first: copying a million of them must not happen under the admission lock.
    copy_patients(&mut tx, id, patients).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fhir-export admission', 0))")
        .execute(&mut *tx)
        .await?;
    let (total, own) = active_counts(&mut *tx, spec.owner.as_deref()).await?;
    if total >= quota.total {
        return Ok(Admission::Busy);
    }
    if own >= quota.per_client {
        return Ok(Admission::ClientBusy);
    }
    sqlx::query(&format!(
        "INSERT INTO export_jobs (id, {SPEC_COLUMNS}, writers)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, ARRAY({WRITERS}))"
    ))
    .bind(id)
    .bind(spec.level)
    .bind(&spec.request_url)
    .bind(spec.transaction_time)
    .bind(spec.since)
    .bind(&spec.types)
    .bind(spec.named_patients)
    .bind(&spec.excluded_groups)
    .bind(&spec.elements)
    .bind(&spec.type_filters)
    .bind(spec.include_history)
    .bind(spec.include_deleted)
    // What a lenient kick-off ignored may quote the client: stored as Postgres can hold it.
    .bind(
        spec.notes
            .iter()
            .map(|n| super::storable(n))
            .collect::<Vec<_>>(),
    )
    .bind(&spec.owner)
    .bind(&spec.container)
    .bind(spec.own_container)
    .bind(&spec.folder)
    .bind(spec.part_size)
    .bind(spec.part_max_bytes)
    .bind(spec.range_size)
    .bind(spec.created_at)
    .bind(&spec.anonymization_name)
    .bind(&spec.anonymization_config)
    .bind(&spec.anonymization_seed)
    .bind(spec.separate_status)
    .bind(spec.until)
    .bind(&spec.organize_by)
    .bind(spec.allow_partial_manifests)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO export_tasks (job_id, kind) VALUES ($1, 'plan')")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    notify::send(&mut tx, notify::TASKS, "").await?;
    tx.commit().await?;
    Ok(Admission::Accepted)
}

/// Stores the patients a job reads, with COPY. Ids are FHIR ids (letters, digits, `-`, `.`):
/// nothing in them needs escaping.
async fn copy_patients(
    conn: &mut PgConnection,
    job: Uuid,
    patients: &[String],
) -> sqlx::Result<()> {
    if patients.is_empty() {
        return Ok(());
    }
    let mut copy = conn
        .copy_in_raw("COPY export_job_patients (job_id, patient_id) FROM STDIN")
        .await?;
    let job = job.to_string();
    let mut buf = Vec::with_capacity(1 << 20);
    for id in patients {
        buf.extend_from_slice(job.as_bytes());
        buf.push(b'\t');
        buf.extend_from_slice(id.as_bytes());
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// How many of the writers recorded at a job's kick-off are still open.
pub async fn writers_remaining(pool: &PgPool, id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM ({WRITERS}) w, export_jobs j
         WHERE j.id = $1 AND w.virtualtransaction = ANY(j.writers)"
    ))
    .bind(id)
    .fetch_one(pool)
    .await
}

fn job_columns() -> String {
    format!(
        "id, status, {SPEC_COLUMNS}, error, error_id, finished_at, expires_at, \
         read_lsn::text AS read_lsn"
    )
}

/// A job its owner can still see: not cancelled, not expired. Other callers see nothing.
pub async fn visible(pool: &PgPool, id: Uuid, owner: Option<&str>) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "SELECT {} FROM export_jobs
         WHERE id = $1 AND owner IS NOT DISTINCT FROM $2 AND status <> 'cancelled'
           AND (expires_at IS NULL OR expires_at > now())",
        job_columns()
    ))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "SELECT {} FROM export_jobs WHERE id = $1",
        job_columns()
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
                    AS running_types,
                coalesce(max(waiting_writers) FILTER (WHERE kind = 'plan' AND status = 'running'),
                         0) AS waiting_writers,
                max(standby_behind_bytes) FILTER (WHERE kind = 'plan' AND status = 'running')
                    AS standby_behind_bytes,
                count(*) FILTER (WHERE read_source = 'primary') AS primary_fallbacks
         FROM export_tasks WHERE job_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
}

/// Whose job a cancel may touch.
#[derive(Debug, Clone, Copy)]
pub enum Canceller<'a> {
    /// The client that started it (`None` without auth).
    Owner(Option<&'a str>),
    /// An operator on the admin pages: any job.
    Admin,
}

/// Cancels a visible job, fences out its workers and tells them at once. Returns where its
/// files are.
pub async fn cancel(
    pool: &PgPool,
    id: Uuid,
    by: Canceller<'_>,
    sweep_after: Duration,
) -> sqlx::Result<Option<JobFiles>> {
    let (owner, admin) = match by {
        Canceller::Owner(owner) => (owner, false),
        Canceller::Admin => (None, true),
    };
    let mut tx = pool.begin().await?;
    let files: Option<JobFiles> = sqlx::query_as(
        "UPDATE export_jobs SET status = 'cancelled', finished_at = now(),
                expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND ($4 OR owner IS NOT DISTINCT FROM $3) AND status <> 'cancelled'
           AND (expires_at IS NULL OR expires_at > now())
         RETURNING id, container, own_container, folder",
    )
    .bind(id)
    .bind(secs(sweep_after))
    .bind(owner)
    .bind(admin)
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
    notify::send(&mut tx, notify::CANCELLED, &id.to_string()).await?;
    tx.commit().await?;
    Ok(files)
}

/// Completes the job when every task is done (called under the job's lock); returns whether
/// it did. A job still `queued` here had its claim skip marking it running (see
/// `tasks::claim`).
pub(super) async fn complete_if_all_done(
    conn: &mut PgConnection,
    id: Uuid,
    retention: Duration,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE export_jobs SET status = 'completed', finished_at = now(),
                expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND status IN ('queued', 'running')
           AND NOT EXISTS (SELECT 1 FROM export_tasks WHERE job_id = $1 AND status <> 'done')",
    )
    .bind(id)
    .bind(secs(retention))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A job that failed: its correlation id and the cause, for the one log line that reports it,
/// and where its files are (they are deleted).
#[derive(Debug, Clone, FromRow)]
pub struct FailedJob {
    pub id: Uuid,
    pub error_id: Uuid,
    pub error: String,
    #[sqlx(flatten)]
    pub files: JobFiles,
}

/// What a job that ended wrote, and how long it ran: its one log line.
#[derive(Debug, Clone, FromRow)]
pub struct Summary {
    pub id: Uuid,
    pub status: JobState,
    pub files: i64,
    pub resources: i64,
    pub bytes: i64,
    pub seconds: f64,
}

/// The files, resources and bytes a job committed, and its run time so far.
pub async fn summary(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Summary>> {
    sqlx::query_as(
        "SELECT j.id, j.status, count(p.resources) AS files,
                coalesce(sum(p.resources), 0)::bigint AS resources,
                coalesce(sum(p.bytes), 0)::bigint AS bytes,
                extract(epoch FROM coalesce(j.finished_at, now()) - j.created_at)::float8 AS seconds
         FROM export_jobs j LEFT JOIN export_parts p ON p.job_id = j.id
         WHERE j.id = $1 GROUP BY j.id",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Fails jobs whose task ran out of attempts, naming that task's last error under a new
/// correlation id, and stops their other tasks.
pub(super) async fn fail(
    conn: &mut PgConnection,
    ids: &[Uuid],
    retention: Duration,
) -> sqlx::Result<Vec<FailedJob>> {
    let failed: Vec<FailedJob> = sqlx::query_as(
        "UPDATE export_jobs j
         SET status = 'failed', finished_at = now(),
             expires_at = now() + make_interval(secs => $2),
             error_id = gen_random_uuid(),
             error = (SELECT 'export of ' || coalesce(t.resource_type, 'the plan') || ' failed after '
                             || t.failures || ' attempts: ' || coalesce(t.last_error, 'unknown error')
                      FROM export_tasks t WHERE t.job_id = j.id AND t.status = 'failed'
                      ORDER BY t.id LIMIT 1)
         WHERE j.id = ANY($1) AND j.status IN ('queued', 'running')
         RETURNING j.id, j.error_id, coalesce(j.error, 'unknown error') AS error,
                   j.container, j.own_container, j.folder",
    )
    .bind(ids)
    .bind(secs(retention))
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE export_tasks SET status = 'cancelled'
         WHERE job_id = ANY($1) AND status IN ('queued', 'running')",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(failed)
}

/// Serializes the "was this the last task?" check of tasks finishing at the same moment.
pub(super) async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM export_jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
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

/// Forgets a job: its patients, and the job row (its tasks and parts go with it).
pub async fn delete(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM export_job_patients WHERE job_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM export_jobs WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
