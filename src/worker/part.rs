//! One output file of a task: its number reserved, its lines written, then committed only if
//! the lease still holds, and the task's checkpoint moved past it.

use super::Context;
use crate::{
    db::jobs::{self, Job, Task},
    storage::PartWriter,
};

pub struct OpenPart {
    writer: Box<dyn PartWriter>,
    /// The storage name, `{folder}/{kind}-{n}.ndjson`.
    pub name: String,
    /// The task's part number (the key of its reserved file number).
    seq: i32,
    pub lines: i32,
    pub bytes: u64,
}

/// Reserves the file number of the task's part `seq` (kept across retries) and creates the
/// file. None: the lease is lost.
pub async fn open(
    context: &Context,
    job: &Job,
    task: &Task,
    kind: &str,
    seq: i32,
) -> anyhow::Result<Option<OpenPart>> {
    let Some(part_no) = jobs::reserve_part(&context.pool, task, kind, seq).await? else {
        return Ok(None);
    };
    let name = format!("{}/{kind}-{part_no}.ndjson", job.folder);
    let writer = context.storage.create(&job.container, &name).await?;
    Ok(Some(OpenPart {
        writer,
        name,
        seq,
        lines: 0,
        bytes: 0,
    }))
}

impl OpenPart {
    /// Writes one ndjson line (the newline is added).
    pub async fn write_line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        self.writer.write(line).await?;
        self.writer.write(b"\n").await?;
        self.lines += 1;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    /// Commits the file if the lease still holds, then checkpoints `last` (seq, version).
    /// `false`: the lease is lost and nothing was recorded.
    pub async fn finish(
        self,
        context: &Context,
        task: &Task,
        last: (i64, i32),
    ) -> anyhow::Result<bool> {
        let (pool, task_id, attempt) = (context.pool.clone(), task.id, task.attempt);
        let fence = Box::pin(async move { Ok(jobs::holds_lease(&pool, task_id, attempt).await?) });
        if !self.writer.commit(fence).await? {
            return Ok(false);
        }
        let bytes = self.bytes as i64;
        Ok(jobs::checkpoint(&context.pool, task, self.seq, last, self.lines, bytes).await?)
    }
}
