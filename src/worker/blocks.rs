//! A blocks task of an organized export (`organizeOutputBy=Patient`): the patients of a range
//! of ids, each as a resource block — a `Parameters` header naming the patient, the Patient,
//! then the resources of its compartment — in `Patient-blocks-n.ndjson` parts.
//!
//! A part ends before a block that no longer fits in it (`part_size` lines, headers included,
//! and `part_max_bytes`); a block that alone exceeds a part is split, its header repeated at
//! the start of the next part and the part before marked as continued. Each part is written
//! from the task's checkpoint (the last row of the part before) and committed like any other,
//! so a retried task cuts the same parts; memory holds one part at most.

use std::{collections::BTreeSet, sync::Arc};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Context, Ended, TaskError, export, lease::Lease, part, plan, read_source::PageSource};
use crate::{
    db::{
        blocks::{self, BlockPosition, BlockRow, BlockSelection},
        jobs::Job,
        tasks::{Checkpoint, HeldTask},
    },
    deid::{Deidentifier, Scope},
    fhir::{elements, type_filter::TypeFilter},
};

/// The file kind of blocks parts: `Patient-blocks-n.ndjson`.
pub const KIND: &str = "Patient-blocks";

/// How each type's rows become lines.
struct TypeOutput {
    filter: Option<TypeFilter>,
    elements: Option<BTreeSet<String>>,
}

struct Output<'a> {
    selection: BlockSelection<'a>,
    per_type: std::collections::HashMap<String, TypeOutput>,
    deid: Option<Deidentifier>,
    folder: &'a str,
}

pub async fn run(
    context: &Arc<Context>,
    job: &Job,
    held: &mut HeldTask,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> Result<Ended, TaskError> {
    let types = plan::block_types(job);
    let block_last = held.task.block_last.clone();
    let mut task = BlockParts {
        context,
        job,
        output: Output::of(context, job, &types, block_last.as_deref())?,
        pages: PageSource::new(context, job),
    };
    part::write_parts(context, job, held, lease, shutdown, &mut task).await
}

/// A blocks task being written.
struct BlockParts<'a> {
    context: &'a Context,
    job: &'a Job,
    output: Output<'a>,
    pages: PageSource<'a>,
}

impl part::PartByPart for BlockParts<'_> {
    async fn next_part(&mut self, held: &mut HeldTask) -> Result<bool, TaskError> {
        write_part(self.context, self.job, held, &self.output, &mut self.pages).await
    }
}

