//! When each export worker of this process last showed life (an idle poll, a lease
//! heartbeat), so that `/health` can report one that is stuck or whose loop is gone.

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

pub struct Liveness {
    /// Per worker: unix seconds of its last sign of life.
    alive: Box<[AtomicI64]>,
    /// Longer than this without one is stalled.
    limit: Duration,
}

impl Liveness {
    /// `workers` workers that poll every `poll` and renew leases every `stale_after / 4`; one
    /// silent for half a stale period (two missed renewals) is stalled.
    pub fn new(workers: usize, stale_after: Duration, poll: Duration) -> Liveness {
        let now = unix_now();
        Liveness {
            alive: (0..workers).map(|_| AtomicI64::new(now)).collect(),
            limit: (stale_after / 2).max(poll * 3),
        }
    }

    pub fn mark(&self, worker: usize) {
        self.alive[worker].store(unix_now(), Ordering::Relaxed);
    }

    pub fn workers(&self) -> usize {
        self.alive.len()
    }

    pub fn stalled(&self) -> usize {
        let (now, limit) = (unix_now(), self.limit.as_secs() as i64 + 1);
        self.alive
            .iter()
            .filter(|t| now - t.load(Ordering::Relaxed) > limit)
            .count()
    }
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
}
