//! The tasks of export jobs, claimed by workers under a lease.
//!
//! A claimed task is a `HeldTask`. Its methods are the only writes a worker makes to the queue
//! and each is fenced by the attempt it holds (`held!()`): when the fence matches no row, the
//! lease is gone (rescued elsewhere, cancelled, expired) and the method returns
//! `Fenced::LeaseLost` having changed nothing. A worker frozen for an hour and then resumed can
//! therefore change nothing.

mod rescue;

use std::time::Duration;

use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

pub use rescue::{Rescued, RescuedTask, rescue_expired};

use super::{
    jobs::{self, FailedJob, secs},
    notify,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "task_kind", rename_all = "lowercase")]
pub enum TaskKind {
    /// Waits for the snapshot, then splits the job into the tasks below.
    Plan,
    /// The resources of a seq range of one type.
    Export,
    /// The deletions since `_since` (transaction Bundles).
    Deleted,
    /// Older versions (`includeAssociatedData=_history`).
    History,
    /// The last state of deleted resources (`includeAssociatedData=_deleted`).
    SoftDeleted,
    /// `organizeOutputBy=Patient`: the blocks of the patients in a range of ids.
    Blocks,
}

impl TaskKind {
    /// As stored (`task_kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Plan => "plan",
            TaskKind::Export => "export",
            TaskKind::Deleted => "deleted",
            TaskKind::History => "history",
            TaskKind::SoftDeleted => "softdeleted",
            TaskKind::Blocks => "blocks",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "task_state", rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl TaskState {
    /// As stored (`task_state`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// Where an export task reads its pages from when a standby is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "read_source", rename_all = "lowercase")]
pub enum ReadSource {
    Standby,
    /// The standby was behind the job's snapshot or did not answer.
    Primary,
}

/// `standby_behind_bytes` of a plan waiting for a standby that does not answer.
pub const STANDBY_NOT_ANSWERING: i64 = -1;

/// The lease rule every fenced statement shares: `$1` is the task id, `$2` the attempt held.
macro_rules! held {
    () => {
        "id = $1 AND attempt = $2 AND status = 'running' AND leased_until > now()"
    };
}

/// A task the planner hands on.
#[derive(Debug, Clone)]
pub struct PlannedTask {
    pub kind: TaskKind,
    pub resource_type: String,
    /// The resources with seq in (range_start, range_end].
    pub range_start: i64,
    pub range_end: i64,
    /// A blocks task's patients: ids in (block_after, block_last], `None` unbounded.
    pub block_after: Option<String>,
    pub block_last: Option<String>,
    pub estimate: i64,
}

/// A task's row as a claim returns it.
#[derive(Debug, Clone, FromRow)]
pub struct Task {
    pub id: i64,
    pub job_id: Uuid,
    pub kind: TaskKind,
    pub resource_type: Option<String>,
    pub range_start: i64,
    pub range_end: i64,
    /// The fencing token: bumped by every claim.
    pub attempt: i32,
    /// The last row of the last committed part: (seq, version).
    pub checkpoint_seq: i64,
    pub checkpoint_version: i32,
    /// A blocks task's range: patient ids in (block_after, block_last], `None` unbounded.
    pub block_after: Option<String>,
    pub block_last: Option<String>,
    /// A blocks task's checkpoint: the block of the last row written, and whether that row
    /// came after the block's Patient (see `Checkpoint`).
    pub checkpoint_block: Option<String>,
    pub checkpoint_after_patient: bool,
    /// Parts committed so far; the next part's number within the task.
    pub parts_done: i32,
}

const TASK_COLUMNS: &str = "id, job_id, kind, resource_type, range_start, range_end, attempt, \
    checkpoint_seq, checkpoint_version, block_after, block_last, checkpoint_block, \
    checkpoint_after_patient, parts_done";

/// The last row of a committed part, where the task resumes: (seq, version) in the order of
/// the export tasks' pages, and for a blocks task (block, after the Patient, seq).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub version: i32,
    pub block: Option<String>,
    pub after_patient: bool,
}

/// A committed part's counts, and whether its last block goes on in the task's next part.
#[derive(Debug, Clone, Copy)]
pub struct PartDone {
    pub resources: i32,
    pub bytes: i64,
    pub continues: bool,
}

/// A fenced write found the lease gone, or the database failed.
#[derive(Debug, thiserror::Error)]
pub enum Fenced {
    #[error("the task's lease is lost (rescued elsewhere, cancelled or expired)")]
    LeaseLost,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A claimed task: the one owner of its lease.
#[derive(Debug, Clone)]
pub struct HeldTask {
    pool: PgPool,
    lease: Duration,
    pub task: Task,
}

/// What a task's row says after a fault interrupted its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// Still ours: go on from the checkpoint (now in `task`).
    Held,
    /// Its last step committed before the fault was noticed.
    Finished,
}

/// Claims the oldest claimable queued task of a live job with a lease of `lease`, and marks
/// its job running: one statement, so a claim is never half done. It waits for no lock: a
/// task or a job row locked by another transaction (a cancel, a finishing task) is skipped,
/// so a claim can never deadlock with them. A skipped job stays `queued` for a moment; the
/// next claim of its tasks, or its end, moves it on.
pub async fn claim(pool: &PgPool, worker: &str, lease: Duration) -> sqlx::Result<Option<HeldTask>> {
    let task: Option<Task> = sqlx::query_as(&format!(
        "WITH next AS (
            SELECT t.id FROM export_tasks t JOIN export_jobs j ON j.id = t.job_id
            WHERE t.status = 'queued' AND j.status IN ('queued', 'running')
              AND (t.run_after IS NULL OR t.run_after <= now())
            ORDER BY t.id LIMIT 1 FOR UPDATE OF t SKIP LOCKED),
         claimed AS (
            UPDATE export_tasks t
            SET status = 'running', attempt = t.attempt + 1, worker = $1, run_after = NULL,
                leased_until = now() + make_interval(secs => $2), updated_at = now()
            FROM next WHERE t.id = next.id
            RETURNING t.*),
         job AS (
            UPDATE export_jobs j SET status = 'running'
            WHERE j.id = (SELECT q.id FROM export_jobs q JOIN claimed c ON q.id = c.job_id
                          WHERE q.status = 'queued' FOR UPDATE OF q SKIP LOCKED))
         SELECT {TASK_COLUMNS} FROM claimed"
    ))
    .bind(worker)
    .bind(secs(lease))
    .fetch_optional(pool)
    .await?;
    Ok(task.map(|task| HeldTask {
        pool: pool.clone(),
        lease,
        task,
    }))
}

