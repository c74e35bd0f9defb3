//! Where export pages are read from: a streaming-replication standby (`database.read_url`)
//! once it has replayed past the job's snapshot, else the primary.
//!
//! The plan records the primary's WAL position after the snapshot is complete (every version
//! stamped at or before the transaction time is committed by then) and gives the standby up to
//! `database.read_max_wait_secs` to replay past it. Each page read checks that position again
//! on its standby connection, so a standby that lags, restarts or is swapped for another is
//! never read before it holds the whole snapshot: the task reads from the primary instead.

use std::time::Duration;

use sqlx::{PgPool, Postgres, pool::PoolConnection};

use super::{Context, TaskError, lease::Lease};
use crate::db::{
    jobs::Job,
    tasks::{Fenced, HeldTask, ReadSource, STANDBY_NOT_ANSWERING},
};

/// Records the snapshot's WAL position and waits (within the bound) until the standby has
/// replayed past it. Does nothing without a standby.
pub async fn wait_for_standby(
    context: &Context,
    held: &HeldTask,
    lease: &Lease,
) -> Result<(), TaskError> {
    let Some(standby) = &context.pools.standby else {
        return Ok(());
    };
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&context.pools.primary)
        .await?;
    held.set_read_lsn(&lsn).await?;
    let bound = Duration::from_secs(context.config.database.read_max_wait_secs);
    let started = tokio::time::Instant::now();
    let mut shown = None;
    let mut pause = Duration::from_millis(10);
    loop {
        let behind = match replay_behind(standby, &lsn).await {
            Ok(Some(bytes)) if bytes <= 0 => break,
            Ok(Some(bytes)) => bytes,
            Ok(None) | Err(_) => STANDBY_NOT_ANSWERING,
        };
        if shown != Some(behind) {
            held.set_standby_behind(Some(behind)).await?;
            shown = Some(behind);
        }
        if started.elapsed() >= bound {
            tracing::warn!(
                behind_bytes = behind,
                "the read standby has not replayed the snapshot in time: the job reads from the primary"
            );
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = lease.lost() => return Err(TaskError::LeaseLost),
        }
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    if shown.is_some() {
        held.set_standby_behind(None).await?;
    }
    Ok(())
}

/// How many bytes of WAL the standby still has to replay to reach `lsn` (≤ 0: it is there).
/// None: it is not a standby (any more), so it cannot vouch for the snapshot.
async fn replay_behind(conn: impl sqlx::PgExecutor<'_>, lsn: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery()
                     THEN pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn())::bigint END",
    )
    .bind(lsn)
    .fetch_one(conn)
    .await
}

/// Hands out page connections for one attempt of an export task.
pub struct PageSource<'a> {
    context: &'a Context,
    /// The standby and the position it must have replayed, while it is still worth asking.
    standby: Option<(&'a PgPool, &'a str)>,
    recorded: Option<ReadSource>,
}

impl<'a> PageSource<'a> {
    pub fn new(context: &'a Context, job: &'a Job) -> PageSource<'a> {
        let standby = match (&context.pools.standby, &job.read_lsn) {
            (Some(pool), Some(lsn)) => Some((pool, lsn.as_str())),
            _ => None,
        };
        PageSource {
            context,
            standby,
            recorded: None,
        }
    }

    /// A connection that sees the whole snapshot: the standby's when it has replayed past it,
    /// else (for the rest of this attempt) the primary's.
    pub async fn connection(
        &mut self,
        held: &HeldTask,
    ) -> Result<PoolConnection<Postgres>, TaskError> {
        if let Some((pool, lsn)) = self.standby {
            match caught_up(pool, lsn).await {
                Ok(conn) => {
                    self.record(held, ReadSource::Standby).await?;
                    return Ok(conn);
                }
                Err(reason) => {
                    tracing::warn!(%reason, "reading pages from the primary");
                    self.standby = None;
                    self.record(held, ReadSource::Primary).await?;
                }
            }
        }
        let asked = std::time::Instant::now();
        let conn = self.context.pools.pages.acquire().await?;
        crate::metrics::page_connection_acquired(asked.elapsed());
        Ok(conn)
    }

    async fn record(&mut self, held: &HeldTask, source: ReadSource) -> Result<(), Fenced> {
        if self.recorded != Some(source) {
            held.set_read_source(source).await?;
            self.recorded = Some(source);
        }
        Ok(())
    }
}

/// A standby connection that has replayed past `lsn`, or why there is none.
async fn caught_up(pool: &PgPool, lsn: &str) -> anyhow::Result<PoolConnection<Postgres>> {
    let mut conn = pool.acquire().await?;
    match replay_behind(&mut *conn, lsn).await? {
        Some(bytes) if bytes <= 0 => Ok(conn),
        Some(bytes) => anyhow::bail!("the read standby is {bytes} bytes behind the snapshot"),
        None => anyhow::bail!("the read database is not a standby"),
    }
}
