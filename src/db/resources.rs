//! The resource store: versioned writes, reads, bulk COPY, and the snapshot pages export reads.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

/// The current version of a resource, as far as writes care.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub version_id: i32,
    pub seq: i64,
    pub last_updated: DateTime<Utc>,
    pub deleted: bool,
}

/// A stored version; `body` is `None` for a delete.
#[derive(Debug)]
pub struct Version {
    pub version_id: i32,
    pub last_updated: DateTime<Utc>,
    pub body: Option<String>,
}

/// A version about to be written.
#[derive(Debug)]
pub struct NewVersion {
    pub resource_type: String,
    pub id: String,
    pub version_id: i32,
    pub seq: i64,
    pub last_updated: DateTime<Utc>,
    pub is_current: bool,
    pub patient_ids: Vec<String>,
    pub body: Option<String>,
}

pub type ResourceKey = (String, String);

/// Starts a write transaction and announces it as a writer before any timestamp is taken.
///
/// Why: an export's transaction time T is only handed out once every writer that could stamp a
/// version at or before T has ended (see `db::jobs::create`). Writers are found by the lock this
/// takes (ROW EXCLUSIVE: it conflicts with no other writer or reader), so it must be held before
/// the clock is read.
pub async fn begin_write(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE resources IN ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The locked current version of one resource: its head, its row address (for
/// `retire_rows`) and its compartment membership.
#[derive(Debug)]
pub struct Current {
    pub head: Head,
    pub address: String,
    pub patient_ids: Vec<String>,
}

/// Locks and returns the current version of one resource; concurrent writers of the resource
/// queue here, one after the other.
pub async fn lock_current(
    tx: &mut PgConnection,
    resource_type: &str,
    id: &str,
) -> sqlx::Result<Option<Current>> {
    loop {
        let row = sqlx::query(
            "SELECT version_id, seq, last_updated, body IS NULL AS deleted, ctid::text, patient_ids
             FROM resources WHERE resource_type = $1 AND id = $2 AND is_current FOR UPDATE",
        )
        .bind(resource_type)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = row {
            return Ok(Some(Current {
                head: Head {
                    version_id: r.get(0),
                    seq: r.get(1),
                    last_updated: r.get(2),
                    deleted: r.get(3),
                },
                address: r.get(4),
                patient_ids: r.get(5),
            }));
        }
        // Nothing current: the resource is new, or the writer we queued behind retired the row
        // we waited for (READ COMMITTED re-checks only that row, not its successor). A resource
        // with any version always has a current one, which a new statement sees.
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM resources WHERE resource_type = $1 AND id = $2)",
        )
        .bind(resource_type)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if !exists {
            return Ok(None);
        }
    }
}

/// Locks and returns the current versions of many resources (one round trip).
/// Also returns each locked row's physical address, for `retire_rows`.
pub async fn lock_current_many(
    tx: &mut PgConnection,
    keys: &[ResourceKey],
) -> sqlx::Result<HashMap<ResourceKey, (Head, String)>> {
    let (types, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    // LATERAL keeps this to one primary-key probe per key whatever the table's statistics say.
    let rows = sqlx::query(
        "SELECT r.resource_type, r.id, r.version_id, r.seq, r.last_updated, r.body IS NULL,
                r.address
         FROM unnest($1::text[], $2::text[]) AS k(t, i)
         CROSS JOIN LATERAL (
             SELECT r.*, r.ctid::text AS address FROM resources r
             WHERE r.resource_type = k.t AND r.id = k.i AND r.is_current FOR UPDATE) r",
    )
    .bind(&types)
    .bind(&ids)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let head = Head {
                version_id: r.get(2),
                seq: r.get(3),
                last_updated: r.get(4),
                deleted: r.get(5),
            };
            ((r.get(0), r.get(1)), (head, r.get(6)))
        })
        .collect())
}

/// The server clock, strictly after `after` (microsecond precision, as Postgres stores it).
pub async fn next_timestamp(
    tx: &mut PgConnection,
    after: Option<DateTime<Utc>>,
) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT greatest(date_trunc('microseconds', clock_timestamp()),
                         $1 + interval '1 microsecond')",
    )
    .bind(after)
    .fetch_one(tx)
    .await
}

