//! Exponential backoff with jitter, for retries of faults that go away by themselves (workers,
//! the bulk client).

use std::time::Duration;

pub struct Backoff {
    next: Duration,
    max: Duration,
}

const FIRST: Duration = Duration::from_millis(100);

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        Backoff::starting(FIRST, max)
    }

    /// Pauses from `first` on, doubling up to `max`.
    pub fn starting(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
        }
    }

    /// The next pause: doubling up to `max`, each within ±25 % so that many workers hit by
    /// one outage do not retry in step.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = 0.75 + rand_fraction() / 2.0;
        pause.mul_f64(jitter)
    }

    pub fn reset(&mut self) {
        self.next = FIRST.min(self.max);
    }
}

/// A number in [0, 1) that differs between calls and processes (not for cryptography).
fn rand_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let pauses: Vec<Duration> = (0..6).map(|_| b.pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(75) && pauses[0] <= Duration::from_millis(125));
        assert!(pauses[5] >= Duration::from_millis(375) && pauses[5] <= Duration::from_millis(625));
        b.reset();
        assert!(b.pause() <= Duration::from_millis(125));
    }
}
