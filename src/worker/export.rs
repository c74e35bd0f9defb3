//! An export task: pages its type (one seq range of it) out of the snapshot into ndjson parts:
//! the resources (narrowed by `_typeFilter`), the deletions since `_since` (`deleted` task),
//! or older versions and the last state of deleted resources (`history`, `softdeleted`).
//!
//! Per part: stream up to `part_size` rows (and at most `part_max_bytes`) into a new file,
//! reserve the file's number, commit the file if the lease still holds, then checkpoint.
//! A retried task resumes at its checkpoint and rewrites the same file names with the same
//! content, so a crash at any instant yields neither duplicates nor gaps.

use std::{borrow::Cow, collections::BTreeSet, sync::Arc, time::Duration};

use futures::TryStreamExt;
use serde_json::Value;
use sqlx::{Row, postgres::PgRow};
use tokio_util::sync::CancellationToken;

use super::{Context, Ended, lease::Lease, part};
use crate::{
    db::{
        jobs::{self, Job, Task},
        resources::{self, PatientFilter, Position, Rows, Selection},
    },
    fhir::{bulk, elements, type_filter::TypeFilter},
};

enum Part {
    /// Nothing (more) in the range.
    Empty,
    Written {
        last: Position,
    },
    LeaseLost,
}

/// What a task writes and how each row becomes a line.
struct Output<'a> {
    selection: Selection<'a>,
    /// `{Type}`, `{Type}-deleted`, `{Type}-history`, `{Type}-softdeleted`: file names.
    file_kind: String,
    filter: Option<TypeFilter>,
    elements: Option<BTreeSet<String>>,
}

pub async fn run(
    context: &Arc<Context>,
    job: &Job,
    task: &Task,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ended> {
    let resource_type = task.resource_type.as_deref().unwrap_or_default();
    // Group members, or the patients a `patient` parameter named.
    let patients = match (&job.patient_ids, job.level.as_str()) {
        (Some(ids), _) => PatientFilter::Patients(ids),
        (None, "system") => PatientFilter::None,
        (None, _) => PatientFilter::AnyPatient,
    };
    let excluded: &[String] = if resource_type == "Group" {
        &job.excluded_groups
    } else {
        &[]
    };
    let (rows, file_kind) = match task.kind.as_str() {
        "deleted" => (Rows::Deleted, format!("{resource_type}-deleted")),
        "history" => (
            Rows::History {
                skip_last_state: job.include_deleted,
            },
            format!("{resource_type}-history"),
        ),
        "softdeleted" => (Rows::LastState, format!("{resource_type}-softdeleted")),
        _ => (Rows::Live, resource_type.to_string()),
    };
    // Deletions are listed whole: a tombstone has nothing to filter on.
    let filter = match rows {
        Rows::Deleted => None,
        _ => TypeFilter::for_type(&job.type_filters, resource_type, &context.base_url)
            .map_err(anyhow::Error::msg)?,
    };
    let pushdown = filter
        .as_ref()
        .map(TypeFilter::pushdown)
        .unwrap_or_default();
    let output = Output {
        selection: Selection {
            resource_type,
            range_end: task.range_end,
            transaction_time: job.transaction_time,
            since: job.since,
            patients,
            excluded_ids: excluded,
            rows,
            ids: pushdown.ids.as_deref(),
            updated_from: pushdown.updated_from,
            updated_before: pushdown.updated_before,
        },
        file_kind,
        filter,
        elements: elements::for_type(&job.elements, resource_type),
    };
    // The checkpoint is the last row written; a fresh task starts at its range's lower bound.
    let mut after = if task.parts_done == 0 {
        Position {
            seq: task.range_start,
            version_id: i32::MAX,
        }
    } else {
        Position {
            seq: task.checkpoint_seq,
            version_id: task.checkpoint_version,
        }
    };
    let mut seq = task.parts_done;
    let throttle = Duration::from_millis(context.config.export.throttle_ms);
    loop {
        if lease.is_lost() {
            return Ok(Ended::LeaseLost);
        }
        if shutdown.is_cancelled() {
            jobs::release(&context.pool, task).await?;
            return Ok(Ended::Released);
        }
        match write_part(context, job, task, &output, after, seq).await? {
            Part::Empty => break,
            Part::LeaseLost => return Ok(Ended::LeaseLost),
            Part::Written { last } => {
                after = last;
                seq += 1;
            }
        }
        if !throttle.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(throttle) => {}
                _ = lease.lost() => return Ok(Ended::LeaseLost),
            }
        }
    }
    if jobs::finish_task(&context.pool, task, &[], context.retention()).await? {
        Ok(Ended::Done)
    } else {
        Ok(Ended::LeaseLost)
    }
}

