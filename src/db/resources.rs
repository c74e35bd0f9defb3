//! The resource store: versioned writes, reads, bulk COPY, and the snapshot pages export reads.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

/// The current version of a resource, as far as writes care.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub version_id: i32,
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

/// Locks and returns the current version of one resource.
pub async fn lock_current(
    tx: &mut PgConnection,
    resource_type: &str,
    id: &str,
) -> sqlx::Result<Option<Head>> {
    let row = sqlx::query(
        "SELECT version_id, last_updated, body IS NULL AS deleted FROM resources
         WHERE resource_type = $1 AND id = $2 AND is_current FOR UPDATE",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(tx)
    .await?;
    Ok(row.map(|r| Head {
        version_id: r.get(0),
        last_updated: r.get(1),
        deleted: r.get(2),
    }))
}

/// Locks and returns the current versions of many resources (one round trip).
pub async fn lock_current_many(
    tx: &mut PgConnection,
    keys: &[ResourceKey],
) -> sqlx::Result<HashMap<ResourceKey, Head>> {
    let (types, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    let rows = sqlx::query(
        "SELECT r.resource_type, r.id, r.version_id, r.last_updated, r.body IS NULL
         FROM resources r JOIN unnest($1::text[], $2::text[]) AS k(t, i)
           ON r.resource_type = k.t AND r.id = k.i
         WHERE r.is_current FOR UPDATE OF r",
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
                last_updated: r.get(3),
                deleted: r.get(4),
            };
            ((r.get(0), r.get(1)), head)
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

/// Marks the current versions of these resources as no longer current.
pub async fn retire_current(tx: &mut PgConnection, keys: &[ResourceKey]) -> sqlx::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let (types, ids): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    sqlx::query(
        "UPDATE resources r SET is_current = false
         FROM unnest($1::text[], $2::text[]) AS k(t, i)
         WHERE r.resource_type = k.t AND r.id = k.i AND r.is_current",
    )
    .bind(&types)
    .bind(&ids)
    .execute(tx)
    .await?;
    Ok(())
}

/// Inserts one version.
pub async fn insert_version(tx: &mut PgConnection, v: &NewVersion) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO resources
           (resource_type, id, version_id, last_updated, is_current, patient_ids, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&v.resource_type)
    .bind(&v.id)
    .bind(v.version_id)
    .bind(v.last_updated)
    .bind(v.is_current)
    .bind(&v.patient_ids)
    .bind(&v.body)
    .execute(tx)
    .await?;
    Ok(())
}

/// Inserts many versions with one COPY.
pub async fn copy_versions(tx: &mut PgConnection, rows: &[NewVersion]) -> sqlx::Result<()> {
    let mut copy = tx
        .copy_in_raw(
            "COPY resources (resource_type, id, version_id, last_updated, is_current, \
             patient_ids, body) FROM STDIN",
        )
        .await?;
    let mut buf = Vec::with_capacity(1 << 20);
    for row in rows {
        encode_copy_row(&mut buf, row);
        if buf.len() >= 1 << 20 {
            copy.send(std::mem::take(&mut buf)).await?;
            buf.reserve(1 << 20);
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// One row of COPY text format. Types and ids are plain ASCII (validated), bodies are escaped.
fn encode_copy_row(buf: &mut Vec<u8>, row: &NewVersion) {
    use std::io::Write;
    let ts = row.last_updated.format("%Y-%m-%d %H:%M:%S%.6f+00");
    let current = if row.is_current { 't' } else { 'f' };
    let _ = write!(
        buf,
        "{}\t{}\t{}\t{ts}\t{current}\t{{{}}}\t",
        row.resource_type,
        row.id,
        row.version_id,
        row.patient_ids.join(",")
    );
    match &row.body {
        None => buf.extend_from_slice(b"\\N"),
        Some(body) => {
            for &b in body.as_bytes() {
                match b {
                    b'\\' => buf.extend_from_slice(b"\\\\"),
                    b'\n' => buf.extend_from_slice(b"\\n"),
                    b'\r' => buf.extend_from_slice(b"\\r"),
                    b'\t' => buf.extend_from_slice(b"\\t"),
                    _ => buf.push(b),
                }
            }
        }
    }
    buf.push(b'\n');
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

/// What one export task reads: one type, an id range, a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub resource_type: &'a str,
    /// Inclusive upper id bound ('~' for none).
    pub range_end: &'a str,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub patients: PatientFilter<'a>,
    pub excluded_ids: &'a [String],
}

/// The snapshot page query. Most rows come straight from their current version (first
/// branch); rows changed after the transaction time take their latest version at that time
/// from the history (second branch, few rows, found through `resources_current_updated`).
/// Parameters: $1 type, $2 after id, $3 last id, $4 transaction time, $5 since, $6 limit,
/// $7 excluded ids, $8 patient ids.
fn snapshot_sql(patients: PatientFilter) -> &'static str {
    static SQL: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
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
        filters.map(|(current, history)| {
            format!(
                "SELECT id, body FROM (
                   (SELECT id, body FROM resources
                    WHERE is_current AND resource_type = $1 AND id > $2 AND id <= $3
                      AND last_updated <= $4 AND body IS NOT NULL
                      AND ($5::timestamptz IS NULL OR last_updated > $5)
                      AND NOT (id = ANY($7::text[])) {current}
                    ORDER BY id LIMIT $6)
                   UNION ALL
                   (SELECT c.id, h.body FROM resources c
                    CROSS JOIN LATERAL (
                        SELECT v.body, v.last_updated, v.patient_ids FROM resources v
                        WHERE v.resource_type = c.resource_type AND v.id = c.id
                          AND v.last_updated <= $4
                        ORDER BY v.version_id DESC LIMIT 1) h
                    WHERE c.is_current AND c.resource_type = $1 AND c.id > $2 AND c.id <= $3
                      AND c.last_updated > $4 AND h.body IS NOT NULL
                      AND ($5::timestamptz IS NULL OR h.last_updated > $5)
                      AND NOT (c.id = ANY($7::text[])) {history}
                    ORDER BY c.id LIMIT $6)
                 ) page ORDER BY id LIMIT $6"
            )
        })
    });
    match patients {
        PatientFilter::None => &SQL[0],
        PatientFilter::AnyPatient => &SQL[1],
        PatientFilter::Patients(_) => &SQL[2],
    }
}

