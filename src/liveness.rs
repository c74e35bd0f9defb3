//! When each export worker of this process last showed life (an idle poll, a lease
//! heartbeat) and, while it holds a task, when that task last moved on (claimed, a file
//! written, a plan still waiting as reported), so that `/health` can report a worker whose loop
//! is gone and one whose task is stuck (retrying a fault that does not go away, or failing to
//! record its failure).

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

pub struct Liveness {
    /// Per worker: unix seconds of its last sign of life.
    alive: Box<[AtomicI64]>,
    /// Per worker: unix seconds its task last moved on; 0 while it holds none.
    moved: Box<[AtomicI64]>,
    /// Longer than this without a sign of life is stalled.
    limit: Duration,
    /// A held task that has not moved on for this long is stuck.
    stuck_after: Duration,
}

/// "Holds no task" in `moved`.
const IDLE: i64 = 0;

impl Liveness {
    /// `workers` workers that poll every `poll` and renew leases every `stale_after / 4`; one
    /// silent for half a stale period (two missed renewals) is stalled, one whose task has not
    /// moved on for a stale period is stuck.
    pub fn new(workers: usize, stale_after: Duration, poll: Duration) -> Liveness {
        let now = unix_now();
        Liveness {
            alive: (0..workers).map(|_| AtomicI64::new(now)).collect(),
            moved: (0..workers).map(|_| AtomicI64::new(IDLE)).collect(),
            limit: (stale_after / 2).max(poll * 3),
            stuck_after: stale_after.max(poll * 3),
        }
    }

    pub fn mark(&self, worker: usize) {
        self.alive[worker].store(unix_now(), Ordering::Relaxed);
    }

    /// Worker `worker`'s task moved on (or was just claimed).
    pub fn moved(&self, worker: usize) {
        self.moved[worker].store(unix_now(), Ordering::Relaxed);
    }

    /// Worker `worker` holds no task any more.
    pub fn idle(&self, worker: usize) {
        self.moved[worker].store(IDLE, Ordering::Relaxed);
    }

    pub fn workers(&self) -> usize {
        self.alive.len()
    }

    pub fn stalled(&self) -> usize {
        older_than(&self.alive, self.limit)
    }

    pub fn stuck(&self) -> usize {
        older_than(&self.moved, self.stuck_after)
    }
}

/// How many of `times` (unix seconds; `IDLE` skipped) lie more than `limit` in the past.
fn older_than(times: &[AtomicI64], limit: Duration) -> usize {
    let (now, limit) = (unix_now(), limit.as_secs() as i64 + 1);
    times
        .iter()
        .map(|t| t.load(Ordering::Relaxed))
        .filter(|&t| t != IDLE && now - t > limit)
        .count()
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_worker_is_stalled() {
        let live = Liveness::new(2, Duration::from_secs(2), Duration::from_millis(100));
        assert_eq!(live.stalled(), 0);
        live.alive[1].store(unix_now() - 60, Ordering::Relaxed);
        assert_eq!(live.stalled(), 1);
        live.mark(1);
        assert_eq!(live.stalled(), 0);
    }

    #[test]
    fn a_task_that_does_not_move_on_is_stuck_until_released() {
        let live = Liveness::new(2, Duration::from_secs(2), Duration::from_millis(100));
        live.moved(0);
        assert_eq!(live.stuck(), 0);
        live.moved[0].store(unix_now() - 60, Ordering::Relaxed);
        assert_eq!(live.stuck(), 1);
        live.idle(0);
        assert_eq!(live.stuck(), 0);
    }
}
