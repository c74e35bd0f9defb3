//! The export snapshot: which rows one export task reads (a type, a seq range, the versions
//! as they were at the job's transaction time), and the page queries that read them.

use chrono::{DateTime, Utc};

/// Which patients' compartments an export reads.
#[derive(Debug, Clone, Copy)]
pub enum PatientFilter {
    /// Every resource (system export).
    None,
    /// Resources in any patient's compartment (Patient export).
    AnyPatient,
    /// Resources in the compartments of the patients stored with this job
    /// (`export_job_patients`: Group members, or the `patient` parameter).
    JobPatients(uuid::Uuid),
    /// Resources in no patient's compartment (an organized export's files of one type).
    Unattached,
}

/// Which rows of the snapshot an export task reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The resources as of the snapshot.
    Live,
    /// The resources deleted at the snapshot (their tombstones).
    Deleted,
    /// Older live versions (`includeAssociatedData=_history`); `skip_last_state` leaves out
    /// the version a deletion ended, when `LastState` lists it.
    History { skip_last_state: bool },
    /// The last live version of each resource deleted at the snapshot
    /// (`includeAssociatedData=_deleted`).
    LastState,
}

/// What one export task reads: one type, a seq range, a snapshot.
#[derive(Debug, Clone)]
pub struct Selection<'a> {
    pub resource_type: &'a str,
    /// Inclusive upper seq bound.
    pub range_end: i64,
    pub transaction_time: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    /// Live and Deleted rows only; older versions are a system-level export's.
    pub patients: PatientFilter,
    pub excluded_ids: &'a [String],
    pub rows: Rows,
    /// `_typeFilter` narrowing SQL can do: these ids only.
    pub ids: Option<Vec<String>>,
    /// `_typeFilter` narrowing SQL can do: `last_updated` in `[from, before)`.
    pub updated_from: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
}

/// Where a page starts: after this seq (and, for older versions, this version of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub seq: i64,
    pub version_id: i32,
}

/// The snapshot page queries; every one returns `(seq, body, id, version_id)` in page order.
/// Parameters: $1 type, $2 after seq, $3 last seq, $4 transaction time, $5 since, $6 limit,
/// $7 excluded ids, $8 the job (whose patients), $9 filter ids, $10/$11 filter last_updated
/// bounds, $12 after version, $13 skip last states.
///
/// Live and Deleted: most rows come straight from their current version (first branch); rows
/// changed after the transaction time take their latest version at that time from the history
/// (second branch, few rows, found through `resources_current_updated`). Pages follow `seq`
/// (creation order, see the migration).
pub(super) fn snapshot_sql(patients: PatientFilter, rows: Rows) -> &'static str {
    static SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let mut variants = Vec::new();
        for (current, history) in PATIENT_FILTERS {
            // Live versions for the output; tombstones for the list of deletions.
            for body in ["IS NOT NULL", "IS NULL"] {
                variants.push(snapshot_versions_sql(body, current, history));
            }
        }
        // Older versions: rows that are not the snapshot's version of their resource (so never
        // current ones), through `resources_history_seq`.
        for which in [
            "($5::timestamptz IS NULL OR v.last_updated > $5)
             AND NOT ($13 AND snap.deleted AND v.version_id = snap.version_id - 1)",
            "snap.deleted AND v.version_id = snap.version_id - 1
             AND ($5::timestamptz IS NULL OR snap.last_updated > $5)",
        ] {
            variants.push(older_versions_sql(which));
        }
        variants
    });
    let filter = match patients {
        PatientFilter::None => 0,
        PatientFilter::AnyPatient => 1,
        PatientFilter::JobPatients(_) => 2,
        PatientFilter::Unattached => 3,
    };
    let older = PATIENT_FILTERS.len() * 2;
    match rows {
        Rows::Live => &SQL[filter * 2],
        Rows::Deleted => &SQL[filter * 2 + 1],
        Rows::History { .. } => &SQL[older],
        Rows::LastState => &SQL[older + 1],
    }
}

