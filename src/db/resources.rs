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

/// Starts a write transaction and gives it a transaction id before any timestamp is taken.
///
/// Why: an export snapshots at time T and then waits for the transactions that were in flight
/// at T (see `db::jobs`). A writer that read the clock before T must therefore already be
/// visible as in flight, so the id comes first.
pub async fn begin_write(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()")
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

/// Locks and returns the current version of one resource.
pub async fn lock_current(
    tx: &mut PgConnection,
    resource_type: &str,
    id: &str,
) -> sqlx::Result<Option<Current>> {
    let row = sqlx::query(
        "SELECT version_id, seq, last_updated, body IS NULL AS deleted, ctid::text, patient_ids
         FROM resources WHERE resource_type = $1 AND id = $2 AND is_current FOR UPDATE",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(tx)
    .await?;
    Ok(row.map(|r| Current {
        head: Head {
            version_id: r.get(0),
            seq: r.get(1),
            last_updated: r.get(2),
            deleted: r.get(3),
        },
        address: r.get(4),
        patient_ids: r.get(5),
    }))
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

/// Inserts one version.
pub async fn insert_version(tx: &mut PgConnection, v: &NewVersion) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO resources
           (resource_type, id, version_id, seq, last_updated, is_current, patient_ids, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
    Ok(())
}

/// A version as COPY writes it; the body comes in pieces written one after the other
/// (`None` for a delete).
pub struct CopyRow<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: i32,
    pub seq: i64,
    /// An ISO 8601 instant, e.g. `2024-01-01T00:00:00.000001Z`.
    pub last_updated: &'a str,
    pub is_current: bool,
    pub patient_ids: &'a [String],
    pub body: Option<[&'a str; 5]>,
}

/// Streams versions into `resources` with COPY, sending a megabyte at a time.
pub struct CopyWriter<'c> {
    copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
    buf: Vec<u8>,
}

const COPY_CHUNK: usize = 1 << 20;

impl<'c> CopyWriter<'c> {
    pub async fn start(tx: &'c mut PgConnection) -> sqlx::Result<CopyWriter<'c>> {
        let copy = tx
            .copy_in_raw(
                "COPY resources (resource_type, id, version_id, seq, last_updated, is_current, \
                 patient_ids, body) FROM STDIN",
            )
            .await?;
        Ok(CopyWriter {
            copy,
            buf: Vec::with_capacity(COPY_CHUNK + 64 * 1024),
        })
    }

    pub async fn row(&mut self, row: &CopyRow<'_>) -> sqlx::Result<()> {
        encode_copy_row(&mut self.buf, row);
        if self.buf.len() >= COPY_CHUNK {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_CHUNK + 64 * 1024));
            self.copy.send(full).await?;
        }
        Ok(())
    }

    pub async fn finish(mut self) -> sqlx::Result<()> {
        if !self.buf.is_empty() {
            self.copy.send(std::mem::take(&mut self.buf)).await?;
        }
        self.copy.finish().await?;
        Ok(())
    }
}

/// One row of COPY text format. Types, ids and instants are plain ASCII; bodies are escaped.
fn encode_copy_row(buf: &mut Vec<u8>, row: &CopyRow) {
    use std::io::Write;
    let current = if row.is_current { 't' } else { 'f' };
    let _ = write!(
        buf,
        "{}\t{}\t{}\t{}\t{}\t{current}\t{{",
        row.resource_type, row.id, row.version_id, row.seq, row.last_updated
    );
    for (i, p) in row.patient_ids.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(p.as_bytes());
    }
    buf.extend_from_slice(b"}\t");
    match &row.body {
        None => buf.extend_from_slice(b"\\N"),
        Some(pieces) => pieces.iter().for_each(|p| push_escaped(buf, p)),
    }
    buf.push(b'\n');
}

