//! An export task: pages its type (one seq range of it) out of the snapshot into ndjson parts:
//! the resources (narrowed by `_typeFilter`), the deletions since `_since` (`deleted` task),
//! or older versions and the last state of deleted resources (`history`, `softdeleted`).
//!
//! Per part: stream up to `part_size` rows (and at most `part_max_bytes`) into a new file,
//! reserve the file's number, commit the file if the lease still holds, then checkpoint. Rows
//! that go out as stored come from `COPY … TO STDOUT` without being decoded; rows that a filter,
//! de-identification, `_elements` or a deletion mark must change are read row by row.
//! A retried task resumes at its checkpoint and rewrites the same file names with the same
//! content, so a crash at any instant yields neither duplicates nor gaps.

use std::{borrow::Cow, collections::BTreeSet, sync::Arc};

use futures::TryStreamExt;
use serde_json::Value;
use sqlx::{Row, postgres::PgRow};
use tokio_util::sync::CancellationToken;

use super::{Context, Ended, TaskError, lease::Lease, part, plan, read_source::PageSource};
use crate::{
    db::{
        copy_out::{self, CopyRows},
        jobs::{Job, JobSpec},
        snapshot::{self, PatientFilter, Position, Rows, Selection},
        tasks::{Checkpoint, HeldTask, Task, TaskKind},
    },
    deid::{Deidentifier, Scope},
    fhir::{bulk, elements, type_filter::TypeFilter},
};

/// What a task writes and how each row becomes a line.
struct Output<'a> {
    selection: Selection<'a>,
    /// `{Type}`, `{Type}-deleted`, `{Type}-history`, `{Type}-softdeleted`: file names.
    file_kind: String,
    filter: Option<TypeFilter>,
    /// `_anonymizationConfig`: applied after the filter, before `_elements`.
    deid: Option<Deidentifier>,
    elements: Option<BTreeSet<String>>,
}

pub async fn run(
    context: &Arc<Context>,
    job: &Job,
    held: &mut HeldTask,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> Result<Ended, TaskError> {
    let task = held.task.clone();
    let mut parts = ExportParts {
        context,
        job,
        output: Output::of(context, job, &task)?,
        pages: PageSource::new(context, job),
    };
    part::write_parts(context, job, held, lease, shutdown, &mut parts).await
}

/// An export task being written.
struct ExportParts<'a> {
    context: &'a Context,
    job: &'a Job,
    output: Output<'a>,
    pages: PageSource<'a>,
}

impl part::PartByPart for ExportParts<'_> {
    async fn next_part(&mut self, held: &mut HeldTask) -> Result<bool, TaskError> {
        // The checkpoint is the last row written; a fresh task starts at its range's lower
        // bound.
        let after = if held.task.parts_done == 0 {
            Position {
                seq: held.task.range_start,
                version_id: i32::MAX,
            }
        } else {
            Position {
                seq: held.task.checkpoint_seq,
                version_id: held.task.checkpoint_version,
            }
        };
        let (context, job, output) = (self.context, self.job, &self.output);
        if output.streams_stored_text() {
            copy_part(context, job, held, output, &mut self.pages, after).await
        } else {
            write_part(context, job, held, output, &mut self.pages, after).await
        }
    }
}

impl<'j> Output<'j> {
    /// What `task` of `job` writes.
    fn of(context: &Context, job: &'j Job, task: &'j Task) -> Result<Output<'j>, TaskError> {
        let spec = &job.spec;
        let resource_type = task.resource_type.as_deref().unwrap_or_default();
        // Group members, or the patients a `patient` parameter named.
        let patients = match plan::patients_read(job) {
            // What is in a compartment is in the blocks of an organized export.
            PatientFilter::None if spec.organize_by.is_some() && task.kind == TaskKind::Export => {
                PatientFilter::Unattached
            }
            patients => patients,
        };
        let excluded: &[String] = if resource_type == "Group" {
            &spec.excluded_groups
        } else {
            &[]
        };
        let (rows, file_kind) = match task.kind {
            TaskKind::Deleted => (Rows::Deleted, format!("{resource_type}-deleted")),
            TaskKind::History => (
                Rows::History {
                    skip_last_state: spec.include_deleted,
                },
                format!("{resource_type}-history"),
            ),
            TaskKind::SoftDeleted => (Rows::LastState, format!("{resource_type}-softdeleted")),
            TaskKind::Export => (Rows::Live, resource_type.to_string()),
            TaskKind::Plan | TaskKind::Blocks => {
                return Err(TaskError::failed("not a task of one type"));
            }
        };
        // Deletions are listed whole: a tombstone has nothing to filter on.
        let filter = match rows {
            Rows::Deleted => None,
            _ => TypeFilter::for_type(
                &spec.type_filters,
                resource_type,
                &context.base_url,
                spec.created_at,
            )
            .map_err(TaskError::failed)?,
        };
        let pushdown = filter
            .as_ref()
            .map(TypeFilter::pushdown)
            .unwrap_or_default();
        Ok(Output {
            selection: Selection {
                resource_type,
                range_end: task.range_end,
                transaction_time: spec.snapshot_time(),
                since: spec.since,
                patients,
                excluded_ids: excluded,
                rows,
                ids: pushdown.ids,
                updated_from: pushdown.updated_from,
                updated_before: pushdown.updated_before,
            },
            file_kind,
            filter,
            deid: deidentifier(spec)?,
            elements: elements::for_type(&spec.elements, resource_type),
        })
    }
}

