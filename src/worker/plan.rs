//! The plan task: waits until the snapshot is complete, writes the error file of what the
//! kick-off ignored, then splits the job into export tasks (one per type; large types into seq
//! ranges that run in parallel).

use std::{sync::Arc, time::Duration};

use super::{Context, Ended, lease::Lease, part};
use crate::{
    db::{jobs, resources},
    fhir::{
        outcome::{self, Issue, Severity},
        r4::{PATIENT_COMPARTMENT, RESOURCE_TYPES},
    },
};

pub async fn run(
    context: &Arc<Context>,
    job: &jobs::Job,
    task: &jobs::Task,
    lease: &Lease,
) -> anyhow::Result<Ended> {
    let pool = &context.pool;
    // Every write with last_updated <= transaction_time must be committed before we read.
    // Writes are short; a transaction left open elsewhere must not hold the export forever.
    let deadline = tokio::time::Instant::now() + context.lease_duration();
    while jobs::in_flight_remaining(pool, job.id).await? > 0 {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(job = %job.id, "transactions open since kick-off are still running; exporting without them");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = lease.lost() => return Ok(Ended::LeaseLost),
        }
    }
    if !write_notes(context, job, task).await? {
        return Ok(Ended::LeaseLost);
    }
    let types = if job.types.is_empty() {
        let candidates: Vec<&str> = match job.level.as_str() {
            "system" => RESOURCE_TYPES.to_vec(),
            _ => compartment_types(),
        };
        resources::types_with_data(pool, &candidates).await?
    } else {
        job.types.clone()
    };
    let step = context.config.export.range_size;
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
            planned.push(jobs::PlannedTask {
                kind: "export",
                resource_type: resource_type.clone(),
                range_start: start,
                range_end: end,
                estimate: span.count / slices,
            });
            // The same range also lists what was deleted since `_since`, and older versions
            // and last states when asked for.
            let extra = [
                ("deleted", job.since.is_some()),
                ("history", job.include_history),
                ("softdeleted", job.include_deleted),
            ];
            for (kind, wanted) in extra {
                if wanted {
                    planned.push(jobs::PlannedTask {
                        kind,
                        resource_type: resource_type.clone(),
                        range_start: start,
                        range_end: end,
                        estimate: 0,
                    });
                }
            }
            start = end;
        }
    }
    if jobs::finish_task(pool, task, &planned, context.retention()).await? {
        tracing::info!(job = %job.id, tasks = planned.len(), "planned");
        Ok(Ended::Done)
    } else {
        Ok(Ended::LeaseLost)
    }
}

/// The manifest's error file: one OperationOutcome per thing a lenient kick-off ignored.
/// Written once (a retried plan finds its part done). `false`: the lease was lost.
async fn write_notes(
    context: &Context,
    job: &jobs::Job,
    task: &jobs::Task,
) -> anyhow::Result<bool> {
    const KIND: &str = "OperationOutcome-error";
    if job.notes.is_empty() || task.parts_done > 0 {
        return Ok(true);
    }
    let Some(mut part) = part::open(context, job, task, KIND, 0).await? else {
        return Ok(false);
    };
    for note in &job.notes {
        let issue = Issue::new(
            Severity::Warning,
            "not-supported",
            format!("ignored: {note}"),
        );
        let line = outcome::operation_outcome(&[issue]).to_string();
        part.write_line(line.as_bytes()).await?;
    }
    part.finish(context, task, (0, 0)).await
}

/// Types that can be in a patient's compartment (Patient and Group export read only these).
fn compartment_types() -> Vec<&'static str> {
    let mut types: Vec<&str> = PATIENT_COMPARTMENT.iter().map(|(t, _)| *t).collect();
    if !types.contains(&"Patient") {
        types.push("Patient");
    }
    types
}