/// Writes the next part: up to `part_size` lines (and `part_max_bytes`) from the rows after
/// `after`. A filter may skip rows, so this reads page after page until the part is full or the
/// range ends; the file is created at the first line, so no empty file is ever written.
async fn write_part(
    context: &Context,
    job: &Job,
    task: &Task,
    output: &Output<'_>,
    after: Position,
    seq: i32,
) -> anyhow::Result<Part> {
    let config = &context.config.export;
    let started = std::time::Instant::now();
    let limit = config.part_size as i64;
    let mut file: Option<part::OpenPart> = None;
    let mut last_written = None;
    let mut page_after = after;
    'pages: loop {
        let mut conn = context.pool.acquire().await?;
        let mut rows = resources::snapshot_page(&mut conn, &output.selection, page_after, limit);
        let mut scanned = 0;
        while let Some(row) = rows.try_next().await? {
            scanned += 1;
            let position = Position {
                seq: row.try_get(0)?,
                version_id: row.try_get(3)?,
            };
            page_after = position;
            let Some(line) = render(output, &row)? else {
                continue;
            };
            let part = match &mut file {
                // One resource always fits; past that the byte cap ends the part early.
                Some(part) if part.bytes + line.len() as u64 + 1 > config.part_max_bytes => {
                    break 'pages;
                }
                Some(part) => part,
                None => match part::open(context, job, task, &output.file_kind, seq).await? {
                    Some(part) => file.insert(part),
                    None => return Ok(Part::LeaseLost),
                },
            };
            part.write_line(line.as_bytes()).await?;
            last_written = Some(position);
            if part.lines as i64 == limit {
                break 'pages;
            }
        }
        if scanned < limit {
            break; // the range is exhausted
        }
    }
    let (Some(last), Some(part)) = (last_written, file) else {
        return Ok(Part::Empty);
    };
    let (name, lines, bytes) = (part.name.clone(), part.lines, part.bytes);
    if !part
        .finish(context, task, (last.seq, last.version_id))
        .await?
    {
        return Ok(Part::LeaseLost);
    }
    tracing::debug!(file = %name, resources = lines, bytes, ms = started.elapsed().as_millis() as u64, "part written");
    Ok(Part::Written { last })
}

/// The line a row becomes, or None when `_typeFilter` leaves it out. Stored text streams out
/// untouched unless a filter, a deletion mark or `_elements` needs the resource parsed.
fn render<'r>(output: &Output, row: &'r PgRow) -> anyhow::Result<Option<Cow<'r, str>>> {
    let selection = &output.selection;
    if selection.rows == Rows::Deleted {
        let id: &str = row.try_get(2)?;
        return Ok(Some(Cow::Owned(bulk::deletion_bundle(
            selection.resource_type,
            id,
        ))));
    }
    let stored: &str = row.try_get(1)?;
    if let Some(filter) = &output.filter {
        let resource: Value = serde_json::from_str(stored)?;
        if !filter.matches(&resource) {
            return Ok(None);
        }
    }
    let mut line = Cow::Borrowed(stored);
    if selection.rows == Rows::LastState {
        line = Cow::Owned(bulk::mark_deleted(&line)?);
    }
    if let Some(keep) = &output.elements {
        line = Cow::Owned(elements::subset(&line, keep)?);
    }
    Ok(Some(line))
}
