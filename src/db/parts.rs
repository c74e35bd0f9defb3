//! A job's output files (`export_parts`): the committed ones, and whether one may be served.

use sqlx::{FromRow, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct Part {
    pub resource_type: String,
    pub part_no: i32,
    pub resources: i32,
    /// The number of the file its last block goes on in (same kind), once that is committed.
    pub continues_in: Option<i32>,
}

/// A part's continuation: the committed part after it in its task.
pub(super) const CONTINUES_IN: &str = "CASE WHEN p.continues THEN
        (SELECT n.part_no FROM export_parts n
         WHERE n.task_id = p.task_id AND n.task_seq = p.task_seq + 1 AND n.resources IS NOT NULL)
    END AS continues_in";

/// The committed output files of a job, by type and number.
pub async fn parts(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<Part>> {
    sqlx::query_as(&format!(
        "SELECT resource_type, part_no, resources, {CONTINUES_IN} FROM export_parts p
         WHERE job_id = $1 AND resources IS NOT NULL ORDER BY resource_type, part_no"
    ))
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Is `{kind}-{n}.ndjson` a committed file of this job (and, if `published`, on a manifest
/// page)?
pub async fn has_part(
    pool: &PgPool,
    id: Uuid,
    kind: &str,
    part_no: i32,
    published: bool,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM export_parts WHERE job_id = $1 AND resource_type = $2
                        AND part_no = $3 AND resources IS NOT NULL
                        AND (page IS NOT NULL OR NOT $4))",
    )
    .bind(id)
    .bind(kind)
    .bind(part_no)
    .bind(published)
    .fetch_one(pool)
    .await
}
