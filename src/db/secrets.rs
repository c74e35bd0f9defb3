//! Secrets shared by every replica (`server_secrets`).

use sqlx::PgPool;

/// The secret `name`: the stored one, or `fresh` stored now when there is none yet (the first
/// replica's wins a race).
pub async fn get_or_create(pool: &PgPool, name: &str, fresh: &[u8]) -> sqlx::Result<Vec<u8>> {
    sqlx::query("INSERT INTO server_secrets (name, secret) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(name)
        .bind(fresh)
        .execute(pool)
        .await?;
    sqlx::query_scalar("SELECT secret FROM server_secrets WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
}