/// The job's de-identification, if it has one.
pub(super) fn deidentifier(spec: &JobSpec) -> Result<Option<Deidentifier>, TaskError> {
    match (&spec.anonymization_config, &spec.anonymization_seed) {
        (Some(config), Some(seed)) => Deidentifier::new(config, seed).map(Some).map_err(|e| {
            TaskError::failed(format!("the job's de-identification configuration: {e}"))
        }),
        _ => Ok(None),
    }
}

impl Output<'_> {
    /// Does each row go out as stored? Then the part is copied out of Postgres as it is.
    fn streams_stored_text(&self) -> bool {
        self.filter.is_none()
            && self.deid.is_none()
            && self.elements.is_none()
            && matches!(self.selection.rows, Rows::Live | Rows::History { .. })
    }
}

/// Writes the task's next part from `COPY … TO STDOUT (FORMAT binary)`: the stored text goes
/// straight into the file. `false`: nothing was left.
async fn copy_part(
    context: &Context,
    job: &Job,
    held: &mut HeldTask,
    output: &Output<'_>,
    pages: &mut PageSource<'_>,
    after: Position,
) -> Result<bool, TaskError> {
    let started = std::time::Instant::now();
    let mut conn = pages.connection(held).await?;
    let copied = copy_rows_into_part(context, job, held, output, after, &mut conn).await;
    let (file, last) = match copied {
        Ok(copied) => copied,
        Err(e) => {
            // It may have stopped in the middle of the COPY: never reuse that connection.
            conn.close_on_drop();
            return Err(e);
        }
    };
    drop(conn);
    commit(held, file.zip(last), started).await
}

/// Reads one page's COPY to its end, writing rows into a part until it holds `part_size` rows
/// or reaching `part_max_bytes` would be next; returns the part and its last row.
async fn copy_rows_into_part(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    output: &Output<'_>,
    after: Position,
    conn: &mut sqlx::PgConnection,
) -> Result<(Option<part::OpenPart>, Option<Position>), TaskError> {
    let limit = i64::from(job.spec.part_size);
    let max_bytes = job.spec.part_max_bytes as u64;
    let seq = held.task.parts_done;
    let mut stream = copy_out::snapshot_page(conn, &output.selection, after, limit).await?;
    let (mut parser, mut rows) = (CopyRows::default(), Vec::new());
    let (mut file, mut last): (Option<part::OpenPart>, Option<Position>) = (None, None);
    let mut full = false;
    while let Some(chunk) = stream.try_next().await? {
        if full {
            continue; // the rest of the page is the next part's: read it to the end unused
        }
        parser.push(chunk, &mut rows)?;
        for row in rows.drain(..) {
            let part = match &mut file {
                Some(part) if part.bytes + row.body.len() as u64 + 1 > max_bytes => {
                    full = true;
                    break;
                }
                Some(part) => part,
                None => file.insert(part::open(context, job, held, &output.file_kind, seq).await?),
            };
            part.write_line(&row.body).await?;
            last = Some(row.position);
        }
    }
    if !(full || parser.ended()) {
        return Err(TaskError::failed("the COPY of a page ended early"));
    }
    Ok((file, last))
}