/// COPY text escaping: backslash, newline, carriage return and tab.
fn push_escaped(buf: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(offset) = bytes[start..]
        .iter()
        .position(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
    {
        let at = start + offset;
        buf.extend_from_slice(&bytes[start..at]);
        buf.extend_from_slice(match bytes[at] {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        start = at + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
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

/// Which patients' compartments an export reads.
#[derive(Debug, Clone, Copy)]
pub enum PatientFilter<'a> {
    /// Every resource (system export).
    None,
    /// Resources in any patient's compartment (Patient export).
    AnyPatient,
    /// Resources in these patients' compartments (Group export).
    Patients(&'a [String]),
}

/// What one export task reads: one type, a seq range, a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub resource_type: &'a str,
    /// Inclusive upper seq bound.
    pub range_end: i64,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub patients: PatientFilter<'a>,
    pub excluded_ids: &'a [String],
    /// Read the resources deleted (a tombstone at the snapshot) instead of the live ones.
    pub deleted: bool,
}

/// The snapshot page query. Most rows come straight from their current version (first
/// branch); rows changed after the transaction time take their latest version at that time
/// from the history (second branch, few rows, found through `resources_current_updated`).
/// Pages follow `seq` (creation order, see the migration). Parameters: $1 type, $2 after seq,
/// $3 last seq, $4 transaction time, $5 since, $6 limit, $7 excluded ids, $8 patient ids.
fn snapshot_sql(patients: PatientFilter, deleted: bool) -> &'static str {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let filters = [
            ("", ""),
            (
                "AND cardinality(patient_ids) > 0",
                "AND cardinality(h.patient_ids) > 0",
            ),
            (
                "AND patient_ids && $8::text[]",
                "AND h.patient_ids && $8::text[]",
            ),
        ];
        let mut variants = Vec::new();
        for (current, history) in filters {
            // Live versions for the output; tombstones for the list of deletions.
            for body in ["IS NOT NULL", "IS NULL"] {
                variants.push(format!(
                    "SELECT seq, body, id FROM (
                       (SELECT seq, body, id FROM resources
                        WHERE is_current AND resource_type = $1 AND seq > $2 AND seq <= $3
                          AND last_updated <= $4 AND body {body}
                          AND ($5::timestamptz IS NULL OR last_updated > $5)
                          AND NOT (id = ANY($7::text[])) {current}
                        ORDER BY seq LIMIT $6)
                       UNION ALL
                       (SELECT c.seq, h.body, c.id FROM resources c
                        CROSS JOIN LATERAL (
                            SELECT v.body, v.last_updated, v.patient_ids FROM resources v
                            WHERE v.resource_type = c.resource_type AND v.id = c.id
                              AND v.last_updated <= $4
                            ORDER BY v.version_id DESC LIMIT 1) h
                        WHERE c.is_current AND c.resource_type = $1 AND c.seq > $2 AND c.seq <= $3
                          AND c.last_updated > $4 AND h.body {body}
                          AND ($5::timestamptz IS NULL OR h.last_updated > $5)
                          AND NOT (c.id = ANY($7::text[])) {history}
                        ORDER BY c.seq LIMIT $6)
                     ) page ORDER BY seq LIMIT $6"
                ));
            }
        }
        variants
    });
    let filter = match patients {
        PatientFilter::None => 0,
        PatientFilter::AnyPatient => 1,
        PatientFilter::Patients(_) => 2,
    };
    &SQL[filter * 2 + usize::from(deleted)]
}

/// Streams up to `limit` rows `(seq, body, id)` of the snapshot after `after`, in seq order.
pub fn snapshot_page<'c>(
    conn: &'c mut PgConnection,
    selection: &Selection<'c>,
    after: i64,
    limit: i64,
) -> futures::stream::BoxStream<'c, sqlx::Result<sqlx::postgres::PgRow>> {
    // Not a persistent statement: each page is planned with its real bounds, so Postgres
    // picks the index that fits this snapshot instead of one generic plan for all.
    let mut query = sqlx::query(snapshot_sql(selection.patients, selection.deleted))
        .persistent(false)
        .bind(selection.resource_type)
        .bind(after)
        .bind(selection.range_end)
        .bind(selection.transaction_time)
        .bind(selection.since)
        .bind(limit)
        .bind(selection.excluded_ids);
    if let PatientFilter::Patients(ids) = selection.patients {
        query = query.bind(ids);
    }
    query.fetch(conn)
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

/// The span of a type's current rows (an upper bound of what a snapshot of it holds).
pub async fn type_span(pool: &PgPool, resource_type: &str) -> sqlx::Result<Option<TypeSpan>> {
    sqlx::query_as(
        "SELECT count(*) AS count, min(seq) AS min_seq, max(seq) AS max_seq FROM resources
         WHERE is_current AND resource_type = $1 HAVING count(*) > 0",
    )
    .bind(resource_type)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_bodies() {
        let pids = vec!["a".to_string(), "b".to_string()];
        let row = CopyRow {
            resource_type: "Patient",
            id: "a",
            version_id: 2,
            seq: 7,
            last_updated: "2023-11-14T22:13:20.000001Z",
            is_current: true,
            patient_ids: &pids,
            body: Some([r#"{"x":"a\"b"#, "\\n", "\t", "\n\r", "}"]),
        };
        let mut buf = Vec::new();
        encode_copy_row(&mut buf, &row);
        let expected = concat!(
            "Patient\ta\t2\t7\t2023-11-14T22:13:20.000001Z\tt\t{a,b}\t",
            r#"{"x":"a\\"b\\n\t\n\r}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(buf).unwrap(), expected);
        let mut tombstone = Vec::new();
        encode_copy_row(
            &mut tombstone,
            &CopyRow {
                body: None,
                is_current: false,
                ..row
            },
        );
        assert!(tombstone.ends_with(b"\tf\t{a,b}\t\\N\n"));
    }
}
