//! Whether the database answers, known at all times: a watcher pings it every second on a
//! connection of its own (so a busy pool never looks like a dead database), with a one-second
//! limit on each ping and each reconnect. While it is down, requests are answered 503 at once
//! instead of waiting for the pool's acquire timeout, and `/health` says so without asking.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use sqlx::{ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the database is asked, and how long each question may take.
const EVERY: Duration = Duration::from_secs(1);

pub struct Availability {
    up: AtomicBool,
    /// Changes to `false` the moment the database is found down.
    changes: watch::Sender<bool>,
}

impl Default for Availability {
    fn default() -> Self {
        Availability {
            up: AtomicBool::new(true),
            changes: watch::channel(true).0,
        }
    }
}

impl Availability {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Resolves when the database is found down (at once if it is down now).
    pub async fn went_down(&self) {
        let mut changes = self.changes.subscribe();
        let _ = changes.wait_for(|up| !up).await;
    }

    fn set(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("the database answers again");
            } else {
                tracing::warn!("the database does not answer; requests get 503 until it does");
            }
            self.changes.send_replace(up);
        }
    }

    /// Pings the database until `shutdown`.
    pub async fn watch(&self, options: PgConnectOptions, shutdown: CancellationToken) {
        let mut connection: Option<PgConnection> = None;
        let mut failures = 0;
        loop {
            // Two failures in a row: one lost connection is not yet a database that is down.
            failures = if ping(&options, &mut connection).await {
                0
            } else {
                failures + 1
            };
            self.set(failures < 2);
            tokio::select! {
                _ = tokio::time::sleep(if failures == 1 { EVERY / 4 } else { EVERY }) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// One ping on the watcher's connection, connecting first if it has none.
async fn ping(options: &PgConnectOptions, connection: &mut Option<PgConnection>) -> bool {
    if connection.is_none() {
        let options = options.clone().log_statements(log::LevelFilter::Trace);
        *connection = match tokio::time::timeout(EVERY, options.connect()).await {
            Ok(Ok(c)) => Some(c),
            _ => return false,
        };
    }
    let conn = connection.as_mut().expect("connected above");
    match tokio::time::timeout(EVERY, conn.ping()).await {
        Ok(Ok(())) => true,
        _ => {
            *connection = None;
            false
        }
    }
}
