//! The plan task: waits until the snapshot is complete, writes the error file of what the
//! kick-off ignored, then splits the job into export tasks (one per type; large types into seq
//! ranges that run in parallel).

use std::{sync::Arc, time::Duration};

use super::{Context, Ended, TaskError, lease::Lease, part, read_source};
use crate::{
    db::{
        jobs::{self, Job, Level},
        resources,
        tasks::{HeldTask, PlannedTask, TaskKind},
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
    let step = spec.range_size;
    let mut planned = Vec::new();
    for resource_type in types {
        let Some(span) = resources::type_span(pool, &resource_type).await? else {
            continue;
        };
        // Equal slices of the seq span, about `step` resources each. Resources that matter to
        // the snapshot all have a current row by now, so the span covers them.
        let slices = (span.count + step - 1) / step;
        let width = (span.max_seq - span.min_seq + 1 + slices - 1) / slices;
        let mut start = span.min_seq - 1;
        while start < span.max_seq {
            let end = (start + width).min(span.max_seq);
            // The same range also lists what was deleted since `_since`, and older versions
            // and last states when asked for.
            let kinds = [
                (TaskKind::Export, true),
                (TaskKind::Deleted, spec.since.is_some()),
                (TaskKind::History, spec.include_history),
                (TaskKind::SoftDeleted, spec.include_deleted),
            ];
            for (kind, wanted) in kinds {
                if wanted {
                    planned.push(PlannedTask {
                        kind,
                        resource_type: resource_type.clone(),
                        range_start: start,
                        range_end: end,
                        estimate: if kind == TaskKind::Export {
                            span.count / slices
                        } else {
                            0
                        },
                    });
                }
            }
            start = end;
        }
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
    part.finish(held, (0, 0)).await
}

/// Types that can be in a patient's compartment (Patient and Group export read only these).
fn compartment_types() -> Vec<&'static str> {
    let mut types: Vec<&str> = PATIENT_COMPARTMENT.iter().map(|(t, _)| *t).collect();
    if !types.contains(&"Patient") {
        types.push("Patient");
    }
    types
}
