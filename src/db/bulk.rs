//! A load into an empty store as one transaction: the table is taken for the load, truncated
//! (so that COPY may write its rows frozen and all-visible, with no vacuum afterwards), stripped
//! of its indexes, filled, and indexed again from sorted input. Building a B-tree from a sort
//! costs a fraction of inserting the same keys one by one (the primary key's are random
//! UUIDs). If anything fails, the rollback leaves the store empty with its indexes as before.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::resources::{self, CopyWriter};

/// How long to wait for readers and writers of the store to finish before giving up on the
/// bulk path: while the lock is requested, every new statement on the store queues behind it.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Sort memory of the index builds (the server's default, 64 MB, spills a 10 M-row key to disk).
const INDEX_BUILD_MEMORY: &str = "512MB";

/// An index of `resources`, as it was before the load dropped it.
#[derive(Debug)]
struct Index {
    /// Quoted for SQL.
    name: String,
    /// `pg_get_indexdef`: the `CREATE INDEX` statement that builds it again.
    definition: String,
    /// The constraint the index backs, if any: `p` (primary key) or `u` (unique).
    constraint: Option<String>,
}

/// Why the bulk path was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The store holds resources: a load must version them, row by row.
    NotEmpty,
    /// Others read or wrote the store for longer than `LOCK_WAIT`.
    Busy,
}

/// How a bulk load ended without being committed.
#[derive(Debug)]
pub enum Failed {
    /// A resource came more than once (the primary key could not be built): versions must be
    /// numbered by a load that looks each resource up.
    Duplicate,
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Failed::Database(e)
    }
}

/// The open transaction of a bulk load: the store is locked, empty and without indexes.
pub struct BulkLoad {
    tx: Transaction<'static, Postgres>,
    indexes: Vec<Index>,
    /// The first number of `resource_seq` this load gives out; the rest follow without gaps.
    pub first_seq: i64,
    /// The database clock when the store was taken.
    pub started_at: DateTime<Utc>,
}

impl BulkLoad {
    /// Takes the store for a bulk load if it is empty and free within `LOCK_WAIT`.
    pub async fn open(pool: &PgPool) -> sqlx::Result<Result<BulkLoad, Refused>> {
        // Asked first without the lock, so that a load into a store in use never makes its
        // readers queue behind a lock request.
        if !is_empty(pool).await? {
            return Ok(Err(Refused::NotEmpty));
        }
        let mut tx = pool.begin().await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            LOCK_WAIT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        // Before the clock is read, like every writer (see `resources::begin_write`), so that
        // a kick-off meanwhile waits for this transaction.
        let locked = sqlx::query("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await;
        match locked {
            Ok(_) => {}
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03") => {
                return Ok(Err(Refused::Busy));
            }
            Err(e) => return Err(e),
        }
        sqlx::query("SET LOCAL lock_timeout = 0")
            .execute(&mut *tx)
            .await?;
        if !is_empty(&mut *tx).await? {
            return Ok(Err(Refused::NotEmpty));
        }
        let indexes = indexes(&mut tx).await?;
        sqlx::query("TRUNCATE resources").execute(&mut *tx).await?;
        for index in &indexes {
            let drop = match &index.constraint {
                Some(_) => format!("ALTER TABLE resources DROP CONSTRAINT {}", index.name),
                None => format!("DROP INDEX {}", index.name),
            };
            sqlx::query(&drop).execute(&mut *tx).await?;
        }
        let first_seq = sqlx::query_scalar("SELECT nextval('resource_seq')")
            .fetch_one(&mut *tx)
            .await?;
        let started_at = resources::next_timestamp(&mut tx, None).await?;
        Ok(Ok(BulkLoad {
            tx,
            indexes,
            first_seq,
            started_at,
        }))
    }

    /// The COPY the load streams its rows into, frozen.
    pub async fn copy(&mut self) -> sqlx::Result<CopyWriter<'_>> {
        CopyWriter::start(&mut self.tx, true).await
    }

    /// Builds the indexes again, moves `resource_seq` past the `rows` given out, gathers the
    /// planner's statistics and commits.
    pub async fn commit(mut self, rows: u64) -> Result<(), Failed> {
        sqlx::query(&format!(
            "SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"
        ))
        .execute(&mut *self.tx)
        .await?;
        for index in &self.indexes {
            build(&mut self.tx, index).await.map_err(|e| {
                match e.as_database_error().and_then(|d| d.code()).as_deref() {
                    Some("23505") => Failed::Duplicate,
                    _ => Failed::Database(e),
                }
            })?;
        }
        if rows > 0 {
            sqlx::query("SELECT setval('resource_seq', $1)")
                .bind(self.first_seq + rows as i64 - 1)
                .execute(&mut *self.tx)
                .await?;
        }
        sqlx::query("ANALYZE resources")
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

async fn is_empty<'c>(conn: impl sqlx::PgExecutor<'c>) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM resources)")
        .fetch_one(conn)
        .await
}

/// The indexes of `resources`, with the constraints they back.
async fn indexes(tx: &mut PgConnection) -> sqlx::Result<Vec<Index>> {
    sqlx::query_as::<_, (String, String, Option<String>)>(
        "SELECT quote_ident(i.relname), pg_get_indexdef(i.oid), c.contype::text
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
                                   AND c.contype IN ('p', 'u')
         WHERE x.indrelid = 'resources'::regclass
         ORDER BY i.relname",
    )
    .fetch_all(tx)
    .await
    .map(|rows| {
        rows.into_iter()
            .map(|(name, definition, constraint)| Index {
                name,
                definition,
                constraint,
            })
            .collect()
    })
}

async fn build(tx: &mut PgConnection, index: &Index) -> sqlx::Result<()> {
    sqlx::query(&index.definition).execute(&mut *tx).await?;
    let kind = match index.constraint.as_deref() {
        Some("p") => "PRIMARY KEY",
        Some(_) => "UNIQUE",
        None => return Ok(()),
    };
    sqlx::query(&format!(
        "ALTER TABLE resources ADD CONSTRAINT {0} {kind} USING INDEX {0}",
        index.name
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}
