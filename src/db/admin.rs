//! What the operators' pages show: recent jobs with their tasks summed up per type, and one
//! job's tasks.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use super::jobs::{JobState, Level};
use super::tasks::{TaskKind, TaskState};

#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub status: JobState,
    pub level: Level,
    pub owner: Option<String>,
    pub types: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    pub type_filters: Vec<String>,
    pub elements: Vec<String>,
    pub named_patients: bool,
    pub include_history: bool,
    pub include_deleted: bool,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub error_id: Option<Uuid>,
    /// Claims of its tasks (first attempts included).
    pub attempts: i64,
    /// Attempts that failed or whose lease ran out (rescued).
    pub failures: i64,
}

/// One type of a job: its export tasks summed up.
#[derive(Debug, Clone, FromRow)]
pub struct TypeProgress {
    pub job_id: Uuid,
    /// `Patient`, or `Patient (history)` etc. for the other task kinds.
    pub label: String,
    pub resources_done: i64,
    pub estimate: i64,
    pub parts: i64,
    pub tasks: i64,
    pub tasks_done: i64,
}

#[derive(Debug, Clone, FromRow)]
pub struct TaskRow {
    pub id: i64,
    pub kind: TaskKind,
    pub resource_type: Option<String>,
    pub range_start: i64,
    pub range_end: i64,
    pub status: TaskState,
    pub attempt: i32,
    pub failures: i32,
    pub worker: Option<String>,
    pub leased_until: Option<DateTime<Utc>>,
    pub parts_done: i32,
    pub resources_done: i64,
    pub estimate: i64,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

const JOB_ROW: &str = "SELECT j.id, j.status, j.level, j.owner, j.types, j.since,
        j.type_filters, j.elements, j.named_patients, j.include_history, j.include_deleted,
        j.created_at,
        j.finished_at, j.error, j.error_id,
        coalesce(sum(t.attempt), 0)::bigint AS attempts,
        coalesce(sum(t.failures), 0)::bigint AS failures
    FROM export_jobs j LEFT JOIN export_tasks t ON t.job_id = j.id";

/// The most recent jobs, newest first.
pub async fn recent_jobs(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as(&format!(
        "{JOB_ROW} WHERE j.id IN (SELECT id FROM export_jobs ORDER BY created_at DESC LIMIT $1)
         GROUP BY j.id ORDER BY j.created_at DESC"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn job(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!("{JOB_ROW} WHERE j.id = $1 GROUP BY j.id"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Per job and type, for these jobs (one query for a whole page).
pub async fn type_progress(pool: &PgPool, jobs: &[Uuid]) -> sqlx::Result<Vec<TypeProgress>> {
    sqlx::query_as(
        "SELECT job_id,
                resource_type || CASE kind WHEN 'export' THEN '' ELSE ' (' || kind || ')' END
                    AS label,
                sum(resources_done)::bigint AS resources_done,
                sum(estimate)::bigint AS estimate,
                sum(parts_done)::bigint AS parts,
                count(*) AS tasks,
                count(*) FILTER (WHERE status = 'done') AS tasks_done
         FROM export_tasks
         WHERE job_id = ANY($1) AND kind <> 'plan'
         GROUP BY job_id, label ORDER BY job_id, label",
    )
    .bind(jobs)
    .fetch_all(pool)
    .await
}

pub async fn tasks(pool: &PgPool, job: Uuid) -> sqlx::Result<Vec<TaskRow>> {
    sqlx::query_as(
        "SELECT id, kind, resource_type, range_start, range_end, status, attempt, failures,
                worker, leased_until, parts_done, resources_done, estimate, last_error, updated_at
         FROM export_tasks WHERE job_id = $1 ORDER BY id",
    )
    .bind(job)
    .fetch_all(pool)
    .await
}
