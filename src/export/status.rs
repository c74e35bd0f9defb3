//! A job as its client sees it: in progress (with a short progress line), done (its manifest)
//! or failed; and cancelled on request.

use chrono::Utc;
use uuid::Uuid;

use super::{
    Error, Exporter,
    manifest::{Item, Manifest},
    require_export,
};
use crate::{
    auth::{Principal, config::AuthMode},
    config::OutputUrls,
    db::{
        jobs::{self, Canceller, Job, JobState},
        parts::{self, Part},
        tasks,
    },
    storage,
};

/// A status request's answer: the job's status, and how the client asked to be told it.
pub struct StatusReport {
    pub status: Status,
    /// `Prefer: separate-export-status` at kick-off.
    pub separate_status: bool,
}

pub enum Status {
    /// Queued or running (a cancelled job keeps answering so until it is gone); with
    /// `allowPartialManifests=true`, a manifest page of the files complete so far.
    InProgress {
        progress: String,
        manifest: Option<Manifest>,
    },
    Completed(Manifest),
    /// The cause is in the server log under this id.
    Failed {
        correlation: Option<Uuid>,
    },
}

fn job_not_found(id: &str) -> Error {
    Error::NotFound(format!(
        "no export job {id} (it may have been cancelled or expired)"
    ))
}

/// A job id from a URL: anything but a UUID names no job.
pub fn job_id(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| job_not_found(id))
}

impl Exporter {
    /// The job, if the caller owns it (another client's job is as good as unknown: 404) and
    /// the caller's token still covers what it exports (403 otherwise: the IG has status and
    /// files need a token that allows the exported resources).
    pub async fn visible_job(&self, principal: &Principal, id: &str) -> Result<Job, Error> {
        let job = jobs::visible(&self.pool, job_id(id)?, principal.client_id.as_deref())
            .await?
            .ok_or_else(|| job_not_found(id))?;
        if job.spec.types.is_empty() && !principal.scopes.exports_every_type() {
            return Err(Error::Forbidden(
                "this export is of every resource type; the granted scopes do not cover them all"
                    .into(),
            ));
        }
        for resource_type in &job.spec.types {
            require_export(principal, resource_type)?;
        }
        Ok(job)
    }

    /// The job's status; `page`: a page of a paged manifest (`allowPartialManifests=true`),
    /// the first when not given.
    pub async fn status(
        &self,
        principal: &Principal,
        id: &str,
        page: Option<i32>,
    ) -> Result<StatusReport, Error> {
        let job = self.visible_job(principal, id).await?;
        let paged = job.spec.allow_partial_manifests;
        if page.is_some() && !paged {
            return Err(Error::NotFound(format!(
                "export {id} has one manifest, without pages (kick off with \
                 allowPartialManifests=true for pages)"
            )));
        }
        let page = page.unwrap_or(1);
        let status = match job.status {
            JobState::Completed if paged => {
                Status::Completed(match self.manifest_page(&job, page).await? {
                    Some(manifest) => manifest,
                    None => self.manifest_of(&job, &[]).await?,
                })
            }
            JobState::Completed => {
                let parts = parts::parts(&self.pool, job.id).await?;
                Status::Completed(self.manifest_of(&job, &parts).await?)
            }
            JobState::Failed => Status::Failed {
                correlation: job.error_id,
            },
            JobState::Queued | JobState::Running | JobState::Cancelled => {
                let progress = jobs::progress(&self.pool, job.id).await?;
                let manifest = match paged && job.status != JobState::Cancelled {
                    true => self.manifest_page(&job, page).await?,
                    false => None,
                };
                Status::InProgress {
                    progress: progress_text(&job, &progress),
                    manifest,
                }
            }
        };
        Ok(StatusReport {
            status,
            separate_status: job.spec.separate_status,
        })
    }

    /// The manifest that lists `parts` of `job`.
    pub(super) async fn manifest_of(&self, job: &Job, parts: &[Part]) -> Result<Manifest, Error> {
        let urls = self.file_urls(job, parts).await?;
        let url_of: std::collections::HashMap<(&str, i32), &String> = parts
            .iter()
            .map(|p| (p.resource_type.as_str(), p.part_no))
            .zip(&urls)
            .collect();
        let (mut output, mut deleted, mut error) = (Vec::new(), Vec::new(), Vec::new());
        for (p, url) in parts.iter().zip(&urls) {
            // File kinds: `Type`, `Type-history`, `Type-softdeleted` (resources), `Type-deleted`
            // (transaction Bundles of deletions), `OperationOutcome-error` (what was ignored).
            let (list, entry_type) = match p.resource_type.split_once('-') {
                Some((_, "deleted")) => (&mut deleted, "Bundle"),
                Some((t, "error")) => (&mut error, t),
                Some((t, _)) => (&mut output, t),
                None => (&mut output, p.resource_type.as_str()),
            };
            let continues_in = p
                .continues_in
                .and_then(|n| url_of.get(&(p.resource_type.as_str(), n)))
                .map(|url| url.to_string());
            list.push(Item {
                resource_type: entry_type.to_string(),
                url: url.clone(),
                count: i64::from(p.resources),
                continues_in,
            });
        }
        let mode = self.config.export.output_urls;
        // Server URLs need the API's token when auth is on; raw blob URLs the client's own
        // storage access; signed and SAS URLs carry their own signature.
        let requires_access_token = match mode {
            OutputUrls::Server => self.auth_mode != AuthMode::None,
            OutputUrls::Blob => true,
            OutputUrls::Sas | OutputUrls::Signed => false,
        };
        Ok(Manifest {
            transaction_time: job.spec.transaction_time,
            request: job.spec.request_url.clone(),
            requires_access_token,
            output,
            deleted: job.spec.since.map(|_| deleted),
            error,
            de_identified_with: job.spec.anonymization_name.clone(),
            expires: job.expires_at,
            organized_by: job.spec.organize_by.clone(),
            next: None,
        })
    }