/// `export_tasks.run_after` of a task's next attempt after its `failures` (the new count):
/// `backoff` doubled for each failure before this one, at most five minutes.
const RETRY_AFTER: &str =
    "now() + make_interval(secs => least($BACKOFF * power(2, least(failures, 16)), 300))";

fn fenced(rows: u64) -> Result<(), Fenced> {
    if rows == 0 {
        Err(Fenced::LeaseLost)
    } else {
        Ok(())
    }
}

impl HeldTask {
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Renews the lease.
    pub async fn heartbeat(&self) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET leased_until = now() + make_interval(secs => $3),
                    updated_at = now() WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(secs(self.lease))
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())
    }

    /// Checks the lease still holds: right before a file becomes visible.
    pub async fn holds(&self) -> Result<(), Fenced> {
        let held: bool = sqlx::query_scalar(concat!(
            "SELECT EXISTS (SELECT 1 FROM export_tasks WHERE ",
            held!(),
            ")"
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .fetch_one(&self.pool)
        .await?;
        fenced(u64::from(held))
    }

    /// Reserves the file number of the task's part `seq` among the job's `kind` files
    /// (`{kind}-{n}.ndjson`). A retried task gets the number it had reserved before, so it
    /// rewrites the same file.
    pub async fn reserve_part(&self, kind: &str, seq: i32) -> Result<i32, Fenced> {
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query(concat!(
            "SELECT 1 FROM export_tasks WHERE ",
            held!(),
            " FOR UPDATE"
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .fetch_optional(&mut *tx)
        .await?;
        if locked.is_none() {
            return Err(Fenced::LeaseLost);
        }
        let existing: Option<i32> = sqlx::query_scalar(
            "SELECT part_no FROM export_parts WHERE task_id = $1 AND task_seq = $2",
        )
        .bind(self.task.id)
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(part_no) = existing {
            return Ok(part_no);
        }
        // One numbering per (job, kind): take its lock for the max + 1 below.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2, 0))")
            .bind(self.task.job_id)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        let part_no: i32 = sqlx::query_scalar(
            "INSERT INTO export_parts (job_id, resource_type, part_no, task_id, task_seq)
             SELECT $1, $2, coalesce(max(part_no), 0) + 1, $3, $4
             FROM export_parts WHERE job_id = $1 AND resource_type = $2
             RETURNING part_no",
        )
        .bind(self.task.job_id)
        .bind(kind)
        .bind(self.task.id)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(part_no)
    }

    /// Records the committed part `seq` (its counts) and moves the checkpoint to `last`.
    pub async fn checkpoint(
        &mut self,
        seq: i32,
        last: Checkpoint,
        part: PartDone,
    ) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "WITH t AS (
                UPDATE export_tasks SET checkpoint_seq = $4, checkpoint_version = $5,
                       checkpoint_block = $8, checkpoint_after_patient = $9,
                       parts_done = $3 + 1, resources_done = resources_done + $6,
                       updated_at = now()
                WHERE parts_done = $3 AND ",
            held!(),
            " RETURNING id)
             UPDATE export_parts p SET resources = $6, bytes = $7, continues = $10
             FROM t WHERE p.task_id = t.id AND p.task_seq = $3"
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(seq)
        .bind(last.seq)
        .bind(last.version)
        .bind(part.resources)
        .bind(part.bytes)
        .bind(&last.block)
        .bind(last.after_patient)
        .bind(part.continues)
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())?;
        self.task.parts_done = seq + 1;
        self.task.checkpoint_seq = last.seq;
        self.task.checkpoint_version = last.version;
        self.task.checkpoint_block = last.block;
        self.task.checkpoint_after_patient = last.after_patient;
        Ok(())
    }

    /// Says how many write transactions the plan still waits for (for X-Progress).
    pub async fn set_waiting_writers(&self, writers: i32) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET waiting_writers = $3, updated_at = now() WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(writers)
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())
    }

    /// Records the primary's WAL position that a standby must have replayed before it may
    /// serve this job's pages (the plan takes it once the snapshot is complete).
    pub async fn set_read_lsn(&self, lsn: &str) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "UPDATE export_jobs SET read_lsn = $3::pg_lsn
             WHERE id = (SELECT job_id FROM export_tasks WHERE ",
            held!(),
            ")"
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(lsn)
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())
    }

    /// Says how far the standby is behind the job's snapshot while the plan waits for it
    /// (None: it no longer waits), for X-Progress.
    pub async fn set_standby_behind(&self, bytes: Option<i64>) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET standby_behind_bytes = $3, updated_at = now() WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(bytes)
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())
    }

    /// Records where this attempt reads its pages from, for X-Progress.
    pub async fn set_read_source(&self, source: ReadSource) -> Result<(), Fenced> {
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET read_source = $3 WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(source)
        .execute(&self.pool)
        .await?;
        fenced(done.rows_affected())
    }

    /// Marks the task done, adds the tasks it hands on (a plan's export tasks), and completes
    /// the job when nothing is left. Returns whether it did.
    pub async fn finish(
        &self,
        follow_ups: &[PlannedTask],
        retention: Duration,
    ) -> Result<bool, Fenced> {
        let mut tx = self.pool.begin().await?;
        jobs::lock(&mut tx, self.task.job_id).await?;
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET status = 'done', leased_until = NULL, waiting_writers = 0,
                    updated_at = now() WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .execute(&mut *tx)
        .await?;
        fenced(done.rows_affected())?;
        if !follow_ups.is_empty() {
            insert_planned(&mut tx, self.task.job_id, follow_ups).await?;
            notify::send(&mut tx, notify::TASKS, "").await?;
        }
        let completed = jobs::complete_if_all_done(&mut tx, self.task.job_id, retention).await?;
        tx.commit().await?;
        Ok(completed)
    }

    /// Gives the task back to the queue without counting a failure (graceful shutdown).
    pub async fn release(&self) -> Result<(), Fenced> {
        let mut conn = self.pool.acquire().await?;
        let done = sqlx::query(concat!(
            "UPDATE export_tasks SET status = 'queued', leased_until = NULL, updated_at = now()
             WHERE ",
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .execute(&mut *conn)
        .await?;
        fenced(done.rows_affected())?;
        notify::send(&mut conn, notify::TASKS, "").await?;
        Ok(())
    }

    /// Records a failed attempt: the task goes back to the queue to be claimed after its
    /// backoff, or, at `max_attempts` failures, the task and its job fail (returned). The job
    /// row is locked first, as every statement that changes a job and its tasks does.
    pub async fn fail(
        &self,
        error: &str,
        max_attempts: i32,
        retry: Retry,
    ) -> Result<Option<FailedJob>, Fenced> {
        let mut tx = self.pool.begin().await?;
        jobs::lock(&mut tx, self.task.job_id).await?;
        let failed: Option<bool> = sqlx::query_scalar(&format!(
            "UPDATE export_tasks
             SET failures = failures + 1, last_error = $3, leased_until = NULL, updated_at = now(),
                 status = CASE WHEN failures + 1 >= $4 THEN 'failed' ELSE 'queued' END::task_state,
                 run_after = {}
             WHERE {} RETURNING status = 'failed'",
            RETRY_AFTER.replace("$BACKOFF", "$5"),
            held!()
        ))
        .bind(self.task.id)
        .bind(self.task.attempt)
        .bind(super::storable(error))
        .bind(max_attempts)
        .bind(secs(retry.backoff))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(failed) = failed else {
            return Err(Fenced::LeaseLost);
        };
        let job = if failed {
            jobs::fail(&mut tx, &[self.task.job_id], retry.retention)
                .await?
                .pop()
        } else {
            None
        };
        notify::send(&mut tx, notify::TASKS, "").await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Reads the task's row again after a fault interrupted the attempt: whatever committed
    /// before the fault (a part, the finish) is taken as done.
    pub async fn resume(&mut self) -> Result<Resumed, Fenced> {
        let row: Option<(TaskState, bool)> = sqlx::query_as(
            "SELECT status, coalesce(leased_until > now(), false)
             FROM export_tasks WHERE id = $1 AND attempt = $2",
        )
        .bind(self.task.id)
        .bind(self.task.attempt)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((TaskState::Running, true)) => {
                self.task = sqlx::query_as(&format!(
                    "SELECT {TASK_COLUMNS} FROM export_tasks WHERE id = $1"
                ))
                .bind(self.task.id)
                .fetch_one(&self.pool)
                .await?;
                Ok(Resumed::Held)
            }
            Some((TaskState::Done, _)) => Ok(Resumed::Finished),
            _ => Err(Fenced::LeaseLost),
        }
    }
}

async fn insert_planned(
    conn: &mut PgConnection,
    job_id: Uuid,
    planned: &[PlannedTask],
) -> sqlx::Result<()> {
    let (mut kinds, mut types, mut starts, mut ends, mut estimates) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut block_after, mut block_last) = (vec![], vec![]);
    for p in planned {
        kinds.push(p.kind);
        types.push(p.resource_type.as_str());
        starts.push(p.range_start);
        ends.push(p.range_end);
        block_after.push(p.block_after.as_deref());
        block_last.push(p.block_last.as_deref());
        estimates.push(p.estimate);
    }
    sqlx::query(
        "INSERT INTO export_tasks (job_id, kind, resource_type, range_start, range_end,
                                   block_after, block_last, estimate)
         SELECT $1, k, t, s, e, a, l, n
         FROM unnest($2::task_kind[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
                     $7::text[], $8::bigint[])
             AS p(k, t, s, e, a, l, n)",
    )
    .bind(job_id)
    .bind(&kinds)
    .bind(&types)
    .bind(&starts)
    .bind(&ends)
    .bind(&block_after)
    .bind(&block_last)
    .bind(&estimates)
    .execute(conn)
    .await?;
    Ok(())
}

/// How a failed attempt is retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The pause before the second attempt; it doubles with each further failure.
    pub backoff: Duration,
    /// How long a job that fails for good keeps its row.
    pub retention: Duration,
}
