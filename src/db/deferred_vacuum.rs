//! The vacuum after large transactions, once they pause: a burst of them (a bulk load sent as
//! Bundles) gets one `VACUUM` at its end instead of one per transaction competing with the
//! next, and a transaction that ends while a vacuum runs gets another one after it.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::Notify;

/// How long writes must pause before the vacuum starts.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct DeferredVacuum {
    wanted: Arc<Notify>,
}

impl DeferredVacuum {
    /// Starts the task that vacuums `pool`'s store when asked to (inside a Tokio runtime).
    pub fn start(pool: PgPool) -> DeferredVacuum {
        let wanted = Arc::new(Notify::new());
        let asks = wanted.clone();
        tokio::spawn(async move {
            loop {
                asks.notified().await;
                // Each request during the quiet period starts it again.
                while tokio::time::timeout(QUIET, asks.notified()).await.is_ok() {}
                if let Err(e) = super::resources::vacuum(&pool, false).await {
                    tracing::warn!(error = %e, "vacuum after large transactions failed");
                }
            }
        });
        DeferredVacuum { wanted }
    }

    /// Asks for a vacuum once writes pause. A request while one runs gets another after it.
    pub fn request(&self) {
        self.wanted.notify_one();
    }
}
