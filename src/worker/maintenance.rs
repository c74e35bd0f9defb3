//! Queue upkeep, run by every process that has workers: rescue tasks whose lease ran out and
//! delete jobs (and their files) whose time is up.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Context;
use crate::{
    db::{jobs, tasks},
    storage,
};

pub async fn run(context: Arc<Context>, shutdown: CancellationToken) {
    // Often enough that a stale task waits at most a fraction of the stale period extra.
    let every = (context.lease_duration() / 4).min(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let max = context.config.export.max_attempts;
        match tasks::rescue_expired(&context.pools.primary, max, context.retention()).await {
            Ok(rescued) => {
                if rescued.tasks > 0 {
                    crate::metrics::tasks_rescued(rescued.tasks);
                    tracing::info!(tasks = rescued.tasks, "rescued tasks whose lease ran out");
                }
                rescued.failed.iter().for_each(super::report_failed);
            }
            Err(e) => tracing::warn!(error = %e, "rescuing stale tasks failed"),
        }
        if let Err(e) = sweep(&context).await {
            tracing::warn!(error = %format!("{e:#}"), "sweeping expired jobs failed");
        }
    }
}

/// Deletes the files, then the rows, of expired jobs. Safe to run in several processes.
pub async fn sweep(context: &Context) -> anyhow::Result<()> {
    for job in jobs::expired(&context.pools.primary, 20).await? {
        storage::delete_export(
            &*context.storage,
            &job.container,
            &job.folder,
            job.own_container,
        )
        .await?;
        jobs::delete(&context.pools.primary, job.id).await?;
        tracing::info!(job = %job.id, "expired job deleted");
    }
    Ok(())
}