/// `n` new resource numbers (see `resource_seq` in the migrations).
pub async fn next_seqs(tx: &mut PgConnection, n: usize) -> sqlx::Result<Vec<i64>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT nextval('resource_seq') FROM generate_series(1, $1)")
        .bind(n as i64)
        .fetch_all(tx)
        .await
}

/// Marks rows locked by `lock_current(_many)` (by physical address) as no longer current. The
/// rows are locked, so their addresses hold until the transaction ends; addressing them
/// directly keeps this a handful of page visits whatever the planner thinks of a join.
pub async fn retire_rows(tx: &mut PgConnection, rows: &[String]) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE resources SET is_current = false WHERE ctid = ANY($1::text[]::tid[])")
        .bind(rows)
        .execute(tx)
        .await?;
    Ok(())
}

/// Inserts one version. `false`: that version already exists — a concurrent writer created
/// the resource first (the insert waited for it to commit); start over from `lock_current`.
pub async fn insert_version(tx: &mut PgConnection, v: &NewVersion) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO resources
           (resource_type, id, version_id, seq, last_updated, is_current, patient_ids, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (resource_type, id, version_id) DO NOTHING",
    )
    .bind(&v.resource_type)
    .bind(&v.id)
    .bind(v.version_id)
    .bind(v.seq)
    .bind(v.last_updated)
    .bind(v.is_current)
    .bind(&v.patient_ids)
    .bind(&v.body)
    .execute(tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Two writers wrote the same version of a resource: the later one must start over.
pub fn is_version_collision(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|d| d.constraint()) == Some("resources_pkey")
}

/// A version as COPY writes it; the body comes in pieces written one after the other
/// (`None` for a delete).
pub struct CopyRow<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: i32,
    pub seq: i64,
    pub last_updated: DateTime<Utc>,
    pub is_current: bool,
    pub patient_ids: &'a [String],
    pub body: Option<[&'a str; 5]>,
}

/// Streams versions into `resources` with binary COPY, sending a megabyte at a time. Binary:
/// bodies go as they are, with no escaping here and no unescaping in Postgres.
pub struct CopyWriter<'c> {
    copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
    buf: Vec<u8>,
}

const COPY_CHUNK: usize = 1 << 20;
/// The binary COPY header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Postgres counts timestamps in microseconds from 2000-01-01.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// The OID of `text`, the element type of `patient_ids`.
const TEXT_OID: i32 = 25;

impl<'c> CopyWriter<'c> {
    /// `freeze`: the rows are written frozen (`COPY … FREEZE`), which Postgres allows only
    /// into a table created or truncated in the same transaction.
    pub async fn start(tx: &'c mut PgConnection, freeze: bool) -> sqlx::Result<CopyWriter<'c>> {
        let copy = tx
            .copy_in_raw(&format!(
                "COPY resources (resource_type, id, version_id, seq, last_updated, is_current, \
                 patient_ids, body) FROM STDIN (FORMAT binary{})",
                if freeze { ", FREEZE" } else { "" }
            ))
            .await?;
        let mut buf = Vec::with_capacity(COPY_CHUNK + 64 * 1024);
        buf.extend_from_slice(COPY_HEADER);
        Ok(CopyWriter { copy, buf })
    }

    pub async fn row(&mut self, row: &CopyRow<'_>) -> sqlx::Result<()> {
        encode_copy_row(&mut self.buf, row);
        if self.buf.len() >= COPY_CHUNK {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_CHUNK + 64 * 1024));
            self.copy.send(full).await?;
        }
        Ok(())
    }

    /// Ends the COPY with nothing written. Dropping it unfinished would leave the connection
    /// in its transaction, holding its locks.
    pub async fn abort(self, why: &str) -> sqlx::Result<()> {
        self.copy.abort(why).await
    }

    pub async fn finish(mut self) -> sqlx::Result<()> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.copy.send(std::mem::take(&mut self.buf)).await?;
        self.copy.finish().await?;
        Ok(())
    }
}