impl<'a> Output<'a> {
    fn of(
        context: &Context,
        job: &'a Job,
        types: &'a [String],
        block_last: Option<&'a str>,
    ) -> Result<Output<'a>, TaskError> {
        let spec = &job.spec;
        let mut per_type = std::collections::HashMap::new();
        for t in types {
            let filter =
                TypeFilter::for_type(&spec.type_filters, t, &context.base_url, spec.created_at)
                    .map_err(TaskError::failed)?;
            let elements = elements::for_type(&spec.elements, t);
            per_type.insert(t.clone(), TypeOutput { filter, elements });
        }
        Ok(Output {
            selection: BlockSelection {
                types,
                block_last,
                transaction_time: spec.snapshot_time(),
                since: spec.since,
                patients: plan::patients_read(job),
                excluded_groups: &spec.excluded_groups,
            },
            per_type,
            deid: export::deidentifier(spec)?,
            folder: &spec.folder,
        })
    }

    /// How a row's type is written, or None when `_typeFilter` leaves the row out.
    fn kept(&self, row: &BlockRow) -> Result<Option<&TypeOutput>, TaskError> {
        let Some(out) = self.per_type.get(&row.resource_type) else {
            return Ok(None);
        };
        if let Some(filter) = &out.filter {
            let resource: Value = serde_json::from_str(&row.body)?;
            if !filter.matches(&resource) {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// The line a kept row becomes in `file`.
    fn line(&self, row: &BlockRow, out: &TypeOutput, file: &str) -> Result<String, TaskError> {
        let mut line = self.deidentified(&row.body, file)?;
        if let Some(keep) = &out.elements {
            line = elements::subset(&line, &row.resource_type, keep)?;
        }
        Ok(line)
    }

    /// The header line of `block` in `file`. With de-identification it names the patient as
    /// the block's other lines do: the reference goes through the rules inside a carrier
    /// resource (a `Basic` whose `subject` it is); a configuration that removes references
    /// leaves a header that names no patient.
    fn header(&self, block: &str, file: &str) -> Result<String, TaskError> {
        let mut reference = Some(format!("Patient/{block}"));
        if self.deid.is_some() {
            let carrier = json!({"resourceType": "Basic", "id": "header", "code": {"text": "header"},
                                 "subject": {"reference": reference}});
            let carried: Value =
                serde_json::from_str(&self.deidentified(&carrier.to_string(), file)?)?;
            reference = carried["subject"]["reference"].as_str().map(str::to_string);
        }
        let mut parameter = json!({"name": "header"});
        if let Some(reference) = reference {
            parameter["valueReference"] = json!({"reference": reference});
        }
        Ok(json!({"resourceType": "Parameters", "parameter": [parameter]}).to_string())
    }

    fn deidentified(&self, line: &str, file: &str) -> Result<String, TaskError> {
        match &self.deid {
            Some(deid) => {
                let scope = Scope {
                    file: file.rsplit('/').next().unwrap_or(file),
                    folder: self.folder,
                };
                Ok(deid.apply(line, &scope)?)
            }
            None => Ok(line.to_string()),
        }
    }
}

/// The block being read: its lines (header first), not yet in the part.
struct PendingBlock {
    block: String,
    lines: Vec<String>,
    bytes: u64,
    last: Option<BlockPosition>,
}

/// Writes the task's next part from its checkpoint; `false`: nothing was left.
async fn write_part(
    context: &Context,
    job: &Job,
    held: &mut HeldTask,
    output: &Output<'_>,
    pages: &mut PageSource<'_>,
) -> Result<bool, TaskError> {
    let limit = i64::from(job.spec.part_size);
    let mut cut = PartCutter {
        part: None,
        pending: None,
        last_written: None,
        lines_cap: job.spec.part_size,
        bytes_cap: u64::try_from(job.spec.part_max_bytes).unwrap_or(u64::MAX),
    };
    let mut after = resume_position(held);
    loop {
        let mut conn = pages.connection(held).await?;
        let rows = blocks::page(&mut conn, &output.selection, &after, limit).await?;
        drop(conn);
        let exhausted = i64::try_from(rows.len()).unwrap_or(i64::MAX) < limit;
        for row in rows {
            after = row.position.clone();
            if let Some(continues) = cut.add(context, job, held, output, row).await? {
                return cut.commit(held, continues).await;
            }
        }
        if exhausted {
            cut.place_pending().await?;
            return cut.commit(held, false).await;
        }
    }
}

/// Where the task's next part starts: after its checkpoint, or before its first block.
fn resume_position(held: &HeldTask) -> BlockPosition {
    let task = &held.task;
    match (&task.checkpoint_block, task.parts_done) {
        (Some(block), parts) if parts > 0 => BlockPosition {
            block: block.clone(),
            after_patient: task.checkpoint_after_patient,
            seq: task.checkpoint_seq,
        },
        _ => BlockPosition::after_block(task.block_after.as_deref()),
    }
}

/// One part being filled with whole blocks.
struct PartCutter {
    part: Option<part::OpenPart>,
    pending: Option<PendingBlock>,
    /// The last row in the part.
    last_written: Option<BlockPosition>,
    lines_cap: i32,
    bytes_cap: u64,
}

impl PartCutter {
    /// Takes the next row. `Some(continues)`: the part is complete (ending inside a block when
    /// `continues`) and must be committed now.
    async fn add(
        &mut self,
        context: &Context,
        job: &Job,
        held: &HeldTask,
        output: &Output<'_>,
        row: BlockRow,
    ) -> Result<Option<bool>, TaskError> {
        let Some(out) = output.kept(&row)? else {
            return Ok(None);
        };
        let part = match &mut self.part {
            Some(part) => part,
            None => self
                .part
                .insert(part::open(context, job, held, KIND, held.task.parts_done).await?),
        };
        let file = part.name.clone();
        let line = output.line(&row, out, &file)?;
        if self.pending.as_ref().map(|b| &b.block) != Some(&row.position.block) {
            self.place_pending().await?;
            let header = output.header(&row.position.block, &file)?;
            self.pending = Some(PendingBlock {
                block: row.position.block.clone(),
                bytes: header.len() as u64 + 1,
                lines: vec![header],
                last: None,
            });
        }
        let (part_lines, part_bytes) = self
            .part
            .as_ref()
            .map_or((0, 0), |p| (i64::from(p.lines), p.bytes));
        let pending = self.pending.as_mut().expect("a block was just started");
        let lines = part_lines + pending.lines.len() as i64 + 1;
        let bytes = part_bytes + pending.bytes + line.len() as u64 + 1;
        if lines > i64::from(self.lines_cap) || bytes > self.bytes_cap {
            // The part holds whole blocks: the next block starts the next part.
            if part_lines > 0 {
                return Ok(Some(false));
            }
            // The block alone fills a part: it goes on in the next one, after its header.
            if pending.last.is_some() {
                self.place_pending().await?;
                return Ok(Some(true));
            }
            // One resource larger than a part goes alone.
        }
        pending.bytes += line.len() as u64 + 1;
        pending.lines.push(line);
        pending.last = Some(row.position);
        Ok(None)
    }

    /// Writes the block read so far into the part.
    async fn place_pending(&mut self) -> Result<(), TaskError> {
        let (Some(pending), Some(part)) = (self.pending.take(), self.part.as_mut()) else {
            return Ok(());
        };
        if pending.last.is_none() {
            return Ok(()); // a header alone: none of its rows were kept
        }
        for line in &pending.lines {
            part.write_line(line.as_bytes()).await?;
        }
        self.last_written = pending.last;
        Ok(())
    }

    /// Commits the part, if it got lines; `false`: there was none.
    async fn commit(self, held: &mut HeldTask, continues: bool) -> Result<bool, TaskError> {
        let (Some(part), Some(last)) = (self.part, self.last_written) else {
            return Ok(false);
        };
        let checkpoint = Checkpoint {
            seq: last.seq,
            version: 0,
            block: Some(last.block),
            after_patient: last.after_patient,
        };
        part.finish(held, checkpoint, continues).await?;
        Ok(true)
    }
}
