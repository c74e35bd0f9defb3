//! The pages of an organized export (`organizeOutputBy=Patient`): the snapshot's resources in
//! block order — by block (the patient: the Patient's own id, else the lowest id in
//! `patient_ids`), the Patient first, then by creation — and the patient ids that cut a job's
//! blocks into tasks of about equal size.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{PgConnection, PgPool, Row};

use super::snapshot::{PATIENT_FILTERS, PatientFilter};

/// What one blocks task reads.
#[derive(Debug, Clone)]
pub struct BlockSelection<'a> {
    /// The types the blocks hold (compartment types; never empty).
    pub types: &'a [String],
    /// The last block of the task's range (inclusive); `None`: unbounded.
    pub block_last: Option<&'a str>,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub patients: PatientFilter,
    /// Group export: the Groups walked, which are not exported themselves.
    pub excluded_groups: &'a [String],
}

/// A row's place in block order: its block, whether it comes after the block's Patient, and
/// its seq. A page starts after one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockPosition {
    pub block: String,
    pub after_patient: bool,
    pub seq: i64,
}

impl BlockPosition {
    /// Before every block after `block` (`None`: before every block).
    pub fn after_block(block: Option<&str>) -> BlockPosition {
        match block {
            Some(block) => BlockPosition {
                block: block.to_string(),
                after_patient: true,
                seq: i64::MAX,
            },
            // Ids are never empty, so every row's position is greater.
            None => BlockPosition {
                block: String::new(),
                after_patient: false,
                seq: i64::MIN,
            },
        }
    }
}

/// One resource of a block.
#[derive(Debug)]
pub struct BlockRow {
    pub position: BlockPosition,
    pub resource_type: String,
    pub version_id: i32,
    /// The stored JSON text, exactly as exported.
    pub body: String,
}

/// The block key of a row (`r`) whose patients are `patients`.
fn block_of(r: &str, patients: &str) -> String {
    format!(
        "((CASE WHEN {r}resource_type = 'Patient' THEN {r}id ELSE {patients}[1] END) COLLATE \"C\")"
    )
}

/// The page query. Parameters: $1 types, $2/$3/$4 the position to start after, $5 last block,
/// $6 transaction time, $7 since, $8 limit, $9 excluded Groups, $10 the job (whose patients).
///
/// Current rows come in index order (`resources_current_blocks`); rows changed after the
/// transaction time take their version at that time, and its block, from the history (few
/// rows, found through `resources_current_updated`).
fn page_sql(patients: PatientFilter) -> &'static str {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        PATIENT_FILTERS
            .iter()
            .map(|(current, history)| {
                // The job is $10 here ($8 in the export pages).
                let (current, history) =
                    (current.replace("$8", "$10"), history.replace("$8", "$10"));
                let (now, then) = (block_of("", "patient_ids"), block_of("c.", "h.patient_ids"));
                format!(
                    "SELECT block, after_patient, seq, resource_type, version_id, body FROM (
                       (SELECT {now} AS block, resource_type <> 'Patient' AS after_patient, seq,
                               resource_type, version_id, body
                        FROM resources
                        WHERE is_current AND cardinality(patient_ids) > 0
                          AND ({now}, resource_type <> 'Patient', seq) > ($2, $3, $4)
                          AND ($5::text IS NULL OR {now} <= $5)
                          AND resource_type = ANY($1::text[])
                          AND last_updated <= $6 AND body IS NOT NULL
                          AND ($7::timestamptz IS NULL OR last_updated > $7)
                          AND NOT (resource_type = 'Group' AND id = ANY($9::text[])) {current}
                        ORDER BY {now}, resource_type <> 'Patient', seq LIMIT $8)
                       UNION ALL
                       (SELECT {then} AS block, c.resource_type <> 'Patient', c.seq,
                               c.resource_type, h.version_id, h.body
                        FROM resources c
                        CROSS JOIN LATERAL (
                            SELECT v.body, v.last_updated, v.patient_ids, v.version_id
                            FROM resources v
                            WHERE v.resource_type = c.resource_type AND v.id = c.id
                              AND v.last_updated <= $6
                            ORDER BY v.version_id DESC LIMIT 1) h
                        WHERE c.is_current AND c.resource_type = ANY($1::text[])
                          AND c.last_updated > $6 AND h.body IS NOT NULL
                          AND cardinality(h.patient_ids) > 0
                          AND ({then}, c.resource_type <> 'Patient', c.seq) > ($2, $3, $4)
                          AND ($5::text IS NULL OR {then} <= $5)
                          AND ($7::timestamptz IS NULL OR h.last_updated > $7)
                          AND NOT (c.resource_type = 'Group' AND c.id = ANY($9::text[]))
                          {history}
                        ORDER BY 1, 2, 3 LIMIT $8)
                     ) page ORDER BY block, after_patient, seq LIMIT $8"
                )
            })
            .collect()
    });
    match patients {
        PatientFilter::JobPatients(_) => &SQL[2],
        PatientFilter::None | PatientFilter::AnyPatient | PatientFilter::Unattached => &SQL[0],
    }
}