/// A binary COPY length. Postgres holds at most 1 GB in a field, so nothing longer is valid:
/// a longer one is sent as the largest length and refused by Postgres as malformed.
fn field_len(len: usize) -> [u8; 4] {
    i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes()
}

fn put_field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&field_len(bytes.len()));
    buf.extend_from_slice(bytes);
}

/// One row of binary COPY: eight fields, each a length and its bytes (-1 for NULL).
fn encode_copy_row(buf: &mut Vec<u8>, row: &CopyRow) {
    buf.extend_from_slice(&8i16.to_be_bytes());
    put_field(buf, row.resource_type.as_bytes());
    put_field(buf, row.id.as_bytes());
    put_field(buf, &row.version_id.to_be_bytes());
    put_field(buf, &row.seq.to_be_bytes());
    let micros = row.last_updated.timestamp_micros() - POSTGRES_EPOCH_MICROS;
    put_field(buf, &micros.to_be_bytes());
    put_field(buf, &[u8::from(row.is_current)]);
    // A one-dimensional text[] (or an empty one): dimensions, null flag, element type, then
    // per dimension its length and lower bound, then the elements.
    let ids = row.patient_ids;
    let size =
        12 + if ids.is_empty() { 0 } else { 8 } + ids.iter().map(|p| 4 + p.len()).sum::<usize>();
    buf.extend_from_slice(&field_len(size));
    buf.extend_from_slice(&i32::from(!ids.is_empty()).to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&TEXT_OID.to_be_bytes());
    if !ids.is_empty() {
        buf.extend_from_slice(&field_len(ids.len()));
        buf.extend_from_slice(&1i32.to_be_bytes());
        for p in ids {
            put_field(buf, p.as_bytes());
        }
    }
    match &row.body {
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(pieces) => {
            let len: usize = pieces.iter().map(|p| p.len()).sum();
            buf.extend_from_slice(&field_len(len));
            pieces
                .iter()
                .for_each(|p| buf.extend_from_slice(p.as_bytes()));
        }
    }
}

/// The current live versions of some resources of one type: (id, body). One query.
pub async fn read_current_many(
    pool: &PgPool,
    resource_type: &str,
    ids: &[String],
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT id, body FROM resources
         WHERE resource_type = $1 AND id = ANY($2) AND is_current AND body IS NOT NULL",
    )
    .bind(resource_type)
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Which of `ids` are live Patients. One query.
pub async fn existing_patients(pool: &PgPool, ids: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT id FROM resources
         WHERE resource_type = 'Patient' AND id = ANY($1) AND is_current AND body IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// `VACUUM` of the store after a bulk write: it sets the hint bits and the visibility map the
/// first reader would otherwise pay for. Pages already all-visible are skipped, so it costs
/// what was written. `analyze` also gives the planner fresh statistics — a sample of the whole
/// table (0.6 s at a million rows), worth it after a load, not after each large transaction
/// (autovacuum analyzes the store as it changes).
pub async fn vacuum(pool: &PgPool, analyze: bool) -> sqlx::Result<()> {
    let sql = if analyze {
        "VACUUM (ANALYZE) resources"
    } else {
        "VACUUM resources"
    };
    sqlx::query(sql).execute(pool).await?;
    Ok(())
}

/// The current version of a resource.
pub async fn read_current(
    pool: &PgPool,
    resource_type: &str,
    id: &str,
) -> sqlx::Result<Option<Version>> {
    sqlx::query(
        "SELECT version_id, last_updated, body FROM resources
         WHERE resource_type = $1 AND id = $2 AND is_current",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(version_from_row))
}

/// One version of a resource.
pub async fn read_version(
    pool: &PgPool,
    resource_type: &str,
    id: &str,
    version_id: i32,
) -> sqlx::Result<Option<Version>> {
    sqlx::query(
        "SELECT version_id, last_updated, body FROM resources
         WHERE resource_type = $1 AND id = $2 AND version_id = $3",
    )
    .bind(resource_type)
    .bind(id)
    .bind(version_id)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(version_from_row))
}

fn version_from_row(row: sqlx::postgres::PgRow) -> Version {
    Version {
        version_id: row.get(0),
        last_updated: row.get(1),
        body: row.get(2),
    }
}

/// The types among `candidates` that have any stored version.
pub async fn types_with_data(pool: &PgPool, candidates: &[&str]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT t FROM unnest($1::text[]) AS t
         WHERE EXISTS (SELECT 1 FROM resources r WHERE r.resource_type = t) ORDER BY t",
    )
    .bind(candidates)
    .fetch_all(pool)
    .await
}

