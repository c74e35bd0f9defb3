//! One output file of a task: its number reserved, its lines written, then committed only if
//! the lease still holds, and the task's checkpoint moved past it.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Context, Ended, TaskError, lease::Lease};
use crate::{
    db::{
        jobs::Job,
        tasks::{Checkpoint, Fenced, HeldTask, PartDone},
    },
    metrics,
    storage::{AttemptTag, PartWriter, spare::Buffer},
};

/// Lines are gathered into writes of about this many bytes.
const WRITE_CHUNK: usize = 1 << 20;

pub struct OpenPart {
    writer: Box<dyn PartWriter>,
    /// `{Type}`, `{Type}-deleted`, …: the metrics' `type`.
    kind: String,
    storage: &'static str,
    opened: Instant,
    /// Lines not yet handed to the writer.
    buffer: Buffer,
    /// The storage name, `{folder}/{kind}-{n}.ndjson`.
    pub name: String,
    /// The task's part number (the key of its reserved file number).
    seq: i32,
    pub lines: i32,
    pub bytes: u64,
}

/// Reserves the file number of the task's part `seq` (kept across retries) and creates the
/// file. A lost lease is a `Fenced::LeaseLost` error.
pub async fn open(
    context: &Context,
    job: &Job,
    held: &HeldTask,
    kind: &str,
    seq: i32,
) -> Result<OpenPart, TaskError> {
    let part_no = held.reserve_part(kind, seq).await?;
    let name = format!("{}/{kind}-{part_no}.ndjson", job.spec.folder);
    let owner = AttemptTag {
        task: held.task.id,
        attempt: held.task.attempt,
    };
    let writer = context
        .storage
        .create(&job.spec.container, &name, owner)
        .await?;
    Ok(OpenPart {
        writer,
        kind: kind.to_string(),
        storage: context.storage.kind(),
        opened: Instant::now(),
        buffer: {
            let mut buffer = Buffer::take();
            buffer.clear();
            buffer
        },
        name,
        seq,
        lines: 0,
        bytes: 0,
    })
}

impl OpenPart {
    /// Writes one ndjson line (the newline is added).
    pub async fn write_line(&mut self, line: &[u8]) -> Result<(), TaskError> {
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
        self.lines += 1;
        self.bytes += line.len() as u64 + 1;
        if self.buffer.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TaskError> {
        if !self.buffer.is_empty() {
            self.writer.write(&self.buffer).await?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Commits the file if the lease still holds, then checkpoints `last`. `continues`: the
    /// file ends inside a block that goes on in the task's next file.
    pub async fn finish(
        mut self,
        held: &mut HeldTask,
        last: Checkpoint,
        continues: bool,
    ) -> Result<(), TaskError> {
        self.flush().await?;
        // Why the fence said no stays here: a lost lease, or a database fault to retry.
        let mut refused: Option<Fenced> = None;
        let fence = Box::pin(async {
            match held.holds().await {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            }
        });
        let committed = self.writer.commit(fence).await?;
        if let Some(why) = refused {
            return Err(why.into());
        }
        if !committed {
            return Err(TaskError::LeaseLost);
        }
        let done = PartDone {
            resources: self.lines,
            bytes: i64::try_from(self.bytes).unwrap_or(i64::MAX),
            continues,
        };
        held.checkpoint(self.seq, last, done).await?;
        metrics::part_written(
            &self.kind,
            self.storage,
            self.lines as u64,
            self.bytes,
            self.opened.elapsed(),
        );
        Ok(())
    }
}

/// A task that writes its output one part at a time, each from the task's checkpoint.
pub(super) trait PartByPart {
    /// Writes and commits the task's next part; `false`: nothing was left.
    async fn next_part(&mut self, held: &mut HeldTask) -> Result<bool, TaskError>;
}

/// Runs a task part by part until nothing is left, then finishes it (completing the job when it
/// was the last). Stops when the lease is lost, and gives the task back on shutdown; pauses
/// `export.throttle_ms` after each part.
pub(super) async fn write_parts(
    context: &Context,
    job: &Job,
    held: &mut HeldTask,
    lease: &Lease,
    shutdown: &CancellationToken,
    task: &mut impl PartByPart,
) -> Result<Ended, TaskError> {
    let throttle = Duration::from_millis(context.config.export.throttle_ms);
    loop {
        if lease.is_lost() {
            return Ok(Ended::LeaseLost);
        }
        if shutdown.is_cancelled() {
            held.release().await?;
            return Ok(Ended::Released);
        }
        if !task.next_part(held).await? {
            break;
        }
        lease.moved();
        if !throttle.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(throttle) => {}
                _ = lease.lost() => return Ok(Ended::LeaseLost),
            }
        }
    }
    if held.finish(&[], context.retention()).await? {
        context.log_end(job.id, "completed").await;
    }
    Ok(Ended::Done)
}
