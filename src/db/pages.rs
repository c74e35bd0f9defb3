//! Manifest pages (`allowPartialManifests=true`): which committed files a page lists. A file is
//! published on one page, once, the first time a page is made; a page never changes after.

use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use super::parts::{CONTINUES_IN, Part};

/// A committed file not yet on a page, with what says whether it may be published yet.
#[derive(Debug, Clone, FromRow)]
pub struct Unpublished {
    pub resource_type: String,
    pub part_no: i32,
    pub task_id: i64,
    pub task_seq: i32,
    /// Its last block goes on in the task's next file.
    pub continues: bool,
}

/// Locks the pages of a job for the rest of the transaction: pages are made one at a time.
pub async fn lock(conn: &mut PgConnection, job: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/pages', 0))")
        .bind(job)
        .execute(conn)
        .await?;
    Ok(())
}

/// The highest page made so far (0: none).
pub async fn last_page(conn: &mut PgConnection, job: Uuid) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "SELECT coalesce(max(page), 0) FROM export_parts WHERE job_id = $1 AND page IS NOT NULL",
    )
    .bind(job)
    .fetch_one(conn)
    .await
}

/// The committed files no page lists yet, by kind and number.
pub async fn unpublished(conn: &mut PgConnection, job: Uuid) -> sqlx::Result<Vec<Unpublished>> {
    sqlx::query_as(
        "SELECT resource_type, part_no, task_id, task_seq, continues FROM export_parts
         WHERE job_id = $1 AND resources IS NOT NULL AND page IS NULL
         ORDER BY resource_type, part_no",
    )
    .bind(job)
    .fetch_all(conn)
    .await
}

/// Puts `files` (kind, number) on `page`.
pub async fn publish(
    conn: &mut PgConnection,
    job: Uuid,
    page: i32,
    files: &[(String, i32)],
) -> sqlx::Result<()> {
    let (kinds, numbers): (Vec<&str>, Vec<i32>) =
        files.iter().map(|(k, n)| (k.as_str(), *n)).unzip();
    sqlx::query(
        "UPDATE export_parts p SET page = $2
         FROM unnest($3::text[], $4::int[]) AS f(kind, part_no)
         WHERE p.job_id = $1 AND p.resource_type = f.kind AND p.part_no = f.part_no
           AND p.page IS NULL",
    )
    .bind(job)
    .bind(page)
    .bind(&kinds)
    .bind(&numbers)
    .execute(conn)
    .await?;
    Ok(())
}

/// The files of a page, by kind and number (with their continuations, which are on the same
/// page).
pub async fn files(pool: &PgPool, job: Uuid, page: i32) -> sqlx::Result<Vec<Part>> {
    sqlx::query_as(&format!(
        "SELECT resource_type, part_no, resources, {CONTINUES_IN} FROM export_parts p
         WHERE job_id = $1 AND page = $2 ORDER BY resource_type, part_no"
    ))
    .bind(job)
    .bind(page)
    .fetch_all(pool)
    .await
}
