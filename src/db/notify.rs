//! The queue's NOTIFY channels: jobs and tasks both announce on them, workers LISTEN.

use sqlx::PgConnection;

/// Wakes idle workers: a task is ready.
pub const TASKS: &str = "fhir_export_tasks";
/// Tells workers a job was cancelled (payload: the job id).
pub const CANCELLED: &str = "fhir_export_cancel";

/// Sends `payload` on `channel` (delivered when the transaction of `conn` commits).
pub async fn send(conn: &mut PgConnection, channel: &str, payload: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}
