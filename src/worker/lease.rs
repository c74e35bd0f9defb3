//! A task's lease: renewed in the background several times per stale period; once a renewal
//! finds the task no longer ours, the lease is lost for good.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Context;
use crate::db::jobs::{self, Task};

pub struct Lease {
    lost: CancellationToken,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub fn start(context: &Arc<Context>, task: &Task) -> Lease {
        let lost = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(context.clone(), task.clone(), lost.clone()));
        Lease { lost, heartbeat }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    pub async fn lost(&self) {
        self.lost.cancelled().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

async fn heartbeat(context: Arc<Context>, task: Task, lost: CancellationToken) {
    let every = context.lease_duration() / 4;
    loop {
        tokio::time::sleep(every).await;
        match jobs::heartbeat(&context.pool, &task, context.lease_duration()).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            // The database may be back before the lease runs out; fenced writes stay safe.
            Err(e) => tracing::warn!(task = task.id, error = %e, "heartbeat failed"),
        }
    }
}
