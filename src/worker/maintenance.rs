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
        match tasks::rescue_expired(&context.pools.primary, max, context.retry()).await {
            Ok(rescued) => {
                if !rescued.tasks.is_empty() {
                    crate::metrics::tasks_rescued(rescued.tasks.len() as u64);
                    tracing::info!(
                        tasks = rescued.tasks.len(),
                        "rescued tasks whose lease ran out"
                    );
                }
                for task in &rescued.tasks {
                    discard_unfinished(&context, task).await;
                }
                for job in &rescued.failed {
                    super::report_failed(&context, job).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "rescuing stale tasks failed"),
        }
        if let Err(e) = sweep(&context).await {
            tracing::warn!(error = %format!("{e:#}"), "sweeping expired jobs failed");
        }
    }
}

/// Removes what the rescued attempt left half-written (a crash between creating a file and
/// committing it): the new attempt writes those files anew under names of its own.
async fn discard_unfinished(context: &Context, task: &tasks::RescuedTask) {
    let owner = storage::AttemptTag {
        task: task.id,
        attempt: task.attempt,
    };
    if let Err(e) = context
        .storage
        .discard_unfinished(&task.container, &task.folder, owner)
        .await
    {
        tracing::warn!(job = %task.job_id, task = task.id, error = %format!("{e:#}"),
            "removing a rescued attempt's unfinished files failed");
    }
}

/// Deletes the files, then the rows, of expired jobs. Safe to run in several processes.
pub async fn sweep(context: &Context) -> anyhow::Result<()> {
    for job in jobs::expired(&context.pools.primary, 20).await? {
        context.log_end(job.id, "expired").await;
        storage::delete_export(
            &*context.storage,
            &job.container,
            &job.folder,
            job.own_container,
        )
        .await?;
        jobs::delete(&context.pools.primary, job.id).await?;
    }
    Ok(())
}