    /// The URLs of a job's files: the server's own, or the storage's (signed for each
    /// manifest request, living at most the storage's signed URL lifetime and never past the job).
    async fn file_urls(&self, job: &Job, parts: &[Part]) -> Result<Vec<String>, Error> {
        let files = parts
            .iter()
            .map(|p| format!("{}-{}.ndjson", p.resource_type, p.part_no));
        let mode = self.config.export.output_urls;
        match mode {
            OutputUrls::Server => {
                return Ok(files
                    .map(|f| format!("{}/export/{}/{f}", self.base_url, job.id))
                    .collect());
            }
            OutputUrls::Signed => {
                let lifetime =
                    i64::try_from(self.config.export.signed_url_lifetime_secs).unwrap_or(i64::MAX);
                let expires = Utc::now().timestamp().saturating_add(lifetime);
                return Ok(files
                    .map(|f| {
                        let signature = self.url_signer.sign(job.id, &f, expires);
                        format!(
                            "{}/export-files/{}/{f}?expires={expires}&signature={signature}",
                            self.base_url, job.id
                        )
                    })
                    .collect());
            }
            OutputUrls::Blob | OutputUrls::Sas => {}
        }
        let lifetime = chrono::TimeDelta::seconds(
            i64::try_from(self.config.storage.signed_url_lifetime_secs()).unwrap_or(i64::MAX),
        );
        let expires = job
            .expires_at
            .unwrap_or_else(Utc::now)
            .min(Utc::now() + lifetime);
        let names: Vec<String> = files.map(|f| format!("{}/{f}", job.spec.folder)).collect();
        self.storage
            .direct_urls(
                &job.spec.container,
                &names,
                mode == OutputUrls::Sas,
                expires,
            )
            .await?
            .ok_or_else(|| {
                Error::Internal(anyhow::anyhow!("the storage gives no direct file URLs"))
            })
    }

    /// Cancels a job and deletes its files.
    pub async fn cancel(&self, id: Uuid, by: Canceller<'_>) -> Result<(), Error> {
        // Files are swept once more after a stale period, for a worker cut off mid-write.
        let files = jobs::cancel(&self.pool, id, by, self.config.stale_after())
            .await?
            .ok_or_else(|| job_not_found(&id.to_string()))?;
        storage::delete_export(
            &*self.storage,
            &files.container,
            &files.folder,
            files.own_container,
        )
        .await?;
        tracing::info!(job = %id, by = ?by, "export cancelled");
        match jobs::summary(&self.pool, id).await {
            Ok(Some(summary)) => crate::telemetry::job_ended(&summary, "cancelled"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "reading a cancelled job's summary failed");
            }
        }
        Ok(())
    }
}

/// A short progress line (IG: under 100 characters).
fn progress_text(job: &Job, p: &jobs::Progress) -> String {
    if job.status == JobState::Queued {
        return "queued".into();
    }
    if p.tasks == 0 {
        return match (p.waiting_writers, p.standby_behind_bytes) {
            (0, None) => "planning".into(),
            (0, Some(tasks::STANDBY_NOT_ANSWERING)) => {
                "planning: waiting for the read standby, which does not answer".into()
            }
            (0, Some(bytes)) => format!(
                "planning: waiting for the read standby to replay the snapshot ({} kB behind)",
                (bytes + 1023) / 1024
            ),
            (1, _) => "planning: waiting for 1 write transaction open since kick-off".into(),
            (n, _) => format!("planning: waiting for {n} write transactions open since kick-off"),
        };
    }
    let percent = if p.estimate > 0 {
        (p.resources_done * 100 / p.estimate).min(99)
    } else {
        0
    };
    let mut text = format!("{percent}%, {} files written", p.parts);
    if p.primary_fallbacks > 0 {
        text.push_str("; read standby behind or down: reading from the primary");
    }
    if !p.running_types.is_empty() {
        text.push_str(&format!("; exporting {}", p.running_types.join(", ")));
    }
    if text.len() > 99 {
        let cut = (0..=96)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}
