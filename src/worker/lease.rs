//! A task's lease, renewed in the background several times per stale period. The lease is lost
//! for good once a renewal finds the task no longer ours, or once it has run out without a
//! successful renewal (the database was unreachable for a whole stale period: by then the task
//! may be rescued elsewhere). A cancelled job's leases check themselves at once.

use std::{sync::Arc, time::Duration};

use tokio::{sync::broadcast::error::RecvError, time::Instant};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::db::tasks::{Fenced, HeldTask};

pub struct Lease {
    lost: CancellationToken,
    heartbeat: tokio::task::JoinHandle<()>,
    context: Arc<Context>,
    /// The worker holding it.
    slot: usize,
}

impl Lease {
    /// Starts renewing `held`'s lease; each renewal shows worker `slot` alive.
    pub fn start(context: &Arc<Context>, held: &HeldTask, slot: usize) -> Lease {
        let lost = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(context.clone(), held.clone(), slot, lost.clone()));
        context.liveness.moved(slot);
        Lease {
            lost,
            heartbeat,
            context: context.clone(),
            slot,
        }
    }

    /// The task moved on (a file written, a wait that X-Progress reports): not stuck.
    pub fn moved(&self) {
        self.context.liveness.moved(self.slot);
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
        self.context.liveness.idle(self.slot);
    }
}

async fn heartbeat(context: Arc<Context>, held: HeldTask, slot: usize, lost: CancellationToken) {
    let every = held.lease() / 4;
    // After a failed renewal, try again soon: the lease keeps running out meanwhile.
    let soon = every.min(Duration::from_secs(2));
    let mut valid_until = Instant::now() + held.lease();
    let mut next_beat = Instant::now() + every;
    let mut cancelled = Some(context.cancelled.subscribe());
    loop {
        let cancel = async {
            match &mut cancelled {
                Some(receiver) => receiver.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next_beat) => {}
            job = cancel => match job {
                Ok(job) if job != held.task.job_id => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {
                    cancelled = None;
                    continue;
                }
            },
        }
        match held.heartbeat().await {
            Ok(()) => {
                valid_until = Instant::now() + held.lease();
                next_beat = Instant::now() + every;
                context.mark_alive(slot);
            }
            Err(Fenced::LeaseLost) => {
                lost.cancel();
                return;
            }
            Err(Fenced::Database(e)) => {
                tracing::warn!(task = held.task.id, error = %e, "heartbeat failed");
                if Instant::now() >= valid_until {
                    lost.cancel();
                    return;
                }
                next_beat = Instant::now() + soon;
            }
        }
    }
}
