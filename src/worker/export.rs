//! An export task: pages its type (one seq range of it) out of the snapshot into ndjson parts:
//! the resources (narrowed by `_typeFilter`), the deletions since `_since` (`deleted` task),
//! or older versions and the last state of deleted resources (`history`, `softdeleted`).
//!
//! Per part: stream up to `part_size` rows (and at most `part_max_bytes`) into a new file,
//! reserve the file's number, commit the file if the lease still holds, then checkpoint. Pages
//! come from `COPY … TO STDOUT`: rows that go out as stored are written as their bytes came;
//! rows that a filter, de-identification, `_elements` or a deletion mark must change are
//! rendered one by one.
//! A retried task resumes at its checkpoint and rewrites the same file names with the same
//! content, so a crash at any instant yields neither duplicates nor gaps.

use std::{borrow::Cow, collections::BTreeSet, sync::Arc};

use futures::TryStreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Context, Ended, TaskError, lease::Lease, part, plan, read_source::PageSource};
use crate::{
    db::{
        copy_out::{self, CopyRows},
        jobs::{Job, JobSpec},
        snapshot::{PatientFilter, Position, Rows, Selection},
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
        write_part(
            self.context,
            self.job,
            held,
            &self.output,
            &mut self.pages,
            after,
        )
        .await
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
    let mut part = PartInProgress {
        file: None,
        last: None,
    };
    let mut page_after = after;
    loop {
        // Page reads have a pool of their own: the queue statements of a commit never wait for
        // a connection from the pool this one came from.
        let mut conn = pages.connection(held).await?;
        let read =
            copy_page_into_part(context, job, held, output, &mut conn, page_after, &mut part);
        match read.await {
            Err(e) => {
                // It may have stopped in the middle of the COPY: never reuse that connection.
                conn.close_on_drop();
                return Err(e);
            }
            Ok(PageRead::PartFull) => break,
            Ok(PageRead::Scanned { rows, last }) => match last {
                Some(last) if rows == i64::from(job.spec.part_size) => page_after = last,
                _ => break, // the range is exhausted
            },
        }
    }
    commit(held, part.file.zip(part.last), started).await
}

/// The part being written and its last row.
struct PartInProgress {
    file: Option<part::OpenPart>,
    last: Option<Position>,
}

/// How a page ended: the part filled (the rest of the page is the next part's), or every row
/// of the page was read (how many, and the last).
enum PageRead {
    PartFull,
    Scanned { rows: i64, last: Option<Position> },
}

/// Reads one page through `COPY … TO STDOUT (FORMAT binary)` to its end, writing its rows into
/// the part until it holds `part_size` rows or reaching `part_max_bytes` would be next. Rows
/// that go out as stored are written as their bytes came, never decoded.
async fn copy_page_into_part(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    output: &Output<'_>,
    conn: &mut sqlx::PgConnection,
    after: Position,
    part: &mut PartInProgress,
) -> Result<PageRead, TaskError> {
    let limit = i64::from(job.spec.part_size);
    let mut stream = copy_out::snapshot_page(conn, &output.selection, after, limit).await?;
    let (mut parser, mut rows) = (CopyRows::default(), Vec::new());
    let (mut scanned, mut last_scanned, mut full) = (0, None, false);
    let as_stored = output.streams_stored_text();
    while let Some(chunk) = stream.try_next().await? {
        if full {
            continue; // read to the end unused
        }
        parser.push(chunk, &mut rows)?;
        for row in rows.drain(..) {
            scanned += 1;
            last_scanned = Some(row.position);
            let taken = if as_stored {
                take_line(context, job, held, output, part, &row.text).await?
            } else {
                let text = std::str::from_utf8(&row.text)
                    .map_err(|_| TaskError::failed("a stored resource is not UTF-8"))?;
                let Some(line) = render(output, text)? else {
                    continue;
                };
                let file = open_part(context, job, held, output, part).await?;
                let line = finish_line(output, line, &file.name, &job.spec.folder)?;
                take_line(context, job, held, output, part, line.as_bytes()).await?
            };
            if !taken {
                full = true;
                break;
            }
            part.last = Some(row.position);
            if part
                .file
                .as_ref()
                .is_some_and(|f| i64::from(f.lines) == limit)
            {
                full = true;
                break;
            }
        }
    }
    if !(full || parser.ended()) {
        return Err(TaskError::failed("the COPY of a page ended early"));
    }
    Ok(if full {
        PageRead::PartFull
    } else {
        PageRead::Scanned {
            rows: scanned,
            last: last_scanned,
        }
    })
}

/// The part's file, created at its first line.
async fn open_part<'p>(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    output: &Output<'_>,
    part: &'p mut PartInProgress,
) -> Result<&'p mut part::OpenPart, TaskError> {
    if part.file.is_none() {
        let seq = held.task.parts_done;
        part.file = Some(part::open(context, job, held, &output.file_kind, seq).await?);
    }
    Ok(part.file.as_mut().expect("opened above"))
}

/// Writes `line` into the part unless it would take the part past `part_max_bytes` (one line
/// always fits); whether it was written.
async fn take_line(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    output: &Output<'_>,
    part: &mut PartInProgress,
    line: &[u8],
) -> Result<bool, TaskError> {
    let file = open_part(context, job, held, output, part).await?;
    if file.lines > 0 && file.bytes + line.len() as u64 + 1 > job.spec.part_max_bytes as u64 {
        return Ok(false);
    }
    file.write_line(line).await?;
    Ok(true)
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

/// The line a row's text becomes (a deletion's text is the deleted resource's id), or None
/// when `_typeFilter` leaves it out (the filter sees the stored resource).
fn render<'r>(output: &Output, text: &'r str) -> Result<Option<Cow<'r, str>>, TaskError> {
    let selection = &output.selection;
    if selection.rows == Rows::Deleted {
        return Ok(Some(Cow::Owned(bulk::deletion_bundle(
            selection.resource_type,
            text,
        ))));
    }
    if let Some(filter) = &output.filter {
        let resource: Value = serde_json::from_str(text)?;
        if !filter.matches(&resource) {
            return Ok(None);
        }
    }
    let mut line = Cow::Borrowed(text);
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