/// The patient conditions of `PatientFilter::None`, `AnyPatient`, `JobPatients` and
/// `Unattached`, on the current row and on its historic version.
pub(super) const PATIENT_FILTERS: [(&str, &str); 4] = [
    ("", ""),
    (
        "AND cardinality(patient_ids) > 0",
        "AND cardinality(h.patient_ids) > 0",
    ),
    // One primary-key probe per patient of the row. (A plain `EXISTS … = ANY(…)` is planned as
    // a semi-join that scans the job's whole member list for every row.)
    (
        "AND EXISTS (SELECT 1 FROM unnest(patient_ids) AS pid
                     WHERE (SELECT true FROM export_job_patients m
                            WHERE m.job_id = $8 AND m.patient_id = pid))",
        "AND EXISTS (SELECT 1 FROM unnest(h.patient_ids) AS pid
                     WHERE (SELECT true FROM export_job_patients m
                            WHERE m.job_id = $8 AND m.patient_id = pid))",
    ),
    (
        "AND cardinality(patient_ids) = 0",
        "AND cardinality(h.patient_ids) = 0",
    ),
];

/// `_typeFilter` narrowing that SQL can do, on the row named by `alias`.
fn narrow(alias: &str, updated: &str) -> String {
    format!(
        "AND ($9::text[] IS NULL OR {alias}id = ANY($9))
         AND ($10::timestamptz IS NULL OR {updated} >= $10)
         AND ($11::timestamptz IS NULL OR {updated} < $11)"
    )
}

/// The snapshot's version of each resource whose body `IS NOT NULL` (live) or `IS NULL`
/// (deleted), with a patient condition on the current row and on the historic one.
fn snapshot_versions_sql(body: &str, current: &str, history: &str) -> String {
    let (current_narrow, history_narrow) =
        (narrow("", "last_updated"), narrow("c.", "h.last_updated"));
    format!(
        "SELECT seq, body, id, version_id FROM (
           (SELECT seq, body, id, version_id FROM resources
            WHERE is_current AND resource_type = $1 AND seq > $2 AND seq <= $3
              AND last_updated <= $4 AND body {body}
              AND ($5::timestamptz IS NULL OR last_updated > $5)
              AND NOT (id = ANY($7::text[])) {current} {current_narrow}
            ORDER BY seq LIMIT $6)
           UNION ALL
           (SELECT c.seq, h.body, c.id, h.version_id FROM resources c
            CROSS JOIN LATERAL (
                SELECT v.body, v.last_updated, v.patient_ids, v.version_id
                FROM resources v
                WHERE v.resource_type = c.resource_type AND v.id = c.id
                  AND v.last_updated <= $4
                ORDER BY v.version_id DESC LIMIT 1) h
            WHERE c.is_current AND c.resource_type = $1 AND c.seq > $2 AND c.seq <= $3
              AND c.last_updated > $4 AND h.body {body}
              AND ($5::timestamptz IS NULL OR h.last_updated > $5)
              AND NOT (c.id = ANY($7::text[])) {history} {history_narrow}
            ORDER BY c.seq LIMIT $6)
         ) page ORDER BY seq LIMIT $6"
    )
}

/// Versions older than the snapshot's, chosen by `which`.
fn older_versions_sql(which: &str) -> String {
    let older_narrow = narrow("v.", "v.last_updated");
    format!(
        "SELECT v.seq, v.body, v.id, v.version_id FROM resources v
         CROSS JOIN LATERAL (
             SELECT s.version_id, s.body IS NULL AS deleted, s.last_updated
             FROM resources s
             WHERE s.resource_type = v.resource_type AND s.id = v.id
               AND s.last_updated <= $4
             ORDER BY s.version_id DESC LIMIT 1) snap
         WHERE NOT v.is_current AND v.resource_type = $1
           AND (v.seq, v.version_id) > ($2, $12) AND v.seq <= $3
           AND v.body IS NOT NULL AND v.last_updated <= $4
           AND v.version_id < snap.version_id
           AND NOT (v.id = ANY($7::text[])) {older_narrow}
           AND {which}
         ORDER BY v.seq, v.version_id LIMIT $6"
    )
}
