//! Replay protection for SMART client assertions: each `jti` is accepted once per client until
//! its assertion expires (shared by every replica through the database).

use chrono::DateTime;
use sqlx::PgPool;

/// Remembers `jti`; `false` if the client used it before.
pub async fn record(pool: &PgPool, client_id: &str, jti: &str, exp: u64) -> sqlx::Result<bool> {
    let expires_at = DateTime::from_timestamp(exp.min(i64::MAX as u64) as i64, 0)
        .unwrap_or(DateTime::<chrono::Utc>::MAX_UTC);
    // Expired entries can never be replayed (their assertions are refused anyway).
    sqlx::query("DELETE FROM auth_assertions WHERE client_id = $1 AND expires_at < now()")
        .bind(client_id)
        .execute(pool)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO auth_assertions (client_id, jti, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(client_id)
    .bind(jti)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}
