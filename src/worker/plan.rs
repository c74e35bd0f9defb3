//! The plan task: waits until the snapshot is complete, writes the error file of what the
//! kick-off ignored, then splits the job into export tasks (one per type; large types into seq
//! ranges that run in parallel).

use std::{sync::Arc, time::Duration};

use super::{Context, Ended, TaskError, lease::Lease, part, read_source};
use crate::{
    db::{
        blocks,
        jobs::{self, Job, Level},
        resources,
        snapshot::PatientFilter,
        tasks::{Checkpoint, HeldTask, PlannedTask, TaskKind},
    },
    fhir::{
        outcome::{self, Issue, Severity},
        r4::{PATIENT_COMPARTMENT, RESOURCE_TYPES},
    },
};

/// How long a plan waits for writers before it says so in the log (it keeps waiting).
const WRITERS_WARN_AFTER: Duration = Duration::from_secs(30);

pub async fn run(
    context: &Arc<Context>,
    job: &Job,
    held: &mut HeldTask,
    lease: &Lease,
) -> Result<Ended, TaskError> {
    wait_for_writers(context, job, held, lease).await?;
    read_source::wait_for_standby(context, held, lease).await?;
    write_notes(context, job, held).await?;
    let pool = &context.pools.primary;
    let spec = &job.spec;
    let types = if spec.types.is_empty() {
        let candidates: Vec<&str> = match spec.level {
            Level::System => RESOURCE_TYPES.to_vec(),
            Level::Patient | Level::Group => compartment_types(),
        };
        resources::types_with_data(pool, &candidates).await?
    } else {
        spec.types.clone()
    };
    let mut planned = Vec::new();
    let mut block_estimate = 0;
    let mut has_blocks = false;
    let compartment = compartment_types();
    for resource_type in types {
        let Some(span) = resources::type_span(pool, &resource_type).await? else {
            continue;
        };
        let organized = spec.organize_by.is_some();
        // What is in a compartment goes in blocks.
        let in_blocks = organized && compartment.contains(&resource_type.as_str());
        if in_blocks {
            has_blocks = true;
            block_estimate += span.count;
        }
        // An organized export writes files of one type only for what is in no compartment
        // (system level): one task reads a compartment type's few such rows.
        let step = if in_blocks { i64::MAX } else { spec.range_size };
        let ranges = seq_ranges(span, step);
        let slices = i64::try_from(ranges.len()).unwrap_or(1);
        for (start, end) in ranges {
            // The same range also lists what was deleted since `_since`, and older versions
            // and last states when asked for.
            let kinds = [
                (TaskKind::Export, !in_blocks || spec.level == Level::System),
                (TaskKind::Deleted, spec.since.is_some()),
                (TaskKind::History, spec.include_history),
                (TaskKind::SoftDeleted, spec.include_deleted),
            ];
            for (kind, _) in kinds.into_iter().filter(|(_, wanted)| *wanted) {
                let estimate = match kind {
                    TaskKind::Export if !in_blocks => span.count / slices,
                    _ => 0,
                };
                planned.push(PlannedTask {
                    kind,
                    resource_type: resource_type.clone(),
                    range_start: start,
                    range_end: end,
                    block_after: None,
                    block_last: None,
                    estimate,
                });
            }
        }
    }
    if has_blocks {
        planned.extend(block_tasks(context, job, block_estimate).await?);
    }
    if held.finish(&planned, context.retention()).await? {
        context.log_end(job.id, "completed").await;
    }
    tracing::info!(tasks = planned.len(), "planned");
    Ok(Ended::Done)
}