/// A type's current rows: how many, and their lowest and highest seq.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct TypeSpan {
    pub count: i64,
    pub min_seq: i64,
    pub max_seq: i64,
}

/// The span of a type's current rows (an upper bound of what a snapshot of it holds), with
/// about how many there are. The bounds are two index probes; the count comes from the
/// planner's statistics when they know the type (counting ten million rows takes seconds), and
/// is counted only for types too rare to be in them. It only sizes ranges and progress.
pub async fn type_span(pool: &PgPool, resource_type: &str) -> sqlx::Result<Option<TypeSpan>> {
    sqlx::query_as(
        "WITH bounds AS (
             SELECT min(seq) AS min_seq, max(seq) AS max_seq FROM resources
             WHERE is_current AND resource_type = $1),
         estimate AS (
             SELECT (c.reltuples * m.freq)::bigint AS count
             FROM pg_class c, pg_stats s,
                  unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS m(val, freq)
             WHERE c.oid = 'resources_current_seq'::regclass AND c.reltuples > 0
               AND s.schemaname = current_schema() AND s.tablename = 'resources'
               AND s.attname = 'resource_type' AND m.val = $1)
         SELECT greatest(coalesce((SELECT count FROM estimate),
                                  (SELECT count(*) FROM resources
                                   WHERE is_current AND resource_type = $1)), 1) AS count,
                min_seq, max_seq
         FROM bounds WHERE min_seq IS NOT NULL",
    )
    .bind(resource_type)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_are_binary_fields() {
        let pids = vec!["a".to_string(), "bc".to_string()];
        let row = CopyRow {
            resource_type: "Patient",
            id: "a",
            version_id: 2,
            seq: 7,
            last_updated: "2000-01-01T00:00:01.000002Z".parse().unwrap(),
            is_current: true,
            patient_ids: &pids,
            body: Some([r#"{"x":"a\"b"#, "\n", "\t", "", "}"]),
        };
        let mut buf = Vec::new();
        encode_copy_row(&mut buf, &row);
        let mut expected = vec![0, 8];
        let field = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend(
                i32::try_from(bytes.len())
                    .expect("a test field")
                    .to_be_bytes(),
            );
            out.extend(bytes);
        };
        field(&mut expected, b"Patient");
        field(&mut expected, b"a");
        field(&mut expected, &2i32.to_be_bytes());
        field(&mut expected, &7i64.to_be_bytes());
        field(&mut expected, &1_000_002i64.to_be_bytes());
        field(&mut expected, &[1]);
        let mut array = Vec::new();
        for n in [1i32, 0, 25, 2, 1] {
            array.extend(n.to_be_bytes());
        }
        field(&mut array, b"a");
        field(&mut array, b"bc");
        field(&mut expected, &array);
        let pieces = row.body.unwrap();
        field(&mut expected, pieces.concat().as_bytes());
        assert_eq!(buf, expected);

        let mut tombstone = Vec::new();
        encode_copy_row(
            &mut tombstone,
            &CopyRow {
                body: None,
                patient_ids: &[],
                ..row
            },
        );
        let mut empty = Vec::new();
        for n in [0i32, 0, 25] {
            empty.extend(n.to_be_bytes());
        }
        let mut tail = (12i32).to_be_bytes().to_vec();
        tail.extend(empty);
        tail.extend((-1i32).to_be_bytes());
        assert!(tombstone.ends_with(&tail));
    }
}
