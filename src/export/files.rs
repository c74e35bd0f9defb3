//! An export's output files, streamed from the storage to the job's client.

use uuid::Uuid;

use super::{Error, Exporter, status::job_id};
use crate::{
    auth::Principal,
    db::{
        jobs::{self, Job, JobState},
        parts,
    },
    storage::ByteStream,
};

/// A signed file link (`export.output_urls = "signed"`): its expiry and signature.
pub struct FileLink<'a> {
    pub expires: i64,
    pub signature: &'a str,
}

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
        self.job_file(&job, file).await
    }

    /// The bytes of `file` through a signed link: no token, the signature is the leave.
    pub async fn linked_file(
        &self,
        id: &str,
        file: &str,
        link: FileLink<'_>,
    ) -> Result<ByteStream, Error> {
        let job: Uuid = job_id(id)?;
        let valid = self
            .url_signer
            .verify(job, file, link.expires, link.signature);
        if !valid || link.expires <= chrono::Utc::now().timestamp() {
            return Err(Error::Forbidden(
                "this file link has expired or is not valid; fetch the manifest again for new \
                 links"
                    .into(),
            ));
        }
        let job = jobs::get(&self.pool, job)
            .await?
            .filter(|j| j.status != JobState::Cancelled)
            .ok_or_else(|| Error::NotFound(format!("no export job {id}")))?;
        self.job_file(&job, file).await
    }

    async fn job_file(&self, job: &Job, file: &str) -> Result<ByteStream, Error> {
        let id = job.id;
        let no_file = || Error::NotFound(format!("export {id} has no file '{file}'"));
        let (resource_type, part_no) = file
            .strip_suffix(".ndjson")
            .and_then(|stem| stem.rsplit_once('-'))
            .and_then(|(t, n)| Some((t, n.parse::<i32>().ok()?)))
            .ok_or_else(no_file)?;
        // A running job's files are there once a manifest page lists them.
        let ready = match job.status {
            JobState::Completed => {
                parts::has_part(&self.pool, job.id, resource_type, part_no, false).await?
            }
            JobState::Running | JobState::Queued if job.spec.allow_partial_manifests => {
                parts::has_part(&self.pool, job.id, resource_type, part_no, true).await?
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