/// Waits until every write transaction open at kick-off has ended: then every version stamped
/// at or before the transaction time is committed, and nothing read later can miss one. A
/// writer that stays open keeps the job waiting (X-Progress says so); exporting without it
/// could lose its versions for good, for this export and for the next `_since` one.
async fn wait_for_writers(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    lease: &Lease,
) -> Result<(), TaskError> {
    let started = tokio::time::Instant::now();
    let (mut shown, mut warned) = (0, false);
    let mut pause = Duration::from_millis(20);
    loop {
        let remaining =
            i32::try_from(jobs::writers_remaining(&context.pools.primary, job.id).await?)
                .unwrap_or(i32::MAX);
        if remaining != shown {
            held.set_waiting_writers(remaining).await?;
            shown = remaining;
        }
        if remaining == 0 {
            return Ok(());
        }
        // Waiting for a writer is reported (X-Progress, the warning below), not stuck.
        lease.moved();
        if !warned && started.elapsed() > WRITERS_WARN_AFTER {
            tracing::warn!(
                writers = remaining,
                "write transactions open since kick-off hold the export back"
            );
            warned = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = lease.lost() => return Err(TaskError::LeaseLost),
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The manifest's error file: one OperationOutcome per thing a lenient kick-off ignored.
/// Written once (a retried plan finds its part done).
async fn write_notes(context: &Context, job: &Job, held: &mut HeldTask) -> Result<(), TaskError> {
    const KIND: &str = "OperationOutcome-error";
    if job.spec.notes.is_empty() || held.task.parts_done > 0 {
        return Ok(());
    }
    let mut part = part::open(context, job, held, KIND, 0).await?;
    for note in &job.spec.notes {
        let issue = Issue::new(
            Severity::Warning,
            "not-supported",
            format!("ignored: {note}"),
        );
        let line = outcome::operation_outcome(&[issue]).to_string();
        part.write_line(line.as_bytes()).await?;
    }
    part.finish(held, Checkpoint::default(), false).await
}

/// Equal slices of a type's seq span, about `step` resources each. Resources that matter to
/// the snapshot all have a current row by now, so the span covers them.
fn seq_ranges(span: resources::TypeSpan, step: i64) -> Vec<(i64, i64)> {
    let slices = div_ceil(span.count, step).max(1);
    let width = div_ceil(span.max_seq - span.min_seq + 1, slices);
    let mut ranges = Vec::new();
    let mut start = span.min_seq - 1;
    while start < span.max_seq {
        let end = (start + width).min(span.max_seq);
        ranges.push((start, end));
        start = end;
    }
    ranges
}

/// `a / b` rounded up, for positive numbers (`i64::div_ceil` is not stable).
fn div_ceil(a: i64, b: i64) -> i64 {
    a / b + i64::from(a % b != 0)
}

/// An organized export's blocks tasks: the patients cut into ranges of about `range_size`
/// resources (`estimate` in all), each range one task writing `{organize_by}-blocks` files.
async fn block_tasks(
    context: &Context,
    job: &Job,
    estimate: i64,
) -> Result<Vec<PlannedTask>, TaskError> {
    let spec = &job.spec;
    let slices = div_ceil(estimate, spec.range_size).max(1);
    let patients = patients_read(job);
    let bounds = blocks::slice_bounds(&context.pools.primary, patients, slices).await?;
    let per_task = estimate / i64::try_from(bounds.len() + 1).unwrap_or(1);
    let mut after = None;
    let mut planned = Vec::new();
    for last in bounds.into_iter().map(Some).chain([None]) {
        planned.push(PlannedTask {
            kind: TaskKind::Blocks,
            resource_type: "Patient".into(),
            range_start: 0,
            range_end: 0,
            block_after: after.clone(),
            block_last: last.clone(),
            estimate: per_task,
        });
        after = last;
    }
    Ok(planned)
}

/// Whose compartments a job reads: every resource (system level), or those in the
/// compartment of any patient or of the patients stored with the job.
pub fn patients_read(job: &Job) -> PatientFilter {
    match (job.spec.named_patients, job.spec.level) {
        (true, _) => PatientFilter::JobPatients(job.id),
        (false, Level::System) => PatientFilter::None,
        (false, Level::Patient | Level::Group) => PatientFilter::AnyPatient,
    }
}

/// The types an organized export writes in blocks: those that can be in a patient's
/// compartment, of the job's types.
pub fn block_types(job: &Job) -> Vec<String> {
    compartment_types()
        .into_iter()
        .filter(|t| job.spec.types.is_empty() || job.spec.types.iter().any(|s| s == t))
        .map(str::to_string)
        .collect()
}

/// Types that can be in a patient's compartment (Patient and Group export read only these).
fn compartment_types() -> Vec<&'static str> {
    let mut types: Vec<&str> = PATIENT_COMPARTMENT.iter().map(|(t, _)| *t).collect();
    if !types.contains(&"Patient") {
        types.push("Patient");
    }
    types
}