/// Reads up to `limit` rows in block order after `after`.
pub async fn page(
    conn: &mut PgConnection,
    selection: &BlockSelection<'_>,
    after: &BlockPosition,
    limit: i64,
) -> sqlx::Result<Vec<BlockRow>> {
    let job = job_of(selection.patients);
    // Not a persistent statement: each page is planned with its real bounds (see snapshot).
    let mut stream = sqlx::query(page_sql(selection.patients))
        .persistent(false)
        .bind(selection.types)
        .bind(&after.block)
        .bind(after.after_patient)
        .bind(after.seq)
        .bind(selection.block_last)
        .bind(selection.transaction_time)
        .bind(selection.since)
        .bind(limit)
        .bind(selection.excluded_groups)
        .bind(job)
        .fetch(conn);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        rows.push(BlockRow {
            position: BlockPosition {
                block: row.try_get("block")?,
                after_patient: row.try_get("after_patient")?,
                seq: row.try_get("seq")?,
            },
            resource_type: row.try_get("resource_type")?,
            version_id: row.try_get("version_id")?,
            body: row.try_get("body")?,
        });
    }
    Ok(rows)
}

/// Patient ids that cut the blocks of a job into `slices` ranges of about as many patients:
/// the job's patients when it names them, else the current Patients. Fewer (or none) when
/// there are fewer patients.
pub async fn slice_bounds(
    pool: &PgPool,
    patients: PatientFilter,
    slices: i64,
) -> sqlx::Result<Vec<String>> {
    if slices <= 1 {
        return Ok(Vec::new());
    }
    let source = match patients {
        PatientFilter::JobPatients(_) => {
            "SELECT patient_id COLLATE \"C\" AS id FROM export_job_patients WHERE job_id = $2"
        }
        PatientFilter::None | PatientFilter::AnyPatient | PatientFilter::Unattached => {
            "SELECT id FROM resources WHERE is_current AND resource_type = 'Patient'"
        }
    };
    let job = job_of(patients);
    sqlx::query_scalar(&format!(
        "SELECT DISTINCT max(id) FROM (
             SELECT id, ntile($1::int) OVER (ORDER BY id) AS slice FROM ({source}) ids) s
         GROUP BY slice HAVING slice < $1 ORDER BY 1"
    ))
    .bind(i32::try_from(slices).unwrap_or(i32::MAX))
    .bind(job)
    .fetch_all(pool)
    .await
}

fn job_of(patients: PatientFilter) -> Option<uuid::Uuid> {
    match patients {
        PatientFilter::JobPatients(job) => Some(job),
        PatientFilter::None | PatientFilter::AnyPatient | PatientFilter::Unattached => None,
    }
}
