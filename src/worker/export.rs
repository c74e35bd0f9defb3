//! An export task: pages its type (one seq range of it) out of the snapshot into ndjson parts:
//! the resources, or for a `deleted` task the deletions since `_since`.
//!
//! Per part: stream up to `part_size` rows (and at most `part_max_bytes`) into a new file,
//! reserve the file's number, commit the file if the lease still holds, then checkpoint.
//! A retried task resumes at its checkpoint and rewrites the same file names with the same
//! content, so a crash at any instant yields neither duplicates nor gaps.

use std::{borrow::Cow, collections::BTreeSet, sync::Arc, time::Duration};

use futures::TryStreamExt;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::{Context, Ended, lease::Lease};
use crate::db::{
    jobs::{self, Job, Task},
    resources::{self, PatientFilter, Selection},
};
use crate::fhir::{bulk, elements};

enum Part {
    /// Nothing left in the range.
    Empty,
    Written {
        last_seq: i64,
    },
    LeaseLost,
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
    let selection = Selection {
        resource_type,
        range_end: task.range_end,
        transaction_time: job.transaction_time,
        since: job.since,
        patients,
        excluded_ids: excluded,
        deleted: task.kind == "deleted",
    };
    // The checkpoint is the last seq written; a fresh task starts at its range's lower bound.
    let mut after = if task.parts_done == 0 {
        task.range_start
    } else {
        task.checkpoint_seq
    };
    let mut seq = task.parts_done;
    let elements = elements::for_type(&job.elements, resource_type);
    let throttle = Duration::from_millis(context.config.export.throttle_ms);
    loop {
        if lease.is_lost() {
            return Ok(Ended::LeaseLost);
        }
        if shutdown.is_cancelled() {
            jobs::release(&context.pool, task).await?;
            return Ok(Ended::Released);
        }
        match write_part(
            context,
            job,
            task,
            &selection,
            elements.as_ref(),
            after,
            seq,
        )
        .await?
        {
            Part::Empty => break,
            Part::LeaseLost => return Ok(Ended::LeaseLost),
            Part::Written { last_seq } => {
                after = last_seq;
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

async fn write_part(
    context: &Context,
    job: &Job,
    task: &Task,
    selection: &Selection<'_>,
    elements: Option<&BTreeSet<String>>,
    after: i64,
    seq: i32,
) -> anyhow::Result<Part> {
    let config = &context.config.export;
    let started = std::time::Instant::now();
    let mut conn = context.pool.acquire().await?;
    let mut rows = resources::snapshot_page(&mut conn, selection, after, config.part_size as i64);
    let Some(first) = rows.try_next().await? else {
        return Ok(Part::Empty);
    };
    // Deletions are numbered and named apart: `{Type}-deleted-{n}.ndjson`.
    let file_kind = if selection.deleted {
        format!("{}-deleted", selection.resource_type)
    } else {
        selection.resource_type.to_string()
    };
    let Some(part_no) = jobs::reserve_part(&context.pool, task, &file_kind, seq).await? else {
        return Ok(Part::LeaseLost);
    };
    let name = format!("{}/{file_kind}-{part_no}.ndjson", job.folder);
    let mut writer = context.storage.create(&job.container, &name).await?;
    let (mut count, mut bytes) = (0i32, 0u64);
    let mut last_written = None;
    let mut next = Some(first);
    while let Some(row) = next.take() {
        // Stored text streams out untouched, unless `_elements` asks for a subset.
        let body: Cow<str> = if selection.deleted {
            Cow::Owned(bulk::deletion_bundle(
                selection.resource_type,
                row.try_get(2)?,
            ))
        } else {
            let stored: &str = row.try_get(1)?;
            match elements {
                Some(keep) => Cow::Owned(elements::subset(stored, keep)?),
                None => Cow::Borrowed(stored),
            }
        };
        let size = body.len() as u64 + 1;
        // One resource always fits; past that the byte cap ends the part early.
        if count > 0 && bytes + size > config.part_max_bytes {
            break;
        }
        writer.write(body.as_bytes()).await?;
        writer.write(b"\n").await?;
        count += 1;
        bytes += size;
        last_written = Some(row);
        next = rows.try_next().await?;
    }
    drop(rows);
    drop(conn);
    let last_seq: i64 = last_written
        .expect("the first row is always written")
        .try_get(0)?;
    let (pool, task_id, attempt) = (context.pool.clone(), task.id, task.attempt);
    let fence = Box::pin(async move { Ok(jobs::holds_lease(&pool, task_id, attempt).await?) });
    if !writer.commit(fence).await? {
        return Ok(Part::LeaseLost);
    }
    if !jobs::checkpoint(&context.pool, task, seq, last_seq, count, bytes as i64).await? {
        return Ok(Part::LeaseLost);
    }
    tracing::debug!(file = %name, resources = count, bytes, ms = started.elapsed().as_millis() as u64, "part written");
    Ok(Part::Written { last_seq })
}
