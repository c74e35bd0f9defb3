//! An export's output files, streamed from the storage to the job's client.

use super::{Error, Exporter};
use crate::{
    auth::Principal,
    db::jobs::{self, JobState},
    storage::ByteStream,
};

impl Exporter {
    /// The bytes of `file` (`Type-n.ndjson`) of a job the caller may see: a completed job's,
    /// or one a manifest page already lists.
    pub async fn file(
        &self,
        principal: &Principal,
        id: &str,
        file: &str,
    ) -> Result<ByteStream, Error> {
        let job = self.visible_job(principal, id).await?;
        let no_file = || Error::NotFound(format!("export {id} has no file '{file}'"));
        let (resource_type, part_no) = file
            .strip_suffix(".ndjson")
            .and_then(|stem| stem.rsplit_once('-'))
            .and_then(|(t, n)| Some((t, n.parse::<i32>().ok()?)))
            .ok_or_else(no_file)?;
        // A running job's files are there once a manifest page lists them.
        let ready = match job.status {
            JobState::Completed => {
                jobs::has_part(&self.pool, job.id, resource_type, part_no, false).await?
            }
            JobState::Running | JobState::Queued if job.spec.allow_partial_manifests => {
                jobs::has_part(&self.pool, job.id, resource_type, part_no, true).await?
            }
            _ => false,
        };
        if !ready {
            return Err(no_file());
        }
        let name = format!("{}/{file}", job.spec.folder);
        self.storage
            .read(&job.spec.container, &name)
            .await?
            .ok_or_else(no_file)
    }
}