/// Writes the task's next part: up to `part_size` lines (and `part_max_bytes`) from the rows
/// after `after`, then checkpoints it. `false`: nothing was left. A filter may skip rows, so
/// this reads page after page until the part is full or the range ends; the file is created at
/// the first line, so no empty file is ever written.
async fn write_part(
    context: &Context,
    job: &Job,
    held: &mut HeldTask,
    output: &Output<'_>,
    pages: &mut PageSource<'_>,
    after: Position,
) -> Result<bool, TaskError> {
    let started = std::time::Instant::now();
    let limit = i64::from(job.spec.part_size);
    let max_bytes = job.spec.part_max_bytes as u64;
    let seq = held.task.parts_done;
    let mut file: Option<part::OpenPart> = None;
    let mut last_written = None;
    let mut page_after = after;
    'pages: loop {
        // Page reads have a pool of their own: the queue statements below never wait for a
        // connection from the pool this one came from.
        let mut conn = pages.connection(held).await?;
        let mut rows = snapshot::snapshot_page(&mut conn, &output.selection, page_after, limit);
        let mut scanned = 0;
        while let Some(row) = rows.try_next().await? {
            scanned += 1;
            let position = Position {
                seq: row.try_get("seq")?,
                version_id: row.try_get("version_id")?,
            };
            page_after = position;
            let Some(line) = render(output, &row)? else {
                continue;
            };
            let part = match &mut file {
                Some(part) => part,
                None => file.insert(part::open(context, job, held, &output.file_kind, seq).await?),
            };
            let line = finish_line(output, line, &part.name, &job.spec.folder)?;
            // One resource always fits; past that the byte cap ends the part early.
            if part.lines > 0 && part.bytes + line.len() as u64 + 1 > max_bytes {
                break 'pages;
            }
            part.write_line(line.as_bytes()).await?;
            last_written = Some(position);
            if i64::from(part.lines) == limit {
                break 'pages;
            }
        }
        if scanned < limit {
            break; // the range is exhausted
        }
    }
    commit(held, file.zip(last_written), started).await
}

/// Commits a part that got lines (with its last row), and moves the checkpoint past it.
/// `false`: there was no part (nothing was left to write).
async fn commit(
    held: &mut HeldTask,
    written: Option<(part::OpenPart, Position)>,
    started: std::time::Instant,
) -> Result<bool, TaskError> {
    let Some((part, last)) = written else {
        return Ok(false);
    };
    let (name, lines, bytes) = (part.name.clone(), part.lines, part.bytes);
    let checkpoint = Checkpoint {
        seq: last.seq,
        version: last.version_id,
        ..Checkpoint::default()
    };
    part.finish(held, checkpoint, false).await?;
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(file = %name, resources = lines, bytes, ms, "part committed");
    Ok(true)
}

/// The line a row becomes, or None when `_typeFilter` leaves it out (the filter sees the
/// stored resource). Stored text streams out untouched unless a filter, a deletion mark,
/// de-identification or `_elements` needs the resource parsed.
fn render<'r>(output: &Output, row: &'r PgRow) -> Result<Option<Cow<'r, str>>, TaskError> {
    let selection = &output.selection;
    if selection.rows == Rows::Deleted {
        let id: &str = row.try_get("id")?;
        return Ok(Some(Cow::Owned(bulk::deletion_bundle(
            selection.resource_type,
            id,
        ))));
    }
    let stored: &str = row.try_get("body")?;
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
    Ok(Some(line))
}

/// De-identifies a rendered line (its scope is the file it goes into, `file` the part's
/// storage name), then keeps only `_elements`. A deletion's Bundle is neither: it names the
/// deleted resource by its de-identified id, as the resource itself was exported.
fn finish_line<'r>(
    output: &Output,
    mut line: Cow<'r, str>,
    file: &str,
    folder: &str,
) -> Result<Cow<'r, str>, TaskError> {
    let resource_type = output.selection.resource_type;
    if let Some(deid) = &output.deid {
        let scope = Scope {
            file: file.rsplit('/').next().unwrap_or(file),
            folder,
        };
        line = Cow::Owned(match output.selection.rows {
            Rows::Deleted => de_identified_deletion(deid, resource_type, &line, &scope)?,
            _ => deid.apply(&line, &scope)?,
        });
    }
    if output.selection.rows == Rows::Deleted {
        return Ok(line);
    }
    if let Some(keep) = &output.elements {
        line = Cow::Owned(elements::subset(&line, resource_type, keep)?);
    }
    Ok(line)
}

/// The deletion Bundle `line` of a `resource_type` with the id the rules give that resource
/// (`Resource.id` hashed, say), so that a de-identified copy can apply it.
fn de_identified_deletion(
    deid: &Deidentifier,
    resource_type: &str,
    line: &str,
    scope: &Scope,
) -> Result<String, TaskError> {
    let bundle: Value = serde_json::from_str(line)?;
    let url = bundle["entry"][0]["request"]["url"]
        .as_str()
        .unwrap_or_default();
    let id = url.rsplit('/').next().unwrap_or_default();
    let carrier = serde_json::json!({"resourceType": resource_type, "id": id}).to_string();
    let carried: Value = serde_json::from_str(&deid.apply(&carrier, scope)?)?;
    match carried["id"].as_str() {
        Some(id) if !id.is_empty() => Ok(bulk::deletion_bundle(resource_type, id)),
        _ => Err(TaskError::Unprocessable(crate::deid::ProcessingError(
            format!(
                "the de-identification rules remove the id of a deleted {resource_type}, so its \
             deletion cannot be listed (keep or hash Resource.id)"
            ),
        ))),
    }
}