/// Streams up to `limit` rows `(id, body)` of the snapshot after id `after`, in id order.
pub fn snapshot_page<'c>(
    conn: &'c mut PgConnection,
    selection: &Selection<'c>,
    after: &'c str,
    limit: i64,
) -> futures::stream::BoxStream<'c, sqlx::Result<sqlx::postgres::PgRow>> {
    // Not a persistent statement: each page is planned with its real bounds, so Postgres
    // picks the index that fits this snapshot instead of one generic plan for all.
    let mut query = sqlx::query(snapshot_sql(selection.patients))
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

/// Current rows per type (an upper bound of what a snapshot of the type holds).
pub async fn count_current(pool: &PgPool, types: &[String]) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT resource_type, count(*) FROM resources
         WHERE is_current AND resource_type = ANY($1) GROUP BY 1 ORDER BY 1",
    )
    .bind(types)
    .fetch_all(pool)
    .await
}

/// Every `step`-th current id of a type, in order: the boundaries of its export ranges.
pub async fn range_boundaries(
    pool: &PgPool,
    resource_type: &str,
    step: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT id FROM (
            SELECT id, row_number() OVER (ORDER BY id) AS n FROM resources
            WHERE is_current AND resource_type = $1) s
         WHERE n % $2 = 0 ORDER BY id",
    )
    .bind(resource_type)
    .bind(step)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_bodies() {
        let row = NewVersion {
            resource_type: "Patient".into(),
            id: "a".into(),
            version_id: 2,
            last_updated: DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap(),
            is_current: true,
            patient_ids: vec!["a".into()],
            body: Some(r#"{"x":"a\"b\\n"}"#.into()),
        };
        let mut buf = Vec::new();
        encode_copy_row(&mut buf, &row);
        let expected = concat!(
            "Patient\ta\t2\t2023-11-14 22:13:20.000001+00\tt\t{a}\t",
            r#"{"x":"a\\"b\\\\n"}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(buf).unwrap(), expected);
    }
}
