//! `fhir-export migrate`: applies pending migrations and exits.

use crate::{config::Config, db};

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let pool = db::connect(&config.database.url, 2).await?;
    db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}
